#!/usr/bin/python3
"""The checks of the end-to-end test that run inside the booted guest (tools/e2e.sh).

Runs as root in the guest with Debian's python3 and nothing else from the repository.
Prints one ``PASS <check>`` or ``FAIL <check>: <why>`` line per check and exits 0 only
when every check passed. Described in docs/e2e.md.

Usage: guest_check.py DIR   (DIR holds ailfmd_*.deb and lfm_workload.py)
"""
from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request

WORKLOAD_UNIT = "lfm-workload.service"
WORKLOAD_THREADS = 3
METRICS_URL = "http://127.0.0.1:9747/metrics"
PROMETHEUS_URL = "http://127.0.0.1:9090"
# Longer than the unit's WatchdogSec=30s: a daemon that stopped pinging would have been
# killed and restarted by now.
WATCHDOG_OBSERVE_S = 40.0
CONFIG = """\
# Written by the end-to-end test (tests/e2e/guest_check.py).
[daemon]
mode = "enforce"
epoch_ms = 200
log_level = "info"

[platform]
# The guest's own sysfs/procfs: a container has no temperature sensors it may use and
# no writable cpufreq, so the daemon runs placement only and leaves frequencies alone.
kind = "linux"
cgroupfs_root = "{cgroupfs_root}"

[targets]
systemd_units = ["lfm-workload.service"]

[policy]
# hotpotato pins every new thread to the least-loaded CPU, without temperatures.
kind = "baseline"
baseline = "hotpotato"
fallback = "stepwise"

[metrics]
enabled = true
listen_address = "127.0.0.1"
port = 9747

[telemetry]
# Under the unit's ProtectSystem=strict only its StateDirectory (/var/lib/ailfmd) is
# writable: the recording proves that works.
path = "/var/lib/ailfmd/telemetry.rec"
every_epochs = 5
"""
TELEMETRY = "/var/lib/ailfmd/telemetry.rec"

failures: list[str] = []


def check(name: str, ok: bool, why: str = "") -> bool:
    if ok:
        print(f"PASS {name}", flush=True)
    else:
        print(f"FAIL {name}: {why}", flush=True)
        failures.append(name)
    return ok


def run(*cmd: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def show(unit: str, *props: str) -> dict[str, str]:
    out = run("systemctl", "show", unit, *(f"--property={p}" for p in props)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def cpus_allowed(pid: int, tid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                if line.startswith("Cpus_allowed_list:"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def parse_cpu_list(s: str) -> frozenset[int]:
    out: set[int] = set()
    for part in filter(None, s.split(",")):
        a, _, b = part.partition("-")
        out.update(range(int(a), int(b or a) + 1))
    return frozenset(out)


def workload_threads(pid: int) -> dict[int, str]:
    out = {}
    for d in glob.glob(f"/proc/{pid}/task/*"):
        try:
            with open(f"{d}/comm") as f:
                out[int(os.path.basename(d))] = f.read().strip()
        except OSError:
            pass
    return out


def http_get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def ctl_json(*args: str) -> dict:
    p = run("ailfmctl", *args, "--json", timeout=30)
    if p.returncode != 0:
        raise RuntimeError(f"ailfmctl {' '.join(args)} exited {p.returncode}: {p.stderr.strip()}")
    return json.loads(p.stdout)


def journal(unit: str, lines: int = 40) -> str:
    return run("journalctl", "--no-pager", "-o", "cat", "-n", str(lines), "-u", unit).stdout


def main() -> int:
    d = sys.argv[1]
    debs = sorted(glob.glob(os.path.join(d, "ailfmd_*.deb")))
    if not check("deb present in guest", len(debs) == 1, f"found {debs}"):
        return 1

    # --- install ---------------------------------------------------------------
    p = run("dpkg", "-i", debs[0], timeout=300)
    if not check("dpkg -i ailfmd", p.returncode == 0, (p.stdout + p.stderr)[-2000:]):
        return 1
    st = show("ailfmd.service", "LoadState", "UnitFileState", "ActiveState")
    check("unit installed, not enabled, not started",
          st.get("LoadState") == "loaded" and st.get("UnitFileState") == "disabled"
          and st.get("ActiveState") == "inactive", str(st))

    # --- workload as its own unit ------------------------------------------------
    p = run("systemd-run", f"--unit={WORKLOAD_UNIT}", "--property=Type=exec", "--",
            "/usr/bin/python3", os.path.join(d, "lfm_workload.py"),
            "--threads", str(WORKLOAD_THREADS), "--layers", "2", "--d-model", "256",
            "--heads", "4", "--vocab", "2048", "--prompt", "32", "--output", "32",
            "--report-s", "5")
    if not check("workload unit started", p.returncode == 0, p.stderr.strip()):
        return 1
    deadline, wpid, threads = time.monotonic() + 60, 0, {}
    while time.monotonic() < deadline:
        wpid = int(show(WORKLOAD_UNIT, "MainPID").get("MainPID", "0") or 0)
        threads = workload_threads(wpid) if wpid else {}
        if sum(1 for c in threads.values() if c.startswith("lfm-w")) == WORKLOAD_THREADS:
            break
        time.sleep(0.5)
    if not check(f"workload has {WORKLOAD_THREADS} worker threads + main",
                 len(threads) == WORKLOAD_THREADS + 1,
                 f"pid {wpid} threads {threads}; journal:\n{journal(WORKLOAD_UNIT)}"):
        return 1
    before = {tid: cpus_allowed(wpid, tid) for tid in threads}
    print(f"INFO workload pid {wpid}, affinities before: {before}", flush=True)

    # --- configure and start the daemon ------------------------------------------
    # cgroup v2 is at /sys/fs/cgroup in a unified guest; a host booted with the hybrid
    # layout gives the guest hybrid too, with cgroup v2 at /sys/fs/cgroup/unified.
    cgroupfs_root = "/sys/fs/cgroup"
    if not os.path.exists("/sys/fs/cgroup/cgroup.controllers") and \
            os.path.exists("/sys/fs/cgroup/unified/cgroup.controllers"):
        cgroupfs_root = "/sys/fs/cgroup/unified"
    print(f"INFO cgroup v2 of the guest at {cgroupfs_root}", flush=True)
    with open("/etc/ailfmd/ailfmd.toml", "w") as f:
        f.write(CONFIG.format(cgroupfs_root=cgroupfs_root))
    t_start = time.monotonic()
    p = run("systemctl", "start", "ailfmd", timeout=120)
    started = check("systemctl start ailfmd", p.returncode == 0,
                    f"{p.stderr.strip()}\n{journal('ailfmd.service')}")
    active = run("systemctl", "is-active", "ailfmd").stdout.strip()
    check("systemctl is-active ailfmd", active == "active", active)
    st = show("ailfmd.service", "Type", "MainPID", "NRestarts", "StatusText",
              "WatchdogUSec", "WatchdogTimestampMonotonic", "ExecMainStartTimestampMonotonic")
    print(f"INFO ailfmd after start: {st}", flush=True)
    # Type=notify: `systemctl start` returns and the unit is active only after READY=1;
    # the daemon sends STATUS= with it.
    check("READY=1 reached (Type=notify, active, STATUS= set)",
          started and active == "active" and st.get("Type") == "notify" and bool(st.get("StatusText")),
          str(st))
    if not started:
        return 1
    main_pid = st.get("MainPID")

    # --- status: managed threads -------------------------------------------------
    status = {}
    deadline = time.monotonic() + 20
    managed: dict[int, dict] = {}
    while time.monotonic() < deadline:
        try:
            status = ctl_json("status")
        except Exception as e:  # noqa: BLE001 - reported below if it never works
            status = {"error": str(e)}
        managed = {t["tid"]: t for t in status.get("threads", [])}
        if set(threads) <= set(managed):
            break
        time.sleep(0.5)
    check("ailfmctl status --json shows every workload thread",
          set(threads) <= set(managed),
          f"workload {sorted(threads)}, managed {sorted(managed)} {status.get('error', '')}")
    # --- cpusets: what the daemon read against what systemd and /proc say ------------
    effective = show(WORKLOAD_UNIT, "EffectiveCPUs").get("EffectiveCPUs", "")
    sets = {tid: managed[tid].get("cpuset") for tid in threads if tid in managed}
    print(f"INFO workload EffectiveCPUs={effective!r}; cpusets in status: "
          f"{sorted({str(c) for c in sets.values()})}", flush=True)
    if effective:
        # The unit's cgroup has the cpuset controller: that is the set the kernel enforces.
        check("status shows the workload unit's cpuset (systemd EffectiveCPUs)",
              bool(sets) and all(c is not None and parse_cpu_list(c) == parse_cpu_list(effective)
                                 for c in sets.values()), f"EffectiveCPUs {effective!r}, status {sets}")
    else:
        # No cpuset controller for the unit: a cpuset read higher up must still hold every
        # thread's affinity (the kernel keeps affinities inside the cpuset).
        allowed = {tid: cpus_allowed(wpid, tid) for tid in sets}
        check("status cpusets contain each thread's affinity",
              bool(sets) and all(c is None or (a is not None and parse_cpu_list(a) <= parse_cpu_list(c))
                                 for c, a in ((sets[t], allowed[t]) for t in sets)),
              f"cpusets {sets}, affinities {allowed}")
    d_ = status.get("daemon", {})
    check("daemon in enforce mode on platform linux",
          d_.get("mode") == "enforce" and d_.get("platform") == "linux" and not d_.get("paused"), str(d_))
    caps = ctl_json("sensors", "--socket", "/run/ailfmd/control.sock").get("capabilities", {})
    print(f"INFO capabilities: {json.dumps(caps)}", flush=True)

    # --- affinities as decided ---------------------------------------------------
    explain = ctl_json("explain", "--epochs", "100")
    decided: dict[int, frozenset[int]] = {}
    # epochs are newest first: keep the newest placement of each thread.
    for ep in explain.get("epochs", []):
        if not ep.get("applied"):
            continue
        for a in ep.get("actions", []):
            m = re.fullmatch(r"thread (\d+)", a.get("target", ""))
            pm = re.fullmatch(r"runs on cpu (\d+)", a.get("predicted") or "")
            if a.get("kind") == "placement" and m and pm and int(m.group(1)) not in decided:
                decided[int(m.group(1))] = frozenset((int(pm.group(1)),))
    after = {tid: cpus_allowed(wpid, tid) for tid in threads}
    print(f"INFO affinities after: {after}; decided: "
          f"{ {t: sorted(c) for t, c in decided.items()} }", flush=True)
    check("explain --json has applied placements for the workload threads",
          bool(decided) and set(decided) <= set(threads), f"decided {decided}")
    mism = {t: (after[t], sorted(c)) for t, c in decided.items()
            if t in after and (after[t] is None or parse_cpu_list(after[t]) != c)}
    check("affinities read back from /proc match explain's placements", not mism and bool(decided),
          f"mismatches (proc, decided): {mism}")
    # status reports each thread's affinity as observed at the start of the last epoch:
    # let a few epochs pass after the placements, then ask again.
    time.sleep(1.0)
    managed = {t["tid"]: t for t in ctl_json("status").get("threads", [])}
    mism = {t: (after[t], m["cpu_list"]) for t, m in managed.items()
            if t in after and after[t] is not None and parse_cpu_list(after[t]) != frozenset(m["cpus"])}
    # hotpotato places each thread once, on arrival; without temperatures it never
    # rotates, so the two views stay equal.
    check("affinities read back from /proc match status threads[].cpus", not mism,
          f"mismatches (proc, status): {mism}")
    changed = {t for t in threads if after.get(t) != before.get(t)}
    check("workload affinities changed", bool(changed), f"before {before}, after {after}")

    # --- metrics endpoint --------------------------------------------------------
    try:
        text = http_get(METRICS_URL)
        ok = ("ailfm_build_info" in text and re.search(r'^ailfm_mode\{mode="enforce"\} 1(\.0)?$', text, re.M)
              and re.search(r"^ailfm_epochs_total [1-9]", text, re.M))
        check("metrics endpoint answers on 127.0.0.1:9747", bool(ok), text[:500])
    except Exception as e:  # noqa: BLE001
        check("metrics endpoint answers on 127.0.0.1:9747", False, repr(e))
        text = ""
    if text and os.path.exists("/usr/bin/promtool"):
        p = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
        check("promtool check metrics", p.returncode == 0, (p.stdout + p.stderr)[-1500:])

    if os.path.exists("/usr/bin/prometheus"):
        deadline, got, why = time.monotonic() + 60, None, ""
        q = urllib.parse.urlencode({"query": 'ailfm_epochs_total{job="ailfmd"}'})
        while time.monotonic() < deadline:
            try:
                r = json.loads(http_get(f"{PROMETHEUS_URL}/api/v1/query?{q}"))
                res = r.get("data", {}).get("result", [])
                if res and float(res[0]["value"][1]) > 0:
                    got = res
                    break
                why = str(r)
            except Exception as e:  # noqa: BLE001
                why = repr(e)
            time.sleep(1)
        check("guest Prometheus scraped ailfmd (ailfm_epochs_total > 0)", got is not None,
              f"{why}\n{journal('prometheus.service', 20)}")
        if got:
            print(f"INFO prometheus: {json.dumps(got)}", flush=True)

    # --- watchdog ----------------------------------------------------------------
    ts0 = st.get("WatchdogTimestampMonotonic", "0")
    while time.monotonic() - t_start < WATCHDOG_OBSERVE_S:
        time.sleep(1)
    st2 = show("ailfmd.service", "MainPID", "NRestarts", "ActiveState", "WatchdogUSec",
               "WatchdogTimestampMonotonic", "Result")
    print(f"INFO ailfmd after {WATCHDOG_OBSERVE_S:.0f} s: {st2}", flush=True)
    check("watchdog armed (WatchdogUSec=30s)", st2.get("WatchdogUSec") in ("30s", "30000000"), str(st2))
    check("watchdog pings received (WatchdogTimestamp advanced)",
          st2.get("WatchdogTimestampMonotonic", "0") not in ("0", "", ts0), f"{ts0} -> {st2}")
    check(f"watchdog not firing ({WATCHDOG_OBSERVE_S:.0f} s > WatchdogSec: same MainPID, NRestarts=0)",
          st2.get("MainPID") == main_pid and st2.get("NRestarts") == "0"
          and st2.get("ActiveState") == "active", f"{st} -> {st2}")

    # --- stop and restore --------------------------------------------------------
    p = run("systemctl", "stop", "ailfmd", timeout=60)
    st3 = show("ailfmd.service", "ActiveState", "Result", "ExecMainStatus")
    check("systemctl stop ailfmd (clean exit)",
          p.returncode == 0 and st3.get("ActiveState") == "inactive" and st3.get("Result") == "success",
          f"{p.stderr.strip()} {st3}")
    restored = {tid: cpus_allowed(wpid, tid) for tid in threads}
    bad = {t: (before[t], restored[t]) for t in changed if restored.get(t) != before[t]}
    check("every changed affinity restored", bool(changed) and not bad,
          f"(before, after stop): {bad}" if bad else "nothing had changed")
    log = journal("ailfmd.service", 200)
    check("daemon logged 'every setting restored'", "stopped; every setting restored" in log, log[-1500:])
    # The recording the daemon wrote as the unit's user, closed at stop: every record whole.
    p = run("ailfm", "inspect", TELEMETRY, "--json")
    try:
        summary = json.loads(p.stdout) if p.returncode == 0 else {}
    except ValueError:
        summary = {}
    steps = summary.get("by_kind", {}).get("step", 0)
    check("telemetry recorded under /var/lib/ailfmd (ailfm inspect: step records, no torn tail)",
          steps > 0 and summary.get("torn_tail_bytes") == 0 and summary.get("header", {}).get("platform") == "linux",
          (p.stdout + p.stderr)[-1500:])
    check("workload still running after the daemon stopped",
          run("systemctl", "is-active", WORKLOAD_UNIT).stdout.strip() == "active", journal(WORKLOAD_UNIT))

    if failures:
        print("INFO ailfmd journal:\n" + log, flush=True)
    run("systemctl", "stop", WORKLOAD_UNIT)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
