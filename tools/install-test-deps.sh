#!/usr/bin/env bash
# Install the Debian packages the service tests drive as real programs.
#   prometheus  - the server (scrape test) and promtool (`promtool check metrics`)
# Idempotent: does nothing when every tool is already on PATH.
# Usage: tools/install-test-deps.sh
set -euo pipefail

# tool on PATH -> Debian package that provides it
declare -A provider=(
    [prometheus]=prometheus
    [promtool]=prometheus
)

missing=()
for tool in "${!provider[@]}"; do
    command -v "$tool" >/dev/null 2>&1 && continue
    pkg="${provider[$tool]}"
    [[ " ${missing[*]-} " == *" $pkg "* ]] || missing+=("$pkg")
done

if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "install-test-deps: installing Debian packages: ${missing[*]}" >&2
$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q
# Recommends would pull in prometheus-node-exporter, which the tests do not use.
$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"

for tool in "${!provider[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || { echo "install-test-deps: $tool still missing" >&2; exit 1; }
done
