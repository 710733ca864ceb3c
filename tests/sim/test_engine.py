"""Behaviour of the simulation engine: DTM, time sharing, barriers, migration, accuracy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ailfmd.sim.chip import load_chip
from ailfmd.sim.engine import Engine
from ailfmd.sim.governor import Dtm, VfLevels
from ailfmd.sim.kernels import Kernel
from ailfmd.sim.scheduler import COUNTER
from ailfmd.sim.workload import load_workload


def trace_workload(tmp_path: Path, rows: list[dict], name: str = "trace"):
    """A trace stream written to ``tmp_path`` (models come from the shipped profiles)."""
    text = '[workload]\nsuite = "test"\n[arrivals]\nkind = "trace"\n'
    for r in rows:
        text += "[[trace]]\n" + "".join(
            f"{k} = {v!r}\n".replace("'", '"') for k, v in r.items())
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return load_workload(path)


def request(arrival_s=0.0, prompt=512, output=4, threads=1, model="tinyllama-1.1b") -> dict:
    return {"arrival_s": arrival_s, "prompt_tokens": prompt, "output_tokens": output,
            "model": model, "threads": threads}


def pin(engine: Engine, row: int, core: int) -> None:
    mask = np.zeros(engine.n_cores, dtype=bool)
    mask[core] = True
    engine.set_affinity(row, mask)


def cap_all(engine: Engine, level: int) -> None:
    khz = int(engine.levels.freq_khz[level])
    for cpu in range(engine.n_cores):
        engine.set_cap_khz(cpu, khz)


# --------------------------------------------------------------------------- governor/DTM


def test_caps_map_to_the_highest_table_level_at_or_below_them():
    levels = VfLevels(load_chip("3d-64"))  # 1.0-4.0 GHz in 200 MHz steps
    caps = np.array([4_000_000, 3_999_999, 3_000_000, 1_100_000, 999_999, 10, 9_000_000])
    assert levels.freq_khz[levels.levels_for_caps(caps)].tolist() == [
        4_000_000, 3_800_000, 3_000_000, 1_000_000, 1_000_000, 1_000_000, 4_000_000]
    assert levels.clamp_cap(2_100_000) == (2_000_000, "rounded down to table entry 2000000 kHz")
    assert levels.clamp_cap(10)[0] == 1_000_000
    assert levels.clamp_cap(5_000_000)[0] == 4_000_000


def test_dtm_relay_throttles_at_threshold_and_releases_only_below_hysteresis():
    chip = load_chip("3d-64")  # 80 C, hysteresis 2 C
    dtm = Dtm(chip)
    state = np.zeros(1, dtype=bool)
    path = [79.9, 80.0, 79.0, 78.0, 78.01, 77.99, 79.99, 80.5]
    seen = []
    for t in path:
        state = dtm.update(state, np.array([t]))
        seen.append(bool(state[0]))
    assert seen == [False, True, True, True, True, False, False, True]


def test_hot_cores_are_throttled_at_threshold_and_released_below_hysteresis(tmp_path):
    """Every core of a fully busy 3D chip, watched at each 1 ms tick."""
    chip = load_chip("3d-64")
    eng = Engine(chip, _all_busy(tmp_path), 0, 5.0, tick_s=0.001)
    temps, throttled, freqs = [], [], []
    for _ in range(400):
        eng.advance(0.001)
        temps.append(eng.state.temps_c.copy())
        throttled.append(eng.state.throttled.copy())
        freqs.append(eng.current_freq_mhz())
    temps, throttled, freqs = np.array(temps), np.array(throttled), np.array(freqs)
    threshold, release = chip.dtm.threshold_c, chip.dtm.threshold_c - chip.dtm.hysteresis_c
    assert np.all(throttled[temps >= threshold])  # at or above the threshold: throttled
    assert np.all(~throttled[temps < release])  # below the release point: free
    # In between, a core keeps the state it had: throttled ones stay throttled while
    # they cool through the band, free ones stay free while they heat through it.
    band = (temps[1:] >= release) & (temps[1:] < threshold)
    assert np.all(throttled[1:][band] == throttled[:-1][band])
    assert throttled[1:][band].any() and (~throttled[1:][band]).any()
    assert np.all(freqs[throttled] == chip.vf.min_mhz)
    assert np.all(freqs[~throttled] == chip.vf.max_mhz)  # busy and uncapped


def _all_busy(tmp_path):
    # 4 x 16 threads of 13B prefill: every core of 3d-64 runs GEMM for seconds.
    return trace_workload(tmp_path, [request(prompt=2048, output=1, threads=16, model="llama2-13b")
                                     for _ in range(4)], "busy")


def test_all_cores_busy_at_max_vf_hits_dtm_on_the_3d_chip(tmp_path):
    eng = Engine(load_chip("3d-64"), _all_busy(tmp_path), 0, 3.0)
    eng.advance(1.0)
    assert np.all(eng.busy_cores())
    m = eng.metrics()
    assert m.peak_temp_c >= 80.0
    assert m.time_above_dtm_s > 0.1
    assert m.dtm_throttle_events > 0
    assert eng.state.throttle_count.sum() == m.dtm_throttle_events


def test_all_cores_busy_at_lowest_level_stays_below_dtm(tmp_path):
    eng = Engine(load_chip("3d-64"), _all_busy(tmp_path), 0, 3.0)
    cap_all(eng, 0)
    eng.advance(3.0)
    assert np.all(eng.busy_cores())
    m = eng.metrics()
    assert m.peak_temp_c < 80.0
    assert m.time_above_dtm_s == 0.0 and m.dtm_throttle_events == 0
    assert m.mean_busy_freq_mhz == pytest.approx(1000.0)


# --------------------------------------------------------------------------- scheduler


def test_new_threads_spread_over_distinct_cores(tmp_path):
    wl = trace_workload(tmp_path, [request(threads=16), request(threads=16)])
    eng = Engine(load_chip("3d-64"), wl, 0, 1.0)
    eng.advance(0.01)
    cores = eng.state.threads.core
    assert len(cores) == 32 and len(set(cores.tolist())) == 32


def test_time_sharing_halves_per_thread_progress(tmp_path):
    """Two identical compute-bound threads: alone on two cores vs sharing one."""
    wl = trace_workload(tmp_path, [request(prompt=2000, output=1), request(prompt=2000, output=1)])

    def instructions(shared: bool) -> np.ndarray:
        eng = Engine(load_chip("tiny"), wl, 0, 2.0)
        cap_all(eng, 5)  # 2 GHz: far from DTM on the small chip
        eng.advance(0.01)
        pin(eng, 0, 0)
        pin(eng, 1, 0 if shared else 1)
        eng.advance(0.01)
        before = eng.thread_counters()[:, COUNTER["instructions"]]
        eng.advance(0.2)
        after = eng.thread_counters()
        assert not eng.state.throttled.any()
        return after[:, COUNTER["instructions"]] - before, after

    alone, _ = instructions(False)
    shared, counters = instructions(True)
    assert shared / alone == pytest.approx([0.5, 0.5], rel=0.01)
    # Each waited for the core as long as it ran (schedstat wait_ns ~ run_ns).
    assert counters[:, COUNTER["wait_ns"]] == pytest.approx(counters[:, COUNTER["run_ns"]] - 0.01e9, rel=0.1)


def test_affinity_change_migrates_and_pays_the_cache_warm_up(tmp_path):
    wl = trace_workload(tmp_path, [request(prompt=2000, output=1)])
    eng = Engine(load_chip("tiny"), wl, 0, 2.0)
    cap_all(eng, 5)
    eng.advance(0.01)
    old = int(eng.state.threads.core[0])
    target = (old + 1) % eng.n_cores
    snap = eng.snapshot()
    before = eng.thread_counters()[0, COUNTER["instructions"]]
    assert eng.set_affinity(0, np.eye(eng.n_cores, dtype=bool)[target])
    assert eng.state.threads.core[0] == target
    penalty_s = float(eng.state.threads.penalty_s[0])
    # W (1 - ln s0 / (s0 - 1)) with s0 the slowdown right after the move.
    s0 = eng.perf.migration_slowdown(Kernel.PREFILL_GEMM, target, 2.0, 0.0, eng.chip.migration.warmup_us)
    assert s0 > 1.0
    assert penalty_s == pytest.approx(20e-6 * (1 - np.log(s0) / (s0 - 1)), rel=1e-9)
    assert eng.take_counter_deltas()[0, COUNTER["cpu_migrations"]] == 1
    eng.advance(0.01)
    slowed = eng.thread_counters()[0, COUNTER["instructions"]] - before

    eng.restore_snapshot(snap)
    eng.set_affinity(0, np.eye(eng.n_cores, dtype=bool)[target])
    eng.state.threads.penalty_s[0] = 0.0  # the same move without the warm-up
    eng.advance(0.01)
    free = eng.thread_counters()[0, COUNTER["instructions"]] - before
    assert free - slowed == pytest.approx(penalty_s * free / 0.01, rel=0.02)


def test_a_slow_thread_holds_its_request_at_every_step_barrier(tmp_path):
    """One of two threads on a core capped to 1 GHz: the fast one sleeps at barriers."""
    wl = trace_workload(tmp_path, [request(prompt=64, output=40, threads=2)])

    def run(slow_cap_level: int, fast_cap_level: int):
        eng = Engine(load_chip("tiny"), wl, 0, 5.0)
        eng.advance(0.01)
        a, b = (int(c) for c in eng.state.threads.core)
        eng.set_cap_khz(a, int(eng.levels.freq_khz[slow_cap_level]))
        eng.set_cap_khz(b, int(eng.levels.freq_khz[fast_cap_level]))
        counters = None
        while not eng.metrics().requests_completed:
            counters = eng.thread_counters()
            eng.advance(0.01)
        return eng.metrics().mean_response_s, counters

    both_slow, _ = run(0, 0)
    mixed, counters = run(0, 15)
    both_fast, _ = run(15, 15)
    assert both_fast < 0.8 * both_slow
    # The request goes at the pace of its slowest thread...
    assert mixed == pytest.approx(both_slow, rel=0.05)
    # ... and the fast thread spends the difference asleep at the barriers.
    run_ns = counters[:, COUNTER["run_ns"]]
    assert run_ns[1] < 0.8 * run_ns[0]
    assert counters[1, COUNTER["context_switches"]] >= 30  # about one sleep per step


# --------------------------------------------------------------------------- consistency


def test_engine_cpi_stack_and_power_match_the_physics_modules(tmp_path):
    """The closed-form progress uses PerfModel.rates' CPI stack and activity law, and
    the DTM sub-steps PowerModel's tile power."""
    eng = Engine(load_chip("3d-64"), trace_workload(tmp_path, [request()]), 0, 1.0)
    rng = np.random.default_rng(3)
    kernel = rng.integers(0, 5, eng.n_cores)
    freq_mhz = rng.choice(eng.levels.freq_mhz, eng.n_cores)
    mpki = np.where(kernel > 0, rng.uniform(0.1, 60.0, eng.n_cores), 0.0)
    rates = eng.perf.rates(kernel, freq_mhz * 1e-3, None, mpki)
    activity = eng._activity(kernel, mpki, rates.dram_latency_ns, freq_mhz)
    assert activity == pytest.approx(rates.activity, rel=1e-12)
    kt = eng.perf.kernels
    apki = (kt.llc_apki - kt.dram_mpki)[kernel] + mpki
    tpi_ns = (kt.base_cpi[kernel] / (freq_mhz * 1e-3)
              + eng.perf.llc_latency_ns * 1e-3 * apki / kt.mlp[kernel]
              + rates.dram_latency_ns * 1e-3 * mpki / kt.mlp[kernel])
    busy = kernel > 0
    assert 1e9 / tpi_ns[busy] == pytest.approx(rates.ips[busy], rel=1e-12)
    # The per-level power coefficients used in DTM sub-steps are PowerModel's.
    table = eng._power_table
    level = rng.integers(0, len(eng.levels.freq_mhz), eng.n_cores)
    temps_c = rng.uniform(45.0, 95.0, eng.n_cores)
    by_table = (table.constant_w + activity * table.dynamic_w_per_activity[level]
                + table.leakage_w_at_ref[level] * table.heat_factor(temps_c))
    assert by_table == pytest.approx(
        eng.power.tile_power_w(activity, eng.levels.freq_mhz[level], temps_c), rel=1e-12)


def test_no_work_is_lost_at_segment_and_step_boundaries(tmp_path):
    """Away from DTM the tick size must not change when requests finish."""
    wl = trace_workload(tmp_path, [request(prompt=700, output=30, threads=4),
                                   request(arrival_s=0.013, prompt=40, output=60, threads=3)])
    done = {}
    for tick_s in (0.01, 0.001):
        eng = Engine(load_chip("3d-64"), wl, 0, 10.0, tick_s=tick_s)
        cap_all(eng, 0)
        times = []
        while len(times) < 2:
            eng.advance(tick_s)
            times = eng.state.metrics.response_s
        done[tick_s] = sorted(times)
    assert done[0.01] == pytest.approx(done[0.001], rel=2e-3)


def test_idle_chip_stays_at_its_idle_steady_state(tmp_path):
    eng = Engine(load_chip("3d-64"), trace_workload(tmp_path, [request(arrival_s=50.0)]), 0, 60.0)
    temps0 = eng.state.temps_c.copy()
    eng.advance(2.0)
    assert eng.state.temps_c == pytest.approx(temps0, abs=1e-6)
    idle_w = eng.power.idle_tile_power_w(temps0).sum()
    assert eng.metrics().energy_j == pytest.approx(idle_w * 2.0, rel=1e-6)


@pytest.mark.parametrize(("workload", "seed", "duration_s"), [("bursty", 1, 20.0), ("tiny-test", 0, 8.0)])
def test_ten_ms_ticks_match_one_ms_reference(workload, seed, duration_s):
    """The default tick resolves DTM in 1 ms sub-steps: same peak and throughput."""
    chip, wl = load_chip("3d-64"), load_workload(workload)
    results = {}
    for tick_s in (0.01, 0.001):
        eng = Engine(chip, wl, seed, duration_s, tick_s=tick_s)
        eng.advance(duration_s)
        results[tick_s] = eng.metrics()
    coarse, fine = results[0.01], results[0.001]
    assert fine.time_above_dtm_s > 1.0  # the scenario exercises DTM
    assert fine.requests_completed >= 10
    assert abs(coarse.peak_temp_c - fine.peak_temp_c) <= 1.0
    assert coarse.requests_completed == fine.requests_completed
    assert coarse.mean_response_s == pytest.approx(fine.mean_response_s, rel=0.03)
    assert coarse.output_tokens_per_s == pytest.approx(fine.output_tokens_per_s, rel=0.03)
    assert coarse.energy_j == pytest.approx(fine.energy_j, rel=0.02)
    assert coarse.time_above_dtm_s == pytest.approx(fine.time_above_dtm_s, rel=0.1)


def test_tokens_and_response_times_are_counted_per_request():
    wl = load_workload("tiny-trace")  # six explicit requests
    eng = Engine(load_chip("tiny"), wl, 0, 5.0)
    eng.advance(5.0)
    m = eng.metrics()
    assert m.requests_arrived == m.requests_completed == 6 and m.requests_in_flight == 0
    assert m.output_tokens == sum(r.output_tokens for r in wl.trace)
    assert m.prefill_tokens == sum(r.prompt_tokens for r in wl.trace)
    responses = np.array(eng.state.metrics.response_s)
    assert np.all(responses > 0)
    assert m.mean_response_s == pytest.approx(responses.mean())
    assert m.p99_response_s == pytest.approx(np.percentile(responses, 99))
