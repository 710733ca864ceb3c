"""Target thread discovery: real child processes, fixture cgroupfs and procfs trees."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from childproc import THREADS_CHILD as _CHILD
from childproc import start_child, start_child_with, stop_child

from ailfmd.errors import ConfigError, NoSuchThread, SysfsError
from ailfmd.platform.base import ThreadRef
from ailfmd.platform.linux import procfs as pfs
from ailfmd.platform.linux.sysfs import Root
from ailfmd.platform.linux.targets import (
    TargetSelector,
    cgroup_thread_ids,
    discover_threads,
    unit_cgroup_paths,
)

PROC = Root("/proc")

@dataclass
class Child:
    proc: subprocess.Popen[str]
    pid: int
    tids: tuple[int, ...]  # main thread first

    def refs(self) -> set[ThreadRef]:
        return {
            ThreadRef(self.pid, tid, pfs.read_start_ticks(PROC, self.pid, tid)) for tid in self.tids
        }


@pytest.fixture
def spawn():
    """Start multi-threaded children; every one is killed at teardown."""
    procs: list[subprocess.Popen[str]] = []

    def start(comm: str = "", executable: str | None = None) -> Child:
        if executable is None:
            proc, words = start_child(_CHILD, comm)
        else:  # the same script under another interpreter name (comm/argv[0] tests)
            proc, words = start_child_with(executable, _CHILD, comm)
        procs.append(proc)
        tids = tuple(int(x) for x in words)
        assert len(tids) == 4, "child did not report its threads"
        return Child(proc, proc.pid, tids)

    try:
        yield start
    finally:
        for proc in procs:
            stop_child(proc)


def _unique(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(3)}"


# --------------------------------------------------------------------------- selector


def test_selector_is_validated_with_clear_errors() -> None:
    with pytest.raises(ConfigError) as info:
        TargetSelector(comm_patterns=("llama(",))
    assert info.value.key == "comm_patterns" and info.value.value == "llama("
    assert "llama(" in str(info.value) and "regular expression" in str(info.value)
    for bad_pid in (0, -3, True, "12"):
        with pytest.raises(ConfigError, match="pids"):
            TargetSelector(pids=(bad_pid,))  # type: ignore[arg-type]
    for bad_path in ("/", "a/../b", ""):
        with pytest.raises(ConfigError, match="cgroup_paths"):
            TargetSelector(cgroup_paths=(bad_path,))
    for bad_unit in ("foo", "foo.timer", "system.slice/multi-user.target", "/"):
        with pytest.raises(ConfigError, match="systemd_units"):
            TargetSelector(systemd_units=(bad_unit,))
    with pytest.raises(ConfigError, match="must be a list"):
        TargetSelector(comm_patterns="llama")  # type: ignore[arg-type]
    units = ["system.slice/foo.service"]
    sel = TargetSelector(pids=[5], systemd_units=units)  # type: ignore[arg-type]
    assert sel.pids == (5,) and isinstance(sel.systemd_units, tuple)
    assert TargetSelector().is_empty and not sel.is_empty


# --------------------------------------------------------------------------- real /proc


def test_by_pid_finds_every_thread(spawn) -> None:
    a, b = spawn(), spawn()
    found = discover_threads(TargetSelector(pids=(a.pid,)), PROC)
    assert set(found) == a.refs()
    assert [r.tid for r in found] == sorted(a.tids)
    # A tid given in place of a pid stands for its process; the union has no duplicates.
    found = discover_threads(TargetSelector(pids=(a.tids[2], b.pid, a.pid)), PROC)
    assert set(found) == a.refs() | b.refs()
    assert len(found) == 8


def test_own_process_is_never_a_target(spawn) -> None:
    a = spawn()
    found = discover_threads(TargetSelector(pids=(os.getpid(), a.pid)), PROC)
    assert set(found) == a.refs()
    own_comm = pfs.read_comm(PROC, os.getpid())
    found = discover_threads(TargetSelector(comm_patterns=(f"^{re.escape(own_comm)}$",)), PROC)
    assert all(r.pid != os.getpid() for r in found)


def test_gone_pid_gives_nothing(spawn) -> None:
    a = spawn()
    a.proc.kill()
    a.proc.wait(10)
    assert discover_threads(TargetSelector(pids=(a.pid,)), PROC) == ()


def test_by_comm_regex(spawn) -> None:
    name = _unique("ailfm-t-")
    a, other = spawn(name), spawn(_unique("ailfm-o-"))
    found = discover_threads(TargetSelector(comm_patterns=(f"^{name}$",)), PROC)
    assert set(found) == a.refs()
    # re.search semantics: an unanchored part of the name matches too.
    found = discover_threads(TargetSelector(comm_patterns=(name[6:],)), PROC)
    assert set(found) == a.refs()
    assert not {r.pid for r in found} & {other.pid}


def test_by_argv0_basename(spawn, tmp_path: Path) -> None:
    tag = secrets.token_hex(3)
    bindir = tmp_path / f"dir-{tag}"
    bindir.mkdir()
    exe = bindir / f"ailfm-a-name-longer-than-comm-{tag}"
    exe.symlink_to(sys.executable)
    a = spawn("plain-comm", str(exe))
    assert pfs.read_comm(PROC, a.pid) == "plain-comm"
    # Matches the basename beyond comm's 15 bytes...
    found = discover_threads(TargetSelector(comm_patterns=(f"than-comm-{tag}$",)), PROC)
    assert set(found) == a.refs()
    # ...but not the directories above it.
    assert discover_threads(TargetSelector(comm_patterns=(f"dir-{tag}",)), PROC) == ()


def test_kernel_threads_are_never_targets() -> None:
    kthreads = [pid for pid in pfs.list_pids(PROC)[:50] if _is_kthread(pid)]
    if not kthreads:
        pytest.skip("no kernel threads visible in this procfs")
    assert discover_threads(TargetSelector(pids=tuple(kthreads)), PROC) == ()


def _is_kthread(pid: int) -> bool:
    try:
        return pfs.read_task_stat(PROC, pid, pid).is_kernel_thread
    except (NoSuchThread, SysfsError):
        return False


# --------------------------------------------------------------------------- cgroups


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _unused_tid() -> int:
    tid = 4_000_000
    while Path(f"/proc/{tid}").exists():
        tid += 1
    return tid


def test_by_cgroup_path_with_child_cgroups(spawn, tmp_path: Path) -> None:
    a, other = spawn(), spawn()
    cg = tmp_path / "cgroup"
    svc = cg / "system.slice" / "foo.service"
    gone = _unused_tid()
    _write(svc / "cgroup.threads", f"{a.tids[0]}\n{a.tids[1]}\n{gone}\n{os.getpid()}\n")
    _write(svc / "workers" / "cgroup.threads", f"{a.tids[2]}\n")
    _write(svc / "workers" / "deeper" / "cgroup.threads", f"{a.tids[3]}\n")
    _write(cg / "system.slice" / "bar.service" / "cgroup.threads", f"{other.pid}\n")

    assert set(cgroup_thread_ids(Root(cg), "/system.slice/foo.service/")) == {
        *a.tids,
        gone,
        os.getpid(),
    }
    sel = TargetSelector(cgroup_paths=("system.slice/foo.service",))
    found = discover_threads(sel, PROC, Root(cg))
    # The vanished tid and our own thread are left out; child cgroups are included.
    assert set(found) == a.refs()
    sel = TargetSelector(cgroup_paths=("system.slice/foo.service/workers",))
    assert {r.tid for r in discover_threads(sel, PROC, Root(cg))} == {a.tids[2], a.tids[3]}
    sel = TargetSelector(cgroup_paths=("system.slice/absent.service",))
    assert discover_threads(sel, PROC, Root(cg)) == ()


def test_garbage_cgroup_threads_names_the_file(tmp_path: Path) -> None:
    _write(tmp_path / "x.slice" / "cgroup.threads", "12\nnope\n")
    with pytest.raises(SysfsError) as info:
        cgroup_thread_ids(Root(tmp_path), "x.slice")
    assert info.value.path == "x.slice/cgroup.threads"


def _fake_process(
    proc: Path, pid: int, tids: list[int], cgroup: str, kthread: bool = False
) -> None:
    _write(proc / str(pid) / "cgroup", f"0::{cgroup}\n")
    _write(proc / str(pid) / "comm", f"p{pid}\n")
    _write(proc / str(pid) / "cmdline", f"/bin/p{pid}\0")
    flags = 0x208040 if kthread else 0x400040
    for tid in tids:
        rest = ["0"] * 50
        rest[0], rest[6], rest[19], rest[36] = "S", str(flags), str(1000 + tid), "0"
        _write(proc / str(pid) / "task" / str(tid) / "stat", f"{tid} (p{pid}) {' '.join(rest)}\n")
        _write(proc / str(tid) / "status", f"Name:\tp{pid}\nTgid:\t{pid}\n")


@pytest.fixture
def fake_system(tmp_path: Path) -> tuple[Root, Root]:
    """A procfs and cgroupfs as systemd arranges them, with a user manager too."""
    proc, cg = tmp_path / "proc", tmp_path / "cgroup"
    user_foo = "/user.slice/user-1000.slice/user@1000.service/app.slice/foo.service"
    _fake_process(proc, 100, [100, 101], "/system.slice/foo.service")
    _fake_process(proc, 200, [200], "/system.slice/bar.service/payload")  # Delegate=yes
    _fake_process(proc, 300, [300, 301], user_foo)
    _fake_process(proc, 400, [400], "/system.slice/foo.service.d-lookalike.service")
    _fake_process(proc, 2, [2], "/", kthread=True)
    _write(cg / "system.slice/foo.service/cgroup.threads", "100\n101\n102\n")  # 102 vanished
    _write(cg / "system.slice/bar.service/payload/cgroup.threads", "200\n")
    _write(cg / user_foo.lstrip("/") / "cgroup.threads", "300\n301\n")
    _write(cg / "system.slice/foo.service.d-lookalike.service/cgroup.threads", "400\n")
    _write(cg / "cgroup.threads", "2\n")
    return Root(proc), Root(cg)


def test_systemd_unit_resolved_from_proc_cgroup(fake_system: tuple[Root, Root]) -> None:
    proc, cg = fake_system
    assert unit_cgroup_paths(proc, "bar.service") == ("system.slice/bar.service",)
    assert unit_cgroup_paths(proc, "system.slice/foo.service") == ("system.slice/foo.service",)
    assert unit_cgroup_paths(proc, "nothere.service") == ()

    def tids(*units: str, self_pid: int = 1) -> list[int]:
        sel = TargetSelector(systemd_units=units)
        return [r.tid for r in discover_threads(sel, proc, cg, self_pid=self_pid)]

    # A bare name matches the unit in every slice and user manager, never a lookalike.
    assert tids("foo.service") == [100, 101, 300, 301]
    assert tids("system.slice/foo.service") == [100, 101]
    assert tids("bar.service") == [200]  # processes only in a delegated sub-cgroup
    assert tids("system.slice/foo.service", self_pid=100) == []
    found = discover_threads(TargetSelector(systemd_units=("foo.service",)), proc, cg, self_pid=1)
    assert found[0] == ThreadRef(pid=100, tid=100, start_ticks=1100)
    assert found[-1] == ThreadRef(pid=300, tid=301, start_ticks=1301)


def test_union_of_selectors_on_a_fixture(fake_system: tuple[Root, Root]) -> None:
    proc, cg = fake_system
    sel = TargetSelector(
        pids=(200, 2),
        comm_patterns=("^p4",),
        cgroup_paths=("user.slice",),
        systemd_units=("system.slice/foo.service",),
    )
    found = discover_threads(sel, proc, cg, self_pid=1)
    assert [(r.pid, r.tid) for r in found] == [
        (100, 100), (100, 101), (200, 200), (300, 300), (300, 301), (400, 400)
    ]


# --------------------------------------------------------------------------- real cgroup v2


def _cgroup2_mount() -> Path | None:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split()[:1] == ["cgroup2"]:
            return Path(left.split()[4])
    return None


def test_real_cgroup_v2_tree(spawn) -> None:
    mount = _cgroup2_mount()
    if mount is None:
        pytest.skip("no cgroup2 mount")
    name = _unique("ailfm-test-")
    top = mount / name
    a, b = spawn(), spawn()
    try:
        (top / "leaf").mkdir(parents=True)
    except OSError as e:
        pytest.skip(f"cannot create a cgroup under {mount}: {e.strerror}")
    try:
        try:
            (top / "cgroup.procs").write_text(str(a.pid))
            (top / "leaf" / "cgroup.procs").write_text(str(b.pid))
        except OSError as e:
            pytest.skip(f"cannot move a process into {top}: {e.strerror}")
        assert pfs.read_cgroup_v2_path(PROC, a.pid) is not None
        found = discover_threads(TargetSelector(cgroup_paths=(name,)), PROC, Root(mount))
        assert set(found) == a.refs() | b.refs()
        found = discover_threads(TargetSelector(cgroup_paths=(f"{name}/leaf",)), PROC, Root(mount))
        assert set(found) == b.refs()
    finally:
        # A cgroup can only be removed once its processes are gone.
        for c in (a, b):
            c.proc.kill()
            c.proc.wait(10)
        for d in (top / "leaf", top):
            try:
                d.rmdir()
            except OSError:
                pass


def test_hybrid_cgroup_layout_is_found(tmp_path: Path, machine_sys) -> None:
    """Hybrid hosts mount v1 controllers at /sys/fs/cgroup and v2 at .../unified."""
    from ailfmd.platform.linux.platform import LinuxPlatform, find_cgroup2

    (tmp_path / "cg" / "unified").mkdir(parents=True)
    (tmp_path / "cg" / "unified" / "cgroup.controllers").write_text("cpu memory\n")
    root, note = find_cgroup2(tmp_path / "cg")
    assert root.path == tmp_path / "cg" / "unified" and note and "hybrid" in note
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "cgroup.controllers").write_text("cpu\n")
    root, note = find_cgroup2(tmp_path / "v2")
    assert root.path == tmp_path / "v2" and note is None
    plat = LinuxPlatform(sysfs_root=machine_sys("vm-bare"), run_dir=tmp_path / "run", cgroupfs_root=tmp_path / "none",
                         use_perf=False)
    assert any("no cgroup v2 hierarchy" in n for n in plat.capabilities().notes)
    plat.close()
