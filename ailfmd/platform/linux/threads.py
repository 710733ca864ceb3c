"""The managed threads: who they are, where they run, what they did since last time.

Threads come and go every epoch; one that vanished mid-read is dropped silently (that is
normal for an inference server's worker pool). Counters come from ``perf_event_open``
where the machine has them and from ``schedstat`` always; a counter this machine cannot
measure is absent from the sample, never reported as zero.
"""

from __future__ import annotations

import os

from ailfmd.errors import NoSuchThread, SysfsError, ThreadReused, WriteRefused
from ailfmd.platform.base import ApplyOutcome, Capability, ThreadRef, ThreadSample
from ailfmd.platform.linux import procfs as pfs
from ailfmd.platform.linux.affinity import get_affinity, set_affinity
from ailfmd.platform.linux.journal import Journal
from ailfmd.platform.linux.perf import HARDWARE_EVENT_NAMES, SOFTWARE_EVENT_NAMES, ThreadCounters, probe_pmu
from ailfmd.platform.linux.sysfs import Root, format_cpu_list
from ailfmd.platform.linux.targets import TargetSelector, discover_threads


class ThreadTracker:
    """Finds the target threads and samples them; owns their perf descriptors."""

    def __init__(self, procfs: Root, cgroupfs: Root, selector: TargetSelector, use_perf: bool = True) -> None:
        self.procfs = procfs
        self.cgroupfs = cgroupfs
        self.selector = selector
        self._counters: dict[ThreadRef, ThreadCounters] = {}
        self._sched_prev: dict[ThreadRef, pfs.SchedStat] = {}
        self._pmu: dict[str, str | None] = probe_pmu() if use_perf else {}
        self._events = tuple(n for n, why in self._pmu.items() if why is None)
        self._schedstat_ok = os.path.exists(procfs.join("self/schedstat"))

    def set_selector(self, selector: TargetSelector) -> None:
        self.selector = selector

    def capabilities(self) -> dict[str, Capability]:
        hw = [n for n in HARDWARE_EVENT_NAMES if self._pmu.get(n, "x") is None]
        sw = [n for n in SOFTWARE_EVENT_NAMES if self._pmu.get(n, "x") is None]
        hw_missing = {n: self._pmu.get(n) or "perf disabled" for n in HARDWARE_EVENT_NAMES if n not in hw}
        hw_detail = (
            ("counting " + ", ".join(hw)) if hw else "no hardware PMU events"
        ) + (("; missing: " + "; ".join(f"{n} ({why})" for n, why in hw_missing.items())) if hw_missing else "")
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

    def refs(self) -> tuple[ThreadRef, ...]:
        return discover_threads(self.selector, self.procfs, self.cgroupfs)

    def sample(self) -> dict[int, ThreadSample]:
        if self.selector.is_empty:
            return {}
        refs = self.refs()
        live = set(refs)
        for gone in [r for r in self._counters if r not in live]:
            self._counters.pop(gone).close()
        for gone in [r for r in self._sched_prev if r not in live]:
            del self._sched_prev[gone]
        out: dict[int, ThreadSample] = {}
        for ref in refs:
            try:
                out[ref.tid] = self._sample_one(ref)
            except (NoSuchThread, ThreadReused, SysfsError):
                continue  # exited or replaced between discovery and read: normal
        return out

    def _sample_one(self, ref: ThreadRef) -> ThreadSample:
        st = pfs.read_task_stat(self.procfs, ref.pid, ref.tid)
        if st.start_ticks != ref.start_ticks:
            raise ThreadReused(ref.tid, ref.start_ticks, st.start_ticks)
        counters: dict[str, float] = {}
        if self._events:
            tc = self._counters.get(ref)
            if tc is None:
                tc = ThreadCounters(ref.tid, self._events)
                self._counters[ref] = tc
            counters.update({k: v for k, v in tc.read_deltas().items() if v is not None})
        if self._schedstat_ok:
            ss = pfs.read_task_schedstat(self.procfs, ref.pid, ref.tid)
            if ss is not None:
                prev = self._sched_prev.get(ref)
                if prev is not None:
                    counters["run_ns"] = float(ss.run_ns - prev.run_ns)
                    counters["wait_ns"] = float(ss.wait_ns - prev.wait_ns)
                    counters["timeslices"] = float(ss.timeslices - prev.timeslices)
                self._sched_prev[ref] = ss
        affinity = get_affinity(ref.tid)
        return ThreadSample(ref=ref, comm=st.comm, last_cpu=st.last_cpu, affinity=affinity, counters=counters)

    def set_affinity(self, ref: ThreadRef, cpus: frozenset[int], journal: Journal) -> ApplyOutcome:
        """Journal the original mask, then change it; the outcome says what is in effect."""
        target = f"thread {ref.tid}"
        want = format_cpu_list(cpus)
        try:
            current = get_affinity(ref.tid)
            if current == cpus:
                return ApplyOutcome(target, want, want, True, "unchanged")
            # The mask journaled must be this thread's, not a successor's with the same tid.
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
            got = set_affinity(self.procfs, ref, cpus)
        except (NoSuchThread, ThreadReused) as e:
            return ApplyOutcome(target, want, None, False, str(e))
        except WriteRefused as e:
            return ApplyOutcome(target, want, None, False, e.reason)
        return ApplyOutcome(target, want, format_cpu_list(got), got == cpus, "" if got == cpus else "kernel narrowed the set")

    def close(self) -> None:
        for tc in self._counters.values():
            tc.close()
        self._counters.clear()
