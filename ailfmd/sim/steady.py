"""Ticks in which no thread leaves its program segment, taken without the look-ahead.

Most ticks of a long prefill chunk or of a decode step's big kernels are *steady*: nobody
arrives, nobody owes a migration warm-up, and every running thread stays inside the
segment it is in, even at the fastest speed it could have in the tick (its governor clock,
the unloaded DRAM latency). Then the general tick's look-ahead has a known outcome: each
running thread runs the whole tick in its current segment (busy fraction 1 over its
divisor), a thread asleep at its barrier stays asleep, and no barrier releases. What
depends only on those positions (each core's kernel and MPKI, utilisation, divisors, the
constants of each thread's instruction rate) is computed once per ``EngineState.version``
and kept in ``SteadyConstants``; what depends on the loaded DRAM latency is kept per
latency value (under DTM the chip cycles through a few of them).

A steady tick then costs the DRAM latency (memoised on which DRAM-using cores are
throttled), the power, the thermal step or DTM sub-steps, and a progress update that is
one division per thread: the time per instruction of a thread that runs a fraction
``theta`` of its busy time throttled is ``divisor / (A + theta (B - A))`` ns with ``A`` and
``B`` its instructions per ns at the free and the lowest clock, the same matched rate the
general tick uses (``LookAhead.throttled_clock``). The results equal the general tick's to
rounding; ``Engine(..., reference=True)`` takes the general tick every time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ailfmd.sim.scheduler import cfs_slice_s, time_shares
from ailfmd.sim.state import S_PER_NS, Clocks, EngineState

if TYPE_CHECKING:
    from ailfmd.sim.engine import Engine

EXIT_MARGIN = 1e-6  # relative margin on "stays in its segment" against rounding


class SteadyConstants:
    """What a steady tick needs that depends only on positions, placement and caps.

    Built in two parts: what decides whether a tick is steady (cheap, computed for every
    new version), and the rest (computed when a steady tick first needs it).
    """

    def __init__(self, eng: "Engine", st: EngineState, ck: Clocks) -> None:
        tt, P, lay = st.threads, st.pool, st.layout
        self.version = st.version
        g = tt.seg
        self.running = running = g != tt.step_end
        self.divisor = (time_shares(tt.core, running, eng.n_cores)[1].astype(float)
                        if lay.shared else lay.ones)
        self.seg_len = P.length[g]
        self.rate = P.rate[:, g]  # base cycles, LLC and DRAM weights of the current segment
        # Fastest possible time per instruction: governor clock, unloaded DRAM latency.
        fastest = np.add.reduce(ck.fastest_s * self.rate, axis=0)
        self.tpi_min = fastest if self.divisor is lay.ones else fastest * self.divisor
        self.need_s = eng.tick_s * (1.0 + EXIT_MARGIN)
        self.ready = False

    def stays(self, done: np.ndarray) -> bool:
        """Whether every running thread stays in its segment through the tick."""
        short = (self.seg_len - done) * self.tpi_min < self.need_s
        return not np.count_nonzero(short & self.running)

    def complete(self, eng: "Engine", st: EngineState, ck: Clocks) -> None:
        tt, lay = st.threads, st.layout
        dt = eng.tick_s
        g, running, divisor = tt.seg, self.running, self.divisor
        self.dt_run = dt * running
        self.run_inc = self.dt_run / divisor  # time on the CPU per tick
        self.cycle_inc = self.run_inc * 1e6  # cycles per tick per MHz of the core's clock
        self.run_ns = self.run_inc / S_PER_NS  # ns on the CPU per tick: instructions = ns x rate
        self.switch_inc = (np.where(divisor > 1, self.dt_run / cfs_slice_s(divisor), 0.0)
                           if lay.shared else None)
        # Parked at the end of its request's last step: shows no kernel (the general tick's
        # dominant segment is -1 there).
        self.dominant = np.where(~running & (g == lay.end_seg), -1, g)
        self.busy_s = self.dt_run
        self.utilisation = np.minimum(np.bincount(tt.core, self.busy_s / divisor, eng.n_cores), dt) / dt
        base, llc_w, dram_w = self.rate
        self.base = np.where(running, base, 1.0)  # asleep: any finite rate (no progress)
        self.llc_stall_ns = lay.llc_ns * llc_w
        self.dram_w = dram_w
        self.f_hi_ghz = ck.f_hi_ghz_thread
        self._kernels: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._dram: dict[tuple[int, bytes], float] = {}
        self._per_latency: dict[tuple[int, float], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.ready = True

    def kernels(self, eng: "Engine", st: EngineState, parity: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        got = self._kernels.get(parity)
        if got is None:
            got = self._kernels[parity] = eng.cores.core_kernels(st, self.dominant, self.busy_s)
        return got

    def dram_latency(self, eng: "Engine", st: EngineState, parity: int, f_start: np.ndarray) -> float:
        kernel, mpki, dram_kernel = self.kernels(eng, st, parity)
        key = (parity, (st.throttled & (dram_kernel != 0)).tobytes())
        latency = self._dram.get(key)
        if latency is None:
            latency = self._dram[key] = eng.cores.dram_latency(dram_kernel, mpki, f_start)
        return latency

    def per_latency(self, eng: "Engine", st: EngineState, ck: Clocks, parity: int,
                    dram_ns: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Dynamic power of both operating points, and each thread's free rate ``A`` and
        ``B - A`` (instructions per ns), at loaded DRAM latency ``dram_ns``."""
        key = (parity, dram_ns)
        got = self._per_latency.get(key)
        if got is None:
            kernel, mpki, _ = self.kernels(eng, st, parity)
            activity = eng.cores.activity(kernel, mpki, dram_ns, ck.f2)
            dyn2 = activity * ck.dynamic2_w
            stall = self.llc_stall_ns + dram_ns * self.dram_w
            free = 1.0 / (self.base / self.f_hi_ghz + stall)
            slow = 1.0 / (self.base / (eng.f_min_mhz * 1e-3) + stall)
            got = self._per_latency[key] = (dyn2, free, slow - free)
        return got


def steady_tick(eng: "Engine", st: EngineState, ck: Clocks) -> bool:
    """Run one tick of ``st`` on the steady path if it is steady; False if it is not."""
    sc = st.steady
    if sc is None or sc.version != st.version:
        sc = st.steady = SteadyConstants(eng, st, ck)
    tt = st.threads
    kern = eng.compiled
    if kern is None:
        if not sc.stays(tt.done):
            return False
    elif not kern.steady_stays(sc.seg_len, tt.done, sc.tpi_min, sc.need_s, sc.running):
        return False
    if not sc.ready:
        sc.complete(eng, st, ck)
    dt = eng.tick_s
    parity = int(st.tick_no & 1) if st.layout.shared else 0
    thr = st.throttled
    f_start = ck.f_gov + thr * ck.f_drop
    dram_ns = sc.dram_latency(eng, st, parity, f_start)
    st.dram_ns = dram_ns
    dyn2, free, gain = sc.per_latency(eng, st, ck, parity, dram_ns)
    refine = eng.sub_steps > 1 and st.dtm_active
    if not refine:
        tab = eng.power_table
        idle2 = tab.constant_w + ck.leakage2_w * tab.heat_factor(st.temps_c)
        p_free, p_slow = idle2 + sc.utilisation * dyn2
        power_w = np.where(thr, p_slow, p_free)
        refine, account = eng.whole_tick(st, ck, power_w)
    if refine:
        st.substep_ticks += 1
        frac, slowed, account = eng.substeps.resolve(st, ck, dyn2, sc.utilisation)
        f_eff = ck.f_gov + ck.f_drop * frac
    else:
        f_eff = f_start
        slowed = thr
    if kern is not None:
        has_switches = sc.switch_inc is not None
        kern.steady_progress(np.asarray(slowed, dtype=float), tt.core, sc.run_ns, free, gain,
                             sc.dt_run, sc.run_inc, f_eff, sc.cycle_inc,
                             sc.switch_inc if has_switches else sc.dt_run, has_switches, tt.done,
                             tt.active_s, tt.run_s, tt.cycles, tt.switches)
    else:
        theta = slowed[tt.core]
        tt.done += sc.run_ns * (free + theta * gain)
        tt.active_s += sc.dt_run
        tt.run_s += sc.run_inc
        tt.cycles += f_eff[tt.core] * sc.cycle_inc
        if sc.switch_inc is not None:
            tt.switches += sc.switch_inc
    st.metrics.add_interval(dt, *account, f_eff, st.layout.busy_w)
    st.steady_ticks += 1
    return True
