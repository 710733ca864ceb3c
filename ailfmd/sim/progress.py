"""Threads advance through their programs over one tick, and the accounting that goes
with it (time on the CPU, cycles, context switches, tokens, completions).

Within a tick each thread runs at a constant speed (``lookahead.Timing``) from its start
until the tick ends or it reaches its step barrier. A thread at the barrier sleeps until
the slowest thread of its request gets there; the barrier's release lets the request's
threads go on with the next step in the same tick (as many steps as fit). Work is never
lost at segment or step boundaries.
"""

from __future__ import annotations

from types import ModuleType
from typing import Callable

import numpy as np

from ailfmd.sim.lookahead import LookAhead, Timing
from ailfmd.sim.program import Program
from ailfmd.sim.scheduler import CFS_LATENCY_S, CFS_MIN_GRANULARITY_S, cfs_slice_s
from ailfmd.sim.state import EngineState
from ailfmd.sim.workload import Request


class Progress:
    """Moves every thread through one tick of ``tick_s``."""

    def __init__(self, tick_s: float, program: Callable[[Request], Program],
                 compiled: ModuleType | None = None) -> None:
        self.tick_s = tick_s
        self._program = program
        self._compiled = compiled

    def run(self, st: EngineState, start: np.ndarray | None, divisor: np.ndarray,
            f_eff_mhz: np.ndarray, timing: Timing, t0: float) -> list[int]:
        """Advance every thread through the tick; returns the requests that completed.

        ``timing`` is the first pass's (all threads, from ``start``; None: all from the
        tick's beginning); requests whose barrier releases inside the tick go on in
        further passes at the same speeds. Bumps the state's version (positions changed)
        unless every thread stayed in its segment.
        """
        if self._compiled is not None:
            return self._run_compiled(st, start, divisor, f_eff_mhz, timing, t0)
        tt = st.threads
        n = len(tt)
        speed = timing.speed
        active_s = np.zeros(n)
        sleeps = np.zeros(n)
        completed: list[int] = []
        rows = np.arange(n)
        moved = False
        while True:
            rows, s, moved_now = self._pass(st, rows, start, timing, active_s, sleeps, t0, completed)
            moved = moved or moved_now
            if not rows.size:
                break
            start = s
            timing = LookAhead.timing(st, rows, s, speed)
        run_s = active_s / divisor
        tt.active_s += active_s
        tt.run_s += run_s
        tt.cycles += f_eff_mhz[tt.core] * 1e6 * run_s
        tt.switches += sleeps
        if st.layout.shared:
            tt.switches += np.where(divisor > 1, active_s / cfs_slice_s(divisor), 0.0)
        if moved:
            st.positions_changed()
        return completed

    def _run_compiled(self, st: EngineState, start: np.ndarray | None, divisor: np.ndarray,
                      f_eff_mhz: np.ndarray, timing: Timing, t0: float) -> list[int]:
        """:meth:`run` with each pass's arithmetic in one compiled call
        (``compiled.progress_pass``); barrier releases are handled here."""
        kern = self._compiled
        tt, P, lay = st.threads, st.pool, st.layout
        n = len(tt)
        active_s = np.zeros(n)
        sleeps = np.zeros(n)
        block_starts = np.empty(n, dtype=np.int64)
        block_release = np.empty(n)
        completed: list[int] = []
        widest = len(P.knots)
        rows = np.arange(n)
        s = lay.zeros if start is None else start
        g, d, e = timing.g, timing.d, timing.e
        pen = lay.zeros if timing.pen is None else timing.pen
        cur, speed, t_end = timing.cur, timing.speed, timing.t_end
        moved = False
        while True:
            n_blocks, n_released, moved_now = kern.progress_pass(
                rows, s, t_end, cur, speed, g, d, e, pen, tt.req, P.cum, P.rate, P.length, widest,
                self.tick_s, tt.seg, tt.done, tt.penalty_s, active_s, sleeps, block_starts,
                block_release)
            if not n_released:
                moved = moved or moved_now
                break
            rows, s, released = self._release(st, rows, block_starts[:n_blocks],
                                              block_release[:n_blocks], t0, completed)
            moved = moved or moved_now or released
            if rows is None:
                break
            k = rows.size
            g, e = np.empty(k, dtype=np.int64), np.empty(k, dtype=np.int64)
            d, pen, t_end = np.empty(k), np.empty(k), np.empty(k)
            speed, cur = np.empty((3, k)), np.empty((3, k))
            kern.timing_rows(rows, s, timing.speed, tt.seg, tt.done, tt.step_end, tt.penalty_s,
                             P.cum, P.rate, g, d, e, pen, speed, cur, t_end)
        kern.account_progress(active_s, sleeps, divisor, f_eff_mhz, tt.core, lay.shared,
                              CFS_LATENCY_S, CFS_MIN_GRANULARITY_S, tt.active_s, tt.run_s,
                              tt.cycles, tt.switches)
        if moved:
            st.positions_changed()
        return completed

    def _release(self, st: EngineState, rows: np.ndarray, starts: np.ndarray,
                 release: np.ndarray, t0: float, completed: list[int]
                 ) -> tuple[np.ndarray | None, np.ndarray | None, bool]:
        """Requests whose barrier released inside the tick (``release`` per block of
        ``rows``, blocks from ``starts``) count their tokens and go on with their next
        step, or complete.

        Returns the rows that go on and their start times (None, None: none), and
        whether any barrier released."""
        released = (release <= self.tick_s).nonzero()[0]
        if not released.size:
            return None, None, False
        tt = st.threads
        ends = np.append(starts[1:], rows.size)
        next_rows, next_s = [], []
        for blk in released:
            block = rows[starts[blk]: ends[blk]]
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
            next_s.append(release[blk])
        if not next_rows:
            return None, None, True
        if len(next_rows) == 1:
            block = next_rows[0]
            return block, np.full(block.size, next_s[0]), True
        return np.concatenate(next_rows), np.repeat(next_s, [b.size for b in next_rows]), True

    def _advance_within_step(self, st: EngineState, rows: np.ndarray, part: np.ndarray,
                             s: np.ndarray | None, timing: Timing) -> bool:
        """Move threads ``rows[part]`` (which stay short of their barrier) to where they
        are at the end of the tick; True if one of them changed segment."""
        tt, P = st.threads, st.pool
        dt = self.tick_s
        budget = st.layout.whole_tick_s[part] if s is None else dt - s[part]
        pen = timing.pen
        if pen is not None:
            budget = budget - pen[part]
            if np.count_nonzero(pen[part]):
                stalled = budget <= 0.0  # still paying its migration warm-up
                left = pen[part] - (dt if s is None else dt - s[part])
                tt.penalty_s[rows[part]] = np.where(stalled, left, 0.0)
                part, budget = part[~stalled], budget[~stalled]
                if not part.size:
                    return False
        g, d = timing.g[part], timing.d[part]
        done = d + budget / timing.tpi(P, part, g)
        cross = (done > P.length[g]).nonzero()[0]  # they leave their segment
        at = rows[part]
        if cross.size:
            gc, bc, pc = g[cross], budget[cross], part[cross]
            knots = np.minimum(gc[:, None] + P.knots[None, :], timing.e[pc, None])
            tau = timing.knot_times(P, pc, knots)
            crossed = np.add.reduce(tau <= bc[:, None], axis=1)
            gn = gc + crossed
            t_knot = tau[np.arange(cross.size), crossed - 1]
            done[cross] = np.minimum((bc - t_knot) / timing.tpi(P, pc, gn), P.length[gn])
            tt.seg[at[cross]] = gn
        tt.done[at] = done
        return bool(cross.size)

    def _pass(self, st: EngineState, rows: np.ndarray, s: np.ndarray | None, timing: Timing,
              active_s: np.ndarray, sleeps: np.ndarray, t0: float,
              completed: list[int]) -> tuple[np.ndarray, np.ndarray | None, bool]:
        """Run ``rows`` from their start times ``s`` to the tick end or their step barrier.

        Returns the rows of requests whose barrier released inside the tick (they go on
        with the next step), the release times, and whether a thread changed segment.
        """
        tt = st.threads
        dt = self.tick_s
        g, e, t_end = timing.g, timing.e, timing.t_end
        if rows.size == len(tt):
            starts, block = st.layout.starts, st.layout.block
            active_s += np.minimum(t_end, dt) if s is None else np.minimum(t_end, dt) - s
        else:
            req = tt.req[rows]
            first = np.empty(rows.size, dtype=bool)
            first[0] = True
            np.not_equal(req[1:], req[:-1], out=first[1:])
            starts = first.nonzero()[0]
            block = np.add.accumulate(first) - 1
            active_s[rows] += np.minimum(t_end, dt) - s
        release = np.maximum.reduceat(t_end, starts)
        released = release <= dt
        any_released = bool(np.count_nonzero(released))
        if any_released:
            rel_row = released[block]
            reach = rel_row | (t_end <= dt)
            # The last thread of a released request does not sleep; the others did.
            asleep = reach & ~(rel_row & (t_end >= release[block]))
        else:
            reach = asleep = t_end <= dt
        hit = reach.nonzero()[0]
        moved = False
        if hit.size:
            arriving = hit[g[hit] != e[hit]]  # threads that get to the barrier now
            if arriving.size:
                moved = True
                sleeps[rows[arriving[asleep[arriving]]]] += 1
            at = rows[hit]
            tt.seg[at] = e[hit]
            tt.done[at] = 0.0
            tt.penalty_s[at] = 0.0
        part = (~reach).nonzero()[0] if hit.size else np.arange(rows.size)
        if part.size and self._advance_within_step(st, rows, part, s, timing):
            moved = True

        if not any_released:
            return rows[:0], None, moved
        next_rows, next_s, _ = self._release(st, rows, starts, release, t0, completed)
        if next_rows is None:
            return rows[:0], None, True
        return next_rows, next_s, True
