"""What each core runs in a tick, the loaded DRAM latency that follows, and its switching
activity: the inputs of the tick's power.

Within a tick a core shows one kernel class, its thread's dominant segment; the DRAM queue
sees the cores whose threads run for at least half the tick. The DRAM fixed point of
``PerfModel.rates`` is a pure function of those inputs and is memoised (least recently
used): under DTM the chip cycles through a limited set of them.
"""

from __future__ import annotations

from collections import OrderedDict
from types import ModuleType

import numpy as np

from ailfmd.sim.kernels import STALL_ACTIVITY_FRACTION, Kernel
from ailfmd.sim.perfmodel import _NEWTON_MAX_ITER, _RHO_TOL, PerfModel
from ailfmd.sim.state import EngineState

DRAM_MEMO_SIZE = 256  # loaded-latency solutions remembered (least recently used dropped)


class CoreView:
    """Per-core kernels, DRAM latency and activity for one chip's ``PerfModel``."""

    def __init__(self, perf: PerfModel, n_cores: int, tick_s: float, f_min_mhz: float,
                 compiled: ModuleType | None = None) -> None:
        self.perf = perf
        self.n_cores = n_cores
        self.tick_s = tick_s
        self._f_min = f_min_mhz
        kt = perf.kernels
        self._llc_hit_apki = kt.llc_apki - kt.dram_mpki
        self._dram_memo: OrderedDict[bytes, float] = OrderedDict()
        self._compiled = compiled
        self._llc_latency_ns = np.ascontiguousarray(perf.llc_latency_ns, dtype=float)

    def core_kernels(self, st: EngineState, dominant: np.ndarray, busy_s: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each core's kernel and MPKI (from its thread's dominant segment) and the
        kernels the DRAM queue sees (cores whose threads run for most of the tick)."""
        tt, P = st.threads, st.pool
        n = self.n_cores
        rows = (dominant >= 0).nonzero()[0]
        if st.layout.shared and st.tick_no & 1:
            rows = rows[::-1]  # a time-shared core shows its threads in turn
        seg = dominant[rows]
        kernel = np.zeros(n, dtype=np.intp)
        mpki = np.zeros(n)
        cores = tt.core[rows]
        kernel[cores] = P.kernel[seg]
        mpki[cores] = P.mpki[seg]
        running = np.zeros(n, dtype=bool)
        running[cores[busy_s[rows] >= 0.5 * self.tick_s]] = True
        return kernel, mpki, np.where(running, kernel, Kernel.IDLE)

    def dram_latency(self, kernel: np.ndarray, mpki: np.ndarray, f_mhz: np.ndarray) -> float:
        """Loaded DRAM latency (PerfModel's queue fixed point), memoised on its inputs.

        Compiled, the fixed point costs less than the memo's key: it is solved every time.
        """
        if self._compiled is not None:
            kt, perf = self.perf.kernels, self.perf
            return self._compiled.loaded_dram_latency_ns(
                kernel, mpki, f_mhz, kt.executes, kt.base_cpi, kt.mlp, kt.bytes_per_miss,
                self._llc_hit_apki, self._llc_latency_ns, perf.dram_latency_ns,
                perf.queue_service_ns, perf.dram_bandwidth_gbps, _NEWTON_MAX_ITER, _RHO_TOL)
        active = kernel != Kernel.IDLE
        if not np.count_nonzero(active):
            return self.perf.dram_latency_ns
        mpki = mpki * active
        f = f_mhz * active
        key = kernel.tobytes() + mpki.tobytes() + f.tobytes()
        latency = self._dram_memo.get(key)
        if latency is not None:
            self._dram_memo.move_to_end(key)
            return latency
        latency = self.perf.loaded_dram_latency_ns(kernel, f_mhz * 1e-3, mpki)
        self._dram_memo[key] = latency
        if len(self._dram_memo) > DRAM_MEMO_SIZE:
            self._dram_memo.popitem(last=False)
        return latency

    def activity(self, kernel: np.ndarray, mpki: np.ndarray, dram_ns: float,
                 f_mhz: np.ndarray) -> np.ndarray:
        """Switching activity per core at clock ``f_mhz`` and a given loaded DRAM latency.

        The activity law of ``PerfModel.rates`` (stalled cycles keep a fraction of the
        clock tree toggling), for any clock: a memory-bound kernel stalls more, so
        switches less, at a higher clock.
        """
        kt = self.perf.kernels
        if self._compiled is not None:
            rows = f_mhz.reshape(-1, self.n_cores)
            out = np.empty(rows.shape)
            self._compiled.activity(kernel, mpki, dram_ns, rows, kt.activity, kt.base_cpi, kt.mlp,
                                    self._llc_hit_apki, self._llc_latency_ns,
                                    STALL_ACTIVITY_FRACTION, out)
            return out.reshape(f_mhz.shape)
        apki = self._llc_hit_apki[kernel] + mpki
        base = kt.base_cpi[kernel]
        cpi = base + f_mhz * 1e-6 / kt.mlp[kernel] * (apki * self.perf.llc_latency_ns + mpki * dram_ns)
        return kt.activity[kernel] * (STALL_ACTIVITY_FRACTION
                                      + (1.0 - STALL_ACTIVITY_FRACTION) * base / cpi)
