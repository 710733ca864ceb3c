"""A process's cpuset: read from fixture cgroup trees (v2 and v1) and from this machine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ailfmd.errors import NoSuchThread, SysfsError
from ailfmd.platform.linux import procfs as pfs
from ailfmd.platform.linux.cpusets import process_cpuset
from ailfmd.platform.linux.platform import LinuxPlatform, find_cgroup2
from ailfmd.platform.linux.sysfs import Root
from ailfmd.platform.linux.targets import TargetSelector
from ailfmd.platform.linux.threads import ThreadTracker
from childproc import THREADS_CHILD, child_process

PID = 4242


def _write(root: Path, rel: str, text: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def _trees(tmp_path: Path, cgroup_lines: str) -> tuple[Root, Root, Root, Path]:
    """procfs, the v2 hierarchy, the v1 cpuset hierarchy (as on a hybrid system: the
    mount point holds the v1 controllers and "unified"), and the mount point."""
    proc, cg = tmp_path / "proc", tmp_path / "cgroup"
    _write(proc, f"{PID}/cgroup", cgroup_lines)
    (cg / "unified").mkdir(parents=True)
    return Root(proc), Root(cg / "unified"), Root(cg / "cpuset"), cg


def test_v2_leaf_cpuset(tmp_path: Path) -> None:
    proc, cgroupfs, v1, cg = _trees(tmp_path, "0::/system.slice/llama.service\n")
    _write(cg, "unified/cpuset.cpus.effective", "0-63\n")
    _write(cg, "unified/system.slice/cpuset.cpus.effective", "0-63\n")
    _write(cg, "unified/system.slice/llama.service/cpuset.cpus.effective", "4-35\n")
    assert process_cpuset(proc, cgroupfs, v1, PID) == frozenset(range(4, 36))


def test_v2_without_the_controller_below_takes_the_nearest_ancestor(tmp_path: Path) -> None:
    # The cpuset controller enabled for the slice only: the service has no cpuset files.
    proc, cgroupfs, v1, cg = _trees(tmp_path, "0::/machine.slice/pod1/ctr\n")
    _write(cg, "unified/cpuset.cpus.effective", "0-63")
    _write(cg, "unified/machine.slice/cpuset.cpus.effective", "8-15,40-47")
    (cg / "unified/machine.slice/pod1/ctr").mkdir(parents=True)
    assert process_cpuset(proc, cgroupfs, v1, PID) == frozenset([*range(8, 16), *range(40, 48)])


def test_v2_empty_effective_set_is_the_parents(tmp_path: Path) -> None:
    proc, cgroupfs, v1, cg = _trees(tmp_path, "0::/a\n")
    _write(cg, "unified/cpuset.cpus.effective", "0-3")
    _write(cg, "unified/a/cpuset.cpus.effective", "\n")
    assert process_cpuset(proc, cgroupfs, v1, PID) == frozenset(range(4))


def test_no_cpuset_anywhere_is_unknown(tmp_path: Path) -> None:
    proc, cgroupfs, v1, cg = _trees(tmp_path, "0::/user.slice\n")
    (cg / "unified/user.slice").mkdir()
    assert process_cpuset(proc, cgroupfs, v1, PID) is None


def test_v1_cpuset_hierarchy_wins_over_v2(tmp_path: Path) -> None:
    # A hybrid machine (this VM's layout): the cpuset controller is in a v1 hierarchy.
    proc, cgroupfs, v1, cg = _trees(tmp_path, "9:name=systemd:/\n3:cpuset:/docker/abc\n0::/\n")
    _write(cg, "unified/cpuset.cpus.effective", "0-63")
    _write(cg, "cpuset/cpuset.effective_cpus", "0-63")
    _write(cg, "cpuset/docker/abc/cpuset.effective_cpus", "2,3")
    assert process_cpuset(proc, cgroupfs, v1, PID) == frozenset({2, 3})


def test_v1_without_effective_cpus_reads_cpuset_cpus(tmp_path: Path) -> None:
    proc, cgroupfs, v1, cg = _trees(tmp_path, "3:cpuset:/lxc/web\n")
    _write(cg, "cpuset/lxc/web/cpuset.cpus", "0-1")
    assert process_cpuset(proc, cgroupfs, v1, PID) == frozenset({0, 1})


def test_a_bad_cpu_list_names_the_file(tmp_path: Path) -> None:
    proc, cgroupfs, v1, cg = _trees(tmp_path, "0::/svc\n")
    _write(cg, "unified/svc/cpuset.cpus.effective", "4-x")
    with pytest.raises(SysfsError) as e:
        process_cpuset(proc, cgroupfs, v1, PID)
    assert "svc/cpuset.cpus.effective" in str(e.value) and "4-x" in str(e.value)


def test_a_gone_process_is_no_such_thread(tmp_path: Path) -> None:
    proc, cgroupfs, v1, _ = _trees(tmp_path, "0::/\n")
    with pytest.raises(NoSuchThread):
        process_cpuset(proc, cgroupfs, v1, PID + 1)


def test_this_machine_confines_us_within_our_cpuset() -> None:
    cgroup2, _note = find_cgroup2(Path("/sys/fs/cgroup"))
    got = process_cpuset(Root("/proc"), cgroup2, Root("/sys/fs/cgroup/cpuset"), os.getpid())
    # The kernel keeps every affinity inside the cpuset.
    assert got is None or frozenset(os.sched_getaffinity(0)) <= got


def _mirror_cpuset(cg: Path, pid: int, cpus: str, v2_dir: str = "") -> None:
    """Put a cpuset file where this machine's cgroup layout says ``pid``'s cpuset is:
    ``cg/cpuset/...`` for a v1 cpuset hierarchy, ``cg/<v2_dir>/...`` for v2."""
    entries = pfs.read_cgroups(Root("/proc"), pid)
    v1 = [e for e in entries if "cpuset" in e.controllers]
    if v1:
        parts = ("cpuset", v1[0].path.strip("/"), "cpuset.effective_cpus")
    else:
        parts = (v2_dir, next(e.path for e in entries if e.hierarchy_id == 0).strip("/"), "cpuset.cpus.effective")
    _write(cg, "/".join(p for p in parts if p), cpus)


def test_tracked_threads_carry_their_process_cpuset(tmp_path: Path) -> None:
    """A real process's threads, its cgroup as this machine's /proc says, that cgroup's
    cpuset from a fixture tree: every sample carries it, and a change is seen at the next
    re-discovery."""
    cg = tmp_path / "cgroup"
    with child_process(THREADS_CHILD, "") as (child, _words):
        _mirror_cpuset(cg, child.pid, "0\n")
        tr = ThreadTracker(Root("/proc"), Root(cg), TargetSelector(pids=(child.pid,)), use_perf=False,
                           discover_every=2)
        try:
            first = tr.sample()
            assert len(first) == 4 and {s.cpuset for s in first.values()} == {frozenset({0})}
            _mirror_cpuset(cg, child.pid, "0-1,5\n")
            seen = [tr.sample() for _ in range(3)]
            assert {s.cpuset for s in seen[-1].values()} == {frozenset({0, 1, 5})}
            assert "within each process's cpuset" in tr.capabilities()["affinity"].detail
        finally:
            tr.close()


def test_the_platform_finds_cpusets_on_a_hybrid_layout(tmp_path: Path, machine_sys) -> None:
    """v2 under ``unified``, v1 controllers beside it (Debian with systemd's hybrid
    layout, and this VM): the threads of a real process carry the cpuset of whichever
    hierarchy holds the controller."""
    cg = tmp_path / "cgroup"
    _write(cg, "unified/cgroup.controllers", "cpu io memory pids\n")
    with child_process(THREADS_CHILD, "") as (child, _words):
        _mirror_cpuset(cg, child.pid, "2-3\n", v2_dir="unified")
        plat = LinuxPlatform(sysfs_root=machine_sys("xeon-2s-ht"), run_dir=tmp_path / "run", use_perf=False,
                             cgroupfs_root=cg, targets=TargetSelector(pids=(child.pid,)))
        try:
            threads = plat.observe().threads
            assert len(threads) == 4 and {s.cpuset for s in threads.values()} == {frozenset({2, 3})}
        finally:
            plat.close()
