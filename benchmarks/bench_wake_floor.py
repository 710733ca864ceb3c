"""The floor under the daemon's CPU target: what waking at 10 Hz costs a Python process.

Run: ``.venv/bin/python benchmarks/bench_wake_floor.py [--seconds 30]``

Three loops, each waking every 100 ms on ``poll`` as the daemon does, for ``--seconds``,
measured in the process's CPU time (user + system):

- ``idle``: wake and sleep again;
- ``preads``: 216 ``pread`` calls per wake (the number ``LinuxPlatform.observe`` makes on
  the 64-CPU benchmark tree), on sysfs and procfs files of this machine;
- ``preads+objects``: the same, and a small Python object per value kept in a dict
  (about what a reader that builds records does at the least).

Compared with the whole daemon's share (``bench_daemon.py``), it says how much of the
CPU target is the interpreter and the syscalls, and how much is the daemon's own work.
"""

from __future__ import annotations

import argparse
import glob
import os
import resource
import select
import time

READS_PER_EPOCH = 216


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def loop(mode: str, seconds: float, fds: list[int]) -> float:
    """CPU share of one core (%) of ``mode`` waking at 10 Hz for ``seconds``."""
    waiter = select.poll()
    r, w = os.pipe()
    waiter.register(r, select.POLLIN)
    c0, t0 = cpu_s(), time.monotonic()
    wake = t0
    kept: dict[int, tuple[bytes, float, str]] = {}
    while time.monotonic() - t0 < seconds:
        if mode == "preads":
            for fd in fds:
                os.pread(fd, 64, 0)
        elif mode == "preads+objects":
            kept = {i: (os.pread(fd, 64, 0), float(i), str(i)) for i, fd in enumerate(fds)}
        wake += 0.1
        waiter.poll(max(0.0, (wake - time.monotonic()) * 1000))
    share = 100 * (cpu_s() - c0) / (time.monotonic() - t0)
    os.close(r)
    os.close(w)
    del kept
    return share


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30.0)
    args = ap.parse_args()
    paths = sorted(glob.glob("/sys/devices/system/cpu/cpu*/topology/core_id")) + \
        sorted(glob.glob("/proc/self/task/*/schedstat"))
    fds = [os.open(p, os.O_RDONLY) for p in paths]
    fds = (fds * (READS_PER_EPOCH // len(fds) + 1))[:READS_PER_EPOCH]
    for mode in ("idle", "preads", "preads+objects"):
        print(f"{mode}: {loop(mode, args.seconds, fds):.3f} % of one core at 10 Hz", flush=True)


if __name__ == "__main__":
    main()
