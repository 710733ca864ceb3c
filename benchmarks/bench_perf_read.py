"""Cost of ``ThreadCounters.read_deltas()`` per thread: one read per event vs per group.

Run: ``.venv/bin/python benchmarks/bench_perf_read.py [--threads 32] [--load mixed]``

Starts a child process with ``--threads`` threads (``busy``: hashing with the GIL
released, so they really run; ``idle``: sleeping 1 ms at a time; ``mixed``: half of
each), opens the counters of every thread once per event (``group=False``) and once
per perf event group (``group=True``), and samples them like the daemon does: one
``read_deltas()`` per thread every ``--epoch-s``. The two modes take turns
``--rounds`` times, never open at the same time (their hardware events would
compete for the PMU). Prints medians: per thread, per epoch (all threads), and the
cost of opening one thread's counters.
"""

from __future__ import annotations

import argparse
import os
import select
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ailfmd.platform.linux.perf import ThreadCounters  # noqa: E402

_CHILD = r"""
import hashlib, sys, threading, time
n, load = int(sys.argv[1]), sys.argv[2]
stop = threading.Event()
tids = [0] * n
ready = threading.Barrier(n + 1)
blob = b"x" * (1 << 16)
def work(i):
    tids[i] = threading.get_native_id()
    busy = load == "busy" or (load == "mixed" and i % 2 == 0)
    ready.wait()
    while not stop.is_set():
        if busy:
            hashlib.sha256(blob).digest()  # releases the GIL: runs in parallel
        else:
            time.sleep(0.001)
for i in range(n):
    threading.Thread(target=work, args=(i,), daemon=True).start()
ready.wait()
print(*tids, flush=True)
sys.stdin.read()
stop.set()
"""

MODES = (("per event (group=False)", False), ("per group (group=True)", True))


def _spawn(threads: int, load: str) -> tuple[subprocess.Popen[str], list[int]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(threads), load],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    if not ready:
        proc.kill()
        raise SystemExit("child did not start")
    return proc, [int(t) for t in proc.stdout.readline().split()]


def _round(
    tids: list[int], group: bool, epochs: int, epoch_s: float, out: dict[str, list[float]]
) -> tuple[int, int]:
    start = time.perf_counter()
    counters = []
    for tid in tids:
        t0 = time.perf_counter()
        counters.append(ThreadCounters(tid, group=group))
        out["open"].append(time.perf_counter() - t0)
    try:
        for tc in counters:
            tc.read_deltas()  # baseline; a group that does not fit is split here
        for _ in range(epochs):
            time.sleep(epoch_s)
            t_epoch = time.perf_counter()
            for tc in counters:
                t0 = time.perf_counter()
                tc.read_deltas()
                out["thread"].append(time.perf_counter() - t0)
            out["epoch"].append(time.perf_counter() - t_epoch)
        return len(counters[0].available), len(counters[0].groups)
    finally:
        for tc in counters:
            tc.close()
        out["wall"].append(time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--load", choices=("busy", "idle", "mixed"), default="mixed")
    parser.add_argument("--epochs", type=int, default=20, help="epochs per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epoch-s", type=float, default=0.1)
    args = parser.parse_args()

    proc, tids = _spawn(args.threads, args.load)
    samples: dict[bool, dict[str, list[float]]] = {
        g: {"open": [], "thread": [], "epoch": [], "wall": []} for _, g in MODES
    }
    shape: dict[bool, tuple[int, int]] = {}
    try:
        for _ in range(args.rounds):
            for _, group in MODES:
                shape[group] = _round(tids, group, args.epochs, args.epoch_s, samples[group])
    finally:
        proc.kill()
        proc.wait()

    print(
        f"{args.threads} threads ({args.load}), {args.rounds} x {args.epochs} epochs of "
        f"{args.epoch_s * 1e3:.0f} ms, {os.cpu_count()} CPUs"
    )
    print(f"{'':26s} {'reads/thread':>12s} {'read_deltas':>14s} {'epoch':>10s} {'open':>12s}")
    medians = {}
    for label, group in MODES:
        s = samples[group]
        events, reads = shape[group]
        medians[group] = statistics.median(s["thread"])
        print(
            f"{label:26s} {reads:>5d} ({events} ev) {medians[group] * 1e6:>11.1f} us "
            f"{statistics.median(s['epoch']) * 1e3:>7.3f} ms "
            f"{statistics.median(s['open']) * 1e6:>9.0f} us"
        )
    print(f"read_deltas per thread: {medians[False] / medians[True]:.2f}x faster with groups")


if __name__ == "__main__":
    main()
