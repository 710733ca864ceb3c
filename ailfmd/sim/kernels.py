"""Kernel classes of LFM inference and their micro-architectural parameters.

A thread of an inference request spends its time in a handful of kernel classes whose
behaviour on a core differs sharply: prefill matrix-matrix products are compute-bound,
decode matrix-vector products stream the weights from DRAM, attention walks the KV
cache, and normalisation/softmax/element-wise passes are short vector loops. Each class
gets one parameter record; the performance model (``perfmodel.py``) turns them into a
CPI stack and the power model uses the activity factor.

The numbers are estimates from first principles and public figures, explained per
field below and in ``docs/workloads.md`` ("Kernel classes"); they describe one thread
on an AVX2/AVX-512 server core running llama.cpp/oneDNN-style kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import IntEnum
from types import MappingProxyType
from typing import Mapping

import numpy as np

# A DRAM miss moves one cache line.
CACHE_LINE_BYTES = 64

# Fraction of its busy switching activity a core keeps while stalled on memory: the
# clock tree and pipeline latches keep toggling (the clock tree alone is commonly a
# quarter to a third of core dynamic power), the execution units do not.
STALL_ACTIVITY_FRACTION = 0.3


class Kernel(IntEnum):
    """What a core is executing. Values index the parameter arrays."""

    IDLE = 0
    PREFILL_GEMM = 1
    DECODE_GEMV = 2
    ATTENTION = 3
    NORM_ELEMENTWISE = 4
    SPIN_WAIT = 5

    @property
    def key(self) -> str:
        """Name used in data files (lower case, e.g. ``"prefill_gemm"``)."""
        return self.name.lower()


@dataclass(frozen=True)
class KernelParams:
    """Per-thread behaviour of one kernel class on one core.

    ``llc_apki`` counts every access that reaches the LLC, including those that then
    miss to DRAM (``dram_mpki``), so ``llc_apki >= dram_mpki``.
    """

    activity: float  # switching activity while issuing, 0..1 (GEMM = 1 reference)
    base_cpi: float  # core-only CPI with every access hitting the private caches
    llc_apki: float  # LLC accesses per kilo-instruction, warm private caches
    dram_mpki: float  # DRAM misses per kilo-instruction (default if a segment has none)
    mlp: float  # memory-level parallelism: outstanding misses overlapping one another
    cold_llc_apki: float  # LLC APKI right after a migration (private caches empty)
    bytes_per_miss: int = CACHE_LINE_BYTES

    def __post_init__(self) -> None:
        if not 0.0 <= self.activity <= 1.0:
            raise ValueError(f"activity must be in [0, 1], got {self.activity}")
        if self.base_cpi <= 0 or self.mlp <= 0:
            raise ValueError("base_cpi and mlp must be > 0")
        if not 0 <= self.dram_mpki <= self.llc_apki <= self.cold_llc_apki:
            raise ValueError("need 0 <= dram_mpki <= llc_apki <= cold_llc_apki")


# Why these values (details and sources in docs/workloads.md):
# - PREFILL_GEMM: cache-blocked GEMM (oneDNN, llama.cpp's tiled matmul) sustains IPC
#   2-3 on FMA/VNNI units, so base CPI 0.4. Weights are reused across the 512-token
#   micro-batch, leaving ~0.5 DRAM misses/kinst; blocking keeps tiles in L2, so few LLC
#   accesses (2 APKI), but a migrated thread must refill its L2 tiles (20 APKI cold).
# - DECODE_GEMV: every weight byte is used once per token. llama.cpp's Q8_0 dot product
#   retires ~10 instructions per 34-byte block (~0.3 instr/B), i.e. ~3.2 B/instr =
#   50 misses/kinst. Hardware prefetchers keep ~20 lines in flight (L1 fill buffers plus
#   the L2 streamer), which caps one core near 9 GB/s at 80 ns, as measured single-core
#   bandwidth on server parts is ~8-15 GB/s.
# - ATTENTION: decode attention reads K/V rows of every past token, strided per head
#   (ggml stores all heads of a position together), so prefetch depth is lower (MLP 8)
#   and many accesses hit the LLC for short contexts (40 APKI): the latency-sensitive
#   class. Its DRAM traffic depends on the model's GQA ratio, so segments carry their
#   own bytes; 20 MPKI is only the default.
# - NORM_ELEMENTWISE: RMSNorm, softmax, SiLU, RoPE, residual adds: vector loops over
#   activations that live in L2/LLC; exp/div keep base CPI near 0.6.
# - SPIN_WAIT: a thread waiting at a barrier spins (ggml_barrier, OpenMP active wait)
#   with PAUSE, ~140 cycles on Skylake-SP and later, so CPI is high, activity low.
# - IDLE: the core is halted; it executes nothing and has no dynamic activity.
KERNEL_PARAMS: Mapping[Kernel, KernelParams] = MappingProxyType(
    {
        Kernel.IDLE: KernelParams(
            activity=0.0, base_cpi=1.0, llc_apki=0.0, dram_mpki=0.0, mlp=1.0,
            cold_llc_apki=0.0,
        ),
        Kernel.PREFILL_GEMM: KernelParams(
            activity=1.0, base_cpi=0.4, llc_apki=2.0, dram_mpki=0.5, mlp=10.0,
            cold_llc_apki=20.0,
        ),
        Kernel.DECODE_GEMV: KernelParams(
            activity=0.8, base_cpi=0.4, llc_apki=55.0, dram_mpki=50.0, mlp=20.0,
            cold_llc_apki=62.0,
        ),
        Kernel.ATTENTION: KernelParams(
            activity=0.75, base_cpi=0.7, llc_apki=40.0, dram_mpki=20.0, mlp=8.0,
            cold_llc_apki=55.0,
        ),
        Kernel.NORM_ELEMENTWISE: KernelParams(
            activity=0.65, base_cpi=0.6, llc_apki=8.0, dram_mpki=1.0, mlp=6.0,
            cold_llc_apki=25.0,
        ),
        Kernel.SPIN_WAIT: KernelParams(
            activity=0.25, base_cpi=35.0, llc_apki=0.0, dram_mpki=0.0, mlp=1.0,
            cold_llc_apki=0.0,
        ),
    }
)


@dataclass(frozen=True)
class KernelTable:
    """The parameters of all kernel classes as arrays indexed by ``Kernel`` value."""

    activity: np.ndarray
    base_cpi: np.ndarray
    llc_apki: np.ndarray
    dram_mpki: np.ndarray
    mlp: np.ndarray
    cold_llc_apki: np.ndarray
    bytes_per_miss: np.ndarray
    executes: np.ndarray  # False for IDLE: a halted core retires nothing


def kernel_table(params: Mapping[Kernel, KernelParams] = KERNEL_PARAMS) -> KernelTable:
    """Pack per-class parameters into arrays for vectorised lookups."""
    missing = [k.name for k in Kernel if k not in params]
    if missing:
        raise ValueError(f"no parameters for kernel classes {missing}")
    columns = {
        f.name: np.array([float(getattr(params[k], f.name)) for k in Kernel])
        for f in fields(KernelParams)
    }
    executes = np.array([k is not Kernel.IDLE for k in Kernel])
    return KernelTable(executes=executes, **columns)


def kernel_by_key(key: str) -> Kernel:
    """The kernel class a data file names (``"decode_gemv"``); ``KeyError`` if unknown."""
    try:
        return Kernel[key.upper()]
    except KeyError:
        raise KeyError(key) from None


def kernel_keys() -> tuple[str, ...]:
    """Every data-file name of a kernel class, in enum order."""
    return tuple(k.key for k in Kernel)
