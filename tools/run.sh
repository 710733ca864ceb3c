#!/usr/bin/env bash
# Install ailfmd into ./.venv and run the daemon on the built-in simulated chip (works on
# any machine: no sensors or root needed). Ctrl-C stops it and restores every setting.
# Extra arguments go to ailfmd (e.g. --workload bursty --policy linux --mode observe).
# The daemon refuses a policy file others may write; a checkout made with umask 002 has
# group-writable files, so the policy is copied into the run dir with mode 0644 first.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/bootstrap.sh
run_dir="$PWD/.run"
port="${AILFMD_METRICS_PORT:-9747}"
mkdir -p "$run_dir"
install -m 0644 policies/default.onnx "$run_dir/default.onnx"
cat >&2 <<MSG
== ailfmd on the simulated 64-core 3D chip (3d-64), enforcing, learned policy policies/default.onnx
   metrics:  http://127.0.0.1:$port/metrics
   status:   .venv/bin/ailfmctl status --socket $run_dir/control.sock
   explain:  .venv/bin/ailfmctl explain --socket $run_dir/control.sock
   this box: .venv/bin/ailfmctl sensors
MSG
exec .venv/bin/ailfmd --config /dev/null --platform sim --mode enforce --policy "$run_dir/default.onnx" \
    --run-dir "$run_dir" --metrics-port "$port" "$@"
