"""Daemon cost: the whole control loop on a 64-CPU machine tree with 64 managed threads.

    .venv/bin/python benchmarks/bench_daemon.py [--seconds 120] [--cpus 64] [--threads 64]
        [--thread-sample-every N] [--changing-inputs] [--cached-observation] [--observe-only]
        [--epoch-ms 100] [--policy stepwise|onnx]

Runs the real daemon (LinuxPlatform on a generated Xeon-like tree, the ``stepwise``
baseline or, with ``--policy onnx``, the shipped learned policy as the daemon runs it by
default, safety shield, metrics, control socket, history) at 10 Hz in enforce mode, managing the
threads of a real child process. Prints the epoch duration (median, p99), the daemon's
CPU use as a share of one core, and its RSS over the run. Targets: median epoch <= 2 ms,
CPU <= 0.5 % of one core, RSS stable.

The generated tree's temperatures and frequencies never change, so every record the
platform can reuse is reused. ``--changing-inputs`` has a separate process rewrite every
temperature and current frequency in the tree at 10 Hz (a busy machine), so that reuse
misses as it would there; the writer's own CPU is not counted. ``--cached-observation``
hands the loop the same observation every epoch after the warm-up, so that what is
measured is the rest of the epoch: decide, shield, apply, reporting and the wait.
``--observe-only`` times the platform's ``observe()`` alone, in the loop thread's CPU
time: once per 100 ms (caches gone cold in between, as in the daemon) and back to back.
"""

from __future__ import annotations

import argparse
import array
import dataclasses
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "fixtures"))

from machines import build_large  # noqa: E402

from ailfmd.platform.linux.perf import ThreadCounters  # noqa: E402
from ailfmd.platform.linux.targets import TargetSelector  # noqa: E402
from ailfmd.service.config import EPOCH_MS_RANGE, DaemonConfig  # noqa: E402
from ailfmd.service.daemon import Daemon  # noqa: E402

# The daemon's default policy file, as installed from this tree.
SHIPPED_POLICY = Path(__file__).resolve().parents[1] / "policies" / "default.onnx"

# Inference-like workers that mostly wait (on this 2-core machine busy ones would steal
# the CPU the daemon is measured on).
CHILD = """
import threading, time, sys
def work():
    while True:
        sum(range(5000)); time.sleep(0.05)
for _ in range(int(sys.argv[1]) - 1):
    threading.Thread(target=work, daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""


# Rewrites every temperature input and current frequency of a tree in place at 10 Hz:
# temperatures drift smoothly by up to 1 C around their first value (a different value
# every epoch, far below any limit and too slow to trip a look-ahead, so the policies
# have no more to do than on the still tree); frequencies jitter by up to 100 MHz. Each
# value keeps its length and is overwritten with one pwrite, never truncated first, so
# the daemon never reads a half-written file (sysfs has no such state either).
WRITER = """
import glob, math, os, random, sys, time
root = sys.argv[1]
temps = sorted(glob.glob(root + "/class/hwmon/hwmon*/temp*_input") + glob.glob(root + "/class/thermal/thermal_zone*/temp"))
freqs = sorted(glob.glob(root + "/devices/system/cpu/cpufreq/policy*/scaling_cur_freq"))
base = {f: int(open(f).read()) for f in temps + freqs}
fds = {f: os.open(f, os.O_WRONLY) for f in base}
rng = random.Random(1)
t0 = time.monotonic()
while True:
    t = time.monotonic() - t0
    for i, f in enumerate(temps):
        os.pwrite(fds[f], b"%d\\n" % (base[f] + round(1000 * math.sin(t * 0.6 + i))), 0)
    for f in freqs:
        os.pwrite(fds[f], b"%d\\n" % (base[f] + rng.randrange(-100000, 100001, 1000)), 0)
    time.sleep(0.1)
"""


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def observe_cost(platform: object, epochs: int) -> None:
    """CPU time and user-space instructions of ``platform.observe()`` per call, at 10 Hz
    and back to back: the difference is what cold caches cost each epoch."""
    work = ThreadCounters(threading.get_native_id(), ("instructions",))
    observe = platform.observe  # type: ignore[attr-defined]
    for label, gap_s in (("at 10 Hz", 0.1), ("back to back", 0.0)):
        cpu_ns: list[int] = []
        work.read_deltas()
        for _ in range(epochs):
            if gap_s:
                time.sleep(gap_s)
            t0 = time.thread_time_ns()
            observe()
            cpu_ns.append(time.thread_time_ns() - t0)
        instructions = work.read_deltas().get("instructions")
        per_call = f", {instructions / epochs / 1e6:.2f} M user-space instructions" if instructions else ""
        print(f"observe {label}: CPU median {statistics.median(cpu_ns) / 1e3:.0f} us, "
              f"mean {statistics.mean(cpu_ns) / 1e3:.0f} us per call{per_call}")
    work.close()


class Timings:
    """Each epoch's phase durations in preallocated arrays (the benchmark's own memory
    must not grow while it measures the daemon's)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.names: list[str] = []
        self._cols: dict[str, array.array] = {}
        self.n = 0

    def add(self, timings_s: dict[str, float]) -> None:
        if self.n >= self.capacity:
            return
        for k, v in timings_s.items():
            col = self._cols.get(k)
            if col is None:
                col = self._cols[k] = array.array("d", bytes(8 * self.capacity))
                self.names.append(k)
            col[self.n] = v
        self.n += 1

    def clear(self) -> None:
        self.n = 0

    def column(self, name: str) -> list[float]:
        return self._cols[name][: self.n].tolist()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--epoch-ms", type=int, default=100, help="the daemon's epoch (default 100 ms: 10 Hz)")
    ap.add_argument("--cpus", type=int, default=64)
    ap.add_argument("--threads", type=int, default=64)
    ap.add_argument("--thread-sample-every", type=int, default=None,
                    help="platform.thread_sample_every (default: the configuration's default)")
    ap.add_argument("--changing-inputs", action="store_true",
                    help="rewrite every temperature and current frequency at 10 Hz from another process")
    ap.add_argument("--cached-observation", action="store_true",
                    help="after the warm-up, reuse one observation: measure everything but observe")
    ap.add_argument("--observe-only", action="store_true",
                    help="time platform.observe() alone, at 10 Hz and back to back")
    ap.add_argument("--policy", choices=("stepwise", "onnx"), default="stepwise",
                    help="who decides: the stepwise baseline (default) or policies/default.onnx, "
                         "the daemon's default policy")
    args = ap.parse_args()
    lo, hi = EPOCH_MS_RANGE  # the daemon's own range
    if not lo <= args.epoch_ms <= hi:
        ap.error(f"--epoch-ms {args.epoch_ms}: must be between {lo} and {hi}")
    tmp = Path(tempfile.mkdtemp(prefix="ailfmd-bench", dir="/tmp"))
    sysfs = build_large(tmp, n_cpus=args.cpus, packages=2)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(args.threads)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(sysfs)]) if args.changing_inputs else None
    try:
        base = DaemonConfig()
        cfg = dataclasses.replace(
            base,
            daemon=dataclasses.replace(base.daemon, mode="enforce", epoch_ms=args.epoch_ms, run_dir=tmp / "run"),
            platform=dataclasses.replace(
                base.platform,
                kind="linux",
                sysfs_root=sysfs,
                thread_sample_every=args.thread_sample_every or base.platform.thread_sample_every,
            ),
            targets=TargetSelector(pids=(child.pid,)),
            policy=(dataclasses.replace(base.policy, kind="baseline", baseline="stepwise", fallback="linux")
                    if args.policy == "stepwise" else
                    dataclasses.replace(base.policy, kind="onnx", path=SHIPPED_POLICY, fallback="stepwise")),
            metrics=dataclasses.replace(base.metrics, port=free_port()),
            control=dataclasses.replace(base.control, socket=tmp / "c.sock"),
        )
        daemon = Daemon(cfg, env={})
        if args.observe_only:
            for _ in range(50):  # warm-up: first samples, slow-state slices, a re-discovery
                daemon.platform.observe()
            observe_cost(daemon.platform, int(args.seconds * 10))
            daemon.platform.close()
            return
        daemon.start_services()
        epochs = int(args.seconds * 1000 / args.epoch_ms)
        warm = 50
        # Timings go into arrays allocated up front: lists of floats growing by ~250 bytes
        # an epoch would show up in the RSS measured (~0.14 MiB a minute at 10 Hz).
        timings = Timings(epochs + 3 * warm + 10)
        rss = array.array("q", bytes(8 * (int(args.seconds) + 10)))
        rss_n = 0

        def account(rec) -> None:  # type: ignore[no-untyped-def]
            timings.add(rec.timings_s)

        daemon.loop.sinks.append(account)
        sampler_stop = threading.Event()

        def sample_rss() -> None:
            nonlocal rss_n
            while not sampler_stop.wait(1.0) and rss_n < len(rss):
                rss[rss_n] = rss_kib()
                rss_n += 1
        daemon.loop.tick()
        for _ in range(warm):
            daemon.loop.tick()
        if args.cached_observation:
            cached = daemon.platform.observe()
            daemon.platform.observe = lambda: cached  # type: ignore[method-assign]
            for _ in range(warm):
                daemon.loop.tick()
        timings.clear()
        threading.Thread(target=sample_rss, daemon=True).start()
        # The loop thread's user-space instructions: unlike CPU time, barely moved by what
        # else the machine runs, so runs under different load compare.
        work = ThreadCounters(threading.get_native_id(), ("instructions",))
        work.read_deltas()
        c0, w0 = cpu_s(), time.monotonic()
        daemon.run(max_epochs=daemon.loop.epoch + epochs)
        c1, w1 = cpu_s(), time.monotonic()
        instructions = work.read_deltas().get("instructions")
        work.close()
        sampler_stop.set()
        s = sorted(timings.column("total"))
        phases = {k: timings.column(k) for k in timings.names}
        rss_kibs = rss[:rss_n]
        threads = len(daemon.loop.last.observation.threads) if daemon.loop.last else 0
        every = cfg.platform.thread_sample_every
        print(f"{args.cpus} CPUs, {threads} managed threads, {len(s)} epochs at {1000 / args.epoch_ms:g} Hz "
              f"over {w1 - w0:.0f} s, "
              f"thread counters every {every} epoch{'s' if every > 1 else ''}"
              + (", temperatures and frequencies changing every epoch" if writer else "")
              + (", one cached observation" if args.cached_observation else "")
              + f", policy {daemon.loop.policy.name}")
        print(f"epoch: median {statistics.median(s) * 1e3:.2f} ms, p99 {s[int(0.99 * len(s))] * 1e3:.2f} ms")
        print("phases (median ms): " + ", ".join(f"{k} {statistics.median(v) * 1e3:.2f}" for k, v in phases.items()))
        print(f"CPU: {100 * (c1 - c0) / (w1 - w0):.2f} % of one core")
        if instructions is not None:
            print(f"loop thread: {instructions / epochs / 1e6:.2f} M user-space instructions per epoch")
        if rss_kibs:
            q = max(1, len(rss_kibs) // 4)
            print(f"RSS: first quarter {statistics.mean(rss_kibs[:q]) / 1024:.1f} MiB, "
                  f"last quarter {statistics.mean(rss_kibs[-q:]) / 1024:.1f} MiB, max {max(rss_kibs) / 1024:.1f} MiB")
    finally:
        for proc in (child, writer):
            if proc is not None:
                proc.kill()
                proc.wait()


if __name__ == "__main__":
    main()
