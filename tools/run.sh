#!/usr/bin/env bash
# Install ailfmd into ./.venv and run the main job on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/bootstrap.sh
echo "== ailfmctl sensors: what ailfmd reads on this machine" >&2
.venv/bin/ailfmctl sensors "$@"
