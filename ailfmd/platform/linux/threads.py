"""The managed threads: who they are, where they run, what they did since last time.

Each tracked thread keeps its ``stat`` and ``schedstat`` files open: procfs answers a
read on such a descriptor with ESRCH once that task is gone, even if its tid was reused
since, so an open descriptor is a reuse-proof handle and one pread per file per epoch.
The set of targets is re-discovered every ``discover_every`` epochs (new request threads
show up within that many epochs). A thread that vanished is dropped silently; that is
normal for an inference server's worker pool. Counters come from ``perf_event_open``
where the machine has them and from ``schedstat`` always; a counter this machine cannot
measure is absent from the sample, never reported as zero.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from ailfmd.errors import NoSuchThread, SysfsError, ThreadReused, WriteRefused
from ailfmd.platform.base import ApplyOutcome, Capability, ThreadRef, ThreadSample
from ailfmd.platform.linux import procfs as pfs
from ailfmd.platform.linux.affinity import get_affinity, set_affinity
from ailfmd.platform.linux.journal import Journal
from ailfmd.platform.linux.perf import HARDWARE_EVENT_NAMES, SOFTWARE_EVENT_NAMES, ThreadCounters, probe_pmu
from ailfmd.platform.linux.sysfs import Root, format_cpu_list
from ailfmd.platform.linux.targets import TargetSelector, discover_threads


@dataclass
class _Tracked:
    ref: ThreadRef
    stat_fd: int
    sched_fd: int
    counters: ThreadCounters | None
    sched_prev: pfs.SchedStat | None = None
    # Last known CPU set: re-read at every re-discovery and after we set it (only the
    # application or an operator changes it otherwise, and that is seen within
    # `discover_every` epochs).
    affinity: frozenset[int] | None = None

    def close(self) -> None:
        for fd in (self.stat_fd, self.sched_fd):
            if fd >= 0:
                os.close(fd)
        self.stat_fd = self.sched_fd = -1
        if self.counters is not None:
            self.counters.close()


def _pread_text(fd: int, tid: int) -> str:
    try:
        return os.pread(fd, 1024, 0).decode("ascii", "replace")
    except OSError as e:
        if e.errno == errno.ESRCH:
            raise NoSuchThread(tid) from None
        raise


class ThreadTracker:
    """Finds the target threads and samples them; owns their descriptors."""

    def __init__(
        self,
        procfs: Root,
        cgroupfs: Root,
        selector: TargetSelector,
        use_perf: bool = True,
        discover_every: int = 10,
    ) -> None:
        self.procfs = procfs
        self.cgroupfs = cgroupfs
        self.selector = selector
        self.discover_every = discover_every
        self._tracked: dict[int, _Tracked] = {}  # by tid
        self._epochs_since_discovery: int | None = None
        self._pmu: dict[str, str | None] = probe_pmu() if use_perf else {}
        self._events = tuple(n for n, why in self._pmu.items() if why is None)
        self._schedstat_ok = os.path.exists(procfs.join("self/schedstat"))

    def set_selector(self, selector: TargetSelector) -> None:
        self.selector = selector
        self._epochs_since_discovery = None

    def capabilities(self) -> dict[str, Capability]:
        hw = [n for n in HARDWARE_EVENT_NAMES if self._pmu.get(n, "x") is None]
        sw = [n for n in SOFTWARE_EVENT_NAMES if self._pmu.get(n, "x") is None]
        hw_missing = {n: self._pmu.get(n) or "perf disabled" for n in HARDWARE_EVENT_NAMES if n not in hw}
        hw_detail = ("counting " + ", ".join(hw)) if hw else "no hardware PMU events"
        if hw_missing:
            hw_detail += "; missing: " + "; ".join(f"{n} ({why})" for n, why in hw_missing.items())
        return {
            "hw_counters": Capability(bool(hw), hw_detail),
            "sw_counters": Capability(bool(sw), ("counting " + ", ".join(sw)) if sw else "no perf software events"),
            "schedstat": Capability(
                self._schedstat_ok,
                "per-thread run/wait time from /proc/<pid>/task/<tid>/schedstat"
                if self._schedstat_ok
                else "schedstat absent (kernel without CONFIG_SCHED_INFO)",
            ),
            "affinity": Capability(True, "sched_setaffinity per thread, start time checked first"),
        }

    # ------------------------------------------------------------------ discovery
    def _rediscover(self) -> None:
        refs = discover_threads(self.selector, self.procfs, self.cgroupfs)
        wanted = {r.tid: r for r in refs}
        for tid in [t for t, tr in self._tracked.items() if wanted.get(t) != tr.ref]:
            self._tracked.pop(tid).close()
        for tr in self._tracked.values():
            tr.affinity = None
        for tid, ref in wanted.items():
            if tid not in self._tracked:
                try:
                    self._tracked[tid] = self._open(ref)
                except (NoSuchThread, ThreadReused, SysfsError):
                    continue  # gone between discovery and open
        self._epochs_since_discovery = 0

    def _open(self, ref: ThreadRef) -> _Tracked:
        base = self.procfs.join(f"{ref.pid}/task/{ref.tid}")
        try:
            stat_fd = os.open(base / "stat", os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, ProcessLookupError):
            raise NoSuchThread(ref.tid) from None
        try:
            sched_fd = os.open(base / "schedstat", os.O_RDONLY | os.O_CLOEXEC) if self._schedstat_ok else -1
        except OSError:
            sched_fd = -1
        tracked = _Tracked(ref, stat_fd, sched_fd, None)
        try:
            # Opened after discovery read the start time: confirm it is the same thread.
            st = pfs.parse_task_stat(_pread_text(stat_fd, ref.tid), f"{ref.pid}/task/{ref.tid}/stat")
            if st.start_ticks != ref.start_ticks:
                raise ThreadReused(ref.tid, ref.start_ticks, st.start_ticks)
            if self._events:
                tracked.counters = ThreadCounters(ref.tid, self._events)
        except BaseException:
            tracked.close()
            raise
        return tracked

    # ------------------------------------------------------------------ sampling
    def sample(self) -> dict[int, ThreadSample]:
        if self.selector.is_empty:
            for tr in self._tracked.values():
                tr.close()
            self._tracked.clear()
            return {}
        if self._epochs_since_discovery is None or self._epochs_since_discovery >= self.discover_every:
            self._rediscover()
        assert self._epochs_since_discovery is not None
        self._epochs_since_discovery += 1
        out: dict[int, ThreadSample] = {}
        for tid in list(self._tracked):
            tr = self._tracked[tid]
            try:
                out[tid] = self._sample_one(tr)
            except (NoSuchThread, SysfsError):
                self._tracked.pop(tid).close()  # exited: normal
        return out

    def _sample_one(self, tr: _Tracked) -> ThreadSample:
        ref = tr.ref
        rel = f"{ref.pid}/task/{ref.tid}/stat"
        st = pfs.parse_task_stat(_pread_text(tr.stat_fd, ref.tid), rel)
        counters: dict[str, float] = {}
        if tr.counters is not None:
            counters.update({k: v for k, v in tr.counters.read_deltas().items() if v is not None})
        if tr.sched_fd >= 0:
            ss = pfs.parse_schedstat(_pread_text(tr.sched_fd, ref.tid), f"{ref.pid}/task/{ref.tid}/schedstat")
            prev = tr.sched_prev
            if prev is not None:
                counters["run_ns"] = float(ss.run_ns - prev.run_ns)
                counters["wait_ns"] = float(ss.wait_ns - prev.wait_ns)
                counters["timeslices"] = float(ss.timeslices - prev.timeslices)
            tr.sched_prev = ss
        if tr.affinity is None:
            tr.affinity = get_affinity(ref.tid)
        return ThreadSample(ref=ref, comm=st.comm, last_cpu=st.last_cpu, affinity=tr.affinity, counters=counters)

    # ------------------------------------------------------------------ actuation
    def set_affinity(self, ref: ThreadRef, cpus: frozenset[int], journal: Journal) -> ApplyOutcome:
        """Journal the original mask, then change it; the outcome says what is in effect."""
        target = f"thread {ref.tid}"
        want = format_cpu_list(cpus)
        try:
            tracked = self._tracked.get(ref.tid)
            current = get_affinity(ref.tid)
            if current == cpus:
                return ApplyOutcome(target, want, want, True, "unchanged")
            # The mask journaled must be this thread's, not a successor's with the same tid.
            if tracked is not None and tracked.ref == ref:
                # Its open stat descriptor answers ESRCH once this very thread is gone.
                _pread_text(tracked.stat_fd, ref.tid)
            else:
                found = pfs.read_start_ticks(self.procfs, ref.pid, ref.tid)
                if found != ref.start_ticks:
                    raise ThreadReused(ref.tid, ref.start_ticks, found)
            journal.record(
                {
                    "kind": "affinity",
                    "pid": ref.pid,
                    "tid": ref.tid,
                    "start_ticks": ref.start_ticks,
                    "original": sorted(current),
                }
            )
            if tracked is not None and tracked.ref == ref:
                got = self._set_tracked(tracked, cpus)
            else:
                got = set_affinity(self.procfs, ref, cpus)
        except (NoSuchThread, ThreadReused) as e:
            return ApplyOutcome(target, want, None, False, str(e))
        except WriteRefused as e:
            return ApplyOutcome(target, want, None, False, e.reason)
        ok = got == cpus
        return ApplyOutcome(target, want, format_cpu_list(got), ok, "" if ok else "kernel narrowed the set")

    @staticmethod
    def _set_tracked(tr: _Tracked, cpus: frozenset[int]) -> frozenset[int]:
        """sched_setaffinity on a tracked thread, identity checked through its open stat
        descriptor before and after (a tid reused in between is at least reported)."""
        tid = tr.ref.tid
        try:
            os.sched_setaffinity(tid, cpus)
        except ProcessLookupError:
            raise NoSuchThread(tid) from None
        except OSError as e:
            raise WriteRefused(f"thread {tid}", format_cpu_list(cpus), os.strerror(e.errno or 0)) from None
        _pread_text(tr.stat_fd, tid)  # ESRCH: the thread we checked is gone
        tr.affinity = get_affinity(tid)
        return tr.affinity

    def close(self) -> None:
        for tr in self._tracked.values():
            tr.close()
        self._tracked.clear()
