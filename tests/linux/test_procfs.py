"""procfs readers: the real /proc of a real child process, and small fixture trees."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from childproc import child_process

from ailfmd.errors import NoSuchThread, SysfsError
from ailfmd.platform.linux import procfs as pfs
from ailfmd.platform.linux.sysfs import Root

PROC = Root("/proc")

# Main thread named "ailfm-proc-t"; a spinning thread that renames itself to a comm
# with a space and parentheses (the case that breaks naive stat parsers); a sleeper.
_CHILD = textwrap.dedent(
    """
    import sys, threading, time
    with open("/proc/self/comm", "w") as f:
        f.write("ailfm-proc-t")
    stop = threading.Event()
    tids = {}
    ready = threading.Barrier(3)
    def spin():
        with open("/proc/thread-self/comm", "w") as f:
            f.write("spin) (x")
        tids["spin"] = threading.get_native_id(); ready.wait()
        while not stop.is_set():
            pass
    def nap():
        tids["nap"] = threading.get_native_id(); ready.wait()
        stop.wait()
    for fn in (spin, nap):
        threading.Thread(target=fn, daemon=True).start()
    ready.wait()
    print(tids["spin"], tids["nap"], flush=True)
    sys.stdin.read()
    stop.set()
    """
)


@dataclass
class Child:
    proc: subprocess.Popen[str]
    args: list[str]
    pid: int
    spin_tid: int
    nap_tid: int


_ARGS = ["extra arg", ""]


@pytest.fixture
def child():
    with child_process(_CHILD, *_ARGS) as (proc, words):
        spin_tid, nap_tid = (int(x) for x in words)
        yield Child(proc, [sys.executable, "-c", _CHILD, *_ARGS], proc.pid, spin_tid, nap_tid)


# --------------------------------------------------------------------------- real /proc


def test_lists_the_threads_of_a_real_process(child: Child) -> None:
    assert pfs.list_tids(PROC, child.pid) == sorted([child.pid, child.spin_tid, child.nap_tid])
    assert child.pid in pfs.list_pids(PROC)
    # Non-leader threads are not listed in the procfs root.
    assert child.spin_tid not in pfs.list_pids(PROC)
    assert pfs.read_tgid(PROC, child.spin_tid) == child.pid


def test_stat_of_real_threads(child: Child) -> None:
    main = pfs.read_task_stat(PROC, child.pid, child.pid)
    spin = pfs.read_task_stat(PROC, child.pid, child.spin_tid)
    nap = pfs.read_task_stat(PROC, child.pid, child.nap_tid)
    # Just after the barrier the sleeper may still be runnable; it blocks soon after.
    deadline = time.monotonic() + 5
    while nap.state != "S" and time.monotonic() < deadline:
        time.sleep(0.01)
        nap = pfs.read_task_stat(PROC, child.pid, child.nap_tid)
    assert (main.tid, main.comm) == (child.pid, "ailfm-proc-t")
    assert (spin.tid, spin.comm) == (child.spin_tid, "spin) (x")
    assert nap.comm == "ailfm-proc-t"  # inherited from the thread that created it
    assert nap.state == "S"
    assert not main.is_kernel_thread
    # Field 22 is what psutil turns into the process creation time.
    clk_tck = os.sysconf("SC_CLK_TCK")
    created = psutil.boot_time() + main.start_ticks / clk_tck
    assert created == pytest.approx(psutil.Process(child.pid).create_time(), abs=2 / clk_tck)
    # Threads start after their process.
    assert spin.start_ticks >= main.start_ticks


def test_stat_and_schedstat_move_for_a_busy_thread(child: Child) -> None:
    cpu = max(os.sched_getaffinity(0))
    os.sched_setaffinity(child.spin_tid, {cpu})
    st0 = pfs.read_task_stat(PROC, child.pid, child.spin_tid)
    ss0 = pfs.read_task_schedstat(PROC, child.pid, child.spin_tid)
    if ss0 is None:
        pytest.skip("kernel without schedstat (CONFIG_SCHED_INFO)")
    t0 = time.monotonic()
    time.sleep(0.4)
    st1 = pfs.read_task_stat(PROC, child.pid, child.spin_tid)
    ss1 = pfs.read_task_schedstat(PROC, child.pid, child.spin_tid)
    elapsed_ns = (time.monotonic() - t0) * 1e9
    assert ss1 is not None
    assert st1.last_cpu == cpu  # field 39, after pinning the thread to one CPU
    assert st1.utime_ticks + st1.stime_ticks > st0.utime_ticks + st0.stime_ticks
    run_ns = ss1.run_ns - ss0.run_ns
    assert 0.05 * elapsed_ns < run_ns <= 1.05 * elapsed_ns + 20e6
    assert ss1.timeslices >= ss0.timeslices
    assert ss1.wait_ns >= ss0.wait_ns


def test_status_cgroup_comm_cmdline(child: Child) -> None:
    assert pfs.read_cpus_allowed(PROC, child.pid) == frozenset(os.sched_getaffinity(child.pid))
    assert pfs.read_status(PROC, child.pid)["Name"] == "ailfm-proc-t"
    assert pfs.read_comm(PROC, child.pid) == "ailfm-proc-t"
    assert pfs.read_comm(PROC, child.pid, child.spin_tid) == "spin) (x"
    assert pfs.read_cmdline(PROC, child.pid) == tuple(child.args)
    raw = Path(f"/proc/{child.pid}/cgroup").read_text().splitlines()
    entries = pfs.read_cgroups(PROC, child.pid)
    assert len(entries) == len(raw)
    v2 = [line.split(":", 2)[2] for line in raw if line.startswith("0::")]
    assert pfs.read_cgroup_v2_path(PROC, child.pid) == (v2[0] if v2 else None)


def test_a_vanished_process_is_no_such_thread(child: Child) -> None:
    c = child
    c.proc.kill()
    c.proc.wait(10)
    readers = [
        lambda: pfs.read_task_stat(PROC, c.pid, c.spin_tid),
        lambda: pfs.read_task_schedstat(PROC, c.pid, c.spin_tid),
        lambda: pfs.read_start_ticks(PROC, c.pid, c.pid),
        lambda: pfs.read_cpus_allowed(PROC, c.pid),
        lambda: pfs.read_cgroups(PROC, c.pid),
        lambda: pfs.read_comm(PROC, c.pid),
        lambda: pfs.read_cmdline(PROC, c.pid),
        lambda: pfs.read_tgid(PROC, c.nap_tid),
    ]
    for read in readers:
        with pytest.raises(NoSuchThread):
            read()
    assert pfs.list_tids(PROC, c.pid) == []


# --------------------------------------------------------------------------- fixtures


def _stat_line(
    tid: int,
    comm: str,
    *,
    state: str = "S",
    flags: int = 0x400040,
    utime: int = 11,
    stime: int = 3,
    start: int = 98765,
    cpu: int = 1,
    nfields: int = 52,
) -> str:
    rest = ["0"] * (nfields - 2)  # fields 3..nfields

    def put(field: int, value: object) -> None:
        if field <= nfields:
            rest[field - 3] = str(value)

    put(3, state)
    put(4, 1)
    put(9, flags)
    put(14, utime)
    put(15, stime)
    put(22, start)
    put(39, cpu)
    return f"{tid} ({comm}) " + " ".join(rest) + "\n"


def _task(root: Path, pid: int, tid: int, files: dict[str, str | bytes]) -> None:
    d = root / str(pid) / "task" / str(tid)
    d.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        if isinstance(content, bytes):
            (d / name).write_bytes(content)
        else:
            (d / name).write_text(content)


@pytest.mark.parametrize("comm", ["a) (b c)", ")", "x (y) z", "((", "sp ace ", ") 1 2 3 ("])
def test_comm_with_spaces_and_parens_splits_at_the_last_paren(tmp_path: Path, comm: str) -> None:
    _task(tmp_path, 40, 41, {"stat": _stat_line(41, comm, state="R", start=555, cpu=3)})
    st = pfs.read_task_stat(Root(tmp_path), 40, 41)
    assert st.comm == comm
    assert (st.tid, st.state, st.start_ticks, st.last_cpu) == (41, "R", 555, 3)
    assert (st.utime_ticks, st.stime_ticks, st.flags) == (11, 3, 0x400040)


def test_kernel_thread_flag(tmp_path: Path) -> None:
    _task(tmp_path, 2, 2, {"stat": _stat_line(2, "kthreadd", flags=0x208040)})
    assert pfs.read_task_stat(Root(tmp_path), 2, 2).is_kernel_thread


def test_stat_without_field_39_has_no_last_cpu(tmp_path: Path) -> None:
    _task(tmp_path, 7, 7, {"stat": _stat_line(7, "old", nfields=30)})
    st = pfs.read_task_stat(Root(tmp_path), 7, 7)
    assert st.last_cpu is None and st.start_ticks == 98765


@pytest.mark.parametrize(
    "text, why",
    [
        ("", "no '(comm)'"),
        ("12 comm S 1 2 3\n", "no '(comm)'"),
        ("x (c) " + " ".join(["0"] * 50), "pid field"),
        ("12 (c) S 1 2 3\n", "fields"),
        (_stat_line(12, "c").replace(" 98765 ", " 98a65 "), "starttime"),
        (_stat_line(12, "c", state="??"), "state"),
        (_stat_line(12, "c", cpu="-" * 3), "processor"),  # type: ignore[arg-type]
    ],
)
def test_garbage_stat_names_the_file(tmp_path: Path, text: str, why: str) -> None:
    _task(tmp_path, 12, 12, {"stat": text})
    with pytest.raises(SysfsError) as info:
        pfs.read_task_stat(Root(tmp_path), 12, 12)
    assert info.value.path == "12/task/12/stat"
    assert why in info.value.reason


def test_schedstat_missing_vs_thread_gone(tmp_path: Path) -> None:
    root = Root(tmp_path)
    _task(tmp_path, 5, 6, {"stat": _stat_line(6, "w")})
    assert pfs.read_task_schedstat(root, 5, 6) is None  # kernel without schedstat
    with pytest.raises(NoSuchThread) as info:
        pfs.read_task_schedstat(root, 5, 7)  # no such thread at all
    assert info.value.tid == 7
    _task(tmp_path, 5, 6, {"schedstat": "100 20 3\n"})
    assert pfs.read_task_schedstat(root, 5, 6) == pfs.SchedStat(100, 20, 3)


@pytest.mark.parametrize("text", ["1 2\n", "1 2 x\n", "\n", "1 2 3 4\n"])
def test_garbage_schedstat_names_the_file(tmp_path: Path, text: str) -> None:
    _task(tmp_path, 5, 6, {"stat": _stat_line(6, "w"), "schedstat": text})
    with pytest.raises(SysfsError, match="5/task/6/schedstat"):
        pfs.read_task_schedstat(Root(tmp_path), 5, 6)


def test_process_files_from_a_fixture(tmp_path: Path) -> None:
    d = tmp_path / "9"
    d.mkdir()
    (d / "comm").write_bytes(b"w\xffrd name \n")
    (d / "cmdline").write_bytes(b"/usr/bin/srv\0--flag\0\0")
    (d / "status").write_text("Name:\tsrv\nTgid:\t9\nCpus_allowed_list:\t0-2,5\n")
    (d / "cgroup").write_text("12:cpu,cpuacct:/a\n1:name=systemd:/x\n0::/sys.slice/a:b.service\n")
    root = Root(tmp_path)
    assert pfs.read_comm(root, 9) == "w\ufffdrd name "
    # An empty argument in the middle survives; the terminating NUL does not add one.
    assert pfs.read_cmdline(root, 9) == ("/usr/bin/srv", "--flag", "")
    assert pfs.read_cpus_allowed(root, 9) == frozenset({0, 1, 2, 5})
    assert pfs.read_tgid(root, 9) == 9
    assert pfs.read_cgroups(root, 9) == (
        pfs.CgroupEntry(12, ("cpu", "cpuacct"), "/a"),
        pfs.CgroupEntry(1, ("name=systemd",), "/x"),
        pfs.CgroupEntry(0, (), "/sys.slice/a:b.service"),
    )
    assert pfs.read_cgroup_v2_path(root, 9) == "/sys.slice/a:b.service"


def test_kernel_thread_cmdline_is_empty_and_bad_files_are_named(tmp_path: Path) -> None:
    d = tmp_path / "3"
    d.mkdir()
    (d / "cmdline").write_bytes(b"")
    (d / "status").write_text("Name:\tx\nCpus_allowed_list:\t0-z\n")
    (d / "cgroup").write_text("zero::/\n")
    root = Root(tmp_path)
    assert pfs.read_cmdline(root, 3) == ()
    with pytest.raises(SysfsError, match="3/status"):
        pfs.read_cpus_allowed(root, 3)
    with pytest.raises(SysfsError, match="3/status.*Tgid"):
        pfs.read_tgid(root, 3)
    with pytest.raises(SysfsError, match="3/cgroup"):
        pfs.read_cgroups(root, 3)
