"""The engine's fast paths give the results of the plain ones: DTM sub-steps, steady
ticks, the DRAM fixed point."""

from __future__ import annotations

import numpy as np
import pytest

from ailfmd.sim.chip import load_chip
from ailfmd.sim.engine import Engine
from ailfmd.sim.governor import Dtm
from ailfmd.sim.substeps import ReferenceStepper, SubStepper
from ailfmd.sim.thermal import ThermalModel
from ailfmd.sim.workload import load_workload


def _all_busy(tmp_path):
    """4 x 16 threads of 13B prefill: every core of 3d-64 runs GEMM for seconds."""
    text = '[workload]\nsuite = "test"\n[arrivals]\nkind = "trace"\n'
    text += ('[[trace]]\narrival_s = 0.0\nprompt_tokens = 2048\noutput_tokens = 1\n'
             'model = "llama2-13b"\nthreads = 16\n') * 4
    path = tmp_path / "busy.toml"
    path.write_text(text)
    return load_workload(path)


@pytest.mark.parametrize("per_step", [False, True])
def test_sub_stepper_gives_the_plain_loops_relays_and_temperatures(per_step):
    """A hand-built hot chip with cores on both sides of the threshold: the in-place
    stepper and the plain loop agree exactly, sub-step by sub-step."""
    chip = load_chip("3d-64")
    thermal, dtm = ThermalModel(chip), Dtm(chip)
    rng = np.random.default_rng(7)
    # Core temperatures spread over the hysteresis band and a little beyond it.
    power = rng.uniform(0.5, 2.0, chip.n_cores)
    temps = thermal.steady_state(power)
    temps[: chip.n_cores] = rng.uniform(76.0, 82.0, chip.n_cores)
    modes = thermal.to_modes(temps)
    throttled = temps[: chip.n_cores] >= 79.0
    shape = (10, chip.n_cores) if per_step else (chip.n_cores,)
    p_free = rng.uniform(2.0, 6.0, shape)
    p_slow = 0.3 * p_free
    fast = SubStepper(dtm, thermal, chip.n_cores, 10, 0.001).run(modes, throttled, p_free, p_slow)
    plain = ReferenceStepper(dtm, thermal, chip.n_cores, 10, 0.001).run(modes, throttled, p_free, p_slow)
    states = plain[2]
    assert (states[1:] != states[:-1]).sum() >= 10  # relays flip in both directions
    assert (states[1:] & ~states[:-1]).any() and (~states[1:] & states[:-1]).any()
    for got, want in zip(fast, plain):
        np.testing.assert_array_equal(got, want)


def test_ten_ms_ticks_throttle_when_one_ms_ticks_do(tmp_path):
    """The first DTM throttle of a chip heating from idle happens at the same time,
    within the 1 ms resolution, in the 10 ms engine (sub-steps) and the 1 ms one."""
    chip = load_chip("3d-64")
    wl = _all_busy(tmp_path)
    fine = Engine(chip, wl, 0, 2.0, tick_s=0.001)
    while not fine.state.throttle_count.any():
        fine.advance(0.001)
    t_fine = fine.time_s
    first_fine = set(np.flatnonzero(fine.state.throttle_count).tolist())

    coarse = Engine(chip, wl, 0, 2.0)
    seen: list[np.ndarray] = []
    run = coarse.substeps.stepper.run

    def record(*args):
        out = run(*args)
        seen.append(out[2].copy())
        return out

    coarse.substeps.stepper.run = record
    while not coarse.state.throttle_count.any():
        seen.clear()
        coarse.advance(0.01)
    assert seen, "the tick that throttled was resolved in sub-steps"
    states = seen[-1]
    j = int(np.argmax((states[1:] & ~states[:-1]).any(axis=1)))
    t_coarse = coarse.time_s - 0.01 + (j + 1) * 0.001
    assert abs(t_coarse - t_fine) <= 0.001 + 1e-9
    first_coarse = set(np.flatnonzero(states[j + 1] & ~states[j]).tolist())
    assert first_coarse & first_fine


@pytest.mark.parametrize(("workload", "seed", "duration_s", "capped"),
                         [("bursty", 1, 10.0, False), ("mixed", 2, 10.0, False), ("mixed", 2, 10.0, True)])
def test_fast_paths_give_the_reference_results(workload, seed, duration_s, capped):
    """Steady ticks and the in-place sub-steps change the cost, not the results."""
    chip, wl = load_chip("3d-64"), load_workload(workload)
    runs = {}
    for reference in (False, True):
        eng = Engine(chip, wl, seed, duration_s, reference=reference)
        if capped:
            for cpu in range(chip.n_cores):
                eng.set_cap_khz(cpu, chip.vf.min_mhz * 1000)
        eng.advance(duration_s)
        runs[reference] = eng
    fast, ref = runs[False], runs[True]
    assert fast.state.steady_ticks > 0 and ref.state.steady_ticks == 0
    assert fast.state.substep_ticks == ref.state.substep_ticks
    if not capped:
        assert fast.state.substep_ticks > 100  # DTM is active most of the time
    a, b = fast.metrics().as_dict(), ref.metrics().as_dict()
    assert a.keys() == b.keys()
    for key in a:
        if a[key] is None or b[key] is None:
            assert a[key] is b[key], key
        else:
            assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12), key
    np.testing.assert_allclose(fast.state.temps_c, ref.state.temps_c, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(fast.state.throttle_count, ref.state.throttle_count)
    np.testing.assert_allclose(fast.thread_counters(), ref.thread_counters(), rtol=1e-9, atol=1e-6)


def test_snapshot_replays_through_steady_ticks():
    """What the steady path keeps is part of the state: a replay is identical."""
    eng = Engine(load_chip("3d-64"), load_workload("mixed"), 0, 20.0)
    eng.advance(4.0)
    snap = eng.snapshot()
    eng.advance(3.0)
    first = (eng.metrics(), eng.state.temps_c.copy(), eng.thread_counters(), eng.state.steady_ticks)
    eng.restore_snapshot(snap)
    eng.advance(3.0)
    second = (eng.metrics(), eng.state.temps_c.copy(), eng.thread_counters(), eng.state.steady_ticks)
    assert first[0] == second[0]
    np.testing.assert_array_equal(first[1], second[1])
    np.testing.assert_array_equal(first[2], second[2])
    assert first[3] == second[3] > snap.steady_ticks


def test_loaded_dram_latency_is_the_one_rates_reports():
    eng = Engine(load_chip("3d-64"), load_workload("mixed"), 0, 1.0)
    rng = np.random.default_rng(5)
    for _ in range(20):
        kernel = np.where(rng.random(64) < 0.5, rng.integers(1, 5, 64), 0)
        mpki = np.where(kernel > 0, rng.uniform(0.1, 60.0, 64), 0.0)
        f_ghz = rng.choice(eng.levels.freq_mhz, 64) * 1e-3
        want = eng.perf.rates(kernel, f_ghz, None, mpki).dram_latency_ns
        assert eng.perf.loaded_dram_latency_ns(kernel, f_ghz, mpki) == want
    idle = np.zeros(64, dtype=np.intp)
    assert eng.perf.loaded_dram_latency_ns(idle, np.ones(64), np.zeros(64)) == eng.perf.dram_latency_ns
