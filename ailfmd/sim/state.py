"""The engine's mutable state, and what is derived from it until placement or caps change.

``EngineState`` is everything that changes while the chip runs; a deep copy of it is a
snapshot. ``Layout`` (per-thread and per-core arrays that change only when threads arrive,
leave or move) and ``Clocks`` (each core's governor clock under its cap) are derived from
it and rebuilt when what they depend on changes, not every tick.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ailfmd.sim.governor import VfLevels, governor_levels
from ailfmd.sim.metrics import MetricsAccumulator
from ailfmd.sim.program import Pool
from ailfmd.sim.scheduler import ThreadTable
from ailfmd.sim.workload import Request

if TYPE_CHECKING:
    from ailfmd.sim.engine import Engine

PID_BASE = 1000  # first simulated pid; pids and tids share one never-reused id space
SCHED_STREAM = 0x5C4ED  # keeps the scheduler's random stream apart from the arrivals'
S_PER_NS = 1e-9


@dataclass
class ActiveRequest:
    request: Request
    pid: int
    offset: int = 0  # first segment in the pool
    step: int = 0  # the step its threads are in


class Layout:
    """Per-thread and per-core arrays that change only when threads arrive, leave or
    move, not every tick."""

    def __init__(self, st: "EngineState", llc_ns: np.ndarray, n_cores: int) -> None:
        tt = st.threads
        n = len(tt)
        req = tt.req
        self.starts = np.flatnonzero(np.concatenate(([True], req[1:] != req[:-1]))) if n else req
        self.counts = np.diff(np.append(self.starts, n))
        self.block = np.repeat(np.arange(len(self.starts)), self.counts)  # row -> its request block
        self.assigned = np.bincount(tt.core, minlength=n_cores)
        self.busy = self.assigned > 0
        self.busy_w = self.busy.astype(float)  # the same as 0/1 (cheaper in products)
        self.n_busy = int(np.count_nonzero(self.busy))
        self.shared = bool(n) and int(self.assigned.max()) > 1
        self.llc_ns = llc_ns[tt.core]
        self.llc_s = S_PER_NS * self.llc_ns  # seconds per unit of the LLC prefix sum
        self.first_seg = st.request_start[req]
        self.end_seg = st.request_end[req]
        self.onehot = np.zeros((n, n_cores))  # row -> its core, for sums per core
        self.onehot[np.arange(n), tt.core] = 1.0
        self.zeros = np.zeros(n)
        self.ones = np.ones(n)
        self.whole_tick_s = np.full(n, st.tick_s)  # per thread: time available in a full tick


class Clocks:
    """Each core's clock under the governor and its cap (DTM aside); depends only on the
    caps and on which cores have threads."""

    def __init__(self, levels: VfLevels, cap_level: np.ndarray, layout: Layout,
                 core: np.ndarray, dynamic_w_per_activity: np.ndarray,
                 leakage_w_at_ref: np.ndarray, dram_idle_ns: float) -> None:
        self.gov_level = governor_levels(layout.busy, cap_level)
        self.f_gov = levels.freq_mhz[self.gov_level]
        f_min = float(levels.freq_mhz[0])
        self.f_drop = f_min - self.f_gov  # clock = f_gov + throttled * f_drop
        self.matters = layout.busy & (self.f_gov > f_min)  # cores whose clock DTM changes
        # Both operating points of every core: row 0 free (governor), row 1 throttled.
        self.level2 = np.stack([self.gov_level, np.zeros_like(self.gov_level)])
        self.f2 = levels.freq_mhz[self.level2]
        self.f_gov_thread = self.f_gov[core]
        self.f_hi_ghz_thread = self.f_gov_thread * 1e-3
        # Seconds per unit of base cycles, LLC and DRAM weight at the fastest a thread can
        # run (governor clock, unloaded DRAM): bounds how far it can get in a tick.
        self.fastest_s = np.stack([S_PER_NS / self.f_hi_ghz_thread, S_PER_NS * layout.llc_ns,
                                   np.full(len(core), S_PER_NS * dram_idle_ns)])
        # Power-model coefficients of both operating points (see substeps.PowerTable).
        self.dynamic2_w = dynamic_w_per_activity[self.level2]
        self.leakage2_w = leakage_w_at_ref[self.level2]


class EngineState:
    """Everything that changes while the chip runs; a deep copy of it is a snapshot."""

    def __init__(self, engine: "Engine", seed: int) -> None:
        n = engine.n_cores
        self.tick_s = engine.tick_s
        self.tick_no = 0
        self.target_s = 0.0  # where advance() was asked to go (whole ticks are run)
        self.modes, self.temps_c = engine.idle_steady_state()
        self.throttled = np.zeros(n, dtype=bool)
        self.throttle_count = np.zeros(n, dtype=np.int64)
        self.cap_khz = np.full(n, engine.levels.max_khz, dtype=np.int64)
        self.cap_level = np.full(n, engine.levels.top_level, dtype=np.intp)
        self.next_arrival = 0
        self.active: list[ActiveRequest] = []
        self.threads = ThreadTable(n)
        self.pool = Pool([])
        self.request_start = np.zeros(0, dtype=np.int64)  # pool index of each request's first segment
        self.request_end = np.zeros(0, dtype=np.int64)  # pool index past each request's last segment
        self.dram_ns = engine.perf.dram_latency_ns  # the last tick's loaded DRAM latency
        self.next_id = PID_BASE
        self.rng = np.random.default_rng([seed, SCHED_STREAM])
        self.balance_due = False  # placement changed since the last balancing pass
        self.dtm_active = False  # the last tick flipped a relay that mattered: sub-step at once
        self.substep_ticks = 0  # ticks resolved in DTM sub-steps (a cost diagnostic)
        self.steady_ticks = 0  # ticks taken by the steady-segment path (a cost diagnostic)
        self.layout = Layout(self, engine.perf.llc_latency_ns, n)
        self.clocks: Clocks | None = None  # rebuilt when caps or placement change
        # Bumped whenever a thread changes segment, step or core, or a cap changes: what
        # the steady-segment path keeps is valid for one version only.
        self.version = 0
        self.steady = None  # the steady-segment path's per-version constants
        self.metrics = MetricsAccumulator(n, engine.tick_s, float(self.temps_c.max()))

    def positions_changed(self) -> None:
        self.version += 1
        self.steady = None

    def relayout(self, llc_ns: np.ndarray, n_cores: int) -> None:
        """Threads arrived, left or moved: rebuild what depends on placement."""
        self.layout = Layout(self, llc_ns, n_cores)
        self.clocks = None
        self.positions_changed()
