"""Per-thread hardware and software counters through ``perf_event_open(2)``.

The syscall has no libc wrapper, so it is called through ``syscall(3)`` with the
uapi ``struct perf_event_attr`` laid out in ctypes (``PERF_ATTR_SIZE_VER8``, 136
bytes, as in ``include/uapi/linux/perf_event.h`` since Linux 6.3). Older kernels
accept the larger struct because every field they do not know is left zero.

Each event is opened for one thread (``pid=tid, cpu=-1``), and the events of a
thread are opened as perf event groups, each read with one ``read(2)``: the
hardware events (in groups of at most ``HW_GROUP_MAX`` = 5, one group on usual
PMUs) and the software events (one group). A group is read with
``PERF_FORMAT_GROUP | PERF_FORMAT_TOTAL_TIME_ENABLED | PERF_FORMAT_TOTAL_TIME_RUNNING
| PERF_FORMAT_ID`` into one preallocated layout: the group's enabled and running
times and, per member, its value and kernel event id (learnt with
``PERF_EVENT_IOC_ID`` at open). A group that lost a member reads short; the ids
then tell which members are left. The members of a group are scheduled onto the PMU
together, so a multiplexed group is scaled by one enabled/running ratio and ratios
between its members (instructions per cycle, LLC miss rate) cover the same time.
An interval in which a counter was enabled but never on the PMU is reported as
``None`` ("not counted"), never as 0. Events the machine lacks (VMs without a
virtual PMU: ENOENT/EOPNOTSUPP) are listed in :attr:`ThreadCounters.missing` with
the errno name and why; whether an event exists is decided by opening it on its
own, so grouping never changes that verdict.

A group is all or nothing: one that needs more counters than the PMU has free is
never scheduled. A hardware group is therefore split when the kernel refuses a
member into it at open time (that member leads the next group), and split in two
when, before it has ever run, a read shows time enabled but none running (the
interval reads None). Halves are split again the same way, down to single events,
which the kernel multiplexes. ``ThreadCounters(tid, group=False)`` opens every
event on its own fd, read with one ``read(2)`` per event.

Privilege: with ``perf_event_paranoid`` = 2 an unprivileged process may only count
user space (``exclude_kernel``). Hardware events are therefore always user-space
only (``exclude_kernel | exclude_hv``), so their meaning does not change with the
daemon's privileges. Software events are tried with kernel counting first and fall
back to user-only where that still means something; context switches and migrations
happen in kernel context, so a user-only count would always read 0 and they are
reported missing instead.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import fcntl
import functools
import operator
import os
import platform
import struct
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from ailfmd.errors import AilfmError, NoSuchThread

# --------------------------------------------------------------------------- uapi constants

PERF_TYPE_HARDWARE = 0
PERF_TYPE_SOFTWARE = 1
PERF_TYPE_TRACEPOINT = 2
PERF_TYPE_HW_CACHE = 3
PERF_TYPE_RAW = 4
PERF_TYPE_BREAKPOINT = 5

PERF_COUNT_HW_CPU_CYCLES = 0
PERF_COUNT_HW_INSTRUCTIONS = 1
PERF_COUNT_HW_CACHE_REFERENCES = 2
PERF_COUNT_HW_CACHE_MISSES = 3
PERF_COUNT_HW_BRANCH_INSTRUCTIONS = 4
PERF_COUNT_HW_BRANCH_MISSES = 5
PERF_COUNT_HW_BUS_CYCLES = 6
PERF_COUNT_HW_STALLED_CYCLES_FRONTEND = 7
PERF_COUNT_HW_STALLED_CYCLES_BACKEND = 8
PERF_COUNT_HW_REF_CPU_CYCLES = 9

PERF_COUNT_SW_CPU_CLOCK = 0
PERF_COUNT_SW_TASK_CLOCK = 1
PERF_COUNT_SW_PAGE_FAULTS = 2
PERF_COUNT_SW_CONTEXT_SWITCHES = 3
PERF_COUNT_SW_CPU_MIGRATIONS = 4
PERF_COUNT_SW_PAGE_FAULTS_MIN = 5
PERF_COUNT_SW_PAGE_FAULTS_MAJ = 6

PERF_FORMAT_TOTAL_TIME_ENABLED = 1 << 0
PERF_FORMAT_TOTAL_TIME_RUNNING = 1 << 1
PERF_FORMAT_ID = 1 << 2
PERF_FORMAT_GROUP = 1 << 3
PERF_FORMAT_LOST = 1 << 4

PERF_FLAG_FD_NO_GROUP = 1 << 0
PERF_FLAG_FD_OUTPUT = 1 << 1
PERF_FLAG_PID_CGROUP = 1 << 2
PERF_FLAG_FD_CLOEXEC = 1 << 3

PERF_ATTR_SIZE_VER0 = 64  # first published struct
PERF_ATTR_SIZE_VER1 = 72  # + config2
PERF_ATTR_SIZE_VER2 = 80  # + branch_sample_type
PERF_ATTR_SIZE_VER3 = 96  # + sample_regs_user, sample_stack_user (+ clockid)
PERF_ATTR_SIZE_VER4 = 104  # + sample_regs_intr
PERF_ATTR_SIZE_VER5 = 112  # + aux_watermark (+ sample_max_stack)
PERF_ATTR_SIZE_VER6 = 120  # + aux_sample_size (+ aux_action)
PERF_ATTR_SIZE_VER7 = 128  # + sig_data
PERF_ATTR_SIZE_VER8 = 136  # + config3


# --------------------------------------------------------------------------- flag bits

# The uapi declares these as C bitfields of one __u64. GCC allocates bitfields from
# the least significant bit on little-endian ABIs and from the most significant bit
# on big-endian ones (s390x, ppc64, sparc64), so the shift depends on byte order.
_BIG_ENDIAN = sys.byteorder == "big"


def _field_shift(first_bit: int, width: int, word_bits: int) -> int:
    return word_bits - first_bit - width if _BIG_ENDIAN else first_bit


def _flag(first_bit: int) -> int:
    return 1 << _field_shift(first_bit, 1, 64)


ATTR_FLAG_DISABLED = _flag(0)
ATTR_FLAG_INHERIT = _flag(1)
ATTR_FLAG_PINNED = _flag(2)
ATTR_FLAG_EXCLUSIVE = _flag(3)
ATTR_FLAG_EXCLUDE_USER = _flag(4)
ATTR_FLAG_EXCLUDE_KERNEL = _flag(5)
ATTR_FLAG_EXCLUDE_HV = _flag(6)
ATTR_FLAG_EXCLUDE_IDLE = _flag(7)
ATTR_FLAG_MMAP = _flag(8)
ATTR_FLAG_COMM = _flag(9)
ATTR_FLAG_FREQ = _flag(10)
ATTR_FLAG_INHERIT_STAT = _flag(11)
ATTR_FLAG_ENABLE_ON_EXEC = _flag(12)
ATTR_FLAG_TASK = _flag(13)
ATTR_FLAG_WATERMARK = _flag(14)
# precise_ip is a 2-bit field at bits 15-16 (0: arbitrary skid .. 3: zero skid).
ATTR_PRECISE_IP_SHIFT = _field_shift(15, 2, 64)
ATTR_PRECISE_IP_MASK = 0b11 << ATTR_PRECISE_IP_SHIFT
ATTR_FLAG_MMAP_DATA = _flag(17)
ATTR_FLAG_SAMPLE_ID_ALL = _flag(18)
ATTR_FLAG_EXCLUDE_HOST = _flag(19)
ATTR_FLAG_EXCLUDE_GUEST = _flag(20)
ATTR_FLAG_EXCLUDE_CALLCHAIN_KERNEL = _flag(21)
ATTR_FLAG_EXCLUDE_CALLCHAIN_USER = _flag(22)
ATTR_FLAG_MMAP2 = _flag(23)
ATTR_FLAG_COMM_EXEC = _flag(24)
ATTR_FLAG_USE_CLOCKID = _flag(25)
ATTR_FLAG_CONTEXT_SWITCH = _flag(26)
ATTR_FLAG_WRITE_BACKWARD = _flag(27)
ATTR_FLAG_NAMESPACES = _flag(28)
ATTR_FLAG_KSYMBOL = _flag(29)
ATTR_FLAG_BPF_EVENT = _flag(30)
ATTR_FLAG_AUX_OUTPUT = _flag(31)
ATTR_FLAG_CGROUP = _flag(32)
ATTR_FLAG_TEXT_POKE = _flag(33)
ATTR_FLAG_BUILD_ID = _flag(34)
ATTR_FLAG_INHERIT_THREAD = _flag(35)
ATTR_FLAG_REMOVE_ON_EXEC = _flag(36)
ATTR_FLAG_SIGTRAP = _flag(37)
# Bits 38-63 are __reserved_1 and must be zero.

# aux_action is a __u32 of bitfields (Linux 6.13+; __reserved_3 before).
AUX_ACTION_START_PAUSED = 1 << _field_shift(0, 1, 32)
AUX_ACTION_PAUSE = 1 << _field_shift(1, 1, 32)
AUX_ACTION_RESUME = 1 << _field_shift(2, 1, 32)


# --------------------------------------------------------------------------- struct


class _SampleUnion(ctypes.Union):
    _fields_ = [("sample_period", ctypes.c_uint64), ("sample_freq", ctypes.c_uint64)]


class _WakeupUnion(ctypes.Union):
    _fields_ = [("wakeup_events", ctypes.c_uint32), ("wakeup_watermark", ctypes.c_uint32)]


class _Config1Union(ctypes.Union):
    _fields_ = [
        ("bp_addr", ctypes.c_uint64),
        ("kprobe_func", ctypes.c_uint64),
        ("uprobe_path", ctypes.c_uint64),
        ("config1", ctypes.c_uint64),
    ]


class _Config2Union(ctypes.Union):
    _fields_ = [
        ("bp_len", ctypes.c_uint64),
        ("kprobe_addr", ctypes.c_uint64),
        ("probe_offset", ctypes.c_uint64),
        ("config2", ctypes.c_uint64),
    ]


class PerfEventAttr(ctypes.Structure):
    """``struct perf_event_attr`` up to ``PERF_ATTR_SIZE_VER8`` (136 bytes).

    The bitfield word is the 64-bit ``flags`` field; build it from the
    ``ATTR_FLAG_*`` constants. Union members are reachable by every uapi name
    (``sample_period``/``sample_freq``, ``config1``/``bp_addr``, ...).
    """

    _anonymous_ = ("_u_sample", "_u_wakeup", "_u_config1", "_u_config2")
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("size", ctypes.c_uint32),
        ("config", ctypes.c_uint64),
        ("_u_sample", _SampleUnion),
        ("sample_type", ctypes.c_uint64),
        ("read_format", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("_u_wakeup", _WakeupUnion),
        ("bp_type", ctypes.c_uint32),
        ("_u_config1", _Config1Union),
        ("_u_config2", _Config2Union),
        ("branch_sample_type", ctypes.c_uint64),
        ("sample_regs_user", ctypes.c_uint64),
        ("sample_stack_user", ctypes.c_uint32),
        ("clockid", ctypes.c_int32),
        ("sample_regs_intr", ctypes.c_uint64),
        ("aux_watermark", ctypes.c_uint32),
        ("sample_max_stack", ctypes.c_uint16),
        ("_reserved_2", ctypes.c_uint16),
        ("aux_sample_size", ctypes.c_uint32),
        ("aux_action", ctypes.c_uint32),
        ("sig_data", ctypes.c_uint64),
        ("config3", ctypes.c_uint64),
    ]


PERF_ATTR_SIZE = ctypes.sizeof(PerfEventAttr)


def make_attr(type_: int, config: int, flags: int, read_format: int) -> PerfEventAttr:
    """A zeroed attr with ``size`` set, so the kernel knows which fields we speak."""
    attr = PerfEventAttr()
    attr.type = type_
    attr.size = PERF_ATTR_SIZE
    attr.config = config
    attr.flags = flags
    attr.read_format = read_format
    return attr


# --------------------------------------------------------------------------- syscall

# (machine family, pointer bits) -> __NR_perf_event_open. A 32-bit userland on a
# 64-bit kernel reports the kernel's machine but must use the compat number.
_SYSCALL_NUMBERS: Mapping[tuple[str, int], int] = {
    ("x86", 64): 298,
    ("x86", 32): 336,
    ("arm64", 64): 241,  # asm-generic table
    ("arm", 32): 364,
    ("riscv", 64): 241,
    ("riscv", 32): 241,
    ("loongarch", 64): 241,
    ("ppc", 64): 319,
    ("ppc", 32): 319,
    ("s390", 64): 331,
    ("mips", 64): 5292,  # n64 ABI; n32 (6296) and o32 (4333) are not told apart here
    ("sparc", 64): 327,
}


def _machine_family(machine: str) -> str:
    m = machine.lower()
    if m in ("x86_64", "amd64") or (len(m) == 4 and m[0] == "i" and m.endswith("86")):
        return "x86"
    if m in ("aarch64", "arm64", "aarch64_be"):
        return "arm64"
    if m.startswith("arm"):
        return "arm"
    for prefix in ("riscv", "loongarch", "ppc", "s390", "mips", "sparc"):
        if m.startswith(prefix):
            return prefix
    return m


class PerfUnsupported(AilfmError):
    """perf_event_open cannot be called here (unknown architecture, no libc)."""


def perf_syscall_number(machine: str | None = None, pointer_bits: int | None = None) -> int:
    """``__NR_perf_event_open`` for ``machine`` (default: this process's ABI)."""
    machine = machine if machine is not None else platform.machine()
    bits = pointer_bits if pointer_bits is not None else struct.calcsize("P") * 8
    family = _machine_family(machine)
    if family == "arm64" and bits == 32:
        family = "arm"  # armhf userland on an aarch64 kernel
    number = _SYSCALL_NUMBERS.get((family, bits))
    if number is None:
        known = ", ".join(sorted({f for f, _ in _SYSCALL_NUMBERS}))
        raise PerfUnsupported(
            f"no perf_event_open syscall number known for machine {machine!r} "
            f"({bits}-bit); known: {known}"
        )
    return number


@functools.cache
def _libc_syscall() -> Callable[..., int]:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.syscall
    except (OSError, AttributeError) as e:
        raise PerfUnsupported(f"libc syscall() not available: {e}") from None
    fn.restype = ctypes.c_long
    return fn


def perf_event_open(
    attr: PerfEventAttr,
    pid: int,
    cpu: int = -1,
    group_fd: int = -1,
    flags: int = PERF_FLAG_FD_CLOEXEC,
) -> int:
    """Call perf_event_open(2); return the fd or raise ``OSError`` with the errno."""
    fn = _libc_syscall()
    number = perf_syscall_number()
    fd = fn(
        ctypes.c_long(number),
        ctypes.byref(attr),
        ctypes.c_int(pid),
        ctypes.c_int(cpu),
        ctypes.c_int(group_fd),
        ctypes.c_ulong(flags),
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(fd)


# --------------------------------------------------------------------------- reading

_READ_FORMAT = PERF_FORMAT_TOTAL_TIME_ENABLED | PERF_FORMAT_TOTAL_TIME_RUNNING
_READ_STRUCT = struct.Struct("=QQQ")  # value, time_enabled, time_running


@dataclass(frozen=True)
class RawCount:
    """One read of a counter fd: the raw value and its enabled/running times (ns)."""

    value: int
    enabled_ns: int
    running_ns: int


def read_count(fd: int) -> RawCount:
    """Read value/enabled/running from a counter opened with our read_format."""
    data = os.read(fd, _READ_STRUCT.size)
    if len(data) != _READ_STRUCT.size:
        # A pinned event that lost its PMU slot goes into an error state and reads EOF.
        raise OSError(errno_mod.EIO, f"short read of perf counter ({len(data)} bytes)")
    value, enabled, running = _READ_STRUCT.unpack(data)
    return RawCount(value, enabled, running)


def scale_count(value: int, enabled_ns: int, running_ns: int) -> float | None:
    """Estimate the full count of a multiplexed counter: value * enabled / running.

    ``enabled_ns == 0``: a per-thread event is only enabled while its thread runs,
    so the thread did not run and the count is exactly 0. ``running_ns == 0`` with
    time enabled: the counter never got onto the PMU, nothing is known -> None.
    """
    if enabled_ns == 0:
        return float(value)
    if running_ns == 0:
        return None
    if running_ns >= enabled_ns:
        return float(value)
    return value * enabled_ns / running_ns


# --------------------------------------------------------------------------- groups

GROUP_READ_FORMAT = (
    PERF_FORMAT_GROUP
    | PERF_FORMAT_TOTAL_TIME_ENABLED
    | PERF_FORMAT_TOTAL_TIME_RUNNING
    | PERF_FORMAT_ID
)


def _ioc_read_request(type_char: str, nr: int, size: int) -> int:
    """``_IOR(type, nr, size)``: the direction bits sit at bit 29 with value 2 on
    powerpc, mips and sparc (13 size bits), at bit 30 elsewhere (asm-generic)."""
    dir_shift = 29 if _machine_family(platform.machine()) in ("ppc", "mips", "sparc") else 30
    return (2 << dir_shift) | (size << 16) | (ord(type_char) << 8) | nr


# The uapi declares it as _IOR('$', 7, __u64 *): the size field is a pointer's size.
PERF_EVENT_IOC_ID = _ioc_read_request("$", 7, struct.calcsize("P"))


def event_id(fd: int) -> int:
    """The kernel's id of the event behind ``fd`` (``PERF_EVENT_IOC_ID``, Linux 3.12+)."""
    buf = bytearray(8)
    fcntl.ioctl(fd, PERF_EVENT_IOC_ID, buf, True)
    return int.from_bytes(buf, sys.byteorder)


def group_read_struct(members: int) -> struct.Struct:
    """Layout of one ``GROUP_READ_FORMAT`` read of ``members`` events:
    nr, time_enabled, time_running, then (value, id) per member."""
    return struct.Struct(f"={3 + 2 * members}Q")


def read_group(fd: int, max_members: int = 16) -> tuple[int, int, dict[int, int]]:
    """One read of a group opened with ``GROUP_READ_FORMAT`` through any member's fd:
    ``(time_enabled, time_running, {event id: value})`` in the kernel's member order."""
    data = os.read(fd, group_read_struct(max_members).size)
    head = struct.calcsize("=3Q")
    if len(data) < head:
        raise OSError(errno_mod.EIO, f"short read of perf group ({len(data)} bytes)")
    nr, enabled, running = struct.unpack_from("=3Q", data)
    if len(data) != group_read_struct(nr).size:
        raise OSError(errno_mod.EIO, f"short read of perf group ({len(data)} bytes, {nr} members)")
    flat = group_read_struct(nr).unpack(data)
    return enabled, running, dict(zip(flat[4::2], flat[3::2]))


# --------------------------------------------------------------------------- events


@dataclass(frozen=True)
class EventSpec:
    """A counter ailfmd reads per thread.

    ``user_only_ok``: whether a user-space-only count still means something, so it may
    serve as the fallback when kernel counting is not permitted.
    """

    name: str
    type_: int
    config: int
    hardware: bool
    user_only_ok: bool


EVENTS: tuple[EventSpec, ...] = (
    EventSpec("instructions", PERF_TYPE_HARDWARE, PERF_COUNT_HW_INSTRUCTIONS, True, True),
    EventSpec("cycles", PERF_TYPE_HARDWARE, PERF_COUNT_HW_CPU_CYCLES, True, True),
    EventSpec("llc_references", PERF_TYPE_HARDWARE, PERF_COUNT_HW_CACHE_REFERENCES, True, True),
    EventSpec("llc_misses", PERF_TYPE_HARDWARE, PERF_COUNT_HW_CACHE_MISSES, True, True),
    EventSpec(
        "stalled_cycles_frontend",
        PERF_TYPE_HARDWARE,
        PERF_COUNT_HW_STALLED_CYCLES_FRONTEND,
        True,
        True,
    ),
    EventSpec(
        "stalled_cycles_backend",
        PERF_TYPE_HARDWARE,
        PERF_COUNT_HW_STALLED_CYCLES_BACKEND,
        True,
        True,
    ),
    EventSpec("task_clock_ns", PERF_TYPE_SOFTWARE, PERF_COUNT_SW_TASK_CLOCK, False, True),
    EventSpec(
        "context_switches", PERF_TYPE_SOFTWARE, PERF_COUNT_SW_CONTEXT_SWITCHES, False, False
    ),
    EventSpec("cpu_migrations", PERF_TYPE_SOFTWARE, PERF_COUNT_SW_CPU_MIGRATIONS, False, False),
    EventSpec("page_faults", PERF_TYPE_SOFTWARE, PERF_COUNT_SW_PAGE_FAULTS, False, True),
)
EVENT_NAMES: tuple[str, ...] = tuple(e.name for e in EVENTS)
HARDWARE_EVENT_NAMES: tuple[str, ...] = tuple(e.name for e in EVENTS if e.hardware)
SOFTWARE_EVENT_NAMES: tuple[str, ...] = tuple(e.name for e in EVENTS if not e.hardware)
_EVENTS_BY_NAME: Mapping[str, EventSpec] = {e.name: e for e in EVENTS}

SCOPE_USER = "user"
SCOPE_ALL = "user+kernel"

_ERRNO_MEANING: Mapping[int, str] = {
    errno_mod.ENOENT: (
        "event not provided by this machine's PMU (usual in VMs without a virtual PMU)"
    ),
    errno_mod.EOPNOTSUPP: "event or mode not supported by the PMU",
    errno_mod.ENODEV: "no PMU for this event",
    errno_mod.EINVAL: "attribute rejected by the kernel",
    errno_mod.EACCES: "not permitted (perf_event_paranoid, CAP_PERFMON or ptrace access)",
    errno_mod.EPERM: "not permitted (perf_event_paranoid, CAP_PERFMON, seccomp or LSM)",
    errno_mod.EMFILE: "out of file descriptors",
    errno_mod.E2BIG: "kernel does not know this perf_event_attr size",
    errno_mod.ENOSYS: "perf_event_open not available in this kernel",
    errno_mod.EBUSY: "PMU in exclusive use by another user",
}


def describe_errno(err: int) -> str:
    """``"ENOENT: <why>"`` for a perf_event_open failure."""
    name = errno_mod.errorcode.get(err, f"errno {err}")
    return f"{name}: {_ERRNO_MEANING.get(err, os.strerror(err))}"


def _open_event(
    spec: EventSpec, tid: int, group_fd: int = -1, read_format: int = _READ_FORMAT
) -> tuple[int, str]:
    """Open ``spec`` on ``tid`` (in the group led by ``group_fd`` if not -1); return
    (fd, scope). Raises OSError from the last try."""
    user_only = ATTR_FLAG_EXCLUDE_KERNEL | ATTR_FLAG_EXCLUDE_HV
    if spec.hardware:
        attempts = [(user_only, SCOPE_USER)]
    else:
        attempts = [(ATTR_FLAG_EXCLUDE_HV, SCOPE_ALL)]
        if spec.user_only_ok:
            attempts.append((user_only, SCOPE_USER))
    last: OSError | None = None
    for flags, scope in attempts:
        attr = make_attr(spec.type_, spec.config, flags, read_format)
        try:
            return perf_event_open(attr, tid, -1, group_fd), scope
        except OSError as e:
            last = e
            if e.errno not in (errno_mod.EACCES, errno_mod.EPERM):
                break
    assert last is not None
    raise last


# --------------------------------------------------------------------------- per thread

# Largest hardware group opened. Instructions, cycles, LLC references, LLC misses and
# one stall event fit together on common PMUs (Intel: fixed counters for instructions
# and cycles plus four or more general ones; AMD Zen: six general; Arm PMUv3: usually
# six plus a cycle counter). A group that does not fit anyway is split when read.
HW_GROUP_MAX = 5


class _Group:
    """Counters read with one ``read(2)`` of their first fd.

    ``grouped``: a perf event group read with ``GROUP_READ_FORMAT`` (any size, ``ids``
    the kernel's event ids in the order the kernel reports them); otherwise a single
    event read with ``_READ_FORMAT``. ``last`` is the (enabled, running, values) of the
    previous ``read_deltas``. ``proven``: the group has been seen running on the PMU
    (or cannot fail to fit because it is a single event).
    """

    __slots__ = (
        "names", "fds", "ids", "grouped", "fd", "size", "unpack", "values", "last", "proven"
    )

    def __init__(
        self,
        names: tuple[str, ...],
        fds: tuple[int, ...],
        ids: tuple[int, ...],
        grouped: bool,
        last: tuple[int, int, tuple[int, ...]] | None = None,
        proven: bool | None = None,
    ) -> None:
        self.names = names
        self.fds = fds
        self.ids = ids
        self.grouped = grouped
        self.fd = fds[0]
        # Both layouts have time_enabled at index 1 and time_running at index 2.
        if grouped:
            fmt, self.values = group_read_struct(len(names)), slice(3, None, 2)
        else:
            fmt, self.values = _READ_STRUCT, slice(0, 1)
        self.size = fmt.size
        self.unpack = fmt.unpack_from
        self.last = last if last is not None else (0, 0, (0,) * len(names))
        self.proven = (len(names) == 1) if proven is None else proven

    def close(self) -> None:
        # Siblings first: closing a leader first would promote them to groups of their own.
        for fd in reversed(self.fds):
            try:
                os.close(fd)
            except OSError:
                pass


def _read_failure(e: OSError) -> str:
    return f"{describe_errno(e.errno or 0)} (read failed: {e.strerror})"


class ThreadCounters:
    """The counters this machine supports, opened for one thread.

    ``available`` lists the events that opened (with their ``scopes``); ``missing``
    maps each event that did not to its reason (``"ENOENT: ..."``). ``read_deltas``
    returns counts since the previous call (or since opening): a float (0.0 when the
    thread did not run), or None where the counter was enabled but multiplexed out
    for the whole interval. Raises
    :class:`NoSuchThread` when the thread is gone at open time. After the thread
    exits its counters keep their final values (deltas become 0); whether the thread
    is alive is for procfs to say.

    ``group`` (default True) reads the events as perf event groups, one ``read(2)``
    per group (see :attr:`groups`); False opens and reads every event on its own.
    """

    def __init__(self, tid: int, events: Iterable[str] = EVENT_NAMES, group: bool = True) -> None:
        self.tid = tid
        self.group = group
        self._groups: list[_Group] = []
        self._fds: dict[str, int] = {}
        self.available: tuple[str, ...] = ()
        self.scopes: dict[str, str] = {}
        self.missing: dict[str, str] = {}
        self._closed = False
        names = tuple(dict.fromkeys(events))
        unknown = [n for n in names if n not in _EVENTS_BY_NAME]
        if unknown:
            raise ValueError(f"unknown perf events {unknown}; known: {list(EVENT_NAMES)}")
        self._order = names
        specs = [_EVENTS_BY_NAME[n] for n in names]
        try:
            if group:
                hardware = [s for s in specs if s.hardware]
                software = [s for s in specs if not s.hardware]
                for part, cap in ((hardware, HW_GROUP_MAX), (software, len(software))):
                    groups, failed = self._open_packed(part, cap)
                    self._groups += groups
                    for spec, err in failed:
                        self._set_missing(spec, err)
            else:
                for spec in specs:
                    self._open_single(spec)
        except BaseException:
            self.close()
            raise
        self.missing = {n: self.missing[n] for n in names if n in self.missing}
        self._sync()

    # ------------------------------------------------------------------ opening

    def _set_missing(self, spec: EventSpec, err: Exception) -> None:
        if isinstance(err, PerfUnsupported):
            self.missing[spec.name] = f"ENOSYS: {err}"
            return
        assert isinstance(err, OSError)
        if not spec.user_only_ok and err.errno in (errno_mod.EACCES, errno_mod.EPERM):
            self.missing[spec.name] = (
                describe_errno(err.errno or 0)
                + "; counted only in kernel context, a user-only count would read 0"
            )
        else:
            self.missing[spec.name] = describe_errno(err.errno or 0)

    def _open(self, spec: EventSpec, group_fd: int, read_format: int) -> tuple[int, str]:
        try:
            return _open_event(spec, self.tid, group_fd, read_format)
        except OSError as e:
            if e.errno == errno_mod.ESRCH:
                raise NoSuchThread(self.tid, "perf_event_open: ESRCH") from None
            raise

    def _open_single(self, spec: EventSpec) -> None:
        try:
            fd, scope = self._open(spec, -1, _READ_FORMAT)
        except (OSError, PerfUnsupported) as e:
            self._set_missing(spec, e)
            return
        self._groups.append(_Group((spec.name,), (fd,), (), False))
        self.scopes[spec.name] = scope

    def _open_packed(
        self, specs: list[EventSpec], cap: int
    ) -> tuple[list[_Group], list[tuple[EventSpec, Exception]]]:
        """Open ``specs`` as groups of at most ``cap`` events, in order.

        An event first tries to join the current group; if the kernel refuses it
        there but accepts it on its own, it leads the next group. An event that does
        not open on its own is returned in the failures with its error, exactly as a
        single open would report it. Raises NoSuchThread (nothing left open).
        """
        groups: list[_Group | None] = []
        failed: list[tuple[EventSpec, Exception]] = []
        members: list[tuple[EventSpec, int, str]] = []
        try:
            for spec in specs:
                if members and len(members) < cap:
                    try:
                        fd, scope = self._open(spec, members[0][1], GROUP_READ_FORMAT)
                    except (OSError, PerfUnsupported):
                        pass  # maybe the group is full: try it on its own
                    else:
                        members.append((spec, fd, scope))
                        continue
                try:
                    fd, scope = self._open(spec, -1, GROUP_READ_FORMAT)
                except (OSError, PerfUnsupported) as e:
                    failed.append((spec, e))
                    continue
                if members:
                    groups.append(self._make_group(members, failed))
                members = [(spec, fd, scope)]
            if members:
                groups.append(self._make_group(members, failed))
        except BaseException:
            for _, fd, _ in members:
                os.close(fd)
            for g in groups:
                if g is not None:
                    g.close()
            raise
        return [g for g in groups if g is not None], failed

    def _make_group(
        self, members: list[tuple[EventSpec, int, str]], failed: list[tuple[EventSpec, Exception]]
    ) -> _Group | None:
        """A group of the opened ``members`` (leader first), or None (and the members
        closed and failed) if its event ids cannot be learnt."""
        fds = tuple(fd for _, fd, _ in members)
        try:
            ids = tuple(event_id(fd) for fd in fds)
        except OSError:
            # Kernels before 3.12 lack the ioctl; a group read lists the leader first
            # and the siblings in the order they joined.
            try:
                ids = tuple(read_group(fds[0], len(fds))[2])
                if len(ids) != len(fds):
                    raise OSError(errno_mod.EIO, f"group of {len(fds)} reads {len(ids)} counters")
            except OSError as e:
                for spec, fd, _ in members:
                    os.close(fd)
                    failed.append((spec, e))
                return None
        for spec, _, scope in members:
            self.scopes[spec.name] = scope
        return _Group(tuple(spec.name for spec, _, _ in members), fds, ids, True)

    def _sync(self) -> None:
        self._fds = {n: fd for g in self._groups for n, fd in zip(g.names, g.fds)}
        self.available = tuple(n for n in self._order if n in self._fds)

    # ------------------------------------------------------------------ reading

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def groups(self) -> tuple[tuple[str, ...], ...]:
        """The events read together, one tuple per ``read(2)``."""
        return tuple(g.names for g in self._groups)

    def _read_groups(self) -> list[tuple[_Group, int, int, tuple[int, ...]]]:
        """Read every group once: (group, enabled, running, values)."""
        if self._closed:
            raise ValueError(f"counters of thread {self.tid} are closed")
        out: list[tuple[_Group, int, int, tuple[int, ...]]] = []
        broken: list[tuple[_Group, OSError | None]] | None = None
        unfit: list[_Group] | None = None
        read = os.read
        for g in self._groups:
            try:
                # The kernel returns exactly the size of the group as it is now, so
                # a group that lost a member reads short.
                data = read(g.fd, g.size)
                if len(data) == g.size:
                    t = g.unpack(data)
                    out.append((g, t[1], t[2], t[g.values]))
                    if not g.proven:
                        if t[2]:
                            g.proven = True
                        elif t[1]:
                            unfit = (unfit or []) + [g]
                    continue
                err = None
            except OSError as e:
                err = e
            broken = (broken or []) + [(g, err)]
        if broken:
            for g, err in broken:
                out.extend(self._recover(g, err))
            self._sync()
        if unfit:
            for g in unfit:
                self._split(g)
        return out

    def _retire(self, name: str, fd: int, err: OSError) -> None:
        # Retire a counter that went into an error state rather than fail the whole
        # sample; from now on it is missing, with the reason.
        try:
            os.close(fd)
        except OSError:
            pass
        self.missing[name] = _read_failure(err)

    def _recover(
        self, g: _Group, err: OSError | None
    ) -> list[tuple[_Group, int, int, tuple[int, ...]]]:
        """A read of ``g`` failed or came back in an unexpected shape: read every
        member through its own fd, retire the ones that fail, and regroup the rest
        as the kernel now groups them. Returns this round's reads of the survivors."""
        self._groups.remove(g)
        if not g.grouped:
            if err is None:
                err = OSError(errno_mod.EIO, "short read of perf counter")
            self._retire(g.names[0], g.fd, err)
            return []
        # The kernel's group (tuple of ids) -> its read and our members in it.
        found: dict[tuple[int, ...], tuple[int, int, dict[int, int], list[int]]] = {}
        lost: list[tuple[int, OSError]] = []
        for i, fd in enumerate(g.fds):
            try:
                enabled, running, values = read_group(fd, len(g.fds))
            except OSError as e:
                lost.append((i, e))
                continue
            if g.ids[i] not in values:
                lost.append((i, OSError(errno_mod.EIO, "counter is no longer in its group")))
                continue
            found.setdefault(tuple(values), (enabled, running, values, []))[3].append(i)
        for i, e in lost:
            self._retire(g.names[i], g.fds[i], e)
        out = []
        last_enabled, last_running, last_values = g.last
        for ids, (enabled, running, values, members) in found.items():
            if len(members) != len(ids):
                # The kernel's group holds counters we could not read: nothing in it
                # can be read reliably any more.
                why = OSError(errno_mod.EIO, "its group holds an unreadable counter")
                for i in members:
                    self._retire(g.names[i], g.fds[i], why)
                continue
            members.sort(key=lambda i: ids.index(g.ids[i]))
            new = _Group(
                tuple(g.names[i] for i in members),
                tuple(g.fds[i] for i in members),
                ids,
                True,
                (last_enabled, last_running, tuple(last_values[i] for i in members)),
                g.proven or len(members) == 1,
            )
            self._groups.append(new)
            out.append((new, enabled, running, tuple(values[x] for x in ids)))
        return out

    def _split(self, g: _Group) -> None:
        """``g`` was enabled but never ran: it does not fit on the PMU. Reopen it as
        two groups. If that fails, keep it as it is (and stop trying)."""
        specs = [_EVENTS_BY_NAME[n] for n in g.names]
        half = len(specs) // 2
        new: list[_Group] = []
        try:
            for part in (specs[:half], specs[half:]):
                groups, failed = self._open_packed(part, len(part))
                new += groups
                if failed:
                    raise failed[0][1]
        except (OSError, PerfUnsupported, NoSuchThread):
            for n in new:
                n.close()
            g.proven = True
            return
        self._groups[self._groups.index(g) : self._groups.index(g) + 1] = new
        g.close()
        self._sync()

    def read_raw(self) -> dict[str, RawCount]:
        """Cumulative raw reads (value, enabled, running) of every open counter; the
        times of grouped events are their group's."""
        out: dict[str, RawCount] = {}
        for g, enabled, running, values in self._read_groups():
            for name, value in zip(g.names, values):
                out[name] = RawCount(value, enabled, running)
        return {n: out[n] for n in self._order if n in out}

    def read_totals(self) -> dict[str, float | None]:
        """Scaled counts since the counters were opened (or their group was split)."""
        return {
            n: scale_count(r.value, r.enabled_ns, r.running_ns) for n, r in self.read_raw().items()
        }

    def read_deltas(self) -> dict[str, float | None]:
        """Scaled counts since the previous ``read_deltas`` (first call: since open);
        None for a counter that did not run in the interval.

        The interval is scaled by its own enabled/running times, not the totals, so
        a counter that was starved earlier does not distort later intervals. Grouped
        counters share their group's times, so one ratio scales the whole group.
        """
        out: dict[str, float | None] = {}
        self._deltas_into(out, 1.0, idle_as_none=True)
        return out

    def add_deltas(self, out: dict[str, float], scale: float = 1.0) -> None:
        """:meth:`read_deltas` written into ``out``, each delta multiplied by ``scale``,
        and counters not counted in the interval (None there) left out.

        The per-epoch path of the thread tracker: no intermediate mapping.
        """
        self._deltas_into(out, scale, idle_as_none=False)  # type: ignore[arg-type]

    def _deltas_into(self, out: dict[str, float | None], scale: float, idle_as_none: bool) -> None:
        # As scale_count(), once per group; a group whose counters all ran the whole
        # interval is converted in one C-level pass.
        sub = operator.sub
        for g, enabled, running, values in self._read_groups():
            last_enabled, last_running, last_values = g.last
            g.last = (enabled, running, values)
            enabled -= last_enabled
            running -= last_running
            if enabled <= 0 or running >= enabled:
                if scale == 1.0:
                    out.update(zip(g.names, map(float, map(sub, values, last_values))))
                else:
                    out.update(zip(g.names, [(v - last) * scale for v, last in zip(values, last_values)]))
            elif running:
                out.update(zip(
                    g.names, [(v - last) * enabled / running * scale for v, last in zip(values, last_values)]
                ))
            elif idle_as_none:
                out.update(dict.fromkeys(g.names))

    def close(self) -> None:
        """Close every counter fd; safe to call twice."""
        self._closed = True
        groups, self._groups = self._groups, []
        self._fds = {}
        for g in groups:
            g.close()

    def __enter__(self) -> "ThreadCounters":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Last resort against fd leaks; callers should close() explicitly.
        if getattr(self, "_groups", None):
            self.close()


def probe_pmu(events: Iterable[str] = EVENT_NAMES) -> dict[str, str | None]:
    """Which events this machine can count: name -> None if available, else why.

    Opens each event on the calling thread and closes it again at once.
    """
    names = tuple(events)
    with ThreadCounters(threading.get_native_id(), names) as tc:
        return {name: tc.missing.get(name) for name in names}
