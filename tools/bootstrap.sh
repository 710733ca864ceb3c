#!/usr/bin/env bash
# Install what ailfmd needs on a Debian/Ubuntu machine into ./.venv.
# Usage: tools/bootstrap.sh [EXTRA...]   (extras from pyproject.toml, e.g. test)
set -euo pipefail
cd "$(dirname "$0")/.."

extras="systemd${1:+,$(IFS=,; echo "$*")}"

need_pkgs=()
command -v python3 >/dev/null || need_pkgs+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_pkgs+=(python3-venv)
# systemd-python builds against libsystemd.
dpkg -s libsystemd-dev >/dev/null 2>&1 || need_pkgs+=(libsystemd-dev)
command -v pkg-config >/dev/null || need_pkgs+=(pkg-config)
command -v gcc >/dev/null || need_pkgs+=(gcc)
python3 - <<'PY' 2>/dev/null || need_pkgs+=(python3-dev)
import sysconfig, os, sys
sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")) else 1)
PY

if [ ${#need_pkgs[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "bootstrap: installing Debian packages: ${need_pkgs[*]}" >&2
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_pkgs[@]}"
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[${extras}]"
