#!/usr/bin/env bash
# Install everything the tests need and run them. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/bootstrap.sh test
tools/install-test-deps.sh
exec .venv/bin/python -m pytest "$@"
