"""Read and change which CPUs a thread may run on, guarding against tid reuse.

A tid can be recycled for an unrelated thread once ours exits. Before changing a
thread's CPU set we re-read its start time (field 22 of ``stat``) and refuse if it
is not the thread we decided about.

Why not a pidfd: ``pidfd_open(2)`` gives a handle that cannot be recycled (for single
threads with ``PIDFD_THREAD`` since Linux 6.9), but ``sched_setaffinity(2)`` takes a
pid_t and no syscall sets affinity through a pidfd, so the handle cannot be what the
change is applied to. A window remains between our check and the syscall. For a
mistake the thread would have to exit and its tid be handed out again (after the
kernel cycled through ``pid_max`` ids) within those few microseconds. The start-time
check, repeated after the change so such a race is at least reported, is the
practical guard, as in psutil's ``cpu_affinity()``.
"""

from __future__ import annotations

import errno
import os

from ailfmd.errors import NoSuchThread, ThreadReused, WriteRefused
from ailfmd.platform.base import ThreadRef
from ailfmd.platform.linux.procfs import read_start_ticks
from ailfmd.platform.linux.sysfs import Root, format_cpu_list


def _target(tid: int) -> str:
    return f"sched_setaffinity(tid {tid})"


def get_affinity(tid: int) -> frozenset[int]:
    """The CPUs ``tid`` may run on now (``sched_getaffinity``)."""
    try:
        return frozenset(os.sched_getaffinity(tid))
    except ProcessLookupError:
        raise NoSuchThread(tid, "sched_getaffinity: ESRCH") from None


def _check_identity(procfs: Root, ref: ThreadRef) -> None:
    found = read_start_ticks(procfs, ref.pid, ref.tid)  # NoSuchThread if gone
    if found != ref.start_ticks:
        raise ThreadReused(ref.tid, ref.start_ticks, found)


def set_affinity(procfs: Root, ref: ThreadRef, cpus: frozenset[int]) -> frozenset[int]:
    """Restrict ``ref`` to ``cpus``; return the CPU set in effect afterwards.

    Raises :class:`ThreadReused` if the tid now belongs to another thread,
    :class:`NoSuchThread` if it is gone, and :class:`WriteRefused` (naming the tid and
    the set) if the kernel refuses the set: EINVAL when no CPU of it is online and
    allowed by the thread's cpuset, EPERM without the right to change that thread.
    The result can be smaller than ``cpus`` (offline CPUs are dropped).
    """
    wanted = frozenset(cpus)
    shown = format_cpu_list(wanted) or "(empty set)"
    if not wanted:
        raise WriteRefused(_target(ref.tid), shown, "an empty CPU set leaves nowhere to run")
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in wanted):
        raise WriteRefused(
            _target(ref.tid), str(sorted(wanted)), "CPU numbers must be integers >= 0"
        )
    _check_identity(procfs, ref)
    try:
        os.sched_setaffinity(ref.tid, wanted)
    except ProcessLookupError:
        raise NoSuchThread(ref.tid, "sched_setaffinity: ESRCH") from None
    except (OverflowError, ValueError) as e:
        # CPU numbers too large for the C cpu_set_t that Python builds.
        raise WriteRefused(_target(ref.tid), shown, f"CPU number out of range: {e}") from None
    except OSError as e:
        if e.errno == errno.EINVAL:
            reason = "EINVAL: no CPU of the set is online and allowed (offline CPUs or cpuset)"
        elif e.errno == errno.EPERM:
            reason = "EPERM: not permitted to change this thread (CAP_SYS_NICE or same owner)"
        else:
            raise
        raise WriteRefused(_target(ref.tid), shown, reason) from None
    # Reported, not undone: if the tid was recycled in the window, the newcomer got
    # the mask and the caller must know its thread is gone.
    _check_identity(procfs, ref)
    return get_affinity(ref.tid)
