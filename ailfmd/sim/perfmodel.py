"""CPI-stack performance model of the simulated S-NUCA many-core.

For a core running kernel class ``k`` at ``f`` GHz::

    CPI = base_cpi[k]
        + APKI/1000 * LLC_latency_cycles(core, f) / MLP[k]
        + MPKI/1000 * DRAM_latency_ns * f / MLP[k]
    IPS = f * 1e9 / CPI

Clock domains: the NoC and LLC banks run on a fixed uncore clock, so the LLC latency
is fixed in nanoseconds (``cycles / uncore_freq_ghz``) and, like DRAM latency, costs
more core cycles the faster the core runs. Compute-bound kernels therefore speed up
almost linearly with ``f`` and memory-bound ones sub-linearly, and memory-bound ones
gain from a core with a short mean distance to the banks.

Shared DRAM bandwidth: the loaded DRAM latency follows an M/D/1-shaped queue,
``L(rho) = L0 + S*rho / (2*(1 - rho))`` with utilisation ``rho = demand / bandwidth``.
Demand falls as latency rises (cores stall longer), so the model solves the fixed
point ``rho = demand(L(rho)) / bandwidth`` with a safeguarded Newton iteration. The
fixed point always has ``rho < 1``: total DRAM traffic never exceeds the bandwidth and
adding memory-bound cores past saturation mostly adds latency, not throughput.

Migration: in S-NUCA the LLC is shared and address-interleaved, so a migrated thread
finds its LLC data where it was; only its private L1/L2 are cold. Until they refill,
more of its accesses reach the LLC (``cold_llc_apki``); a warm fraction ramps linearly
from 0 to 1 over the warm-up period given by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from .kernels import KERNEL_PARAMS, STALL_ACTIVITY_FRACTION, Kernel, KernelParams, kernel_table
from .noc import mean_llc_latency_cycles

# A typical server mesh/uncore clock (Intel Xeon Scalable uncore runs ~1.2-2.4 GHz).
DEFAULT_UNCORE_FREQ_GHZ = 2.0
# Effective M/D/1 service time as a fraction of the idle DRAM latency. With 0.25 the
# loaded latency is ~1.5x idle at 80 % utilisation and ~2x at 90 %, the shape of
# published loaded-latency curves (e.g. Intel MLC --loaded_latency on Xeon servers).
DEFAULT_QUEUE_SERVICE_FRACTION = 0.25
_NEWTON_MAX_ITER = 40
_RHO_TOL = 1e-9


@dataclass(frozen=True)
class PerfRates:
    """Per-core execution rates for one interval (arrays of length ``n_cores``)."""

    ips: np.ndarray  # instructions per second
    cpi: np.ndarray  # total cycles per instruction
    cpi_base: np.ndarray  # core-only component
    cpi_llc: np.ndarray  # exposed LLC (S-NUCA) latency component
    cpi_dram: np.ndarray  # exposed (loaded) DRAM latency component
    dram_bytes_per_s: np.ndarray  # DRAM traffic each core causes
    activity: np.ndarray  # effective switching activity for the power model, 0..1
    dram_latency_ns: float  # loaded DRAM latency after queueing
    dram_utilisation: float  # total DRAM traffic / bandwidth, < 1

    @property
    def total_dram_bytes_per_s(self) -> float:
        return float(self.dram_bytes_per_s.sum())


def warm_fraction(elapsed_us: np.ndarray | float, warmup_us: float) -> np.ndarray:
    """How warm a thread's private caches are ``elapsed_us`` after it migrated (0..1).

    Linear ramp: 0 right after the move, 1 once ``warmup_us`` has passed. A thread that
    never migrated has an infinite ``elapsed_us``.
    """
    elapsed = np.asarray(elapsed_us, dtype=float)
    if warmup_us <= 0:
        return np.ones_like(elapsed)
    return np.clip(elapsed / warmup_us, 0.0, 1.0)


class PerfModel:
    """CPI-stack model of one chip: S-NUCA LLC latency per core plus shared DRAM.

    ``hop_h_cycles``/``hop_v_cycles``/``bank_cycles`` are in cycles of the uncore clock
    ``uncore_freq_ghz`` (HotSniper counts its 6-cycle hop in core cycles at 4 GHz; pass
    ``uncore_freq_ghz=4.0`` to reproduce those nanoseconds). ``dram_bandwidth_gbps`` is
    in gigabytes (1e9 bytes) per second; ``queue_service_ns`` is the effective M/D/1
    service time, by default a quarter of the idle DRAM latency. Instructions retired
    in ``SPIN_WAIT`` are not progress; the caller decides what a core's IPS advances.
    """

    def __init__(
        self,
        layers: int,
        rows: int,
        cols: int,
        hop_h_cycles: float,
        hop_v_cycles: float,
        bank_cycles: float,
        dram_latency_ns: float,
        dram_bandwidth_gbps: float,
        uncore_freq_ghz: float = DEFAULT_UNCORE_FREQ_GHZ,
        queue_service_ns: float | None = None,
        kernel_params: Mapping[Kernel, KernelParams] | None = None,
    ) -> None:
        if not dram_latency_ns > 0:
            raise ValueError(f"dram_latency_ns must be > 0, got {dram_latency_ns!r}")
        if not dram_bandwidth_gbps > 0:
            raise ValueError(f"dram_bandwidth_gbps must be > 0, got {dram_bandwidth_gbps!r}")
        if not uncore_freq_ghz > 0:
            raise ValueError(f"uncore_freq_ghz must be > 0, got {uncore_freq_ghz!r}")
        self.n_cores = layers * rows * cols
        self.dram_latency_ns = float(dram_latency_ns)
        self.dram_bandwidth_gbps = float(dram_bandwidth_gbps)
        self.uncore_freq_ghz = float(uncore_freq_ghz)
        if queue_service_ns is None:
            queue_service_ns = DEFAULT_QUEUE_SERVICE_FRACTION * dram_latency_ns
        if not queue_service_ns > 0:
            # Without queueing delay nothing would hold demand below the bandwidth.
            raise ValueError(f"queue_service_ns must be > 0, got {queue_service_ns!r}")
        self.queue_service_ns = float(queue_service_ns)
        llc_cycles = mean_llc_latency_cycles(
            layers, rows, cols, hop_h_cycles, hop_v_cycles, bank_cycles
        )
        self.llc_latency_ns = llc_cycles / self.uncore_freq_ghz
        self.kernels = kernel_table(KERNEL_PARAMS if kernel_params is None else kernel_params)
        # LLC hits per kilo-instruction do not change when a segment overrides MPKI.
        self._llc_hit_apki = self.kernels.llc_apki - self.kernels.dram_mpki
        self._cold_extra_apki = self.kernels.cold_llc_apki - self.kernels.llc_apki

    # ------------------------------------------------------------------ main entry
    def rates(
        self,
        kernel_per_core: np.ndarray,
        freq_ghz_per_core: np.ndarray,
        warm_fraction_per_core: np.ndarray | None = None,
        dram_mpki_per_core: np.ndarray | None = None,
    ) -> PerfRates:
        """Execution rates of every core for the given kernels, clocks and cache warmth.

        ``kernel_per_core``: ``Kernel`` values (int array); ``freq_ghz_per_core``: core
        clocks; ``warm_fraction_per_core``: 1 = warm private caches, 0 = just migrated
        (see :func:`warm_fraction`), default all warm; ``dram_mpki_per_core``: DRAM
        misses per kilo-instruction of the segment each core runs, default the class
        value. Idle cores retire nothing.
        """
        t = self.kernels
        k = np.asarray(kernel_per_core, dtype=np.intp)
        f = np.asarray(freq_ghz_per_core, dtype=float)
        if k.shape != (self.n_cores,) or f.shape != (self.n_cores,):
            raise ValueError(f"need one kernel and one frequency per core ({self.n_cores})")
        if dram_mpki_per_core is None:
            mpki = t.dram_mpki[k]
        else:
            mpki = np.asarray(dram_mpki_per_core, dtype=float)
        apki = self._llc_hit_apki[k] + mpki
        if warm_fraction_per_core is not None:
            cold = 1.0 - np.asarray(warm_fraction_per_core, dtype=float)
            apki = apki + self._cold_extra_apki[k] * cold
        inv_mlp = 1.0 / t.mlp[k]
        cpi_base = t.base_cpi[k]
        cpi_llc = apki * 1e-3 * self.llc_latency_ns * f * inv_mlp
        # CPI = a + b * L_dram with L_dram in ns; solve the bandwidth fixed point on it.
        a = cpi_base + cpi_llc
        b = mpki * 1e-3 * f * inv_mlp
        gbytes_per_instr = mpki * 1e-3 * t.bytes_per_miss[k]
        c = np.where(t.executes[k], f * gbytes_per_instr, 0.0)  # GB/s = c / CPI
        latency_ns, rho = self._loaded_latency(a, b, c)
        cpi_dram = b * latency_ns
        cpi = a + cpi_dram
        ips_g = np.where(t.executes[k], f / cpi, 0.0)
        stall_free = cpi_base / cpi
        busy = t.activity[k]
        activity = busy * (STALL_ACTIVITY_FRACTION + (1.0 - STALL_ACTIVITY_FRACTION) * stall_free)
        return PerfRates(
            ips=ips_g * 1e9,
            cpi=cpi,
            cpi_base=cpi_base,
            cpi_llc=cpi_llc,
            cpi_dram=cpi_dram,
            dram_bytes_per_s=ips_g * gbytes_per_instr * 1e9,
            activity=activity,
            dram_latency_ns=latency_ns,
            dram_utilisation=rho,
        )

    def loaded_dram_latency_ns(self, kernel_per_core: np.ndarray, freq_ghz_per_core: np.ndarray,
                        dram_mpki_per_core: np.ndarray) -> float:
        """The loaded DRAM latency of :meth:`rates` (warm caches), and nothing else.

        The same arithmetic on the cores that reach DRAM only, so the result equals
        ``rates(kernel, freq, None, mpki).dram_latency_ns`` exactly, at a fraction of the
        cost (a simulator needs it every tick).
        """
        t = self.kernels
        k = kernel_per_core
        f = freq_ghz_per_core
        mpki = dram_mpki_per_core
        idx = (t.executes[k] & (f * (mpki * 1e-3 * t.bytes_per_miss[k]) > 0)).nonzero()[0]
        if not idx.size:
            return self.dram_latency_ns
        k, f, mpki = k[idx], f[idx], mpki[idx]
        inv_mlp = 1.0 / t.mlp[k]
        apki = self._llc_hit_apki[k] + mpki
        a = t.base_cpi[k] + apki * 1e-3 * self.llc_latency_ns[idx] * f * inv_mlp
        b = mpki * 1e-3 * f * inv_mlp
        c = f * (mpki * 1e-3 * t.bytes_per_miss[k])
        return self._solve_queue(a, b, c)[0]

    def _loaded_latency(self, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[float, float]:
        """Solve ``rho = sum(c / (a + b*L(rho))) / BW`` for ``rho`` in [0, 1)."""
        active = c > 0
        if not active.any():
            return self.dram_latency_ns, 0.0
        return self._solve_queue(a[active], b[active], c[active])

    def _solve_queue(self, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[float, float]:
        """The fixed point over cores that all reach DRAM (``c > 0``): latency and rho."""
        l0, s, bw = self.dram_latency_ns, self.queue_service_ns, self.dram_bandwidth_gbps
        cb = c * b
        dot = np.dot
        lo, hi = 0.0, 1.0
        rho = min(float(dot(c, 1.0 / (a + b * l0))) / bw, 0.5)
        for _ in range(_NEWTON_MAX_ITER):
            gap = 1.0 - rho
            latency = l0 + s * rho / (2.0 * gap)
            inv = 1.0 / (a + b * latency)
            h = float(dot(c, inv)) / bw - rho  # decreasing in rho
            if h > 0:
                lo = rho
            else:
                hi = rho
            if abs(h) < _RHO_TOL or hi - lo < _RHO_TOL:
                break
            d_demand_d_latency = -float(dot(cb, inv * inv))
            dh = d_demand_d_latency * s / (2.0 * gap * gap) / bw - 1.0
            step = rho - h / dh
            rho = step if lo < step < hi else 0.5 * (lo + hi)
        gap = 1.0 - rho
        latency = l0 + s * rho / (2.0 * gap)
        demand = float(dot(c, 1.0 / (a + b * latency)))
        return latency, demand / bw

    # ------------------------------------------------------------------ migration
    def migration_slowdown(
        self,
        kernel: Kernel,
        core: int,
        freq_ghz: float,
        elapsed_us: float,
        warmup_us: float,
        dram_latency_ns: float | None = None,
    ) -> float:
        """How much slower a thread runs ``elapsed_us`` after migrating to ``core``.

        Returns ``IPS(warm) / IPS(now)``: > 1 during the warm-up, exactly 1 after it.
        ``dram_latency_ns`` defaults to the idle latency (no queueing).
        """
        latency = self.dram_latency_ns if dram_latency_ns is None else dram_latency_ns
        p = KERNEL_PARAMS[Kernel(kernel)]
        if Kernel(kernel) is Kernel.IDLE:
            return 1.0
        warm = float(warm_fraction(elapsed_us, warmup_us))

        def cpi(apki: float) -> float:
            llc = apki * 1e-3 * self.llc_latency_ns[core] * freq_ghz / p.mlp
            dram = p.dram_mpki * 1e-3 * latency * freq_ghz / p.mlp
            return p.base_cpi + llc + dram

        apki_now = p.llc_apki + (p.cold_llc_apki - p.llc_apki) * (1.0 - warm)
        return cpi(apki_now) / cpi(p.llc_apki)
