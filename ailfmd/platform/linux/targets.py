"""Which threads ailfmd manages: discovery from a :class:`TargetSelector`.

A selector names threads four ways; the result is the union:

- ``pids``: every thread of each process (``/proc/<pid>/task``). A tid given in
  place of a pid stands for its whole process.
- ``comm_patterns``: Python regular expressions, matched with ``re.search`` (anchor
  with ``^...$`` for an exact name) against the process's ``comm`` (at most 15
  bytes, as ``ps -o comm`` shows it) and against the basename of its ``argv[0]``; a
  process matches if either does, and then all its threads are targets. Thread
  names (per-thread ``comm``) are not matched.
- ``cgroup_paths``: cgroup v2 paths relative to the cgroupfs root
  (``system.slice/foo.service``); the threads listed in ``cgroup.threads`` of that
  cgroup and of every cgroup below it.
- ``systemd_units``: a unit name (``foo.service``) or a unit with its slice path
  (``system.slice/foo.service``), resolved without D-Bus by scanning
  ``/proc/<pid>/cgroup`` for a v2 path that contains it as whole components; the
  matching prefix is the unit's cgroup, read as above. A bare name matches the unit
  in every slice and user manager; give the slice path to pin one.

Threads that vanish during the scan are skipped silently, kernel threads are never
targets, and neither is any thread of the daemon's own process.
"""

from __future__ import annotations

import operator
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path, PurePosixPath
from typing import Callable

from ailfmd.errors import ConfigError, NoSuchThread, SysfsError
from ailfmd.platform.base import ThreadRef
from ailfmd.platform.linux import procfs as pfs
from ailfmd.platform.linux.sysfs import Root

DEFAULT_CGROUPFS = "/sys/fs/cgroup"
SELECTOR_SOURCE = "targets"

# A caller's answer for a tid it already knows: the ThreadRef if that very thread is
# still alive (so its stat need not be read again), else None.
KnownThread = Callable[[int], ThreadRef | None]

# Unit types that own a cgroup (targets, timers, paths, devices and automounts do not).
_CGROUP_UNIT_SUFFIXES = (".service", ".scope", ".slice", ".socket", ".mount", ".swap")


# --------------------------------------------------------------------------- selector


def _clean_cgroup_path(key: str, path: str) -> str:
    comps = [c for c in path.split("/") if c]
    if any(c in (".", "..") for c in comps):
        raise ConfigError(SELECTOR_SOURCE, key, path, "'.' and '..' are not allowed")
    if not comps:
        raise ConfigError(
            SELECTOR_SOURCE, key, path, "the root cgroup would select every thread of the machine"
        )
    return "/".join(comps)


@dataclass(frozen=True)
class TargetSelector:
    """What to manage; every field may be empty. Validated on construction."""

    pids: tuple[int, ...] = ()
    comm_patterns: tuple[str, ...] = ()
    cgroup_paths: tuple[str, ...] = ()
    systemd_units: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)):
                raise ConfigError(SELECTOR_SOURCE, f.name, value, "must be a list")
            object.__setattr__(self, f.name, tuple(value))
        for pid in self.pids:
            if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
                raise ConfigError(SELECTOR_SOURCE, "pids", pid, "must be a positive integer")
        for pattern in self.comm_patterns:
            if not isinstance(pattern, str) or not pattern:
                raise ConfigError(
                    SELECTOR_SOURCE, "comm_patterns", pattern, "must be a non-empty string"
                )
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(
                    SELECTOR_SOURCE, "comm_patterns", pattern, f"bad regular expression: {e}"
                ) from None
        for path in self.cgroup_paths:
            if not isinstance(path, str):
                raise ConfigError(SELECTOR_SOURCE, "cgroup_paths", path, "must be a string")
            _clean_cgroup_path("cgroup_paths", path)
        for unit in self.systemd_units:
            if not isinstance(unit, str) or not unit.strip("/"):
                raise ConfigError(
                    SELECTOR_SOURCE, "systemd_units", unit, "must be a non-empty string"
                )
            clean = _clean_cgroup_path("systemd_units", unit)
            if not clean.rsplit("/", 1)[-1].endswith(_CGROUP_UNIT_SUFFIXES):
                raise ConfigError(
                    SELECTOR_SOURCE,
                    "systemd_units",
                    unit,
                    "not a unit that owns a cgroup; expected a name ending in "
                    + ", ".join(_CGROUP_UNIT_SUFFIXES),
                )

    @property
    def is_empty(self) -> bool:
        return not (self.pids or self.comm_patterns or self.cgroup_paths or self.systemd_units)


# --------------------------------------------------------------------------- discovery


def _process_threads(procfs: Root, pid: int, self_pid: int, known: KnownThread | None = None) -> list[ThreadRef]:
    """All threads of one user-space process; [] if it is gone, ours or a kthread."""
    if pid == self_pid:
        return []
    out: list[ThreadRef] = []
    for tid in pfs.list_tids(procfs, pid):
        ref = known(tid) if known is not None else None
        if ref is not None and ref.pid == pid:
            out.append(ref)  # a thread of a process already found not to be a kthread
            continue
        try:
            st = pfs.read_task_stat(procfs, pid, tid)
        except NoSuchThread:
            continue
        if st.is_kernel_thread:
            return []
        out.append(ThreadRef(pid=pid, tid=tid, start_ticks=st.start_ticks))
    return out


def _comm_matches(procfs: Root, pid: int, patterns: list[re.Pattern[str]]) -> bool:
    comm = pfs.read_comm(procfs, pid)
    if any(p.search(comm) for p in patterns):
        return True
    # cmdline is read only when comm did not match: reading it can stall on a
    # process whose address space is locked.
    argv = pfs.read_cmdline(procfs, pid)
    if not argv or not argv[0]:
        return False
    argv0 = PurePosixPath(argv[0]).name
    return any(p.search(argv0) for p in patterns)


def cgroup_thread_ids(cgroupfs: Root, path: str) -> list[int]:
    """Tids in ``cgroup.threads`` of ``path`` and of every cgroup below it.

    A missing cgroup (unit not started, cgroup removed mid-walk) yields nothing.
    """
    top = cgroupfs.join(_clean_cgroup_path("cgroup_paths", path))
    tids: set[int] = set()
    # os.walk ignores directories that vanish while it walks, which is what we want.
    for dirpath, _dirnames, filenames in os.walk(top):
        if "cgroup.threads" not in filenames:
            continue
        file_path = os.path.join(dirpath, "cgroup.threads")
        rel = cgroupfs.rel(Path(file_path))
        try:
            with open(file_path, "rb") as f:
                text = f.read().decode("ascii", errors="replace")
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as e:
            raise SysfsError(rel, f"read failed: {os.strerror(e.errno or 0)}") from None
        for line in text.split():
            if not line.isdigit():
                raise SysfsError(rel, f"not a thread id: {line[:20]!r}")
            tids.add(int(line))
    return sorted(tids)


def unit_cgroup_paths(procfs: Root, unit: str) -> tuple[str, ...]:
    """cgroup v2 paths (relative to the cgroupfs root) of a systemd unit.

    Found from ``/proc/<pid>/cgroup`` of running processes, so a unit with no running
    process resolves to nothing.
    """
    want = _clean_cgroup_path("systemd_units", unit).split("/")
    found: set[str] = set()
    for pid in pfs.list_pids(procfs):
        try:
            path = pfs.read_cgroup_v2_path(procfs, pid)
        except NoSuchThread:
            continue
        if not path:
            continue
        comps = [c for c in path.split("/") if c]
        for i in range(len(comps) - len(want) + 1):
            if comps[i : i + len(want)] == want:
                found.add("/".join(comps[: i + len(want)]))
                break
    return tuple(sorted(found))


def _cgroup_threads(
    procfs: Root, cgroupfs: Root, path: str, self_pid: int, known: KnownThread | None = None
) -> list[ThreadRef]:
    out: list[ThreadRef] = []
    for tid in cgroup_thread_ids(cgroupfs, path):
        ref = known(tid) if known is not None else None
        if ref is not None and ref.pid != self_pid:
            out.append(ref)
            continue
        try:
            pid = pfs.read_tgid(procfs, tid)
            if pid == self_pid:
                continue
            st = pfs.read_task_stat(procfs, pid, tid)
        except NoSuchThread:
            continue
        if st.is_kernel_thread:
            continue
        out.append(ThreadRef(pid=pid, tid=tid, start_ticks=st.start_ticks))
    return out


def discover_threads(
    selector: TargetSelector,
    procfs: Root,
    cgroupfs: Root | None = None,
    *,
    self_pid: int | None = None,
    known: KnownThread | None = None,
) -> tuple[ThreadRef, ...]:
    """The threads ``selector`` names right now, sorted by (pid, tid), each once.

    ``cgroupfs`` defaults to ``/sys/fs/cgroup``; ``self_pid`` (default: this
    process) is never a target. ``known(tid)``, if given, returns the ref of a thread
    the caller already tracks and knows to be alive (None otherwise); such a thread's
    ``stat`` is not read again.
    """
    cgroupfs = cgroupfs if cgroupfs is not None else Root(DEFAULT_CGROUPFS)
    me = os.getpid() if self_pid is None else self_pid
    found: dict[int, ThreadRef] = {}

    def add(refs: list[ThreadRef]) -> None:
        for ref in refs:
            found.setdefault(ref.tid, ref)

    for pid in selector.pids:
        leader = known(pid) if known is not None else None
        if leader is not None and leader.pid == pid:
            tgid = pid  # a live leader already tracked: no need to parse its status again
        else:
            try:
                tgid = pfs.read_tgid(procfs, pid)
            except NoSuchThread:
                continue
        add(_process_threads(procfs, tgid, me, known))

    if selector.comm_patterns:
        patterns = [re.compile(p) for p in selector.comm_patterns]
        for pid in pfs.list_pids(procfs):
            if pid == me:
                continue
            try:
                if not _comm_matches(procfs, pid, patterns):
                    continue
            except NoSuchThread:
                continue
            add(_process_threads(procfs, pid, me, known))

    cgroup_paths = list(selector.cgroup_paths)
    for unit in selector.systemd_units:
        cgroup_paths.extend(unit_cgroup_paths(procfs, unit))
    for path in dict.fromkeys(cgroup_paths):
        add(_cgroup_threads(procfs, cgroupfs, path, me, known))

    return tuple(sorted(found.values(), key=_pid_tid))


_pid_tid = operator.attrgetter("pid", "tid")
