"""Readers of per-process and per-thread files under an injected procfs root.

Threads come and go while we read: a file that vanishes (ENOENT) or a task that
died between open and read (ESRCH) becomes :class:`NoSuchThread`, never a
traceback. Content that cannot be parsed becomes :class:`SysfsError` naming the
file. Text is decoded leniently because ``comm`` and ``cmdline`` are arbitrary
bytes chosen by the process.

Field numbers follow proc(5) (1-based): in ``stat``, 2 is ``(comm)``, 3 state,
9 flags (PF_*), 14 utime, 15 stime (clock ticks), 22 starttime (clock ticks after
boot), 39 processor (the CPU the task last ran on).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from ailfmd.errors import NoSuchThread, SysfsError
from ailfmd.platform.linux.sysfs import Root, parse_cpu_list

_MAX_READ_BYTES = 1 << 20  # cmdline of a huge argv; everything else is tiny

PF_KTHREAD = 0x00200000  # include/linux/sched.h: the task is a kernel thread

# stat fields (1-based, per proc(5)) and their index in the part after "(comm)".
_STAT_FIRST_AFTER_COMM = 3
_STAT_STATE = 3
_STAT_FLAGS = 9
_STAT_UTIME = 14
_STAT_STIME = 15
_STAT_STARTTIME = 22
_STAT_PROCESSOR = 39


@dataclass(frozen=True)
class TaskStat:
    """The parts of ``/proc/<pid>/task/<tid>/stat`` ailfmd uses."""

    tid: int
    comm: str
    state: str  # R, S, D, Z, T, t, X, I, ...
    flags: int  # field 9, PF_* bits
    utime_ticks: int
    stime_ticks: int
    start_ticks: int  # field 22: identifies this thread across tid reuse
    last_cpu: int | None  # field 39; None if the kernel does not report it

    @property
    def is_kernel_thread(self) -> bool:
        return bool(self.flags & PF_KTHREAD)


@dataclass(frozen=True)
class SchedStat:
    """``/proc/<pid>/task/<tid>/schedstat``: time on CPU, time runnable but waiting."""

    run_ns: int
    wait_ns: int
    timeslices: int


@dataclass(frozen=True)
class CgroupEntry:
    """One line of ``/proc/<pid>/cgroup``; v2 is hierarchy 0 with no controllers."""

    hierarchy_id: int
    controllers: tuple[str, ...]
    path: str


# --------------------------------------------------------------------------- low level


def _task_dir(pid: int, tid: int | None) -> str:
    return f"{pid}" if tid is None else f"{pid}/task/{tid}"


def read_bytes(procfs: Root, rel: str, thread_id: int) -> bytes:
    """Raw content of a procfs file; a vanished task raises NoSuchThread(thread_id)."""
    try:
        with open(procfs.join(rel), "rb") as f:
            return f.read(_MAX_READ_BYTES)
    except (FileNotFoundError, NotADirectoryError, ProcessLookupError):
        raise NoSuchThread(thread_id, f"{rel} vanished") from None
    except PermissionError:
        raise SysfsError(rel, "permission denied") from None
    except OSError as e:
        if e.errno == errno.ESRCH:
            raise NoSuchThread(thread_id, f"{rel}: ESRCH") from None
        name = errno.errorcode.get(e.errno or 0, str(e.errno))
        raise SysfsError(rel, f"read failed: {name}") from None


def _read_text(procfs: Root, rel: str, thread_id: int) -> str:
    return read_bytes(procfs, rel, thread_id).decode("utf-8", errors="replace")


def _int_field(rel: str, what: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise SysfsError(rel, f"{what} is not an integer: {text[:40]!r}") from None


# --------------------------------------------------------------------------- listing


def list_pids(procfs: Root) -> list[int]:
    """Process ids present in procfs (numeric entries of the root), sorted."""
    return sorted(int(n) for n in procfs.listdir("") if n.isdigit())


def list_tids(procfs: Root, pid: int) -> list[int]:
    """Thread ids of ``pid`` from ``/proc/<pid>/task``; empty if the process is gone."""
    rel = f"{pid}/task"
    try:
        names = os.listdir(procfs.join(rel))
    except (FileNotFoundError, NotADirectoryError, ProcessLookupError):
        return []
    except OSError as e:
        if e.errno == errno.ESRCH:
            return []
        raise SysfsError(rel, os.strerror(e.errno or 0)) from None
    return sorted(int(n) for n in names if n.isdigit())


# --------------------------------------------------------------------------- stat


def parse_task_stat(text: str, rel: str = "stat") -> TaskStat:
    """Parse a ``stat`` line. ``comm`` may hold spaces and ')', so split at the LAST ')'."""
    open_at = text.find("(")
    close_at = text.rfind(")")
    if open_at < 0 or close_at < open_at:
        raise SysfsError(rel, "no '(comm)' in stat")
    tid = _int_field(rel, "pid field", text[:open_at].strip())
    comm = text[open_at + 1 : close_at]
    rest = text[close_at + 1 :].split()

    def field(n: int) -> str:
        return rest[n - _STAT_FIRST_AFTER_COMM]

    if len(rest) < _STAT_STARTTIME - _STAT_FIRST_AFTER_COMM + 1:
        raise SysfsError(rel, f"stat has {len(rest) + 2} fields, need at least {_STAT_STARTTIME}")
    state = field(_STAT_STATE)
    if len(state) != 1 or not state.isalpha():
        raise SysfsError(rel, f"bad state field {state[:10]!r}")
    last_cpu = None
    if len(rest) >= _STAT_PROCESSOR - _STAT_FIRST_AFTER_COMM + 1:
        last_cpu = _int_field(rel, "processor (field 39)", field(_STAT_PROCESSOR))
    return TaskStat(
        tid=tid,
        comm=comm,
        state=state,
        flags=_int_field(rel, "flags (field 9)", field(_STAT_FLAGS)),
        utime_ticks=_int_field(rel, "utime (field 14)", field(_STAT_UTIME)),
        stime_ticks=_int_field(rel, "stime (field 15)", field(_STAT_STIME)),
        start_ticks=_int_field(rel, "starttime (field 22)", field(_STAT_STARTTIME)),
        last_cpu=last_cpu,
    )


def read_task_stat(procfs: Root, pid: int, tid: int) -> TaskStat:
    """``/proc/<pid>/task/<tid>/stat``, parsed."""
    rel = f"{_task_dir(pid, tid)}/stat"
    return parse_task_stat(_read_text(procfs, rel, tid), rel)


def read_start_ticks(procfs: Root, pid: int, tid: int) -> int:
    """Field 22 of the thread's stat: its start time, our guard against tid reuse."""
    return read_task_stat(procfs, pid, tid).start_ticks


# --------------------------------------------------------------------------- schedstat


def read_task_schedstat(procfs: Root, pid: int, tid: int) -> SchedStat | None:
    """``/proc/<pid>/task/<tid>/schedstat``; None if this kernel has none.

    The file is absent without CONFIG_SCHED_INFO; that is told apart from a vanished
    thread by whether the thread's ``stat`` is still there.
    """
    rel = f"{_task_dir(pid, tid)}/schedstat"
    try:
        text = _read_text(procfs, rel, tid)
    except NoSuchThread:
        if procfs.join(f"{_task_dir(pid, tid)}/stat").exists():
            return None
        raise
    return parse_schedstat(text, rel)


def parse_schedstat(text: str, rel: str = "schedstat") -> SchedStat:
    """Parse ``run_ns wait_ns timeslices``."""
    parts = text.split()
    if len(parts) != 3:
        raise SysfsError(rel, f"expected 3 numbers, got {text.strip()[:60]!r}")
    run_ns, wait_ns, slices = (_int_field(rel, "schedstat value", p) for p in parts)
    return SchedStat(run_ns=run_ns, wait_ns=wait_ns, timeslices=slices)


# --------------------------------------------------------------------------- status


def read_status(procfs: Root, pid: int, tid: int | None = None) -> dict[str, str]:
    """``status`` of a process (or of one of its threads) as key -> raw value."""
    rel = f"{_task_dir(pid, tid)}/status"
    out: dict[str, str] = {}
    for line in _read_text(procfs, rel, pid if tid is None else tid).splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def read_cpus_allowed(procfs: Root, pid: int, tid: int | None = None) -> frozenset[int]:
    """``Cpus_allowed_list`` of the process (or thread): the CPUs it may run on."""
    rel = f"{_task_dir(pid, tid)}/status"
    status = read_status(procfs, pid, tid)
    text = status.get("Cpus_allowed_list")
    if text is None:
        raise SysfsError(rel, "no Cpus_allowed_list")
    try:
        return frozenset(parse_cpu_list(text, rel))
    except ValueError as e:
        raise SysfsError(rel, str(e)) from None


def read_tgid(procfs: Root, tid: int) -> int:
    """The process (thread group) a thread belongs to, from ``/proc/<tid>/status``.

    ``/proc/<tid>`` resolves for any thread even though only group leaders are
    listed in the procfs root.
    """
    rel = f"{tid}/status"
    text = read_status(procfs, tid).get("Tgid")
    if text is None:
        raise SysfsError(rel, "no Tgid")
    return _int_field(rel, "Tgid", text)


# --------------------------------------------------------------------------- identity


def read_comm(procfs: Root, pid: int, tid: int | None = None) -> str:
    """``comm`` (at most 15 bytes, may contain spaces); only the newline is stripped."""
    rel = f"{_task_dir(pid, tid)}/comm"
    text = _read_text(procfs, rel, pid if tid is None else tid)
    return text[:-1] if text.endswith("\n") else text


def read_cmdline(procfs: Root, pid: int) -> tuple[str, ...]:
    """argv of a process; empty for kernel threads and zombies."""
    rel = f"{pid}/cmdline"
    raw = read_bytes(procfs, rel, pid)
    if not raw:
        return ()
    # argv entries are NUL-terminated; a process that rewrote its argv may not be.
    parts = raw.split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()
    return tuple(p.decode("utf-8", errors="replace") for p in parts)


def read_cgroups(procfs: Root, pid: int) -> tuple[CgroupEntry, ...]:
    """``/proc/<pid>/cgroup``: one entry per hierarchy (``0::/path`` is cgroup v2)."""
    rel = f"{pid}/cgroup"
    out: list[CgroupEntry] = []
    for line in _read_text(procfs, rel, pid).splitlines():
        if not line.strip():
            continue
        # The path may itself contain ':', so split only twice.
        parts = line.split(":", 2)
        if len(parts) != 3:
            raise SysfsError(rel, f"bad line {line[:80]!r}")
        hid = _int_field(rel, "hierarchy id", parts[0])
        controllers = tuple(c for c in parts[1].split(",") if c)
        out.append(CgroupEntry(hierarchy_id=hid, controllers=controllers, path=parts[2]))
    return tuple(out)


def read_cgroup_v2_path(procfs: Root, pid: int) -> str | None:
    """The process's cgroup v2 path (``/system.slice/foo.service``), None if not on v2."""
    for entry in read_cgroups(procfs, pid):
        if entry.hierarchy_id == 0 and not entry.controllers:
            return entry.path
    return None
