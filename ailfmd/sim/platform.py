"""``SimPlatform``: the simulated chip behind the same Platform protocol as Linux.

The daemon, the baselines, the oracle and the trainer drive the simulator exactly as
they drive a real machine: ``observe()`` reports per-CPU temperature, clock and limits and
per-thread counter deltas named like Linux's, ``apply()`` takes CPU sets and frequency
caps and answers like the kernel would. On top of the protocol: ``advance(dt_s)`` moves
simulated time (offline runs), ``snapshot()``/``restore_snapshot()`` let an oracle look
ahead, and ``metrics()`` reports the run so far.

CPU id = core id = the chip's core index; one cpufreq policy per CPU (``policy<N>``).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ailfmd.errors import AilfmError
from ailfmd.platform.base import (
    CAPABILITY_NAMES,
    Action,
    ApplyOutcome,
    ApplyResult,
    CacheDomain,
    Capabilities,
    Capability,
    CpuState,
    CpuTemp,
    CpuTopology,
    FreqPolicy,
    Observation,
    TempReading,
    TempSensor,
    ThreadRef,
    ThreadSample,
    ThrottleCounts,
    Topology,
)
from ailfmd.platform.linux.sysfs import format_cpu_list
from ailfmd.sim.chip import Chip
from ailfmd.sim.engine import DEFAULT_TICK_S, DTM_RESOLUTION_S, Engine, EngineState
from ailfmd.sim.governor import KHZ_PER_MHZ, VfLevels
from ailfmd.sim.scheduler import COUNTER_NAMES
from ailfmd.sim.metrics import RunMetrics
from ailfmd.sim.workload import Workload

DEFAULT_DURATION_S = 3600.0
SIM_DRIVER = "sim"
SIM_GOVERNOR = "schedutil"


class SimulationError(AilfmError):
    """A SimPlatform was used in a way the simulation cannot follow."""


class SimPlatform:
    """The simulated many-core (``chip``) running ``workload`` drawn from ``seed``.

    Without ``clock`` simulated time moves only through :meth:`advance`. With ``clock``
    (a monotonic seconds callable, e.g. ``time.monotonic``) the chip runs in real time:
    every :meth:`observe` first simulates up to the clock's time since construction.
    Requests arrive during ``duration_s``; afterwards the chip drains and idles.
    """

    def __init__(self, chip: Chip, workload: Workload, seed: int, tick_s: float = DEFAULT_TICK_S,
                 clock: Callable[[], float] | None = None,
                 duration_s: float = DEFAULT_DURATION_S,
                 dtm_resolution_s: float = DTM_RESOLUTION_S) -> None:
        self.chip = chip
        self.workload = workload
        self.seed = seed
        self.engine = Engine(chip, workload, seed, duration_s, tick_s, dtm_resolution_s)
        self._clock = clock
        self._clock0 = clock() if clock is not None else 0.0
        self._closed = False
        self._topology = _topology(chip)
        self._builder = _ObservationBuilder(chip, self.engine.levels)

    # ------------------------------------------------------------------ protocol

    def topology(self) -> Topology:
        return self._topology

    def capabilities(self) -> Capabilities:
        details = {
            "per_core_temperature": "simulated per-core sensor (one die tile each)",
            "package_temperature": "simulated: the hottest core stands for the package",
            "frequency_read": f"simulated cpufreq, one policy per CPU, governor {SIM_GOVERNOR}",
            "frequency_cap": "simulated scaling_max_freq per CPU",
            "throttle_counters": "simulated hardware DTM events per core",
            "hw_counters": "simulated: instructions, cycles, llc_references, llc_misses, "
                           "stalled_cycles_backend (from the CPI stack)",
            "sw_counters": "simulated: task_clock_ns, context_switches, cpu_migrations",
            "schedstat": "simulated run_ns, wait_ns, timeslices",
            "affinity": "simulated sched_setaffinity per thread",
        }
        items = {name: Capability(True, details[name]) for name in CAPABILITY_NAMES}
        return Capabilities(items=items, notes=(f"simulated chip {self.chip.name} ({self.chip.source})",))

    def observe(self) -> Observation:
        self._check_open()
        if self._clock is not None:
            self.engine.advance_to(self._clock() - self._clock0)
        return self._builder.build(self.engine)

    def apply(self, action: Action) -> ApplyResult:
        self._check_open()
        outcomes = [self._apply_cap(cpu, cap) for cpu, cap in sorted(action.freq_cap_khz.items())]
        outcomes.extend(self._apply_affinity(ref, cpus) for ref, cpus in action.affinity.items())
        return ApplyResult(tuple(outcomes))

    def restore(self) -> ApplyResult:
        """Caps back to the hardware maximum, every live thread's affinity to all CPUs."""
        self._check_open()
        everything = frozenset(self._topology.cpus)
        caps = {cpu: self.engine.levels.max_khz for cpu in self._topology.cpus}
        st = self.engine.state
        refs = {ThreadRef(int(p), int(t), int(s)): everything
                for p, t, s in zip(st.threads.pid, st.threads.tid, st.threads.start_tick)}
        return self.apply(Action(affinity=refs, freq_cap_khz=caps))

    def close(self) -> None:
        self._closed = True

    # ------------------------------------------------------------------ simulation

    @property
    def time_s(self) -> float:
        return self.engine.time_s

    def advance(self, dt_s: float) -> None:
        """Run the simulation ``dt_s`` further (only without a clock)."""
        self._check_open()
        if self._clock is not None:
            raise SimulationError("this SimPlatform follows a clock; observe() advances it")
        self.engine.advance(dt_s)

    def snapshot(self) -> EngineState:
        """An opaque deep copy of the whole simulation state, RNG included."""
        return self.engine.snapshot()

    def restore_snapshot(self, snap: EngineState) -> None:
        """Go back to ``snap`` (which stays valid for further restores)."""
        self.engine.restore_snapshot(snap)

    def metrics(self) -> RunMetrics:
        return self.engine.metrics()

    # ------------------------------------------------------------------ actuation

    def _check_open(self) -> None:
        if self._closed:
            raise SimulationError("SimPlatform is closed")

    def _apply_cap(self, cpu: int, cap_khz: int) -> ApplyOutcome:
        target = f"policy{cpu}"
        if cpu not in self._topology.cpus:
            return ApplyOutcome(target, f"{cap_khz} kHz", None, False, f"no CPU {cpu}")
        value, note = self.engine.levels.clamp_cap(cap_khz)
        if value == int(self.engine.state.cap_khz[cpu]):
            return ApplyOutcome(target, f"{cap_khz} kHz", f"{value} kHz", True, note or "unchanged")
        self.engine.set_cap_khz(cpu, value)
        return ApplyOutcome(target, f"{cap_khz} kHz", f"{value} kHz", True, note)

    def _apply_affinity(self, ref: ThreadRef, cpus: frozenset[int]) -> ApplyOutcome:
        target = f"thread {ref.tid}"
        want = format_cpu_list(cpus)
        st = self.engine.state
        row = st.threads.row_of_tid.get(ref.tid)
        if row is None:
            return ApplyOutcome(target, want, None, False, f"thread {ref.tid} is gone")
        found = (int(st.threads.pid[row]), int(st.threads.start_tick[row]))
        if found != (ref.pid, ref.start_ticks):
            return ApplyOutcome(target, want, None, False,
                                f"thread {ref.tid} was reused: start time {found[1]} != "
                                f"expected {ref.start_ticks}")
        valid = frozenset(c for c in cpus if c in self._topology.cpus)
        if not valid:
            # sched_setaffinity fails with EINVAL when no CPU of the mask is usable.
            return ApplyOutcome(target, want, None, False, "EINVAL: no online CPU in the set")
        current = frozenset(np.flatnonzero(st.threads.affinity[row]).tolist())
        if current == valid and valid == cpus:
            return ApplyOutcome(target, want, want, True, "unchanged")
        mask = np.zeros(self.chip.n_cores, dtype=bool)
        mask[list(valid)] = True
        self.engine.set_affinity(row, mask)
        got = format_cpu_list(valid)
        ok = valid == cpus
        return ApplyOutcome(target, want, got, ok, "" if ok else "kernel narrowed the set")


class _ObservationBuilder:
    """Turns engine state into the records LinuxPlatform would report."""

    def __init__(self, chip: Chip, levels: VfLevels) -> None:
        self.n_cores = chip.n_cores
        self.sensors = tuple(
            TempSensor(kind="sim", chip=chip.name, sensor=f"core{cpu}",
                       label="Core {} (layer {}, row {}, col {})".format(cpu, *chip.position(cpu)),
                       scope="core", path="")
            for cpu in range(chip.n_cores))
        self.max_c = chip.dtm.threshold_c
        self.crit_c = chip.dtm.critical_c
        self.hw_min_khz, self.hw_max_khz = levels.min_khz, levels.max_khz
        self.available_khz = tuple(int(f) for f in levels.freq_khz)
        self.everything = frozenset(range(chip.n_cores))
        # Records are immutable: reuse the ones whose content did not change.
        self._policies: dict[int, tuple[tuple[int, int], FreqPolicy]] = {}
        self._throttles: dict[int, ThrottleCounts] = {}
        self._refs: dict[int, ThreadRef] = {}

    def build(self, engine: Engine) -> Observation:
        st = engine.state
        temps = st.temps_c.tolist()
        freqs = (engine.current_freq_mhz() * KHZ_PER_MHZ).astype(np.int64).tolist()
        caps = st.cap_khz.tolist()
        throttles = st.throttle_count.tolist()
        lo, hi = self.hw_min_khz, self.hw_max_khz
        cpus = {}
        readings = []
        policies = []
        for cpu in range(self.n_cores):
            sensor = self.sensors[cpu]
            throttle = self._throttles.get(cpu)
            if throttle is None or throttle.core_throttle_count != throttles[cpu]:
                throttle = self._throttles[cpu] = ThrottleCounts(cpu, throttles[cpu], None)
            cpus[cpu] = CpuState(cpu, CpuTemp(cpu, temps[cpu], sensor, "simulated per-core sensor"),
                                 freqs[cpu], caps[cpu], lo, hi, throttle)
            readings.append(TempReading(sensor, temps[cpu], None, self.max_c, self.crit_c))
            key = (caps[cpu], freqs[cpu])
            cached = self._policies.get(cpu)
            if cached is None or cached[0] != key:
                cached = self._policies[cpu] = (key, FreqPolicy(
                    cpu, (cpu,), SIM_DRIVER, SIM_GOVERNOR, lo, caps[cpu], freqs[cpu], lo, hi,
                    self.available_khz, (SIM_GOVERNOR,)))
            policies.append(cached[1])
        return Observation(time_s=engine.time_s, cpus=cpus, threads=self._threads(engine),
                           sensors=tuple(readings), policies=tuple(policies))

    def _threads(self, engine: Engine) -> dict[int, ThreadSample]:
        tt = engine.state.threads
        deltas = engine.take_counter_deltas().tolist()
        unpinned = tt.affinity.all(axis=1).tolist()
        refs = self._refs
        out = {}
        for i, (pid, tid, start, core) in enumerate(zip(tt.pid.tolist(), tt.tid.tolist(),
                                                        tt.start_tick.tolist(), tt.core.tolist())):
            ref = refs.get(tid)
            if ref is None:
                ref = refs[tid] = ThreadRef(pid, tid, start)
            out[tid] = ThreadSample(
                ref=ref,
                comm=f"lfm{pid}/{tid - pid}",
                last_cpu=core,
                affinity=(self.everything if unpinned[i]
                          else frozenset(np.flatnonzero(tt.affinity[i]).tolist())),
                counters=dict(zip(COUNTER_NAMES, deltas[i])),
            )
        if len(refs) > 4 * len(out) + 64:  # forget threads that exited
            self._refs = {tid: refs[tid] for tid in out}
        return out


def _topology(chip: Chip) -> Topology:
    cpus = {}
    for cpu in range(chip.n_cores):
        layer, row, col = chip.position(cpu)
        cpus[cpu] = CpuTopology(cpu=cpu, package_id=0, core_id=cpu, die_id=layer,
                                thread_siblings=(cpu,), numa_node=0, position=(layer, row, col))
    everything = tuple(range(chip.n_cores))
    llc = CacheDomain(level=3, kind="Unified", cpus=everything,
                      size_bytes=chip.memory.llc_bank_size_kib * 1024 * chip.n_cores, cache_id=0)
    return Topology(cpus=cpus, caches=(llc,), numa_nodes={0: everything})
