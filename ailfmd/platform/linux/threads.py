"""The managed threads: who they are, where they run, what they did since last time.

Each tracked thread keeps its ``stat`` and ``schedstat`` files open: procfs answers a
read on such a descriptor with ESRCH once that task is gone, even if its tid was reused
since, so an open descriptor is a reuse-proof handle and one pread per file read.
The set of targets is re-discovered every ``discover_every`` epochs (new request threads
show up within that many epochs). A thread that vanished is dropped silently; that is
normal for an inference server's worker pool. Counters come from ``perf_event_open``
where the machine has them and from ``schedstat`` always; a counter this machine cannot
measure is absent from the sample, never reported as zero.

Counters may be read at a lower rate than the epoch: with ``sample_every`` = N each
thread is measured every N-th call of :meth:`ThreadTracker.sample`, the threads spread
round-robin over the N phases so that every call measures about the same number. A
measurement reports the per-epoch share of what the counters did since the thread's
previous measurement (the window's deltas times ``this interval / window``), so a rate
derived from one epoch's deltas and the epoch length is the window's average rate.
In the calls between two measurements the thread's last sample is handed out again:
same counters (hence the same rates while epochs are evenly spaced), same ``comm`` and
``last_cpu``. Its CPU set is as current as with a measurement every call (re-read at
every re-discovery and after ailfmd sets it); a thread whose CPU set ailfmd changes is
measured again at the next call, and a thread that has exited is noticed at its next
measurement, at its next re-discovery, or when a change to it fails.

A measurement reads ``stat`` (comm and the CPU the thread last ran on, the most costly
of the per-thread reads) only when that may have changed: when the thread's perf
``cpu_migrations`` count went up in the window or cannot be read (no perf, no kernel
counting, no ``schedstat`` to tell a gone thread by), at its first measurement and after
ailfmd moved it. Every re-discovery reads it too (it is how a tracked thread is known to
be alive), which catches a comm renamed by another thread while this one slept. The
kernel counts a migration when the thread next runs, so a thread moved while it waited
in a run queue shows its new CPU at the measurement after.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass

from ailfmd.errors import NoSuchThread, SysfsError, ThreadReused, WriteRefused
from ailfmd.platform.base import ApplyOutcome, Capability, ThreadRef, ThreadSample
from ailfmd.platform.linux import procfs as pfs
from ailfmd.platform.linux.affinity import get_affinity, set_affinity
from ailfmd.platform.linux.cpusets import V1_MOUNT, process_cpuset
from ailfmd.platform.linux.journal import Journal
from ailfmd.platform.linux.perf import HARDWARE_EVENT_NAMES, SOFTWARE_EVENT_NAMES, ThreadCounters, probe_pmu
from ailfmd.platform.linux.records import make_thread_sample
from ailfmd.platform.linux.sysfs import Root, format_cpu_list
from ailfmd.platform.linux.targets import TargetSelector, discover_threads


@dataclass
class _Tracked:
    ref: ThreadRef
    stat_fd: int
    sched_fd: int
    counters: ThreadCounters | None
    sched_prev: tuple[int, int, int] | None = None  # run_ns, wait_ns, timeslices
    # Last known CPU set: re-read at every re-discovery and after we set it (only the
    # application or an operator changes it otherwise, and that is seen within
    # `discover_every` epochs).
    affinity: frozenset[int] | None = None
    slot: int = 0  # measured in the calls where call number % sample_every == slot
    measured_s: float | None = None  # when the counters were last read
    comm_raw: bytes = b""
    comm: str = ""
    last_cpu: int | None = None
    stat_stale: bool = True  # comm and last_cpu must be read from stat at the next measurement
    cpuset: frozenset[int] | None = None  # its process's cpuset, re-read at every re-discovery

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


# Measure each thread's counters every this many epochs by default (see the module doc).
DEFAULT_SAMPLE_EVERY = 3


class ThreadTracker:
    """Finds the target threads and samples them; owns their descriptors.

    ``sample_every``: measure each thread's counters every that many calls of
    :meth:`sample` (see the module docstring); 1 measures every thread every call.
    """

    def __init__(
        self,
        procfs: Root,
        cgroupfs: Root,
        selector: TargetSelector,
        use_perf: bool = True,
        discover_every: int = 10,
        sample_every: int = 1,
        cpuset_v1: Root | None = None,
    ) -> None:
        if sample_every < 1:
            raise ValueError(f"sample_every must be at least 1, got {sample_every}")
        self.procfs = procfs
        self.cgroupfs = cgroupfs
        # Where a v1 cpuset hierarchy is mounted (hybrid systems); by default beside a v2
        # root that is the mount point itself.
        self.cpuset_v1 = cpuset_v1 if cpuset_v1 is not None else Root(cgroupfs.join(V1_MOUNT))
        self.selector = selector
        self.discover_every = discover_every
        self.sample_every = sample_every
        self._tracked: dict[int, _Tracked] = {}  # by tid
        self._phases: list[dict[int, _Tracked]] = [{} for _ in range(sample_every)]  # by slot, then tid
        self._pending: dict[int, _Tracked] = {}  # measured at the next call whatever their phase
        self._samples: dict[int, ThreadSample] = {}  # the latest sample of every tracked thread
        self._check_affinity = False  # re-read the CPU set of the threads not measured next call
        self._calls = 0  # calls of sample(): which phase is measured
        self._last_call_s: float | None = None
        self._epochs_since_discovery: int | None = None
        self._pmu: dict[str, str | None] = probe_pmu() if use_perf else {}
        self._events = tuple(n for n, why in self._pmu.items() if why is None)
        self._schedstat_ok = os.path.exists(procfs.join("self/schedstat"))
        self._cpuset_error: str | None = None  # the last cpuset that could not be read, and why

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
            "affinity": Capability(
                True,
                "sched_setaffinity per thread, start time checked first, within each process's cpuset"
                + (f" (not known for one: {self._cpuset_error})" if self._cpuset_error else ""),
            ),
        }

    # ------------------------------------------------------------------ discovery
    def _known(self, tid: int) -> ThreadRef | None:
        """A tracked thread's ref if that very thread is still alive: its open ``stat``
        descriptor reads (ESRCH once it is gone, even if the tid was reused), so discovery
        need not open and parse it again. The read refreshes its comm and last CPU."""
        tr = self._tracked.get(tid)
        if tr is None:
            return None
        try:
            self._read_stat(tr)
        except OSError:
            return None
        except SysfsError:
            pass  # alive, with odd content: its next measurement reports it
        return tr.ref

    def _rediscover(self) -> None:
        refs = discover_threads(self.selector, self.procfs, self.cgroupfs, known=self._known)
        wanted = {r.tid: r for r in refs}
        # known() hands back the tracked ref itself: identity settles almost every thread.
        stale = [t for t, tr in self._tracked.items() if (w := wanted.get(t)) is not tr.ref and w != tr.ref]
        for tid in stale:
            self._drop(tid)
        for tr in self._tracked.values():
            tr.affinity = None
        self._check_affinity = True
        cpusets = self._cpusets({r.pid for r in wanted.values()})
        for tid, ref in wanted.items():
            tr = self._tracked.get(tid)
            if tr is None:
                try:
                    tr = self._tracked[tid] = self._open(ref)
                except (NoSuchThread, ThreadReused, SysfsError):
                    continue  # gone between discovery and open
                self._pending[tid] = tr  # a first sample at once
            tr.cpuset = cpusets.get(ref.pid)
        self._epochs_since_discovery = 0

    def _cpusets(self, pids: set[int]) -> dict[int, frozenset[int] | None]:
        """Each process's cpuset (None: unknown, so unrestricted). Read once per process
        and re-discovery: a cpuset changes when an operator or a container runtime moves
        the service, which the next re-discovery then sees."""
        out: dict[int, frozenset[int] | None] = {}
        for pid in pids:
            try:
                out[pid] = process_cpuset(self.procfs, self.cgroupfs, self.cpuset_v1, pid)
            except NoSuchThread:
                out[pid] = None
            except SysfsError as e:
                self._cpuset_error = str(e)
                out[pid] = None
        return out

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
        # The least busy phase, so that every call measures about as many threads.
        sizes = [len(p) for p in self._phases]
        tracked.slot = sizes.index(min(sizes))
        self._phases[tracked.slot][ref.tid] = tracked
        return tracked

    def _drop(self, tid: int) -> None:
        tr = self._tracked.pop(tid)
        del self._phases[tr.slot][tid]
        self._pending.pop(tid, None)
        self._samples.pop(tid, None)
        tr.close()

    def _drop_all(self) -> None:
        for tr in self._tracked.values():
            tr.close()
        self._tracked.clear()
        for p in self._phases:
            p.clear()
        self._pending.clear()
        self._samples.clear()

    # ------------------------------------------------------------------ sampling
    def sample(self, now: float | None = None) -> dict[int, ThreadSample]:
        """One sample per tracked thread; ``now`` (monotonic seconds, default: the clock
        now) is the time the counter windows are measured against."""
        if self.selector.is_empty:
            self._drop_all()
            return {}
        if self._epochs_since_discovery is None or self._epochs_since_discovery >= self.discover_every:
            self._rediscover()
        assert self._epochs_since_discovery is not None
        self._epochs_since_discovery += 1
        if now is None:
            now = time.monotonic()
        prev_s, self._last_call_s = self._last_call_s, now
        due = self._phases[self._calls % self.sample_every]
        self._calls += 1
        samples = self._samples
        gone: set[int] = set()
        for tid, tr in due.items():
            try:
                samples[tid] = self._measure(tr, now, prev_s)
            except (NoSuchThread, SysfsError):
                gone.add(tid)  # exited: normal
        if self._pending:
            for tid, tr in self._pending.items():
                if tid not in due:
                    try:
                        samples[tid] = self._measure(tr, now, prev_s)
                    except (NoSuchThread, SysfsError):
                        gone.add(tid)
            self._pending.clear()
        if self._check_affinity:
            # After a re-discovery: the CPU sets of the threads not measured this call.
            self._check_affinity = False
            for tid, tr in self._tracked.items():
                if tr.affinity is None and tid in samples and tid not in gone:
                    last = samples[tid]
                    try:
                        got = get_affinity(tid)
                    except NoSuchThread:
                        gone.add(tid)
                        continue
                    if got == last.affinity and tr.cpuset == last.cpuset:
                        tr.affinity = last.affinity
                    else:
                        tr.affinity = got
                        samples[tid] = ThreadSample(last.ref, last.comm, last.last_cpu, got, last.counters,
                                                    tr.cpuset)
        for tid in gone:
            self._drop(tid)
        return dict(samples)

    def _measure(self, tr: _Tracked, now: float, prev_s: float | None) -> ThreadSample:
        ref = tr.ref
        tid = ref.tid
        # Per-epoch share of the window since the last measurement (1 when that was
        # the previous call, and for a first measurement, whose window is since opening).
        scale = 1.0
        measured_s = tr.measured_s
        if measured_s is not None and prev_s is not None and measured_s != prev_s and now > measured_s:
            scale = (now - prev_s) / (now - measured_s)
        counters: dict[str, float] = {}
        try:
            if tr.counters is not None:
                tr.counters.add_deltas(counters, scale)
            if tr.sched_fd >= 0:
                # Also the liveness check: ESRCH once this very thread is gone.
                ss_raw = os.pread(tr.sched_fd, 1024, 0)
                try:
                    run_ns, wait_ns, slices = ss_raw.split()
                    ss = (int(run_ns), int(wait_ns), int(slices))
                except ValueError:
                    p = pfs.parse_schedstat(ss_raw.decode("ascii", "replace"), f"{ref.pid}/task/{tid}/schedstat")
                    ss = (p.run_ns, p.wait_ns, p.timeslices)
                prev = tr.sched_prev
                if prev is not None:
                    counters["run_ns"] = (ss[0] - prev[0]) * scale
                    counters["wait_ns"] = (ss[1] - prev[1]) * scale
                    counters["timeslices"] = (ss[2] - prev[2]) * scale
                tr.sched_prev = ss
            if tr.stat_stale or counters.get("cpu_migrations") != 0.0 or tr.sched_fd < 0:
                self._read_stat(tr)
        except OSError as e:
            if e.errno == errno.ESRCH:
                raise NoSuchThread(tid) from None
            raise
        if tr.affinity is None:
            tr.affinity = get_affinity(tid)
        tr.measured_s = now
        return make_thread_sample(ref, tr.comm, tr.last_cpu, tr.affinity, counters, tr.cpuset)

    @staticmethod
    def _read_stat(tr: _Tracked) -> None:
        """comm (field 2) and processor (field 39) from the thread's ``stat``."""
        ref = tr.ref
        raw = os.pread(tr.stat_fd, 1024, 0)
        # Split off the part after the last ')' (comm may contain any byte) up to field 39.
        close = raw.rfind(b")")
        fields = raw[close + 2 :].split(b" ", 37)
        try:
            if close < 0 or len(fields) < 37:
                raise ValueError
            tr.last_cpu = int(fields[36])
        except ValueError:
            # Unusual content: the full parser names the problem (or finds no field 39).
            tr.last_cpu = pfs.parse_task_stat(raw.decode("ascii", "replace"), f"{ref.pid}/task/{ref.tid}/stat").last_cpu
        comm_raw = raw[raw.find(b"(") + 1 : close]
        if comm_raw != tr.comm_raw:
            tr.comm_raw, tr.comm = comm_raw, comm_raw.decode("ascii", "replace")
        tr.stat_stale = False

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
                # Measured at the next call, stat included: where it runs now, not where it ran.
                tracked.stat_stale = True
                self._pending[ref.tid] = tracked
            else:
                got = set_affinity(self.procfs, ref, cpus)
        except (NoSuchThread, ThreadReused) as e:
            gone = self._tracked.get(ref.tid)
            if gone is not None and gone.ref == ref:
                self._drop(ref.tid)  # exited since it was last measured: out of the next sample
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
        self._drop_all()
