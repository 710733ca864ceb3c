"""The simulation engine: chip state and how it advances in ticks.

A tick (``tick_s``, default 10 ms) holds each core's operating point constant (zero-order
hold on power; the thermal step under it is exact):

1. requests arriving before the tick ends are admitted and their threads placed; the
   scheduler rebalances when placement changed (``scheduler.py``);
2. each core's V/f level comes from its cap, the governor and its DTM state
   (``governor.py``);
3. a look-ahead through the tick at the last tick's DRAM latency says how long each
   core's threads will run (barrier sleeps included) and in which program segment each
   thread spends most of it; ``PerfModel.rates`` over those segments gives this tick's
   loaded DRAM latency; each core's power is the ``PowerModel`` tile power for that
   segment's kernel, weighted by the core's busy fraction, with leakage at the
   start-of-tick temperature; ``ThermalModel.step_modes`` gives the end temperatures;
4. if that step would flip the DTM relay of a core whose clock it changes, or change
   whether any core is at or above the threshold, the tick is re-run in DTM sub-steps
   (``dtm_resolution_s``, default 1 ms) with every relay live and each core's busy
   fraction resolved per sub-step; a thread's clock for the tick is then the steady
   clock that retires as many instructions as the throttled/free mix it got;
5. threads progress through their programs at the CPI-stack speed of their core (the
   formula of ``PerfModel.rates`` at the tick's DRAM latency), across segment
   boundaries and, through the per-step barrier, across steps; migrations cost the
   cache warm-up as lost time.

Progress is computed in closed form: a thread's time per instruction is
``(base_cpi / f + llc_ns * apki/1000/mlp + dram_ns * mpki/1000/mlp) * 1e-9`` times its
time-sharing divisor, so the time to reach any point of its program is a linear
combination of three prefix sums over the program's segments (``_Pool``), whatever the
mix of kernels in between. Work is never lost at segment or step boundaries. Threads
that finished their part of a step sleep (idle, not spinning) until the slowest thread
of their request finishes it. docs/simulator.md explains every choice.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from ailfmd.sim.chip import Chip
from ailfmd.sim.governor import Dtm, DtmStepper, VfLevels
from ailfmd.sim.kernels import STALL_ACTIVITY_FRACTION, Kernel
from ailfmd.sim.metrics import MetricsAccumulator, RunMetrics
from ailfmd.sim.perfmodel import PerfModel
from ailfmd.sim.power import PowerModel
from ailfmd.sim.scheduler import COUNTER, COUNTER_NAMES, Scheduler, ThreadTable, cfs_slice_s, time_shares
from ailfmd.sim.thermal import ThermalModel
from ailfmd.sim.workload import Request, Workload

DEFAULT_TICK_S = 0.01
DTM_RESOLUTION_S = 0.001
IDLE_JUMP_TICKS = 10  # an idle chip is stepped this many ticks at once (leakage refreshed)
DRAM_MEMO_SIZE = 256  # loaded-latency solutions remembered (least recently used dropped)
PID_BASE = 1000  # first simulated pid; pids and tids share one never-reused id space
SCHED_STREAM = 0x5C4ED  # keeps the scheduler's random stream apart from the arrivals'
_S_PER_NS = 1e-9
_S_PER_CYCLE_MHZ = 1e-6  # seconds per cycle at 1 MHz


# --------------------------------------------------------------------------- programs


@dataclass(frozen=True)
class _Program:
    """Per-segment constants of one request's per-thread program."""

    length: np.ndarray  # instructions per thread
    kernel: np.ndarray
    mpki: np.ndarray
    base_cpi: np.ndarray  # cycles per instruction without memory stalls
    llc_weight: np.ndarray  # apki/1000/mlp: exposed LLC ns per instruction per ns of latency
    dram_weight: np.ndarray  # mpki/1000/mlp: the same for the loaded DRAM latency
    refs: np.ndarray  # LLC references per instruction
    misses: np.ndarray  # DRAM (LLC) misses per instruction
    step_start: np.ndarray  # program-local first segment of each step, plus the total
    step_tokens: np.ndarray  # prompt tokens per prefill step, 1 per decode step
    prefill_steps: int

    @property
    def n_steps(self) -> int:
        return len(self.step_start) - 1


def _build_program(workload: Workload, request: Request, perf: PerfModel) -> _Program:
    prog = workload.program(request)
    kt = perf.kernels
    k = prog.kernel.astype(np.intp)
    mpki = prog.dram_mpki()
    apki = (kt.llc_apki - kt.dram_mpki)[k] + mpki  # as PerfModel.rates: extra misses add accesses
    inv_mlp = 1.0 / kt.mlp[k]
    chunk = workload.models[request.model].prefill_chunk_tokens
    first = np.arange(prog.prefill_steps) * chunk
    prefill_tokens = np.minimum(chunk, request.prompt_tokens - first)
    tokens = np.concatenate([prefill_tokens, np.ones(prog.output_tokens, dtype=np.int64)])
    return _Program(prog.instructions, k, mpki, kt.base_cpi[k], 1e-3 * apki * inv_mlp,
                    1e-3 * mpki * inv_mlp, 1e-3 * apki, 1e-3 * mpki,
                    np.asarray(prog.step_start, dtype=np.int64), tokens, prog.prefill_steps)


class _Pool:
    """The segments of every active request, concatenated, with prefix sums.

    ``X, B, A, M, R, Q`` are exclusive prefix sums (length n + 1) of instructions, base
    cycles, LLC weight, DRAM weight, LLC references and misses; per-segment arrays have a
    zero sentinel at index n so that a thread parked at the very end can be gathered.
    """

    def __init__(self, programs: list[_Program]) -> None:
        def cat(name: str, dtype: type = float) -> np.ndarray:
            return np.concatenate([*(getattr(p, name) for p in programs), np.zeros(1)]).astype(dtype)

        self.length = cat("length")
        self.kernel = cat("kernel", np.intp)
        self.mpki = cat("mpki")
        self.qb, self.qa, self.qm = cat("base_cpi"), cat("llc_weight"), cat("dram_weight")
        self.qr, self.qx = cat("refs"), cat("misses")

        def prefix(rate: np.ndarray | None) -> np.ndarray:
            per_seg = self.length[:-1] if rate is None else self.length[:-1] * rate[:-1]
            return np.concatenate([[0.0], np.cumsum(per_seg)])

        self.X = prefix(None)
        self.B, self.A, self.M = prefix(self.qb), prefix(self.qa), prefix(self.qm)
        self.R, self.Q = prefix(self.qr), prefix(self.qx)
        widest = max((int(np.diff(p.step_start).max(initial=0)) for p in programs), default=0)
        self.knots = np.arange(1, max(widest, 1) + 1)  # offsets to the rest of a step


class _PowerTable:
    """The PowerModel's coefficients per V/f level, read once through its public API,
    for the DTM sub-steps: tile power = constant + activity x dynamic(level) +
    leakage(level) x exp(beta (T - T_ref))."""

    def __init__(self, power: PowerModel, chip: Chip, freq_mhz: np.ndarray) -> None:
        ref_c = chip.power.leakage_ref_c
        self.dynamic_w_per_activity = power.dynamic_w(1.0, freq_mhz)
        self.leakage_w_at_ref = power.leakage_w(ref_c, freq_mhz)
        self.constant_w = float(power.idle_tile_power_w(ref_c, freq_mhz[0]) - self.leakage_w_at_ref[0])
        self._beta = chip.power.leakage_temp_coeff_per_c
        self._ref_c = ref_c

    def heat_factor(self, temps_c: np.ndarray) -> np.ndarray:
        return np.exp(self._beta * (temps_c - self._ref_c))


@dataclass
class _ActiveRequest:
    request: Request
    pid: int
    offset: int = 0  # first segment in the pool
    step: int = 0  # the step its threads are in


class _Layout:
    """Per-thread and per-core arrays that change only when threads arrive, leave or
    move, not every tick."""

    def __init__(self, st: "EngineState", llc_ns: np.ndarray, n_cores: int) -> None:
        tt = st.threads
        n = len(tt)
        req = tt.req
        self.starts = np.flatnonzero(np.concatenate(([True], req[1:] != req[:-1]))) if n else req
        self.counts = np.diff(np.append(self.starts, n))
        self.assigned = np.bincount(tt.core, minlength=n_cores)
        self.busy = self.assigned > 0
        self.shared = bool(n) and int(self.assigned.max()) > 1
        self.llc_s = _S_PER_NS * llc_ns[tt.core]  # seconds per unit of the LLC prefix sum
        self.first_seg = st.request_start[req]
        self.end_seg = st.request_end[req]
        self.onehot = np.zeros((n, n_cores))  # row -> its core, for sums per core
        self.onehot[np.arange(n), tt.core] = 1.0
        self.zeros = np.zeros(n)
        self.ones = np.ones(n)


class EngineState:
    """Everything that changes while the chip runs; a deep copy of it is a snapshot."""

    def __init__(self, engine: "Engine", seed: int) -> None:
        n = engine.n_cores
        self.tick_no = 0
        self.target_s = 0.0  # where advance() was asked to go (whole ticks are run)
        self.modes, self.temps_c = engine.idle_steady_state()
        self.throttled = np.zeros(n, dtype=bool)
        self.throttle_count = np.zeros(n, dtype=np.int64)
        self.cap_khz = np.full(n, engine.levels.max_khz, dtype=np.int64)
        self.cap_level = np.full(n, engine.levels.top_level, dtype=np.intp)
        self.next_arrival = 0
        self.active: list[_ActiveRequest] = []
        self.threads = ThreadTable(n)
        self.pool = _Pool([])
        self.request_start = np.zeros(0, dtype=np.int64)  # pool index of each request's first segment
        self.request_end = np.zeros(0, dtype=np.int64)  # pool index past each request's last segment
        self.dram_ns = engine.perf.dram_latency_ns  # the last tick's loaded DRAM latency
        self.next_id = PID_BASE
        self.rng = np.random.default_rng([seed, SCHED_STREAM])
        self.balance_due = False  # placement changed since the last balancing pass
        self.dtm_active = False  # the last tick flipped a relay that mattered: sub-step at once
        self.substep_ticks = 0  # ticks resolved in DTM sub-steps (a cost diagnostic)
        self.layout = _Layout(self, engine.perf.llc_latency_ns, n)
        self.metrics = MetricsAccumulator(n, engine.tick_s, float(self.temps_c.max()))


@dataclass
class _Timing:
    """Where some threads are in their programs and what reaching the barrier costs."""

    g: np.ndarray  # current segment (pool index)
    d: np.ndarray  # instructions done in it
    e: np.ndarray  # the step's end (the barrier)
    pen: np.ndarray  # migration warm-up still to pay (s)
    cb: np.ndarray  # prefix sums at the current position: base cycles, LLC, DRAM weights
    ca: np.ndarray
    cm: np.ndarray
    u: np.ndarray  # wall seconds per unit of each prefix sum (divisor included)
    v: np.ndarray
    w: np.ndarray
    t_end: np.ndarray  # when each reaches its barrier (tick time, penalty included)
    dram_t: np.ndarray  # the DRAM-latency part of the time to the barrier

    def rescale_dram(self, ratio: float) -> None:
        """The same timing at ``ratio`` times the DRAM latency."""
        self.t_end = self.t_end + self.dram_t * (ratio - 1.0)
        self.dram_t = self.dram_t * ratio
        self.w = self.w * ratio


# --------------------------------------------------------------------------- engine


class Engine:
    """The simulated chip running a workload; see the module docstring for a tick."""

    def __init__(self, chip: Chip, workload: Workload, seed: int, duration_s: float,
                 tick_s: float = DEFAULT_TICK_S, dtm_resolution_s: float = DTM_RESOLUTION_S) -> None:
        if not tick_s > 0 or not duration_s > 0 or not dtm_resolution_s > 0:
            raise ValueError("tick_s, duration_s and dtm_resolution_s must be > 0")
        self.chip, self.workload, self.seed = chip, workload, seed
        self.duration_s, self.tick_s = float(duration_s), float(tick_s)
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
        # DTM sub-steps per tick: the tick in pieces of about dtm_resolution_s.
        self.sub_steps = max(1, round(self.tick_s / dtm_resolution_s))
        self._sub_edges = np.linspace(0.0, self.tick_s, self.sub_steps + 1)
        self._power_table = _PowerTable(self.power, chip, self.levels.freq_mhz)
        self._stepper = DtmStepper(self.dtm, self.thermal, self.n_cores, self.tick_s / self.sub_steps)
        self._f_min = float(self.levels.freq_mhz[0])
        self._programs: dict[int, _Program] = {}  # a pure function of the request: shared
        self._warmup_lost_s: dict[tuple[int, int, int], float] = {}
        # The DRAM fixed point is a pure function of the DRAM-using cores' kernels, MPKI and
        # clocks; under DTM the chip cycles through a limited set of them.
        self._dram_memo: OrderedDict[bytes, float] = OrderedDict()
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
        st = self.state
        tt, P = st.threads, st.pool
        g, d = tt.seg, tt.done
        first = st.layout.first_seg
        out = np.empty((len(tt), len(COUNTER_NAMES)))
        out[:, COUNTER["instructions"]] = P.X[g] + d - P.X[first]
        out[:, COUNTER["llc_references"]] = P.R[g] + d * P.qr[g] - P.R[first]
        out[:, COUNTER["llc_misses"]] = P.Q[g] + d * P.qx[g] - P.Q[first]
        base_cycles = P.B[g] + d * P.qb[g] - P.B[first]
        out[:, COUNTER["cycles"]] = tt.cycles
        out[:, COUNTER["stalled_cycles_backend"]] = np.maximum(tt.cycles - base_cycles, 0.0)
        run_ns = tt.run_s * 1e9
        out[:, COUNTER["task_clock_ns"]] = run_ns
        out[:, COUNTER["run_ns"]] = run_ns
        out[:, COUNTER["wait_ns"]] = (tt.active_s - tt.run_s) * 1e9
        out[:, COUNTER["context_switches"]] = tt.switches
        out[:, COUNTER["timeslices"]] = tt.switches
        out[:, COUNTER["cpu_migrations"]] = tt.migrations
        return out

    def take_counter_deltas(self) -> np.ndarray:
        """Counters since the previous call (or the thread's start), like perf deltas."""
        tt = self.state.threads
        now = self.thread_counters()
        delta = np.maximum(now - tt.seen, 0.0)
        tt.seen = now
        return delta

    # ------------------------------------------------------------------ actuation

    def set_cap_khz(self, cpu: int, cap_khz: int) -> None:
        """Set a (table-exact, already clamped) cap; effective from the next tick."""
        st = self.state
        st.cap_khz[cpu] = cap_khz
        st.cap_level[cpu] = int(self.levels.levels_for_caps(cap_khz))

    def set_affinity(self, row: int, cpus: np.ndarray) -> bool:
        """Set a thread's allowed cores (bool mask); moves it if its core left the set."""
        st = self.state
        st.threads.affinity[row] = cpus
        moved = self.scheduler.enforce_affinity(st.threads, np.array([row]), st.rng)
        st.balance_due = True  # a wider set may let the balancer spread it
        if moved:
            self._charge_migrations(moved)
            self._relayout()
        return bool(moved)

    def _charge_migrations(self, rows: list[int]) -> None:
        """Count the moves and charge each thread its cache warm-up as lost time."""
        st = self.state
        tt = st.threads
        for row in rows:
            tt.migrations[row] += 1
            st.metrics.migrations += 1
            kernel = int(st.pool.kernel[tt.seg[row]])
            core = int(tt.core[row])
            key = (kernel, core, int(st.cap_level[core]))
            lost = self._warmup_lost_s.get(key)
            if lost is None:
                lost = self._warmup_lost(*key)
                self._warmup_lost_s[key] = lost
            tt.penalty_s[row] += lost

    def _warmup_lost(self, kernel: int, core: int, level: int) -> float:
        """Time lost to a cold private cache after a move, in seconds.

        The warm fraction ramps linearly over the warm-up, so CPI falls linearly from
        ``s0 * CPI_warm`` to ``CPI_warm`` (``s0 = migration_slowdown`` right after the move)
        and the time lost against a warm thread is ``W * (1 - ln(s0) / (s0 - 1))``.
        """
        if kernel == Kernel.IDLE:
            return 0.0
        warmup_us = self.chip.migration.warmup_us
        freq_ghz = self.levels.freq_mhz[level] * 1e-3
        s0 = self.perf.migration_slowdown(Kernel(kernel), core, freq_ghz, 0.0, warmup_us)
        if s0 <= 1.0 + 1e-12:
            return 0.0
        return warmup_us * 1e-6 * (1.0 - math.log(s0) / (s0 - 1.0))

    def _relayout(self) -> None:
        self.state.layout = _Layout(self.state, self.perf.llc_latency_ns, self.n_cores)

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
        start = self._admit(t0, dt)
        if st.balance_due:
            self._rebalance()
        if not len(st.threads):
            self._idle(last_tick)
            return
        lay, tt = st.layout, st.threads
        gov_level = np.where(lay.busy, st.cap_level, 0)
        f_gov = self.levels.freq_mhz[gov_level]
        f_start = np.where(st.throttled, self._f_min, f_gov)
        runnable = tt.seg != tt.step_end
        if start is not lay.zeros:
            runnable &= start <= 0.0
        divisor = time_shares(tt.core, runnable, self.n_cores)[1].astype(float) if lay.shared else lay.ones

        # Look ahead at the last tick's DRAM latency; then this tick's latency.
        speeds = self._speeds(divisor, f_start[tt.core], st.dram_ns)
        timing = self._timing(None, start, speeds)
        busy_s, after_s, release = self._busy_s(start, timing.t_end, dt)
        dominant = self._dominant_segments(timing, start, after_s, dt)
        kernel, mpki, dram_kernel = self._core_kernels(dominant, busy_s, dt)
        dram_ns = self._dram_latency(dram_kernel, mpki, f_start)
        if dram_ns != st.dram_ns:
            ratio = dram_ns / st.dram_ns
            timing.rescale_dram(ratio)
            speeds = (speeds[0], speeds[1], speeds[2] * ratio)
            st.dram_ns = dram_ns

        utilisation = np.minimum(np.bincount(tt.core, busy_s / divisor, self.n_cores), dt) / dt
        matters = lay.busy & (f_gov > self._f_min)  # cores whose clock DTM would change
        refine = self.sub_steps > 1 and st.dtm_active
        if not refine:
            # The whole tick at once; resolved finely only if a relay that matters flips.
            activity = self._activity(kernel, mpki, dram_ns, f_start)
            power_w = self.power.tile_power_w(activity * utilisation, f_start, st.temps_c)
            modes, temps = self.thermal.step_modes(st.modes, power_w, dt)
            refine = self.sub_steps > 1 and self.dtm.would_change(st.throttled, st.temps_c, temps,
                                                                  matters)
        if refine:
            st.substep_ticks += 1
            busy = self._busy_profile(start, timing.t_end, release, after_s, divisor, utilisation)
            throttled, slowed, account = self._resolve_dtm(kernel, mpki, dram_ns, gov_level, busy, matters)
            f_eff = f_gov + (self._f_min - f_gov) * throttled
            clock = self._throttled_clock(slowed, f_gov, dominant, dram_ns)
            speeds = self._speeds(divisor, clock, dram_ns)
            timing = self._timing(None, start, speeds)
        else:
            f_eff = f_start
            account = self._account_step(power_w, modes, temps)

        completed = self._progress(start, dt, divisor, f_eff, speeds, timing, t0)
        st.metrics.add_interval(dt, *account, f_eff, lay.busy)
        st.tick_no += 1
        if completed:
            self._retire(completed)

    def _account_step(self, power_w: np.ndarray, modes: np.ndarray, temps: np.ndarray
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
        peak_c = float(temps.max())
        return (float(power_w.sum()) * dt, dt if peak_c >= self.dtm.threshold_c else 0.0,
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
                                np.full(self.n_cores, self._f_min), st.layout.busy, ticks=k)
        st.tick_no += k

    # ------------------------------------------------------------------ power and DTM

    def _core_kernels(self, dominant: np.ndarray, busy_s: np.ndarray, dt: float
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each core's kernel and MPKI (from its thread's dominant segment) and the
        kernels the DRAM queue sees (cores whose threads run for most of the tick)."""
        st = self.state
        tt, P = st.threads, st.pool
        n = self.n_cores
        rows = np.flatnonzero(dominant >= 0)
        if st.layout.shared and st.tick_no & 1:
            rows = rows[::-1]  # a time-shared core shows its threads in turn
        seg = dominant[rows]
        kernel = np.zeros(n, dtype=np.intp)
        mpki = np.zeros(n)
        cores = tt.core[rows]
        kernel[cores] = P.kernel[seg]
        mpki[cores] = P.mpki[seg]
        running = np.zeros(n, dtype=bool)
        running[cores[busy_s[rows] >= 0.5 * dt]] = True
        return kernel, mpki, np.where(running, kernel, Kernel.IDLE)

    def _dram_latency(self, kernel: np.ndarray, mpki: np.ndarray, f_mhz: np.ndarray) -> float:
        """Loaded DRAM latency (PerfModel's queue fixed point), memoised on its inputs."""
        active = kernel != Kernel.IDLE
        if not active.any():
            return self.perf.dram_latency_ns
        mpki = np.where(active, mpki, 0.0)
        f = np.where(active, f_mhz, 0.0)
        key = kernel.tobytes() + mpki.tobytes() + f.tobytes()
        latency = self._dram_memo.get(key)
        if latency is not None:
            self._dram_memo.move_to_end(key)
            return latency
        f_ghz = np.where(active, f_mhz, self._f_min) * 1e-3
        latency = float(self.perf.rates(kernel, f_ghz, None, mpki).dram_latency_ns)
        self._dram_memo[key] = latency
        if len(self._dram_memo) > DRAM_MEMO_SIZE:
            self._dram_memo.popitem(last=False)
        return latency

    def _activity(self, kernel: np.ndarray, mpki: np.ndarray, dram_ns: float,
                  f_mhz: np.ndarray) -> np.ndarray:
        """Switching activity per core at clock ``f_mhz`` and a given loaded DRAM latency.

        The activity law of ``PerfModel.rates`` (stalled cycles keep a fraction of the
        clock tree toggling), for any clock: a memory-bound kernel stalls more, so
        switches less, at a higher clock.
        """
        kt = self.perf.kernels
        apki = (kt.llc_apki - kt.dram_mpki)[kernel] + mpki
        base = kt.base_cpi[kernel]
        cpi = base + f_mhz * 1e-6 / kt.mlp[kernel] * (apki * self.perf.llc_latency_ns + mpki * dram_ns)
        return kt.activity[kernel] * (STALL_ACTIVITY_FRACTION
                                      + (1.0 - STALL_ACTIVITY_FRACTION) * base / cpi)

    def _resolve_dtm(self, kernel: np.ndarray, mpki: np.ndarray, dram_ns: float,
                     gov_level: np.ndarray, busy: np.ndarray, matters: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float, int]]:
        """Re-run the tick in DTM sub-steps, each core's power following its relay.

        ``busy`` is each core's busy fraction per sub-step (sub-steps x cores), or per
        tick (cores) when every core is busy alike throughout. Power = idle part (leakage
        at the start-of-tick temperature) + busy fraction x dynamic power. Returns per core
        the fraction of the tick spent throttled and the fraction of its busy time spent
        throttled (what slows its threads), and the tick's energy, time above DTM, peak
        and throttle events. Remembers whether any relay that matters flipped, in which
        case the next tick goes straight to sub-steps (DTM keeps oscillating).
        """
        st = self.state
        n_sub = self.sub_steps
        h = self.tick_s / n_sub
        # Both clocks at once: row 0 free (governor level), row 1 throttled (lowest level).
        level = np.zeros((2, self.n_cores), dtype=np.intp)
        level[0] = gov_level
        f2 = self.levels.freq_mhz[level]
        tab = self._power_table
        dyn = self._activity(kernel, mpki, dram_ns, f2) * tab.dynamic_w_per_activity[level]
        idle = tab.constant_w + tab.leakage_w_at_ref[level] * tab.heat_factor(st.temps_c)
        p_free, p_slow = idle[0] + busy * dyn[0], idle[1] + busy * dyn[1]
        shape = (n_sub, self.n_cores)
        modes, temps, states = self._stepper.run(st.modes, st.throttled, np.broadcast_to(p_free, shape),
                                                 np.broadcast_to(p_slow, shape))
        during = states[:-1]
        rising = (states[1:] & ~during).sum(axis=0)
        st.throttle_count += rising
        st.dtm_active = bool(((during != states[1:]) & matters).any())
        st.throttled = states[-1]
        st.modes, st.temps_c = modes, temps[-1]
        hottest = temps.max(axis=1)
        on = during.sum(axis=0)
        time_frac = on / n_sub
        if busy.ndim == 1:
            energy_j = (float(p_free.sum()) * n_sub + float(on @ (p_slow - p_free))) * h
            busy_frac = time_frac
        else:
            energy_j = float(np.where(during, p_slow, p_free).sum()) * h
            busy_total = busy.sum(axis=0)
            busy_frac = np.divide((during * busy).sum(axis=0), busy_total, out=time_frac.copy(),
                                  where=busy_total > 0)
        account = (energy_j, float(np.count_nonzero(hottest >= self.dtm.threshold_c)) * h,
                   float(hottest.max()), int(rising.sum()))
        return time_frac, busy_frac, account

    def _busy_profile(self, start: np.ndarray, t_end: np.ndarray, release: np.ndarray,
                      after_s: np.ndarray, divisor: np.ndarray, utilisation: np.ndarray
                      ) -> np.ndarray:
        """Each core's busy fraction per DTM sub-step (sub-steps x cores), so that heat is
        made while threads run; just ``utilisation`` if every thread runs all tick.

        A thread runs over ``[start, t_end]`` and, if its barrier releases inside the tick,
        over ``[release, tick end]``; a time-shared thread uses 1/divisor of it.
        """
        dt = self.tick_s
        whole = (start <= 0.0) & (t_end >= dt)
        if whole.all():
            return utilisation
        lay = self.state.layout
        n_sub = self.sub_steps
        edges = self._sub_edges
        part = np.flatnonzero(~whole)
        # Busy time of each thread from the tick start up to each sub-step edge.
        upto = (np.minimum(edges, np.minimum(t_end[part], dt)[:, None])
                - np.minimum(edges, start[part, None]))
        later = after_s[part] > 0
        if later.any():
            upto[later] += np.maximum(edges - release[part[later], None], 0.0)
        per_step = np.diff(upto, axis=1) / ((dt / n_sub) * divisor[part, None])
        core = self.state.threads.core
        full = np.bincount(core[whole], 1.0 / divisor[whole], self.n_cores)
        return np.minimum(full + per_step.T @ lay.onehot[part], 1.0)

    def _throttled_clock(self, frac: np.ndarray, f_gov: np.ndarray, dominant: np.ndarray,
                         dram_ns: float) -> np.ndarray:
        """Per thread, the steady clock that retires as many instructions as running a
        fraction ``frac`` of its busy time at the lowest level and the rest at ``f_gov``.

        Instruction rates, not clocks, average over time. A memory-bound kernel's rate is
        concave in the clock, so the plain time-averaged clock would overstate its
        progress under DTM. The match is exact for the thread's dominant segment.
        """
        st = self.state
        tt, P = st.threads, st.pool
        core = tt.core
        theta = frac[core]
        f_hi = f_gov[core] * 1e-3
        f_lo = self._f_min * 1e-3
        seg = np.where(dominant >= 0, dominant, tt.seg)
        base = P.qb[seg]
        stall_ns = self.perf.llc_latency_ns[core] * P.qa[seg] + dram_ns * P.qm[seg]
        linear = f_hi + (f_lo - f_hi) * theta
        with np.errstate(divide="ignore", invalid="ignore"):  # base == 0: the pool sentinel
            ips = (1.0 - theta) / (base / f_hi + stall_ns) + theta / (base / f_lo + stall_ns)
            matched = base / (1.0 / ips - stall_ns)
        return np.where((base > 0) & (theta > 0), matched, linear) * 1e3

    # ------------------------------------------------------------------ requests

    def _program(self, request: Request) -> _Program:
        prog = self._programs.get(request.request_id)
        if prog is None:
            prog = _build_program(self.workload, request, self.perf)
            self._programs[request.request_id] = prog
        return prog

    def _admit(self, t0: float, dt: float) -> np.ndarray:
        """Admit the requests arriving before the tick ends; per-row start offsets (s).

        Returns ``layout.zeros`` itself when nobody arrives (the common case).
        """
        st = self.state
        i, horizon = st.next_arrival, t0 + dt
        if i >= len(self.requests) or self.requests[i].arrival_s >= horizon:
            return st.layout.zeros
        tt = st.threads
        new: list[tuple[np.ndarray, float]] = []
        while i < len(self.requests) and self.requests[i].arrival_s < horizon:
            req = self.requests[i]
            prog = self._program(req)
            pid = st.next_id
            st.next_id += req.threads
            st.active.append(_ActiveRequest(req, pid))
            # Program-local positions; _rebuild_pool shifts them to the pool offset.
            rows = tt.append(np.arange(pid, pid + req.threads), pid, st.tick_no,
                             len(st.active) - 1, 0, int(prog.step_start[1]))
            new.append((rows, max(0.0, req.arrival_s - t0)))
            st.metrics.arrived += 1
            i += 1
        st.next_arrival = i
        self._rebuild_pool()
        start = np.zeros(len(tt))
        for rows, offset_s in new:
            self.scheduler.place(tt, rows, st.rng)
            start[rows] = offset_s
        st.balance_due = True
        self._relayout()
        return start

    def _rebalance(self) -> None:
        st = self.state
        st.balance_due = False
        moved = self.scheduler.rebalance(st.threads, st.rng)
        if moved:
            self._charge_migrations(moved)
            self._relayout()

    def _rebuild_pool(self) -> None:
        st = self.state
        programs = [self._program(a.request) for a in st.active]
        offsets = np.concatenate([[0], np.cumsum([len(p.length) for p in programs])])[:-1]
        shift = np.array([int(o) - a.offset for o, a in zip(offsets, st.active)], dtype=np.int64)
        tt = st.threads
        if len(tt):
            tt.seg += shift[tt.req]
            tt.step_end += shift[tt.req]
        for o, a in zip(offsets, st.active):
            a.offset = int(o)
        st.pool = _Pool(programs)
        st.request_start = np.asarray(offsets, dtype=np.int64)
        st.request_end = np.array([int(o) + len(p.length) for o, p in zip(offsets, programs)],
                                  dtype=np.int64)

    def _retire(self, completed: list[int]) -> None:
        """Remove finished requests and their threads (they exit)."""
        st = self.state
        done = np.zeros(len(st.active), dtype=bool)
        done[completed] = True
        for i in completed:
            self._programs.pop(st.active[i].request.request_id, None)
        new_index = np.cumsum(~done) - 1
        tt = st.threads
        tt.keep(~done[tt.req])
        tt.req = new_index[tt.req]
        st.active = [a for a, d in zip(st.active, done) if not d]
        self._rebuild_pool()
        st.balance_due = True
        self._relayout()

    # ------------------------------------------------------------------ progress

    def _speeds(self, divisor: np.ndarray, clock_mhz: np.ndarray, dram_ns: float
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Wall seconds per unit of the base-cycle, LLC and DRAM prefix sums, per thread.

        Time per instruction is ``base_cpi / f + llc_ns * apki/1000/mlp + dram_ns *
        mpki/1000/mlp`` ns (the CPI stack of ``PerfModel.rates`` divided by the clock),
        stretched by the thread's time-sharing divisor.
        """
        return (divisor * _S_PER_CYCLE_MHZ / clock_mhz, divisor * self.state.layout.llc_s,
                divisor * (_S_PER_NS * dram_ns))

    def _timing(self, rows: np.ndarray | None, start: np.ndarray,
                speeds: tuple[np.ndarray, np.ndarray, np.ndarray]) -> _Timing:
        """Positions of ``rows`` (None: all) and when each reaches its step barrier."""
        st = self.state
        tt, P = st.threads, st.pool
        u, v, w = speeds
        if rows is None:
            g, d, e, pen = tt.seg, tt.done, tt.step_end, tt.penalty_s
        else:
            g, d, e, pen = tt.seg[rows], tt.done[rows], tt.step_end[rows], tt.penalty_s[rows]
            u, v, w = u[rows], v[rows], w[rows]
        cb = P.B[g] + d * P.qb[g]
        ca = P.A[g] + d * P.qa[g]
        cm = P.M[g] + d * P.qm[g]
        dram_t = w * (P.M[e] - cm)
        t_end = start + pen + u * (P.B[e] - cb) + v * (P.A[e] - ca) + dram_t
        return _Timing(g, d, e, pen, cb, ca, cm, u, v, w, t_end, dram_t)

    def _busy_s(self, start: np.ndarray, t_end: np.ndarray, dt: float
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Expected time each thread runs in the tick, the part after its barrier, and
        when that barrier releases.

        A thread runs from its start until its step barrier (``t_end``), sleeps until the
        slowest thread of its request gets there, then runs to the end of the tick (unless
        that was the request's last step); a later barrier inside the same tick is ignored.
        """
        st = self.state
        lay = st.layout
        release = np.repeat(np.maximum.reduceat(t_end, lay.starts), lay.counts)
        final = st.threads.step_end == lay.end_seg
        after = np.where((release < dt) & ~final, dt - release, 0.0)
        return np.minimum(t_end, dt) - start + after, after, release

    def _dominant_segments(self, timing: _Timing, start: np.ndarray, after_s: np.ndarray,
                           dt: float) -> np.ndarray:
        """The pool segment each thread spends most of the tick in (-1: none).

        Candidates are the segments up to its barrier and, for ``after_s`` once the barrier
        releases, the first segment of its next step (-1 if its request then completes).
        """
        st = self.state
        P = st.pool
        g, e = timing.g, timing.e
        avail = np.maximum(dt - start - st.threads.penalty_s, 0.0)
        tpi = timing.u * P.qb[g] + timing.v * P.qa[g] + timing.w * P.qm[g]
        in_current = np.minimum((P.length[g] - timing.d) * tpi, avail)
        out = np.where(after_s > in_current, e, g)
        # Threads that leave their segment during the tick: look at the rest of the step.
        crossing = np.flatnonzero((in_current < avail) & (g < e))
        if crossing.size:
            gc, ec = g[crossing], e[crossing]
            knots = np.minimum(gc[:, None] + P.knots[None, :], ec[:, None])
            tau = self._knot_times(timing, crossing, knots)
            reached = np.minimum(tau, avail[crossing, None])
            spent = reached.copy()
            spent[:, 1:] -= reached[:, :-1]
            best = np.argmax(spent, axis=1)
            longest = spent[np.arange(crossing.size), best]
            out[crossing] = np.where(after_s[crossing] > longest, ec, np.minimum(gc + best, ec))
        return np.where((out == e) & (e == st.layout.end_seg), -1, out)

    def _knot_times(self, timing: _Timing, idx: np.ndarray, knots: np.ndarray) -> np.ndarray:
        """Time for threads ``idx`` (of ``timing``) to reach each pool index in ``knots``."""
        P = self.state.pool
        return (timing.u[idx, None] * (P.B[knots] - timing.cb[idx, None])
                + timing.v[idx, None] * (P.A[knots] - timing.ca[idx, None])
                + timing.w[idx, None] * (P.M[knots] - timing.cm[idx, None]))

    def _progress(self, start: np.ndarray, dt: float, divisor: np.ndarray, f_eff_mhz: np.ndarray,
                  speeds: tuple[np.ndarray, np.ndarray, np.ndarray], timing: _Timing,
                  t0: float) -> list[int]:
        """Advance every thread through the tick; returns the requests that completed.

        ``timing`` is the first pass's (all threads, from ``start``); requests whose
        barrier releases inside the tick go on in further passes at the same speeds.
        """
        tt = self.state.threads
        active_s = np.zeros(len(tt))
        sleeps = np.zeros(len(tt))
        completed: list[int] = []
        rows = np.arange(len(tt))
        while True:
            rows, s = self._pass(rows, start, dt, timing, active_s, sleeps, t0, completed)
            if not rows.size:
                break
            start = s
            timing = self._timing(rows, s, speeds)
        run_s = active_s / divisor
        tt.active_s += active_s
        tt.run_s += run_s
        tt.cycles += f_eff_mhz[tt.core] * 1e6 * run_s
        tt.switches += sleeps
        if self.state.layout.shared:
            tt.switches += np.where(divisor > 1, active_s / cfs_slice_s(divisor), 0.0)
        return completed

    def _advance_within_step(self, rows: np.ndarray, part: np.ndarray, s: np.ndarray, dt: float,
                             timing: _Timing) -> None:
        """Move threads ``rows[part]`` (which stay short of their barrier) to where they
        are at the end of the tick."""
        tt, P = self.state.threads, self.state.pool
        budget = dt - s[part] - timing.pen[part]
        if timing.pen[part].any():
            stalled = budget <= 0.0  # still paying its migration warm-up
            tt.penalty_s[rows[part]] = np.where(stalled, timing.pen[part] - (dt - s[part]), 0.0)
            part, budget = part[~stalled], budget[~stalled]
            if not part.size:
                return
        g, d = timing.g[part], timing.d[part]
        u, v, w = timing.u[part], timing.v[part], timing.w[part]
        tpi = u * P.qb[g] + v * P.qa[g] + w * P.qm[g]
        done = d + budget / tpi
        cross = np.flatnonzero(done > P.length[g])  # they leave their segment
        at = rows[part]
        if cross.size:
            gc, bc = g[cross], budget[cross]
            knots = np.minimum(gc[:, None] + P.knots[None, :], timing.e[part[cross], None])
            tau = self._knot_times(timing, part[cross], knots)
            crossed = (tau <= bc[:, None]).sum(axis=1)
            gn = gc + crossed
            t_knot = tau[np.arange(cross.size), crossed - 1]
            tpi_n = u[cross] * P.qb[gn] + v[cross] * P.qa[gn] + w[cross] * P.qm[gn]
            done[cross] = np.minimum((bc - t_knot) / tpi_n, P.length[gn])
            tt.seg[at[cross]] = gn
        tt.done[at] = done

    def _pass(self, rows: np.ndarray, s: np.ndarray, dt: float, timing: _Timing,
              active_s: np.ndarray, sleeps: np.ndarray, t0: float,
              completed: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Run ``rows`` from their start times ``s`` to the tick end or their step barrier.

        Returns the rows of requests whose barrier released inside the tick (they go on
        with the next step) and the release times.
        """
        st = self.state
        tt, P = st.threads, st.pool
        g, d, e, t_end = timing.g, timing.d, timing.e, timing.t_end
        if rows.size == len(tt):
            starts, counts = st.layout.starts, st.layout.counts
            active_s += np.minimum(t_end, dt) - s
        else:
            req = tt.req[rows]
            starts = np.flatnonzero(np.concatenate(([True], req[1:] != req[:-1])))
            counts = np.diff(np.append(starts, rows.size))
            active_s[rows] += np.minimum(t_end, dt) - s
        release = np.maximum.reduceat(t_end, starts)
        released = release <= dt
        if released.any():
            rel_row = np.repeat(released, counts)
            reach = rel_row | (t_end <= dt)
            # The last thread of a released request does not sleep; the others did.
            asleep = reach & ~(rel_row & (t_end >= np.repeat(release, counts)))
        else:
            reach = asleep = t_end <= dt
        hit = np.flatnonzero(reach)
        if hit.size:
            sleeps[rows[hit[(g[hit] != e[hit]) & asleep[hit]]]] += 1
            at = rows[hit]
            tt.seg[at] = e[hit]
            tt.done[at] = 0.0
            tt.penalty_s[at] = 0.0
        part = np.flatnonzero(~reach) if hit.size else np.arange(rows.size)
        if part.size:
            self._advance_within_step(rows, part, s, dt, timing)

        if not released.any():
            return rows[:0], s[:0]
        next_rows, next_s = [], []
        for blk in np.flatnonzero(released):
            block = rows[starts[blk]: starts[blk] + counts[blk]]
            ri = int(tt.req[block[0]])
            areq = st.active[ri]
            prog = self._program(areq.request)
            if areq.step < prog.prefill_steps:
                st.metrics.prefill_tokens += int(prog.step_tokens[areq.step])
            else:
                st.metrics.output_tokens += 1
            areq.step += 1
            if areq.step >= prog.n_steps:
                completed.append(ri)
                st.metrics.add_completion(areq.request.arrival_s, t0 + float(release[blk]))
                continue
            tt.step_end[block] = areq.offset + prog.step_start[areq.step + 1]
            next_rows.append(block)
            next_s.append(np.full(block.size, release[blk]))
        if not next_rows:
            return rows[:0], s[:0]
        return np.concatenate(next_rows), np.concatenate(next_s)
