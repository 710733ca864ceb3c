#!/usr/bin/env bash
# End-to-end system test: build the .deb, boot a Debian bookworm guest with
# systemd-nspawn --boot, install the package, manage a real workload unit, check it,
# stop, check everything was restored. One PASS/FAIL line per check; exit 0 only
# when every check passed. Needs root. Details: docs/e2e.md.
#
# Usage: tools/e2e.sh [--keep]      (--keep: leave the private guest tree for inspection)
# Environment:
#   AILFMD_E2E_CACHE    cache dir for the pristine guest tarball (/var/cache/ailfmd-e2e)
#   AILFMD_E2E_TIMEOUT  overall timeout in seconds (1500)
#   AILFMD_E2E_MIRROR   Debian mirror for debootstrap (http://deb.debian.org/debian)
#   AILFMD_E2E_REBUILD  1: rebuild the cached guest even if a tarball exists
#   AILFMD_E2E_DROPIN   a file installed as a drop-in for ailfmd.service in the guest
#                       (to try a unit change; the test of the shipped unit sets none)
#   LINTIAN             passed to tools/build-deb.sh (0 skips lintian)
#   AILFMD_E2E_ENV_SKIP 1: when this machine cannot host the test (host tools cannot be
#                       installed, the Debian mirror cannot be reached, the guest does
#                       not boot: all before anything of ailfmd is installed), print SKIP
#                       and exit 77 instead of failing. CI sets it.
set -uo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
timeout_s="${AILFMD_E2E_TIMEOUT:-1500}"

# Overall timeout: run the rest under timeout(1); SIGTERM reaches the trap below.
if [ -z "${AILFMD_E2E_INNER:-}" ]; then
    AILFMD_E2E_INNER=1 timeout --foreground --kill-after=60 "$timeout_s" "$0" "$@"
    rc=$?
    [ "$rc" -eq 124 ] && echo "FAIL overall timeout (${timeout_s} s)"
    exit "$rc"
fi

keep=0
[ "${1:-}" = "--keep" ] && keep=1
cache="${AILFMD_E2E_CACHE:-/var/cache/ailfmd-e2e}"
mirror="${AILFMD_E2E_MIRROR:-http://deb.debian.org/debian}"
suite=bookworm
# minbase + systemd as init + the package's Depends (and Recommends python3-systemd)
# + Prometheus (scrape, promtool) + curl.
packages="systemd,systemd-sysv,dbus,python3,python3-numpy,python3-psutil,python3-pyudev,python3-prometheus-client,python3-systemd,adduser,prometheus,curl"
cache_key="$(printf '%s %s %s v1' "$suite" "$packages" "$(dpkg --print-architecture)" | sha256sum | cut -c1-12)"
tarball="$cache/$suite-$cache_key.tar.zst"

start_all=$(date +%s)
failed=0
pass() { echo "PASS $1"; }
fail() { echo "FAIL $1${2:+: $2}"; failed=1; }
# The machine cannot host the test (nothing of ailfmd involved yet).
env_fail() {
    if [ "${AILFMD_E2E_ENV_SKIP:-0}" = 1 ]; then echo "SKIP $1${2:+: $2}"; exit 77; fi
    fail "$@"; exit 1
}
log() { echo "e2e: $*" >&2; }
elapsed() { echo "$(( $(date +%s) - start_all )) s"; }

[ "$(id -u)" -eq 0 ] || env_fail "running as root" "systemd-nspawn and debootstrap need root"

work="$(mktemp -d "${TMPDIR:-/tmp}/ailfmd-e2e.XXXXXX")"
nspawn_pid=""
machine="ailfmd-e2e-$$-$(date +%s)"
cleanup() {
    trap - EXIT INT TERM
    if [ -n "$nspawn_pid" ] && kill -0 "$nspawn_pid" 2>/dev/null; then
        # SIGRTMIN+4 to the guest's init asks for a clean poweroff; nspawn then exits.
        [ -n "${leader:-}" ] && kill -s RTMIN+4 "$leader" 2>/dev/null
        for _ in $(seq 1 30); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 0.5; done
        kill -TERM "$nspawn_pid" 2>/dev/null
        for _ in $(seq 1 20); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 0.5; done
        kill -KILL "$nspawn_pid" 2>/dev/null
        wait "$nspawn_pid" 2>/dev/null
    fi
    if [ "$keep" -eq 1 ]; then
        log "kept $work"
    else
        rm -rf --one-file-system "$work"
    fi
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

need_apt=()
command -v debootstrap >/dev/null || need_apt+=(debootstrap)
command -v systemd-nspawn >/dev/null || need_apt+=(systemd-container)
command -v zstd >/dev/null || need_apt+=(zstd)
if [ ${#need_apt[@]} -gt 0 ]; then
    log "installing ${need_apt[*]}"
    { DEBIAN_FRONTEND=noninteractive apt-get update -q &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need_apt[@]}"; } >&2 ||
        env_fail "host tools (${need_apt[*]})" "apt-get failed"
fi

# --- 1. the package -----------------------------------------------------------------
t=$(date +%s)
if deb="$("$root/tools/build-deb.sh" "$work/deb" 2>"$work/build-deb.log")" && [ -f "$deb" ]; then
    pass "build .deb ($(basename "$deb"), $(( $(date +%s) - t )) s)"
else
    tail -n 40 "$work/build-deb.log" >&2
    fail "build .deb" "see the log above"
    exit 1
fi

# --- 2. the guest tree: cached pristine tarball -------------------------------------
t=$(date +%s)
mkdir -p "$cache"
(
    flock 9
    if [ "${AILFMD_E2E_REBUILD:-0}" = 1 ] || [ ! -s "$tarball" ]; then
        log "debootstrap $suite into the cache (first run only)"
        build="$cache/build.$$"
        rm -rf --one-file-system "$build"
        debootstrap --variant=minbase --include="$packages" "$suite" "$build" "$mirror" >"$work/debootstrap.log" 2>&1 || {
            tail -n 30 "$work/debootstrap.log" >&2; rm -rf --one-file-system "$build"; exit 1; }
        chroot "$build" apt-get clean >/dev/null 2>&1
        tar -C "$build" --numeric-owner --xattrs -I 'zstd -T0 -3' -cf "$tarball.tmp" . &&
            mv -f "$tarball.tmp" "$tarball" || { rm -rf --one-file-system "$build" "$tarball.tmp"; exit 1; }
        rm -rf --one-file-system "$build"
    fi
) 9>"$cache/lock"
if [ $? -ne 0 ] || [ ! -s "$tarball" ]; then
    env_fail "guest tree (debootstrap $suite from $mirror)" "see the log above"
fi
pass "guest tree ready ($(basename "$tarball"), $(( $(date +%s) - t )) s)"

t=$(date +%s)
guest="$work/root"
mkdir -p "$guest"
tar -C "$guest" --numeric-owner --xattrs -I zstd -xf "$tarball" || { fail "unpack guest tree"; exit 1; }
# Files the test brings into the guest.
mkdir -p "$guest/root/e2e"
cp "$deb" "$root/tools/lfm_workload.py" "$root/tests/e2e/guest_check.py" "$guest/root/e2e/"
# Scrape ailfmd every second with the guest's Prometheus (started at boot by its unit).
cat >"$guest/etc/prometheus/prometheus.yml" <<'EOF'
global:
  scrape_interval: 1s
  evaluation_interval: 15s
scrape_configs:
  - job_name: ailfmd
    static_configs:
      - targets: ["127.0.0.1:9747"]
EOF
# No login prompt on the console: nspawn's stdin is /dev/null.
for u in console-getty.service getty@tty1.service; do
    ln -sf /dev/null "$guest/etc/systemd/system/$u"
done
echo "$machine" >"$guest/etc/hostname"
if [ -n "${AILFMD_E2E_DROPIN:-}" ]; then
    mkdir -p "$guest/etc/systemd/system/ailfmd.service.d"
    cp "$AILFMD_E2E_DROPIN" "$guest/etc/systemd/system/ailfmd.service.d/50-e2e.conf"
    echo "INFO ailfmd.service drop-in from $AILFMD_E2E_DROPIN: $(tr '\n' ' ' <"$AILFMD_E2E_DROPIN")"
fi
pass "private guest tree unpacked ($(( $(date +%s) - t )) s)"

# --- 3. boot -------------------------------------------------------------------------
register=()
# Without systemd as the host's init (containers, some CI runners) there is neither
# systemd-machined to register with nor a manager to create a scope unit in.
if [ ! -d /run/systemd/system ]; then
    register=(--register=no --keep-unit)
elif ! systemctl is-active -q systemd-machined 2>/dev/null; then
    register=(--register=no)
fi
t=$(date +%s)
setsid systemd-nspawn --boot --quiet --directory="$guest" --machine="$machine" "${register[@]}" \
    --private-network --console=pipe --kill-signal=SIGRTMIN+3 \
    </dev/null >"$work/nspawn.log" 2>&1 &
nspawn_pid=$!

# The guest's init: a descendant of nspawn whose pid in its own namespace is 1.
leader=""
for _ in $(seq 1 120); do
    kill -0 "$nspawn_pid" 2>/dev/null || break
    for p in $(pgrep -P "$nspawn_pid") $(for c in $(pgrep -P "$nspawn_pid"); do pgrep -P "$c"; done); do
        if grep -Eq '^NSpid:[[:space:]]+[0-9]+[[:space:]]+1$' "/proc/$p/status" 2>/dev/null; then
            leader=$p; break 2
        fi
    done
    sleep 0.25
done
if [ -z "$leader" ]; then
    tail -n 40 "$work/nspawn.log" >&2
    env_fail "guest booted" "no init process found (nspawn log above)"
fi

# Run a command inside the guest: all of its namespaces, its root, a clean environment.
guest_exec=(nsenter --target "$leader" --mount --uts --ipc --net --pid --cgroup --root --wd=/ --
    /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    HOME=/root LANG=C.UTF-8 TERM=dumb SYSTEMD_PAGER=)
in_guest() { "${guest_exec[@]}" "$@"; }

state=""
for _ in $(seq 1 30); do
    state="$(timeout 120 "${guest_exec[@]}" systemctl is-system-running --wait 2>/dev/null)"
    case "$state" in running|degraded) break ;; esac
    sleep 1
done
case "$state" in
running)
    pass "guest booted: is-system-running=running ($(( $(date +%s) - t )) s)" ;;
degraded)
    pass "guest booted: is-system-running=degraded ($(( $(date +%s) - t )) s)"
    echo "INFO failed units in the guest: $(in_guest systemctl --failed --plain --no-legend | awk '{print $1}' | xargs)" ;;
*)
    tail -n 40 "$work/nspawn.log" >&2
    env_fail "guest booted" "is-system-running=${state:-no answer}" ;;
esac

# --- 4. the checks inside the guest ----------------------------------------------------
t=$(date +%s)
in_guest /usr/bin/python3 /root/e2e/guest_check.py /root/e2e
rc=$?
[ "$rc" -eq 0 ] || failed=1
log "guest checks took $(( $(date +%s) - t )) s"

# --- 5. cleanup (trap) and verdict ---------------------------------------------------------
if [ "$failed" -eq 0 ]; then
    echo "PASS e2e ($(elapsed))"
    exit 0
fi
echo "FAIL e2e ($(elapsed))"
exit 1
