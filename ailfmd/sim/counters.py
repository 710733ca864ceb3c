"""Per-thread counters as Linux reports them, and the cost of a migration.

Instructions, LLC references and misses and stall-free cycles follow from a thread's
position in its program (prefix sums of the CPI stack); cycles, run and wait time and
switches are accumulated tick by tick by ``progress.Progress``. A moved thread pays the
cache warm-up of ``PerfModel`` as time it runs without retiring instructions.
"""

from __future__ import annotations

import math

import numpy as np

from ailfmd.sim.governor import VfLevels
from ailfmd.sim.kernels import Kernel
from ailfmd.sim.perfmodel import PerfModel
from ailfmd.sim.scheduler import COUNTER, COUNTER_NAMES
from ailfmd.sim.state import EngineState


def thread_counters(st: EngineState) -> np.ndarray:
    """Cumulative counters of every live thread since it started (rows x COUNTER_NAMES)."""
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


def take_counter_deltas(st: EngineState) -> np.ndarray:
    """Counters since the previous call (or the thread's start), like perf deltas."""
    tt = st.threads
    now = thread_counters(st)
    delta = np.maximum(now - tt.seen, 0.0)
    tt.seen = now
    return delta


class MigrationCost:
    """Counts moves and charges each moved thread its cache warm-up as lost time."""

    def __init__(self, perf: PerfModel, levels: VfLevels, warmup_us: float) -> None:
        self.perf = perf
        self.levels = levels
        self.warmup_us = warmup_us
        self._lost_s: dict[tuple[int, int, int], float] = {}

    def charge(self, st: EngineState, rows: list[int]) -> None:
        tt = st.threads
        for row in rows:
            tt.migrations[row] += 1
            st.metrics.migrations += 1
            kernel = int(st.pool.kernel[tt.seg[row]])
            core = int(tt.core[row])
            key = (kernel, core, int(st.cap_level[core]))
            lost = self._lost_s.get(key)
            if lost is None:
                lost = self._lost_s[key] = self.warmup_lost_s(*key)
            tt.penalty_s[row] += lost

    def warmup_lost_s(self, kernel: int, core: int, level: int) -> float:
        """Time lost to a cold private cache after a move, in seconds.

        The warm fraction ramps linearly over the warm-up, so CPI falls linearly from
        ``s0 * CPI_warm`` to ``CPI_warm`` (``s0 = migration_slowdown`` right after the move)
        and the time lost against a warm thread is ``W * (1 - ln(s0) / (s0 - 1))``.
        """
        if kernel == Kernel.IDLE:
            return 0.0
        freq_ghz = self.levels.freq_mhz[level] * 1e-3
        s0 = self.perf.migration_slowdown(Kernel(kernel), core, freq_ghz, 0.0, self.warmup_us)
        if s0 <= 1.0 + 1e-12:
            return 0.0
        return self.warmup_us * 1e-6 * (1.0 - math.log(s0) / (s0 - 1.0))
