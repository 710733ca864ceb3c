#!/usr/bin/env bash
# Build the Debian package of ailfmd and check it with lintian.
# Usage: tools/build-deb.sh [OUTDIR]     (default: dist/)
# Installs the build dependencies with apt when they are missing (sudo when not root).
# Environment: DEB_BUILD_OPTIONS is passed on (e.g. nocheck); LINTIAN=0 skips lintian.
# Details and design: docs/packaging.md.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
outdir="${1:-$root/dist}"
mkdir -p "$outdir"
outdir="$(cd "$outdir" && pwd)"
start=$(date +%s)

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
apt_updated=""
# apt-get with its output on stderr, so that stdout carries only the path of the .deb.
apt_get() {
    if [ -z "$apt_updated" ]; then
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
        apt_updated=1
    fi
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get "$@" -y -q --no-install-recommends >&2
}

# The tools that read debian/control: dpkg-dev (dpkg-buildpackage, dpkg-checkbuilddeps), lintian.
base=()
command -v dpkg-buildpackage >/dev/null || base+=(dpkg-dev)
command -v lintian >/dev/null || base+=(lintian)
if [ ${#base[@]} -gt 0 ]; then
    echo "build-deb: installing ${base[*]}" >&2
    apt_get install "${base[@]}"
fi

# A clean copy of exactly what the package is built from. Nothing else of the
# working tree (.venv, .run, dist, bench results, tests and their fixtures, caches)
# is seen by the build. tar copies symlinks as symlinks and never follows them.
work="$(mktemp -d "${TMPDIR:-/tmp}/ailfmd-deb.XXXXXX")"
trap 'rm -rf "$work"' EXIT
src="$work/ailfmd"
mkdir -p "$src"
(cd "$root" && tar -cf - \
    --exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info' \
    --exclude=packaging/debian \
    ailfmd pyproject.toml README.md docs systemd policies packaging) | tar -xf - -C "$src"
cp -a "$root/packaging/debian" "$src/debian"

# Build dependencies from debian/control; apt-get installs only what is missing.
if ! (cd "$src" && dpkg-checkbuilddeps >/dev/null 2>&1); then
    echo "build-deb: installing build dependencies from packaging/debian/control" >&2
    apt_get build-dep "$src"
fi

version="$(cd "$src" && dpkg-parsechangelog -S Version)"
echo "build-deb: building ailfmd $version" >&2
# Debian's python3 only: a virtualenv, pyenv or other python3 earlier on PATH would
# build against modules the package does not depend on.
(cd "$src" && env -u PYTHONPATH -u PYTHONHOME -u VIRTUAL_ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    dpkg-buildpackage -b -us -uc) >"$work/build.log" 2>&1 || {
    cat "$work/build.log" >&2
    echo "build-deb: dpkg-buildpackage failed (log above)" >&2
    exit 1
}

debs=("$work"/ailfmd_"$version"_*.deb)
[ -f "${debs[0]}" ] || { cat "$work/build.log" >&2; echo "build-deb: no .deb produced" >&2; exit 1; }
for deb in "${debs[@]}"; do
    mv -f "$deb" "$outdir/"
done
deb="$outdir/$(basename "${debs[0]}")"

if [ "${LINTIAN:-1}" != 0 ]; then
    # Errors fail the build; warnings are printed (each one is explained in docs/packaging.md).
    lintian --fail-on error --display-info --tag-display-limit 0 "$deb" >&2 || {
        echo "build-deb: lintian reports errors" >&2
        exit 1
    }
fi

echo "build-deb: $deb built in $(( $(date +%s) - start )) s" >&2
echo "$deb"
