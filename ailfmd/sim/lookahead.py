"""The look-ahead through a tick: when each thread reaches its step barrier, how long it
runs, in which segment it spends most of the tick, and the clock that stands for a mix of
throttled and free time.

All of it is closed form on the prefix sums of ``program.Pool``: a thread's time to reach
pool index ``k`` from where it is is ``u (B[k] - cb) + v (A[k] - ca) + w (M[k] - cm)``
with ``u, v, w`` the wall seconds per unit of each sum (its clock, the LLC latency of its
core, the loaded DRAM latency, each stretched by its time-sharing divisor). The three
sums and the three speeds are kept stacked (3 x threads) so that one array operation
covers all three.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import numpy as np

from ailfmd.sim.program import Pool
from ailfmd.sim.state import S_PER_NS, EngineState

S_PER_CYCLE_MHZ = 1e-6  # seconds per cycle at 1 MHz


def _offset(start: np.ndarray | None, pen: np.ndarray | None) -> np.ndarray | None:
    """Start time plus warm-up still to pay; None when both are zero."""
    if start is None:
        return pen
    return start if pen is None else start + pen


@dataclass
class Timing:
    """Where some threads are in their programs and what reaching the barrier costs."""

    g: np.ndarray  # current segment (pool index)
    d: np.ndarray  # instructions done in it
    e: np.ndarray  # the step's end (the barrier)
    pen: np.ndarray | None  # migration warm-up still to pay (s); None: nothing to pay
    cur: np.ndarray  # 3 x n prefix sums at the current position: base cycles, LLC, DRAM
    rem: np.ndarray  # 3 x n the same sums from the current position to the barrier
    speed: np.ndarray  # 3 x n wall seconds per unit of each sum (divisor included)
    t_end: np.ndarray  # when each reaches its barrier (tick time, penalty included)
    dram_t: np.ndarray  # the DRAM-latency part of the time to the barrier

    def rescale_dram(self, ratio: float) -> None:
        """The same timing at ``ratio`` times the DRAM latency."""
        self.t_end = self.t_end + self.dram_t * (ratio - 1.0)
        self.dram_t = self.dram_t * ratio
        self.speed = self.speed.copy()
        self.speed[2] *= ratio

    def with_base_speed(self, start: np.ndarray | None, u: np.ndarray) -> "Timing":
        """The same positions with another clock (``u``: seconds per base cycle)."""
        speed = self.speed.copy()
        speed[0] = u
        base = _offset(start, self.pen)
        t_end = u * self.rem[0] if base is None else base + u * self.rem[0]
        t_end = t_end + speed[1] * self.rem[1] + self.dram_t
        return Timing(self.g, self.d, self.e, self.pen, self.cur, self.rem, speed, t_end, self.dram_t)

    def tpi(self, P: Pool, idx: np.ndarray, g: np.ndarray) -> np.ndarray:
        """Wall seconds per instruction of threads ``idx`` in segments ``g``."""
        return np.add.reduce(self.speed[:, idx] * P.rate[:, g], axis=0)

    def knot_times(self, P: Pool, idx: np.ndarray, knots: np.ndarray) -> np.ndarray:
        """Time for threads ``idx`` to reach each pool index in ``knots`` (rows x knots)."""
        return np.add.reduce(self.speed[:, idx, None] * (P.cum[:, knots] - self.cur[:, idx, None]), axis=0)


class LookAhead:
    """Closed-form timing of threads within a tick of ``tick_s``."""

    def __init__(self, tick_s: float, f_min_mhz: float, compiled: ModuleType | None = None) -> None:
        self.tick_s = tick_s
        self._f_min = f_min_mhz
        self._compiled = compiled

    def plan(self, st: EngineState, start: np.ndarray | None, divisor: np.ndarray,
             clock_mhz: np.ndarray, dram_ns: float, n_cores: int
             ) -> tuple[Timing, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                        np.ndarray, np.ndarray, np.ndarray]:
        """The compiled look-ahead (``compiled.plan_tick``): :meth:`speeds`, :meth:`timing`,
        :meth:`busy_s`, :meth:`dominant_segments`, ``CoreView.core_kernels`` and each
        core's utilisation in one call.

        Returns the timing, busy time, time after the barrier, release time and dominant
        segment per thread, and each core's kernel, MPKI, DRAM-visible kernel and
        utilisation.
        """
        tt, P, lay = st.threads, st.pool, st.layout
        n = len(tt)
        speed, cur, rem = np.empty((3, 3, n))
        t_end, dram_t, busy, after, release = np.empty((5, n))
        dominant = np.empty(n, dtype=np.int64)
        kernel = np.empty(n_cores, dtype=np.intp)
        dram_kernel = np.empty(n_cores, dtype=np.intp)
        mpki, utilisation = np.empty(n_cores), np.empty(n_cores)
        reverse = bool(lay.shared and st.tick_no & 1)
        self._compiled.plan_tick(
            tt.seg, tt.done, tt.step_end, tt.penalty_s, lay.zeros if start is None else start,
            divisor, clock_mhz, tt.core, lay.llc_s, dram_ns, P.cum, P.rate, P.length, P.kernel,
            P.mpki, len(P.knots), lay.starts, lay.end_seg, self.tick_s, reverse, speed, cur, rem,
            t_end, dram_t, busy, after, release, dominant, kernel, mpki, dram_kernel, utilisation)
        pen = tt.penalty_s if np.count_nonzero(tt.penalty_s) else None
        timing = Timing(tt.seg, tt.done, tt.step_end, pen, cur, rem, speed, t_end, dram_t)
        return timing, busy, after, release, dominant, kernel, mpki, dram_kernel, utilisation

    def throttled_timing(self, st: EngineState, frac: np.ndarray, f_hi_ghz: np.ndarray,
                         dominant: np.ndarray, dram_ns: float, divisor: np.ndarray,
                         start: np.ndarray | None, timing: Timing) -> Timing:
        """The compiled :meth:`throttled_clock` and ``Timing.with_base_speed`` in one call
        (``compiled.throttled_base_speed``)."""
        tt, lay = st.threads, st.layout
        n = len(tt)
        speed = timing.speed.copy()
        t_end = np.empty(n)
        self._compiled.throttled_base_speed(
            frac, tt.core, f_hi_ghz, dominant, tt.seg, st.pool.rate, lay.llc_ns, dram_ns,
            self._f_min * 1e-3, divisor, lay.zeros if start is None else start,
            lay.zeros if timing.pen is None else timing.pen, timing.rem, speed[1],
            timing.dram_t, speed[0], t_end)
        return Timing(timing.g, timing.d, timing.e, timing.pen, timing.cur, timing.rem, speed,
                      t_end, timing.dram_t)

    @staticmethod
    def speeds(st: EngineState, divisor: np.ndarray, clock_mhz: np.ndarray, dram_ns: float
               ) -> np.ndarray:
        """Wall seconds per unit of the base-cycle, LLC and DRAM prefix sums, per thread
        (3 x threads).

        Time per instruction is ``base_cpi / f + llc_ns * apki/1000/mlp + dram_ns *
        mpki/1000/mlp`` ns (the CPI stack of ``PerfModel.rates`` divided by the clock),
        stretched by the thread's time-sharing divisor.
        """
        lay = st.layout
        speed = np.empty((3, len(divisor)))
        if divisor is lay.ones:
            np.divide(S_PER_CYCLE_MHZ, clock_mhz, out=speed[0])
            speed[1] = lay.llc_s
            speed[2] = S_PER_NS * dram_ns
        else:
            np.divide(divisor * S_PER_CYCLE_MHZ, clock_mhz, out=speed[0])
            np.multiply(divisor, lay.llc_s, out=speed[1])
            np.multiply(divisor, S_PER_NS * dram_ns, out=speed[2])
        return speed

    @staticmethod
    def timing(st: EngineState, rows: np.ndarray | None, start: np.ndarray | None,
               speed: np.ndarray) -> Timing:
        """Positions of ``rows`` (None: all) and when each reaches its step barrier.

        ``start``: when each starts in the tick (None: all at the tick's beginning).
        """
        tt, P = st.threads, st.pool
        if rows is None:
            g, d, e, pen = tt.seg, tt.done, tt.step_end, tt.penalty_s
        else:
            g, d, e, pen = tt.seg[rows], tt.done[rows], tt.step_end[rows], tt.penalty_s[rows]
            speed = speed[:, rows]
        cur = P.cum[:, g]
        cur += d * P.rate[:, g]
        rem = P.cum[:, e] - cur
        parts = speed * rem
        if not np.count_nonzero(pen):
            pen = None
        base = _offset(start, pen)
        t_end = np.add.reduce(parts, axis=0) if base is None else base + parts[0] + parts[1] + parts[2]
        return Timing(g, d, e, pen, cur, rem, speed, t_end, parts[2])

    def busy_s(self, st: EngineState, start: np.ndarray | None, t_end: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Expected time each thread runs in the tick, the part after its barrier, and
        when that barrier releases.

        A thread runs from its start until its step barrier (``t_end``), sleeps until the
        slowest thread of its request gets there, then runs to the end of the tick (unless
        that was the request's last step); a later barrier inside the same tick is ignored.
        """
        dt = self.tick_s
        lay = st.layout
        release = np.maximum.reduceat(t_end, lay.starts)[lay.block]
        later = (release < dt) & (st.threads.step_end != lay.end_seg)
        after = (dt - release) * later
        busy = np.minimum(t_end, dt)
        if start is not None:
            busy -= start
        busy += after
        return busy, after, release

    def dominant_segments(self, st: EngineState, timing: Timing, start: np.ndarray | None,
                          after_s: np.ndarray) -> np.ndarray:
        """The pool segment each thread spends most of the tick in (-1: none).

        Candidates are the segments up to its barrier and, for ``after_s`` once the barrier
        releases, the first segment of its next step (-1 if its request then completes).
        """
        P = st.pool
        g, e = timing.g, timing.e
        base = _offset(start, timing.pen)
        avail = st.layout.whole_tick_s if base is None else np.maximum(self.tick_s - base, 0.0)
        tpi = np.add.reduce(timing.speed * P.rate[:, g], axis=0)
        in_current = np.minimum((P.length[g] - timing.d) * tpi, avail)
        out = np.where(after_s > in_current, e, g)
        # Threads that leave their segment during the tick: look at the rest of the step.
        crossing = ((in_current < avail) & (g < e)).nonzero()[0]
        if crossing.size:
            gc, ec = g[crossing], e[crossing]
            knots = np.minimum(gc[:, None] + P.knots[None, :], ec[:, None])
            tau = timing.knot_times(P, crossing, knots)
            reached = np.minimum(tau, avail[crossing, None])
            spent = reached.copy()
            spent[:, 1:] -= reached[:, :-1]
            best = np.argmax(spent, axis=1)
            longest = spent[np.arange(crossing.size), best]
            out[crossing] = np.where(after_s[crossing] > longest, ec, np.minimum(gc + best, ec))
        return np.where((out == e) & (e == st.layout.end_seg), -1, out)

    def throttled_clock(self, st: EngineState, frac: np.ndarray, f_hi_ghz: np.ndarray,
                        dominant: np.ndarray, dram_ns: float) -> np.ndarray:
        """Per thread, the steady clock (MHz) that retires as many instructions as running
        a fraction ``frac`` (per core) of its busy time at the lowest level and the rest
        at its governor clock ``f_hi_ghz``.

        Instruction rates, not clocks, average over time. A memory-bound kernel's rate is
        concave in the clock, so the plain time-averaged clock would overstate its
        progress under DTM. The match is exact for the thread's dominant segment.
        """
        tt, P = st.threads, st.pool
        theta = frac[tt.core]
        f_hi = f_hi_ghz
        f_lo = self._f_min * 1e-3
        seg = np.where(dominant >= 0, dominant, tt.seg)
        base = P.qb[seg]
        stall_ns = st.layout.llc_ns * P.qa[seg] + dram_ns * P.qm[seg]
        linear = f_hi + (f_lo - f_hi) * theta
        real = base > 0  # not the pool sentinel (no instructions: base and stalls 0)
        if np.count_nonzero(real) < len(real):
            base = np.where(real, base, 1.0)  # any finite rate; the linear clock is used there
        ips = (1.0 - theta) / (base / f_hi + stall_ns) + theta / (base / f_lo + stall_ns)
        matched = base / (1.0 / ips - stall_ns)
        return np.where(real & (theta > 0), matched, linear) * 1e3
