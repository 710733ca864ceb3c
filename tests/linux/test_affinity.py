"""sched_setaffinity round trips on the threads of a real multi-threaded process."""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from childproc import THREADS_CHILD, child_process

from ailfmd.errors import NoSuchThread, ThreadReused, WriteRefused
from ailfmd.platform.base import ThreadRef
from ailfmd.platform.linux.affinity import get_affinity, set_affinity
from ailfmd.platform.linux.procfs import read_start_ticks
from ailfmd.platform.linux.sysfs import Root, parse_cpu_list

PROC = Root("/proc")

@dataclass
class Child:
    proc: subprocess.Popen[str]
    pid: int
    tids: tuple[int, ...]  # main thread first

    def ref(self, tid: int) -> ThreadRef:
        return ThreadRef(self.pid, tid, read_start_ticks(PROC, self.pid, tid))


@pytest.fixture
def child():
    with child_process(THREADS_CHILD, "") as (proc, words):
        tids = tuple(int(x) for x in words)
        assert len(tids) == 4
        yield Child(proc, proc.pid, tids)


@pytest.fixture
def two_cpus() -> tuple[int, int]:
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip(f"needs 2 CPUs this process may use, has {allowed}")
    return allowed[0], allowed[1]


def _status_cpus(pid: int, tid: int) -> frozenset[int]:
    """Cpus_allowed_list straight from the thread's status file."""
    text = Path(f"/proc/{pid}/task/{tid}/status").read_text()
    m = re.search(r"^Cpus_allowed_list:\s*(\S+)\s*$", text, re.M)
    assert m, text
    return frozenset(parse_cpu_list(m.group(1)))


def _impossible_cpu() -> int:
    """One past the highest CPU this kernel could ever bring online."""
    possible = Path("/sys/devices/system/cpu/possible").read_text()
    return max(parse_cpu_list(possible)) + 1


def test_round_trip_per_thread(child: Child, two_cpus: tuple[int, int]) -> None:
    a, b = two_cpus
    main, w1, w2, w3 = child.tids
    original = get_affinity(main)
    assert original == frozenset(os.sched_getaffinity(main))

    assert set_affinity(PROC, child.ref(w1), frozenset({a})) == {a}
    assert set_affinity(PROC, child.ref(w2), frozenset({b})) == {b}
    for tid, want in ((w1, {a}), (w2, {b})):
        assert os.sched_getaffinity(tid) == want
        assert _status_cpus(child.pid, tid) == want
        assert get_affinity(tid) == want
    # Affinity is per thread: the others keep theirs.
    for tid in (main, w3):
        assert os.sched_getaffinity(tid) == original
        assert _status_cpus(child.pid, tid) == original

    assert set_affinity(PROC, child.ref(w1), frozenset({a, b})) == {a, b}
    assert _status_cpus(child.pid, w1) == {a, b}


def test_result_is_what_the_kernel_applied(child: Child, two_cpus: tuple[int, int]) -> None:
    a, _ = two_cpus
    w = child.tids[1]
    got = set_affinity(PROC, child.ref(w), frozenset({a, _impossible_cpu()}))
    assert got == {a} == os.sched_getaffinity(w)


def test_reused_start_time_is_refused_untouched(child: Child, two_cpus: tuple[int, int]) -> None:
    a, _ = two_cpus
    w = child.tids[1]
    before = os.sched_getaffinity(w)
    real = child.ref(w)
    stale = ThreadRef(real.pid, real.tid, real.start_ticks - 1)
    with pytest.raises(ThreadReused) as info:
        set_affinity(PROC, stale, frozenset({a}))
    assert info.value.tid == w
    assert str(real.start_ticks) in str(info.value)
    assert os.sched_getaffinity(w) == before


def test_vanished_thread(two_cpus: tuple[int, int], child: Child) -> None:
    a, _ = two_cpus
    c = child
    ref = c.ref(c.tids[2])
    c.proc.kill()
    c.proc.wait(10)
    with pytest.raises(NoSuchThread) as info:
        set_affinity(PROC, ref, frozenset({a}))
    assert info.value.tid == ref.tid
    with pytest.raises(NoSuchThread):
        get_affinity(ref.tid)


def test_empty_and_impossible_sets_are_refused(child: Child, two_cpus: tuple[int, int]) -> None:
    w = child.tids[3]
    before = os.sched_getaffinity(w)
    ref = child.ref(w)
    with pytest.raises(WriteRefused) as info:
        set_affinity(PROC, ref, frozenset())
    assert f"tid {w}" in str(info.value) and "empty" in str(info.value)

    impossible = _impossible_cpu()
    with pytest.raises(WriteRefused) as info:
        set_affinity(PROC, ref, frozenset({impossible}))
    assert f"tid {w}" in str(info.value)
    assert info.value.value == str(impossible)
    assert info.value.reason.startswith("EINVAL")

    with pytest.raises(WriteRefused, match="integers >= 0"):
        set_affinity(PROC, ref, frozenset({-1}))
    assert os.sched_getaffinity(w) == before
