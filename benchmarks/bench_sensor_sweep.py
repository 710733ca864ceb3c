"""One full sensor sweep (temperatures, frequencies, throttle counters, per-thread counters)
on a generated 256-CPU machine tree.

    .venv/bin/python benchmarks/bench_sensor_sweep.py [--cpus 256] [--threads 32] [--sweeps 2000]

Prints median / p90 / p99 of ``LinuxPlatform.observe()``: first the sysfs part alone, then
with the counters of every thread of a real multi-threaded child process (perf groups +
schedstat). Target: the sysfs sweep median <= 1 ms.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "fixtures"))

from machines import build_large  # noqa: E402

from ailfmd.platform.linux.platform import LinuxPlatform  # noqa: E402
from ailfmd.platform.linux.targets import TargetSelector  # noqa: E402

# Mostly sleeping workers: on the 2-core machine this runs on, busy ones would steal the
# CPU the sweep is timed on (a real server has the cores to spare).
CHILD = """
import threading, time, sys
def work():
    while True:
        sum(range(2000)); time.sleep(0.02)
for _ in range(int(sys.argv[1])):
    threading.Thread(target=work, daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""


def quantiles_us(samples: list[float]) -> str:
    s = sorted(samples)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))] * 1e6  # noqa: E731
    return f"median {statistics.median(s) * 1e6:7.1f} us   p90 {pick(0.9):7.1f} us   p99 {pick(0.99):7.1f} us"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpus", type=int, default=256)
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--sweeps", type=int, default=2000)
    ap.add_argument("--thread-sample-every", type=int, default=1,
                    help="read each thread's counters every N sweeps (the daemon's default is 3)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sysfs = build_large(Path(tmp), n_cpus=args.cpus)
        no_threads = LinuxPlatform(sysfs_root=sysfs, run_dir=Path(tmp) / "run2", use_perf=False)
        for _ in range(50):  # warm up: open descriptors
            no_threads.observe()
        sysfs_only: list[float] = []
        for _ in range(args.sweeps):
            t0 = time.perf_counter()
            obs = no_threads.observe()
            sysfs_only.append(time.perf_counter() - t0)
        print(f"machine: {args.cpus} CPUs, {len(obs.sensors)} temperature inputs, {len(obs.policies)} cpufreq policies")
        print(f"sysfs sweep (temps, freqs, throttle):        {quantiles_us(sysfs_only)}")
        no_threads.close()
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(args.threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        try:
            plat = LinuxPlatform(
                sysfs_root=sysfs, run_dir=Path(tmp) / "run", targets=TargetSelector(pids=(child.pid,)),
                thread_sample_every=args.thread_sample_every,
            )
            for _ in range(50):  # warm up: open descriptors, perf events
                plat.observe()
            full: list[float] = []
            threads_seen = 0
            for _ in range(args.sweeps):
                t0 = time.perf_counter()
                obs = plat.observe()
                full.append(time.perf_counter() - t0)
                threads_seen = len(obs.threads)
            print(f"full sweep incl. {threads_seen:3d} threads' counters:   {quantiles_us(full)}")
            plat.close()
        finally:
            child.kill()
            child.wait()


if __name__ == "__main__":
    main()
