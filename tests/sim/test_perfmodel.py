"""CPI-stack performance model: DVFS response by kernel class, cache distance, shared
DRAM bandwidth and the migration warm-up penalty."""

from __future__ import annotations

import numpy as np
import pytest

from ailfmd.sim.kernels import KERNEL_PARAMS, Kernel, kernel_by_key, kernel_table
from ailfmd.sim.perfmodel import PerfModel, warm_fraction

LAYERS, ROWS, COLS = 4, 4, 4
N = LAYERS * ROWS * COLS
BW_GBPS = 128.0
CENTRE = 1 * 16 + 1 * 4 + 1  # layer 1, row 1, col 1
CORNER = 0  # layer 0, row 0, col 0


@pytest.fixture(scope="module")
def model() -> PerfModel:
    return PerfModel(LAYERS, ROWS, COLS, hop_h_cycles=6, hop_v_cycles=3, bank_cycles=8,
                     dram_latency_ns=80.0, dram_bandwidth_gbps=BW_GBPS)


def single(model: PerfModel, kernel: Kernel, core: int, freq_ghz: float, warm: float = 1.0):
    """Rates of one busy core on an otherwise idle chip."""
    kernels = np.full(N, Kernel.IDLE)
    kernels[core] = kernel
    warmth = np.ones(N)
    warmth[core] = warm
    return model.rates(kernels, np.full(N, freq_ghz), warmth)


def busy(model: PerfModel, kernel: Kernel, n_busy: int, freq_ghz: float = 4.0):
    kernels = np.full(N, Kernel.IDLE)
    kernels[:n_busy] = kernel
    return model.rates(kernels, np.full(N, freq_ghz))


def speedup_2_to_4_ghz(model: PerfModel, kernel: Kernel) -> float:
    fast = single(model, kernel, CENTRE, 4.0).ips[CENTRE]
    return fast / single(model, kernel, CENTRE, 2.0).ips[CENTRE]


def test_compute_bound_gemm_scales_linearly_with_frequency(model):
    assert speedup_2_to_4_ghz(model, Kernel.PREFILL_GEMM) >= 1.9


@pytest.mark.parametrize("kernel", [Kernel.DECODE_GEMV, Kernel.ATTENTION])
def test_memory_bound_kernels_scale_sub_linearly(model, kernel):
    assert speedup_2_to_4_ghz(model, kernel) <= 1.6


def test_kernel_classes_ordered_by_memory_boundedness(model):
    s = {k: speedup_2_to_4_ghz(model, k) for k in
         (Kernel.PREFILL_GEMM, Kernel.NORM_ELEMENTWISE, Kernel.ATTENTION, Kernel.DECODE_GEMV)}
    assert s[Kernel.PREFILL_GEMM] > s[Kernel.NORM_ELEMENTWISE] > s[Kernel.DECODE_GEMV]
    assert s[Kernel.PREFILL_GEMM] > s[Kernel.ATTENTION]


def test_llc_latency_is_fixed_in_ns_so_costs_more_core_cycles_at_high_clock(model):
    lo = single(model, Kernel.ATTENTION, CENTRE, 2.0)
    hi = single(model, Kernel.ATTENTION, CENTRE, 4.0)
    assert hi.cpi_llc[CENTRE] == pytest.approx(2 * lo.cpi_llc[CENTRE])
    assert hi.cpi_base[CENTRE] == lo.cpi_base[CENTRE]


@pytest.mark.parametrize("kernel", [Kernel.DECODE_GEMV, Kernel.ATTENTION, Kernel.NORM_ELEMENTWISE])
def test_memory_bound_kernels_run_faster_on_the_central_core(model, kernel):
    assert model.llc_latency_ns[CENTRE] < model.llc_latency_ns[CORNER]
    centre = single(model, kernel, CENTRE, 3.0).ips[CENTRE]
    corner = single(model, kernel, CORNER, 3.0).ips[CORNER]
    assert centre > corner * 1.01


def test_compute_bound_kernel_barely_cares_about_cache_distance(model):
    centre = single(model, Kernel.PREFILL_GEMM, CENTRE, 3.0).ips[CENTRE]
    corner = single(model, Kernel.PREFILL_GEMM, CORNER, 3.0).ips[CORNER]
    assert centre >= corner
    assert centre / corner < 1.01


def test_cpi_stack_is_consistent(model):
    rng = np.random.default_rng(7)
    kernels = rng.integers(0, len(Kernel), N)
    freq = rng.uniform(1.0, 4.0, N)
    r = model.rates(kernels, freq, rng.uniform(0, 1, N))
    running = kernels != Kernel.IDLE
    np.testing.assert_allclose(r.cpi, r.cpi_base + r.cpi_llc + r.cpi_dram)
    np.testing.assert_allclose(r.ips[running], freq[running] * 1e9 / r.cpi[running])
    mpki = kernel_table().dram_mpki[kernels]
    np.testing.assert_allclose(r.dram_bytes_per_s, r.ips * mpki / 1000 * 64)
    assert np.all(r.ips[~running] == 0) and np.all(r.dram_bytes_per_s[~running] == 0)
    assert np.all(r.activity[~running] == 0)
    assert np.all((r.activity >= 0) & (r.activity <= 1))


def test_single_core_decode_bandwidth_is_plausible(model):
    # Server cores sustain roughly 5-15 GB/s each from DRAM (fill-buffer limited).
    r = single(model, Kernel.DECODE_GEMV, CENTRE, 3.0)
    assert 5e9 < r.dram_bytes_per_s[CENTRE] < 15e9
    assert r.dram_latency_ns < 85.0  # one core barely queues


@pytest.mark.parametrize("kernel", [Kernel.DECODE_GEMV, Kernel.ATTENTION])
def test_dram_demand_never_exceeds_bandwidth(model, kernel):
    for n_busy in range(1, N + 1):
        for freq in (1.0, 2.5, 4.0):
            r = busy(model, kernel, n_busy, freq)
            assert r.total_dram_bytes_per_s <= BW_GBPS * 1e9
            assert r.dram_utilisation < 1.0
            assert r.total_dram_bytes_per_s == pytest.approx(r.dram_utilisation * BW_GBPS * 1e9)


def test_random_mixes_respect_bandwidth_with_huge_miss_rates(model):
    rng = np.random.default_rng(3)
    for _ in range(200):
        kernels = rng.integers(0, len(Kernel), N)
        mpki = rng.uniform(0, 300, N)
        r = model.rates(kernels, rng.uniform(1, 4, N), rng.uniform(0, 1, N), mpki)
        assert r.total_dram_bytes_per_s <= BW_GBPS * 1e9
        assert np.all(np.isfinite(r.ips)) and np.all(r.ips >= 0)


def test_adding_cores_past_saturation_adds_little_throughput(model):
    per_core = single(model, Kernel.DECODE_GEMV, 0, 4.0).dram_bytes_per_s[0]
    n_sat = int(np.ceil(BW_GBPS * 1e9 / per_core))
    assert 4 < n_sat < N  # decode saturates DRAM with a minority of the cores
    total = [busy(model, Kernel.DECODE_GEMV, n).ips.sum() for n in range(1, N + 1)]
    assert all(b >= a * (1 - 1e-9) for a, b in zip(total, total[1:]))  # never worse
    # Queueing makes the knee soft (~80 % utilisation at n_sat); from twice that many
    # cores on, the rest of the chip adds well under 10 %.
    assert total[N - 1] < 1.1 * total[2 * n_sat - 1]
    bytes_per_instr = KERNEL_PARAMS[Kernel.DECODE_GEMV].dram_mpki / 1000 * 64
    assert total[N - 1] * bytes_per_instr <= BW_GBPS * 1e9
    # ... whereas below saturation cores add throughput almost linearly.
    assert total[1] > 1.9 * total[0]


def test_loaded_latency_rises_with_utilisation(model):
    lat = [busy(model, Kernel.DECODE_GEMV, n).dram_latency_ns for n in (1, 8, 16, 32, 64)]
    assert all(b > a for a, b in zip(lat, lat[1:]))
    assert lat[0] == pytest.approx(80.0, rel=0.05)


def test_gemm_cores_are_slowed_when_decode_saturates_dram(model):
    alone = single(model, Kernel.PREFILL_GEMM, CENTRE, 3.0).ips[CENTRE]
    kernels = np.full(N, Kernel.DECODE_GEMV)
    kernels[CENTRE] = Kernel.PREFILL_GEMM
    shared = model.rates(kernels, np.full(N, 3.0)).ips[CENTRE]
    assert shared < alone
    assert shared > 0.8 * alone  # GEMM rarely misses, so the queue hurts it little


def test_segment_miss_rate_overrides_class_default(model):
    kernels = np.full(N, Kernel.IDLE)
    kernels[CENTRE] = Kernel.ATTENTION
    freq = np.full(N, 3.0)
    low = np.zeros(N)
    low[CENTRE] = 2.0
    high = np.zeros(N)
    high[CENTRE] = 120.0
    r_low = model.rates(kernels, freq, None, low)
    r_high = model.rates(kernels, freq, None, high)
    assert r_high.ips[CENTRE] < r_low.ips[CENTRE]
    assert r_high.dram_bytes_per_s[CENTRE] / r_high.ips[CENTRE] == pytest.approx(120 * 64 / 1000)


def test_memory_stalls_lower_the_switching_activity(model):
    gemv_lo = single(model, Kernel.DECODE_GEMV, CENTRE, 2.0).activity[CENTRE]
    gemv_hi = single(model, Kernel.DECODE_GEMV, CENTRE, 4.0).activity[CENTRE]
    gemm_hi = single(model, Kernel.PREFILL_GEMM, CENTRE, 4.0).activity[CENTRE]
    assert gemv_hi < gemv_lo < gemm_hi
    assert gemm_hi > 0.9 * KERNEL_PARAMS[Kernel.PREFILL_GEMM].activity


@pytest.mark.parametrize("kernel", [Kernel.PREFILL_GEMM, Kernel.DECODE_GEMV, Kernel.ATTENTION,
                                    Kernel.NORM_ELEMENTWISE])
def test_just_migrated_thread_runs_slower(model, kernel):
    cold = single(model, kernel, CENTRE, 3.0, warm=0.0).ips[CENTRE]
    half = single(model, kernel, CENTRE, 3.0, warm=0.5).ips[CENTRE]
    warm = single(model, kernel, CENTRE, 3.0, warm=1.0).ips[CENTRE]
    assert cold < half < warm


def test_warmup_penalty_vanishes_after_the_warmup(model):
    warmup_us = 20.0
    slow = [model.migration_slowdown(Kernel.PREFILL_GEMM, CENTRE, 3.0, t, warmup_us)
            for t in (0.0, 5.0, 10.0, 19.0)]
    assert slow[0] > 1.05
    assert all(b < a for a, b in zip(slow, slow[1:]))
    for t in (20.0, 50.0, np.inf):
        assert model.migration_slowdown(Kernel.PREFILL_GEMM, CENTRE, 3.0, t, warmup_us) == 1.0
    assert model.migration_slowdown(Kernel.IDLE, CENTRE, 3.0, 0.0, warmup_us) == 1.0
    np.testing.assert_allclose(warm_fraction(np.array([0.0, 10.0, 20.0, 99.0]), 20.0),
                               [0.0, 0.5, 1.0, 1.0])
    assert warm_fraction(0.0, 0.0) == 1.0  # no warm-up configured: never cold


def test_slowdown_matches_rates(model):
    cold = single(model, Kernel.NORM_ELEMENTWISE, CENTRE, 3.0, warm=0.25).ips[CENTRE]
    warm = single(model, Kernel.NORM_ELEMENTWISE, CENTRE, 3.0).ips[CENTRE]
    slowdown = model.migration_slowdown(Kernel.NORM_ELEMENTWISE, CENTRE, 3.0, 5.0, 20.0)
    assert slowdown == pytest.approx(warm / cold, rel=1e-3)


def test_wrong_shapes_are_refused(model):
    with pytest.raises(ValueError):
        model.rates(np.zeros(3, dtype=int), np.ones(3))


def test_kernel_keys_round_trip():
    for kernel in Kernel:
        assert kernel_by_key(kernel.key) is kernel
    with pytest.raises(KeyError):
        kernel_by_key("softmax")
