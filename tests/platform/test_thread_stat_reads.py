"""A thread's ``stat`` (comm, last CPU) is read only when it may have changed, and every
change still shows: renamed while asleep, moved by someone else, moved by ailfmd."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from ailfmd.platform.linux import threads as threads_mod
from ailfmd.platform.linux.journal import Journal
from ailfmd.platform.linux.sysfs import Root
from ailfmd.platform.linux.targets import TargetSelector
from ailfmd.platform.linux.threads import ThreadTracker

# Two named workers that run briefly every few ms; the main thread obeys
# "rename <i> <name>" (writes the worker's comm, as pthread_setname_np does from another
# thread) and answers with the worker tids at start.
CHILD = textwrap.dedent(
    """
    import sys, threading, time
    tids = []
    started = threading.Barrier(3)
    def work():
        tids.append(threading.get_native_id()); started.wait()
        while True:
            sum(range(2000)); time.sleep(0.003)
    for _ in range(2):
        threading.Thread(target=work, daemon=True).start()
    started.wait()
    print(" ".join(map(str, tids)), flush=True)
    for line in sys.stdin:
        _, i, name = line.split()
        with open(f"/proc/self/task/{tids[int(i)]}/comm", "w") as f:
            f.write(name)
        print("ok", flush=True)
    """
)


@pytest.fixture
def child():  # type: ignore[no-untyped-def]
    p = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    tids = [int(t) for t in p.stdout.readline().split()]
    yield p, tids
    p.kill()
    p.wait()


def _tracker(pid: int, use_perf: bool = True, discover_every: int = 1000, sample_every: int = 1) -> ThreadTracker:
    return ThreadTracker(Root("/proc"), Root("/sys/fs/cgroup"), TargetSelector(pids=(pid,)), use_perf=use_perf,
                         discover_every=discover_every, sample_every=sample_every)


def _last_cpu(pid: int, tid: int) -> int:
    text = open(f"/proc/{pid}/task/{tid}/stat").read()
    return int(text[text.rfind(")") + 2 :].split()[36])


def test_a_comm_renamed_while_asleep_shows_by_the_next_rediscovery(child) -> None:  # type: ignore[no-untyped-def]
    p, tids = child
    tr = _tracker(p.pid, discover_every=3)
    try:
        assert tr.sample()[tids[0]].comm not in ("", "worker-renamed")
        p.stdin.write("rename 0 worker-renamed\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "ok"
        seen = [tr.sample()[tids[0]].comm for _ in range(3)]
        assert seen[-1] == "worker-renamed"
    finally:
        tr.close()


@pytest.mark.parametrize("use_perf", [True, False])
def test_a_thread_moved_by_someone_else_shows_its_new_cpu(child, use_perf: bool) -> None:  # type: ignore[no-untyped-def]
    p, tids = child
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    tid = tids[0]
    os.sched_setaffinity(tid, {cpus[0]})
    tr = _tracker(p.pid, use_perf=use_perf)
    try:
        time.sleep(0.02)
        assert tr.sample()[tid].last_cpu == cpus[0]
        for _ in range(3):
            time.sleep(0.01)
            assert tr.sample()[tid].last_cpu == cpus[0]
        os.sched_setaffinity(tid, {cpus[1]})  # not through the tracker
        got = []
        for _ in range(3):
            time.sleep(0.02)  # it runs every few ms: on its new CPU by now
            got.append(tr.sample()[tid].last_cpu)
        # The migration is counted when the thread next runs: seen at once or one later.
        assert got[-1] == cpus[1] == _last_cpu(p.pid, tid)
    finally:
        tr.close()


def test_a_thread_moved_by_ailfmd_shows_its_new_cpu_at_the_next_call(child, tmp_path) -> None:  # type: ignore[no-untyped-def]
    p, tids = child
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    tid = tids[1]
    os.sched_setaffinity(tid, {cpus[0]})
    tr = _tracker(p.pid, sample_every=3)
    journal = Journal(tmp_path / "run")
    try:
        time.sleep(0.02)
        ref = tr.sample()[tid].ref
        out = tr.set_affinity(ref, frozenset({cpus[1]}), journal)
        assert out.ok
        time.sleep(0.02)
        assert tr.sample()[tid].last_cpu == cpus[1]
    finally:
        tr.close()
        journal.close()


def test_stat_is_not_read_again_while_a_thread_stays_put(child, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    p, tids = child
    for t in tids:
        os.sched_setaffinity(t, {min(os.sched_getaffinity(0))})
    tr = _tracker(p.pid)
    try:
        if "cpu_migrations" not in tr._events:
            pytest.skip("no perf cpu_migrations counter here: stat is read at every measurement")
        time.sleep(0.02)
        tr.sample()  # first measurement: stat read
        reads: list[int] = []
        real = ThreadTracker._read_stat

        def counted(tr_: threads_mod._Tracked) -> None:
            reads.append(tr_.ref.tid)
            real(tr_)

        monkeypatch.setattr(ThreadTracker, "_read_stat", staticmethod(counted))
        measured = 0
        for _ in range(5):
            time.sleep(0.01)
            measured += len(tr.sample())
        assert measured >= 10 and len(reads) < measured / 2
    finally:
        tr.close()
