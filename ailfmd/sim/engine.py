"""The simulation engine: chip state and how it advances in ticks.

A tick (``tick_s``, default 10 ms) holds each core's operating point constant (zero-order
hold on power; the thermal step under it is exact):

1. requests arriving before the tick ends are admitted and their threads placed; the
   scheduler rebalances when placement changed (``admission.py``, ``scheduler.py``);
2. each core's V/f level comes from its cap, the governor and its DTM state
   (``governor.py``, ``state.Clocks``);
3. a look-ahead through the tick at the last tick's DRAM latency says how long each
   core's threads will run (barrier sleeps included) and in which program segment each
   thread spends most of it (``lookahead.py``); ``PerfModel.rates`` over those segments
   gives this tick's loaded DRAM latency (``cores.py``); each core's power is the
   ``PowerModel`` tile power for that segment's kernel, weighted by the core's busy
   fraction, with leakage at the start-of-tick temperature; ``ThermalModel.step_modes``
   gives the end temperatures;
4. if that step would flip the DTM relay of a core whose clock it changes, or change
   whether any core is at or above the threshold, the tick is re-run in DTM sub-steps
   (``dtm_resolution_s``, default 1 ms) with every relay live and each core's busy
   fraction resolved per sub-step (``substeps.py``); a thread's clock for the tick is
   then the steady clock that retires as many instructions as the throttled/free mix it
   got;
5. threads progress through their programs at the CPI-stack speed of their core, across
   segment boundaries and, through the per-step barrier, across steps (``progress.py``;
   closed form on the prefix sums of ``program.Pool``); migrations cost the cache
   warm-up as lost time (``counters.py``).

A tick in which no thread can leave its segment takes a shorter path with the same
result (``steady.py``); ``reference=True`` turns that path off and runs the DTM
sub-steps in the plain loop, as a cross-check. With numba installed, each phase of a
tick runs as one compiled call (``compiled.py``), to the same results to rounding.
docs/simulator.md explains every choice.
"""

from __future__ import annotations

import copy
import math

import numpy as np

from ailfmd.sim import jit
from ailfmd.sim.admission import Admission
from ailfmd.sim.chip import Chip
from ailfmd.sim.cores import DRAM_MEMO_SIZE, CoreView
from ailfmd.sim.counters import MigrationCost, take_counter_deltas, thread_counters
from ailfmd.sim.governor import Dtm, VfLevels
from ailfmd.sim.lookahead import S_PER_CYCLE_MHZ, LookAhead
from ailfmd.sim.metrics import RunMetrics
from ailfmd.sim.perfmodel import PerfModel
from ailfmd.sim.power import PowerModel
from ailfmd.sim.progress import Progress
from ailfmd.sim.scheduler import Scheduler, time_shares
from ailfmd.sim.state import PID_BASE, SCHED_STREAM, Clocks, EngineState
from ailfmd.sim.steady import steady_tick
from ailfmd.sim.substeps import PowerTable, SubSteps, busy_profile
from ailfmd.sim.thermal import ThermalModel
from ailfmd.sim.workload import Request, Workload

__all__ = ["DEFAULT_TICK_S", "DTM_RESOLUTION_S", "DRAM_MEMO_SIZE", "IDLE_JUMP_TICKS", "PID_BASE",
           "SCHED_STREAM", "Engine", "EngineState"]

DEFAULT_TICK_S = 0.01
DTM_RESOLUTION_S = 0.001
IDLE_JUMP_TICKS = 10  # an idle chip is stepped this many ticks at once (leakage refreshed)


class Engine:
    """The simulated chip running a workload; see the module docstring for a tick.

    ``reference=True`` runs every tick through the general path and the DTM sub-steps
    through the plain loop: slower, the same results to rounding (a cross-check).
    ``compiled`` chooses the compiled kernels (numba) over the numpy path: None uses them
    when numba is installed unless ``AILFMD_SIM_COMPILED=0``, True requires them, False
    refuses them; the results are the same to rounding (``jit.py``, ``compiled.py``).
    """

    def __init__(self, chip: Chip, workload: Workload, seed: int, duration_s: float,
                 tick_s: float = DEFAULT_TICK_S, dtm_resolution_s: float = DTM_RESOLUTION_S,
                 reference: bool = False, compiled: bool | None = None) -> None:
        if not tick_s > 0 or not duration_s > 0 or not dtm_resolution_s > 0:
            raise ValueError("tick_s, duration_s and dtm_resolution_s must be > 0")
        self.chip, self.workload, self.seed = chip, workload, seed
        self.duration_s, self.tick_s = float(duration_s), float(tick_s)
        self.reference = bool(reference)
        # Compiled kernels (numba) when available; the reference path is numpy throughout.
        self.compiled = jit.load(False if self.reference else compiled)
        self.n_cores = chip.n_cores
        fp, noc, mem = chip.floorplan, chip.noc, chip.memory
        self.thermal = ThermalModel(chip)
        self.power = PowerModel(chip)
        self.perf = PerfModel(fp.layers, fp.rows, fp.cols, noc.hop_horizontal_cycles,
                              noc.hop_vertical_cycles, noc.llc_bank_access_cycles,
                              mem.dram_latency_ns, mem.dram_bandwidth_gbps)
        self.levels = VfLevels(chip)
        self.dtm = Dtm(chip)
        self.scheduler = Scheduler(self.n_cores)
        self.requests: tuple[Request, ...] = tuple(workload.requests(seed, duration_s))
        self.f_min_mhz = float(self.levels.freq_mhz[0])
        # DTM sub-steps per tick: the tick in pieces of about dtm_resolution_s.
        self.sub_steps = max(1, round(self.tick_s / dtm_resolution_s))
        self.power_table = self._power_table = PowerTable(self.power, chip, self.levels.freq_mhz)
        self.substeps = SubSteps(self.dtm, self.thermal, self.power_table, self.n_cores,
                                 self.tick_s, self.sub_steps, self.reference, self.compiled)
        self.cores = CoreView(self.perf, self.n_cores, self.tick_s, self.f_min_mhz, self.compiled)
        self.look = LookAhead(self.tick_s, self.f_min_mhz, self.compiled)
        self._busy_profile = np.empty((self.sub_steps, self.n_cores))
        if self.compiled is not None:
            # The whole-tick step's propagator, laid out for the compiled kernel.
            prop = self.thermal.propagator(self.tick_s)
            self._whole = (np.ascontiguousarray(prop.decay), np.ascontiguousarray(prop.modal_input.T),
                           np.ascontiguousarray(self.thermal.core_readout().T))
        self.admission = Admission(workload, self.requests, self.perf, self.scheduler, self.n_cores)
        self.progress = Progress(self.tick_s, self.admission.program, self.compiled)
        self.migration = MigrationCost(self.perf, self.levels, chip.migration.warmup_us)
        self.state = EngineState(self, seed)

    # ------------------------------------------------------------------ state

    @property
    def time_s(self) -> float:
        return self.state.tick_no * self.tick_s

    def idle_steady_state(self) -> tuple[np.ndarray, np.ndarray]:
        """Modal state and core temperatures of a chip idling for a long time.

        Runs start from here rather than from ambient: a server is on before the load
        comes, and the heat sink's time constant (~20 s) would otherwise dominate a run.
        """
        f_min = self.levels.freq_mhz[0]
        ambient = self.thermal.ambient_c
        constant = self.power.idle_tile_power_w(ambient) - self.power.leakage_w(ambient, f_min)
        steady = self.thermal.steady_state_with_leakage(
            np.full(self.n_cores, float(constant)),
            lambda t: self.power.leakage_w(t, f_min) * np.ones(self.n_cores))
        return self.thermal.to_modes(steady.temps_c), steady.temps_c[: self.n_cores].copy()

    def snapshot(self) -> EngineState:
        """A deep copy of the state (temperatures, threads, RNG, metrics)."""
        return copy.deepcopy(self.state)

    def restore_snapshot(self, snap: EngineState) -> None:
        """Return to ``snap``; the snapshot stays usable for further restores."""
        self.state = copy.deepcopy(snap)

    def metrics(self) -> RunMetrics:
        return self.state.metrics.result(in_flight=len(self.state.active))

    def busy_cores(self) -> np.ndarray:
        """Cores with a live thread assigned (the governor's notion of busy)."""
        return self.state.layout.busy.copy()

    def current_freq_mhz(self) -> np.ndarray:
        """The clock each core runs at now: governor under the cap, DTM below it."""
        st = self.state
        level = np.where(st.throttled | ~st.layout.busy, 0, st.cap_level)
        return self.levels.freq_mhz[level]

    def thread_counters(self) -> np.ndarray:
        """Cumulative counters of every live thread since it started (rows x COUNTER_NAMES).

        Instructions, LLC references and misses and stall-free cycles follow from the
        thread's position in its program (prefix sums of the CPI stack); cycles, run and
        wait time and switches are accumulated tick by tick.
        """
        return thread_counters(self.state)

    def take_counter_deltas(self) -> np.ndarray:
        """Counters since the previous call (or the thread's start), like perf deltas."""
        return take_counter_deltas(self.state)

    # ------------------------------------------------------------------ actuation

    def set_cap_khz(self, cpu: int, cap_khz: int) -> None:
        """Set a (table-exact, already clamped) cap; effective from the next tick."""
        st = self.state
        st.cap_khz[cpu] = cap_khz
        st.cap_level[cpu] = int(self.levels.levels_for_caps(cap_khz))
        st.clocks = None
        st.positions_changed()

    def set_affinity(self, row: int, cpus: np.ndarray) -> bool:
        """Set a thread's allowed cores (bool mask); moves it if its core left the set."""
        st = self.state
        st.threads.affinity[row] = cpus
        moved = self.scheduler.enforce_affinity(st.threads, np.array([row]), st.rng)
        st.balance_due = True  # a wider set may let the balancer spread it
        if moved:
            self.migration.charge(st, moved)
            self.admission.relayout(st)
        return bool(moved)

    def _rebalance(self) -> None:
        st = self.state
        st.balance_due = False
        moved = self.scheduler.rebalance(st.threads, st.rng)
        if moved:
            self.migration.charge(st, moved)
            self.admission.relayout(st)

    def _clocks(self, st: EngineState) -> Clocks:
        tab = self.power_table
        st.clocks = Clocks(self.levels, st.cap_level, st.layout, st.threads.core,
                           tab.dynamic_w_per_activity, tab.leakage_w_at_ref, self.perf.dram_latency_ns)
        return st.clocks

    # ------------------------------------------------------------------ time

    def advance(self, dt_s: float) -> None:
        """Move simulated time on by ``dt_s`` (whole ticks; a remainder carries over)."""
        if dt_s < 0:
            raise ValueError(f"dt_s must be >= 0, got {dt_s!r}")
        self.advance_to(self.state.target_s + dt_s)

    def advance_to(self, time_s: float) -> None:
        """Run ticks until simulated time reaches ``time_s`` (rounded down to a tick)."""
        st = self.state
        st.target_s = max(st.target_s, float(time_s))
        last = int(math.floor(st.target_s / self.tick_s + 1e-9))
        while self.state.tick_no < last:
            self._tick(last)

    def _tick(self, last_tick: int) -> None:
        st = self.state
        dt = self.tick_s
        t0 = st.tick_no * dt
        start = self.admission.admit(st, t0, dt)
        if st.balance_due:
            self._rebalance()
        tt = st.threads
        if not len(tt):
            self._idle(last_tick)
            return
        lay = st.layout
        ck = st.clocks or self._clocks(st)
        if (not self.reference and start is lay.zeros and not np.count_nonzero(tt.penalty_s)
                and steady_tick(self, st, ck)):
            st.tick_no += 1
            return

        f_start = ck.f_gov + st.throttled * ck.f_drop
        runnable = tt.seg != tt.step_end
        if start is lay.zeros:
            start = None  # everybody there from the tick's beginning
        else:
            runnable &= start <= 0.0
        divisor = (time_shares(tt.core, runnable, self.n_cores)[1].astype(float) if lay.shared
                   else lay.ones)

        # Look ahead at the last tick's DRAM latency; then this tick's latency.
        kern = self.compiled
        if kern is None:
            speed = LookAhead.speeds(st, divisor, f_start[tt.core], st.dram_ns)
            timing = LookAhead.timing(st, None, start, speed)
            busy_s, after_s, release = self.look.busy_s(st, start, timing.t_end)
            dominant = self.look.dominant_segments(st, timing, start, after_s)
            kernel, mpki, dram_kernel = self.cores.core_kernels(st, dominant, busy_s)
            utilisation = np.minimum(np.bincount(tt.core, busy_s / divisor, self.n_cores), dt) / dt
        else:
            (timing, busy_s, after_s, release, dominant, kernel, mpki, dram_kernel,
             utilisation) = self.look.plan(st, start, divisor, f_start[tt.core], st.dram_ns,
                                           self.n_cores)
        dram_ns = self.cores.dram_latency(dram_kernel, mpki, f_start)
        if dram_ns != st.dram_ns:
            timing.rescale_dram(dram_ns / st.dram_ns)
            st.dram_ns = dram_ns

        refine = self.sub_steps > 1 and st.dtm_active
        if not refine:
            # The whole tick at once; resolved finely only if a relay that matters flips.
            activity = self.cores.activity(kernel, mpki, dram_ns, f_start)
            power_w = self.power.tile_power_w(activity * utilisation, f_start, st.temps_c)
            refine, account = self.whole_tick(st, ck, power_w)
        if refine:
            st.substep_ticks += 1
            if kern is None:
                busy = busy_profile(start, timing.t_end, release, after_s, divisor, utilisation,
                                    tt.core, lay.onehot, self.substeps.edges, self.n_cores)
            else:
                busy = self._busy_profile
                if not kern.busy_profile(lay.zeros if start is None else start, start is not None,
                                         timing.t_end, release, after_s, divisor, utilisation,
                                         tt.core, self.substeps.edges, busy):
                    busy = utilisation
            dyn2 = self.cores.activity(kernel, mpki, dram_ns, ck.f2) * ck.dynamic2_w
            throttled, slowed, account = self.substeps.resolve(st, ck, dyn2, busy)
            f_eff = ck.f_gov + ck.f_drop * throttled
            if kern is None:
                clock = self.look.throttled_clock(st, slowed, ck.f_hi_ghz_thread, dominant, dram_ns)
                u = (divisor * S_PER_CYCLE_MHZ / clock if divisor is not lay.ones
                     else S_PER_CYCLE_MHZ / clock)
                timing = timing.with_base_speed(start, u)
            else:
                timing = self.look.throttled_timing(st, slowed, ck.f_hi_ghz_thread, dominant,
                                                    dram_ns, divisor, start, timing)
        else:
            f_eff = f_start

        completed = self.progress.run(st, start, divisor, f_eff, timing, t0)
        st.metrics.add_interval(dt, *account, f_eff, lay.busy_w)
        st.tick_no += 1
        if completed:
            self.admission.retire(st, completed)

    def whole_tick(self, st: EngineState, ck: Clocks, power_w: np.ndarray
                   ) -> tuple[bool, tuple[float, float, float, int] | None]:
        """One exact thermal step over the tick at ``power_w``: whether it needs DTM
        sub-steps (then nothing is committed), else the tick's energy, time above DTM,
        peak and throttle events, with temperatures and relays committed."""
        check = self.sub_steps > 1
        if self.compiled is None:
            modes, temps = self.thermal.step_modes(st.modes, power_w, self.tick_s)
            if check and self.dtm.would_change(st.throttled, st.temps_c, temps, ck.matters):
                return True, None
            return False, self.account_step(power_w, modes, temps)
        decay, modal_input_t, readout_t = self._whole
        n = len(power_w)
        modes, temps, new = np.empty_like(st.modes), np.empty(n), np.empty(n, dtype=bool)
        refine, energy_j, above_s, peak_c, events = self.compiled.whole_step(
            st.modes, power_w, decay, modal_input_t, readout_t, self.thermal.ambient_c,
            st.throttled, st.temps_c, ck.matters, self.dtm.threshold_c, self.dtm.release_c,
            check, self.tick_s, modes, temps, new, st.throttle_count)
        if refine:
            return True, None
        st.throttled = new
        st.modes, st.temps_c = modes, temps
        st.dtm_active = False
        return False, (energy_j, above_s, peak_c, events)

    def account_step(self, power_w: np.ndarray, modes: np.ndarray, temps: np.ndarray
                     ) -> tuple[float, float, float, int]:
        """Commit a whole-tick thermal step (no relay flipped where it mattered).

        Returns the tick's energy, time above DTM, peak and throttle events.
        """
        st = self.state
        dt = self.tick_s
        new = self.dtm.update(st.throttled, temps)
        rising = new & ~st.throttled
        events = int(np.count_nonzero(rising))
        if events:
            st.throttle_count += rising
        st.throttled = new
        st.modes, st.temps_c = modes, temps
        st.dtm_active = False
        peak_c = float(np.maximum.reduce(temps))
        return (float(np.add.reduce(power_w)) * dt, dt if peak_c >= self.dtm.threshold_c else 0.0,
                peak_c, events)

    def _idle(self, last_tick: int) -> None:
        """Step an idle chip, several ticks at once while nothing can arrive or matter."""
        st = self.state
        dt = self.tick_s
        k = 1
        if st.temps_c.max() < self.dtm.threshold_c:
            until = last_tick - st.tick_no
            if st.next_arrival < len(self.requests):
                arrival_tick = int(self.requests[st.next_arrival].arrival_s / dt)
                until = min(until, arrival_tick - st.tick_no)
            k = IDLE_JUMP_TICKS if until >= IDLE_JUMP_TICKS else 1
        power_w = self.power.idle_tile_power_w(st.temps_c)
        modes, temps = self.thermal.step_modes(st.modes, power_w, k * dt)
        st.throttled = self.dtm.update(st.throttled, temps)  # no effect on an idle core's clock
        st.dtm_active = False
        st.modes, st.temps_c = modes, temps
        peak = float(temps.max())
        st.metrics.add_interval(k * dt, float(power_w.sum()) * k * dt,
                                k * dt if peak >= self.dtm.threshold_c else 0.0, peak, 0,
                                np.full(self.n_cores, self.f_min_mhz), st.layout.busy, ticks=k)
        st.tick_no += k

    # ------------------------------------------------------------------ physics

    def _activity(self, kernel: np.ndarray, mpki: np.ndarray, dram_ns: float,
                  f_mhz: np.ndarray) -> np.ndarray:
        """Switching activity per core (the activity law of ``PerfModel.rates``)."""
        return self.cores.activity(kernel, mpki, dram_ns, f_mhz)
