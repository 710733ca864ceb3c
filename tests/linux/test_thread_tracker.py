"""The tracker follows a real process whose threads come and go."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from ailfmd.platform.linux.sysfs import Root
from ailfmd.platform.linux.targets import TargetSelector
from ailfmd.platform.linux.threads import ThreadTracker

CHILD = textwrap.dedent(
    """
    import threading, sys, time
    stop = {}
    def work(name):
        ev = threading.Event(); stop[name] = ev
        while not ev.is_set():
            sum(range(20000)); time.sleep(0.0005)
    def start(name):
        threading.Thread(target=work, args=(name,), daemon=True).start()
    start("a"); start("b")
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, name = line.split()
        if cmd == "start": start(name)
        else: stop[name].set()
        time.sleep(0.2)
        print("ok", flush=True)
    """
)


def _tasks(pid: int) -> set[int]:
    return {int(t) for t in os.listdir(f"/proc/{pid}/task")}


def test_threads_come_and_go_without_errors() -> None:
    p = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdin is not None and p.stdout is not None
    try:
        assert p.stdout.readline().strip() == "ready"
        tr = ThreadTracker(Root("/proc"), Root("/sys/fs/cgroup"), TargetSelector(pids=(p.pid,)), discover_every=3)
        first = tr.sample()
        assert set(first) == _tasks(p.pid)
        time.sleep(0.05)
        second = tr.sample()
        busy = [s for s in second.values() if s.counters.get("run_ns", 0) > 0]
        assert busy, "worker threads ran, schedstat deltas must show it"
        # A worker exits: it is dropped at the next sample, silently.
        p.stdin.write("stop a\n"); p.stdin.flush()
        assert p.stdout.readline().strip() == "ok"
        third = tr.sample()
        assert set(third) == _tasks(p.pid) and len(third) == len(first) - 1
        # A new worker starts: it appears after at most discover_every samples.
        p.stdin.write("start c\n"); p.stdin.flush()
        assert p.stdout.readline().strip() == "ok"
        seen = [set(tr.sample()) for _ in range(3)]
        assert seen[-1] == _tasks(p.pid) and len(seen[-1]) == len(first)
        tr.close()
    finally:
        p.kill()
        p.wait()


def test_whole_process_exit_empties_the_sample() -> None:
    p = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    tr = ThreadTracker(Root("/proc"), Root("/sys/fs/cgroup"), TargetSelector(pids=(p.pid,)))
    assert tr.sample()
    p.kill()
    p.wait()
    assert tr.sample() == {}
    tr.close()


# --------------------------------------------------------------------------- sample_every

# Six workers that each run a little every few milliseconds; prints its pid when ready.
BUSY_CHILD = textwrap.dedent(
    """
    import sys, threading, time
    ready = threading.Barrier(7)
    def work():
        ready.wait()
        while True:
            sum(range(3000)); time.sleep(0.002)
    for _ in range(6):
        threading.Thread(target=work, daemon=True).start()
    ready.wait()
    print("ready", flush=True)
    sys.stdin.read()
    """
)

# One thread (the main one) that burns CPU only when told to, then sleeps in read().
BURST_CHILD = textwrap.dedent(
    """
    import sys, time
    print("ready", flush=True)
    for line in sys.stdin:
        end = time.thread_time() + 0.03
        while time.thread_time() < end:
            pass
        print("ok", flush=True)
    """
)


def _start(script: str) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    return p


def test_counters_every_epoch_measured_round_robin_every_n() -> None:
    p = _start(BUSY_CHILD)
    try:
        n = 3
        tr = ThreadTracker(Root("/proc"), Root("/sys/fs/cgroup"), TargetSelector(pids=(p.pid,)),
                           discover_every=1000, sample_every=n)
        calls = []
        for _ in range(1 + 4 * n):
            calls.append(tr.sample())
            time.sleep(0.01)
        tids = _tasks(p.pid)
        assert len(tids) == 7
        first = calls[0]
        assert set(first) == tids  # a new thread is measured at once, whatever its phase
        # Every call lists every thread with the same counters: none goes missing between
        # two measurements (schedstat deltas need one earlier read, so from the second on).
        names = set(calls[1 + n][min(tids)].counters)
        assert {"run_ns", "wait_ns", "timeslices"} <= names
        for c in calls[1 + n:]:
            assert set(c) == tids
            assert all(set(s.counters) == names for s in c.values())
        # Each call after the first measures about a third of the threads (a new sample
        # object), and reuses the last sample of the others (the very same object).
        refreshed = []
        for before, now in zip(calls, calls[1:]):
            fresh = {t for t in tids if now[t] is not before[t]}
            for t in tids - fresh:
                assert now[t].counters is before[t].counters
            refreshed.append(fresh)
        sizes = [len(f) for f in refreshed]
        assert max(sizes) - min(sizes) <= 1 and sum(sizes[:n]) == len(tids), sizes
        # Round robin: each thread once in every n consecutive calls, always in the same phase.
        for i in range(len(refreshed) - n + 1):
            window = refreshed[i : i + n]
            assert set().union(*window) == tids
            assert sum(len(f) for f in window) == len(tids)
        for t in tids:
            phases = {i % n for i, f in enumerate(refreshed) if t in f}
            assert len(phases) == 1
        # The workers ran: a measurement shows it.
        last = calls[-1]
        assert sum(s.counters["run_ns"] for s in last.values()) > 0
        tr.close()
    finally:
        p.kill()
        p.wait()


def test_deltas_over_several_epochs_are_reported_per_epoch() -> None:
    p = _start(BURST_CHILD)
    assert p.stdin is not None and p.stdout is not None
    schedstat = f"/proc/{p.pid}/task/{p.pid}/schedstat"
    try:
        tr = ThreadTracker(Root("/proc"), Root("/sys/fs/cgroup"), TargetSelector(pids=(p.pid,)),
                           use_perf=False, sample_every=2)
        first = tr.sample(now=100.0)[p.pid]  # measured (new); the child sleeps in read()
        run0 = int(open(schedstat).read().split()[0])
        p.stdin.write("burn\n"); p.stdin.flush()
        assert p.stdout.readline().strip() == "ok"
        time.sleep(0.05)  # back in read()
        run1 = int(open(schedstat).read().split()[0])
        assert run1 - run0 >= 20_000_000  # the burst: ~30 ms on the CPU
        second = tr.sample(now=100.1)[p.pid]  # not its phase: the last sample again
        assert second is first
        third = tr.sample(now=100.2)[p.pid]  # measured: a window of two epochs
        # Reported as one epoch's share: delta * (0.1 s epoch / 0.2 s window).
        assert third.counters["run_ns"] == pytest.approx((run1 - run0) * 0.5, rel=1e-9)
        assert third.counters["timeslices"] >= 0.5
        tr.close()
    finally:
        p.kill()
        p.wait()


def test_sample_every_one_measures_every_call_unscaled() -> None:
    p = _start(BURST_CHILD)
    assert p.stdin is not None and p.stdout is not None
    schedstat = f"/proc/{p.pid}/task/{p.pid}/schedstat"
    try:
        tr = ThreadTracker(Root("/proc"), Root("/sys/fs/cgroup"), TargetSelector(pids=(p.pid,)),
                           use_perf=False, sample_every=1)
        first = tr.sample(now=100.0)[p.pid]
        run0 = int(open(schedstat).read().split()[0])
        p.stdin.write("burn\n"); p.stdin.flush()
        assert p.stdout.readline().strip() == "ok"
        time.sleep(0.05)
        run1 = int(open(schedstat).read().split()[0])
        second = tr.sample(now=100.7)[p.pid]
        assert second is not first
        assert second.counters["run_ns"] == float(run1 - run0)
        tr.close()
    finally:
        p.kill()
        p.wait()


def test_a_moved_thread_is_measured_at_the_next_call(tmp_path) -> None:
    from ailfmd.platform.linux.journal import Journal

    p = _start(BUSY_CHILD)
    journal = Journal(tmp_path / "run")
    tr = ThreadTracker(Root("/proc"), Root("/sys/fs/cgroup"), TargetSelector(pids=(p.pid,)),
                       discover_every=1000, sample_every=4)
    try:
        first = tr.sample()
        second = tr.sample()
        # A thread that was not measured in the second call (so not due in the third).
        tid = next(t for t in second if second[t] is first[t])
        cpu = min(second[tid].affinity)
        out = tr.set_affinity(second[tid].ref, frozenset({cpu}), journal)
        assert out.ok, out
        third = tr.sample()
        assert third[tid] is not second[tid]  # measured: where it runs now
        assert third[tid].affinity == frozenset({cpu})
    finally:
        tr.close()
        journal.close()
        p.kill()
        p.wait()


def test_affinity_is_current_between_measurements() -> None:
    p = _start(BUSY_CHILD)
    try:
        tr = ThreadTracker(Root("/proc"), Root("/sys/fs/cgroup"), TargetSelector(pids=(p.pid,)),
                           discover_every=2, sample_every=5)
        first = tr.sample()
        cpu = min(os.sched_getaffinity(p.pid))
        for tid in first:
            os.sched_setaffinity(tid, {cpu})  # changed behind ailfmd's back
        seen = [tr.sample() for _ in range(2)]  # the second of these re-discovers
        # Threads of the phases not measured in these two calls still show their new set.
        kept = [t for t in first if seen[-1][t].counters is first[t].counters]
        assert kept
        for t in first:
            assert seen[-1][t].affinity == frozenset({cpu})
        tr.close()
    finally:
        p.kill()
        p.wait()


def test_an_exited_thread_leaves_within_n_calls() -> None:
    p = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdin is not None and p.stdout is not None
    try:
        assert p.stdout.readline().strip() == "ready"
        n = 3
        tr = ThreadTracker(Root("/proc"), Root("/sys/fs/cgroup"), TargetSelector(pids=(p.pid,)),
                           discover_every=1000, sample_every=n)
        first = tr.sample()
        p.stdin.write("stop a\n"); p.stdin.flush()
        assert p.stdout.readline().strip() == "ok"
        seen = [set(tr.sample()) for _ in range(n)]
        assert seen[-1] == _tasks(p.pid) and len(seen[-1]) == len(first) - 1
        tr.close()
    finally:
        p.kill()
        p.wait()


def test_rediscovery_does_not_reread_tracked_threads(monkeypatch) -> None:
    from ailfmd.platform.linux import targets

    p = _start(BUSY_CHILD)
    try:
        tr = ThreadTracker(Root("/proc"), Root("/sys/fs/cgroup"), TargetSelector(pids=(p.pid,)), discover_every=1)
        assert set(tr.sample()) == _tasks(p.pid)
        reads: list[int] = []
        real = targets.pfs.read_task_stat

        def counted(procfs, pid, tid):  # type: ignore[no-untyped-def]
            reads.append(tid)
            return real(procfs, pid, tid)

        monkeypatch.setattr(targets.pfs, "read_task_stat", counted)
        assert set(tr.sample()) == _tasks(p.pid)  # re-discovered: the same threads
        assert reads == []
        tr.close()
    finally:
        p.kill()
        p.wait()
