"""The engine's fast paths give the results of the plain ones: DTM sub-steps, steady
ticks, the DRAM fixed point, and the compiled kernels (numba) against the numpy path."""

from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from ailfmd.sim import jit
from ailfmd.sim.chip import load_chip
from ailfmd.sim.engine import Engine
from ailfmd.sim.governor import Dtm
from ailfmd.sim.substeps import ReferenceStepper, SubStepper
from ailfmd.sim.thermal import ThermalModel
from ailfmd.sim.workload import load_workload

HAVE_NUMBA = importlib.util.find_spec("numba") is not None
needs_numba = pytest.mark.skipif(not HAVE_NUMBA, reason="numba is not installed (extra 'fast')")
# Both ways of running the fast paths: the numpy path and the compiled kernels.
PATHS = [pytest.param(False, id="numpy"), pytest.param(True, id="compiled", marks=needs_numba)]


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


@pytest.mark.parametrize("compiled", PATHS)
def test_ten_ms_ticks_throttle_when_one_ms_ticks_do(tmp_path, compiled):
    """The first DTM throttle of a chip heating from idle happens at the same time,
    within the 1 ms resolution, in the 10 ms engine (sub-steps) and the 1 ms one."""
    chip = load_chip("3d-64")
    wl = _all_busy(tmp_path)
    fine = Engine(chip, wl, 0, 2.0, tick_s=0.001, compiled=compiled)
    while not fine.state.throttle_count.any():
        fine.advance(0.001)
    t_fine = fine.time_s
    first_fine = set(np.flatnonzero(fine.state.throttle_count).tolist())

    coarse = Engine(chip, wl, 0, 2.0, compiled=compiled)
    seen: list[np.ndarray] = []
    resolve = coarse.substeps.resolve

    def record(*args):
        out = resolve(*args)
        seen.append(coarse.substeps.states.copy())
        return out

    coarse.substeps.resolve = record
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


@pytest.mark.parametrize("compiled", PATHS)
@pytest.mark.parametrize(("workload", "seed", "duration_s", "capped"),
                         [("bursty", 1, 10.0, False), ("mixed", 2, 10.0, False), ("mixed", 2, 10.0, True)])
def test_fast_paths_give_the_reference_results(workload, seed, duration_s, capped, compiled):
    """Steady ticks, the in-place sub-steps and the compiled kernels change the cost,
    not the results."""
    chip, wl = load_chip("3d-64"), load_workload(workload)
    runs = {}
    for reference in (False, True):
        eng = Engine(chip, wl, seed, duration_s, reference=reference, compiled=compiled)
        if capped:
            for cpu in range(chip.n_cores):
                eng.set_cap_khz(cpu, chip.vf.min_mhz * 1000)
        eng.advance(duration_s)
        runs[reference] = eng
    fast, ref = runs[False], runs[True]
    assert (fast.compiled is not None) == compiled and ref.compiled is None
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


def _assert_same_run(a: Engine, b: Engine, rel: float = 1e-9) -> None:
    """Two engines that ran the same scenario reached the same state, to rounding."""
    ma, mb = a.metrics().as_dict(), b.metrics().as_dict()
    for key in ma:
        if ma[key] is None or mb[key] is None:
            assert ma[key] is mb[key], key
        else:
            assert ma[key] == pytest.approx(mb[key], rel=rel, abs=1e-12), key
    sa, sb = a.state, b.state
    np.testing.assert_allclose(sa.temps_c, sb.temps_c, rtol=0, atol=1e-9)
    np.testing.assert_allclose(sa.modes, sb.modes, rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(sa.throttled, sb.throttled)
    np.testing.assert_array_equal(sa.throttle_count, sb.throttle_count)
    np.testing.assert_array_equal(sa.threads.tid, sb.threads.tid)
    np.testing.assert_array_equal(sa.threads.seg, sb.threads.seg)
    np.testing.assert_array_equal(sa.threads.core, sb.threads.core)
    np.testing.assert_allclose(a.thread_counters(), b.thread_counters(), rtol=rel, atol=1e-6)
    assert (sa.substep_ticks, sa.steady_ticks) == (sb.substep_ticks, sb.steady_ticks)
    assert sa.dram_ns == pytest.approx(sb.dram_ns, rel=1e-12)


@needs_numba
@pytest.mark.parametrize(("workload", "seed", "duration_s"),
                         [("mixed", 0, 20.0), ("decode-heavy", 1, 15.0), ("bursty", 2, 10.0),
                          ("tiny-test", 0, 5.0)])
def test_compiled_kernels_give_the_numpy_paths_results(workload, seed, duration_s):
    """A whole run under hardware DTM: every tick path, both sub-step shapes, arrivals,
    barriers and completions; the compiled kernels and the numpy path agree to rounding."""
    chip, wl = load_chip("3d-64"), load_workload(workload)
    runs = [Engine(chip, wl, seed, duration_s, compiled=c) for c in (True, False)]
    for eng in runs:
        eng.advance(duration_s)
    fast, plain = runs
    assert fast.compiled is not None and plain.compiled is None
    assert fast.state.substep_ticks > 100 and fast.state.steady_ticks > 0
    assert fast.metrics().requests_completed > 0
    _assert_same_run(fast, plain)


@needs_numba
def test_compiled_kernels_follow_migrations_and_time_sharing():
    """Affinity changes crowd threads onto few cores (time sharing, CFS slices) and move
    them (warm-up penalties, some longer than a tick): both paths stay together."""
    chip, wl = load_chip("3d-64"), load_workload("mixed")
    runs = [Engine(chip, wl, 3, 12.0, compiled=c) for c in (True, False)]
    rng = np.random.default_rng(11)
    for epoch in range(120):
        cpus = np.zeros(chip.n_cores, dtype=bool)
        if epoch % 10 == 3:
            cpus[rng.choice(chip.n_cores, 3, replace=False)] = True
        elif epoch % 10 == 7:
            cpus[:] = True
        for eng in runs:
            rows = np.arange(len(eng.state.threads))
            for row in rows[:: 2] if cpus.any() else ():
                eng.set_affinity(int(row), cpus)
            if epoch == 50:
                for cpu in range(0, chip.n_cores, 2):
                    eng.set_cap_khz(cpu, 2_000_000)
            if epoch == 30:
                # Warm-ups longer than a tick (real ones last microseconds): threads
                # that cannot pay theirs off stay where they are.
                eng.state.threads.penalty_s[::3] = 0.025
            eng.advance(0.1)
        _assert_same_run(*runs)
    fast = runs[0]
    assert fast.metrics().migrations > 20
    assert fast.state.threads.switches.sum() > 0


@needs_numba
@pytest.mark.parametrize("per_step", [False, True])
def test_compiled_sub_steps_give_the_numpy_relays_and_temperatures(per_step):
    """One sub-stepped tick from a hot chip with relays chattering: the same relay states
    sub-step by sub-step, temperatures and energy to rounding."""
    chip, wl = load_chip("3d-64"), load_workload("mixed")
    engines = [Engine(chip, wl, 0, 10.0, compiled=c) for c in (True, False)]
    engines[1].advance(4.0)
    st = engines[1].state
    ck = st.clocks or engines[1]._clocks(st)
    rng = np.random.default_rng(3)
    dyn2 = np.stack([rng.uniform(4.0, 9.0, chip.n_cores), rng.uniform(0.5, 2.0, chip.n_cores)])
    busy = (rng.uniform(0.0, 1.0, (engines[0].sub_steps, chip.n_cores)) if per_step
            else rng.uniform(0.0, 1.0, chip.n_cores))
    st.temps_c[:] = rng.uniform(76.0, 82.0, chip.n_cores)
    st.throttled[:] = st.temps_c >= 79.0
    out, states = [], []
    for eng in engines:
        mine = copy.deepcopy(st)
        out.append((eng.substeps.resolve(mine, ck, dyn2, busy), mine))
        states.append(eng.substeps.states.copy())
    np.testing.assert_array_equal(states[0], states[1])
    assert (states[0][1:] != states[0][:-1]).sum() >= 10  # relays flip
    (frac_a, slow_a, acc_a), sa = out[0]
    (frac_b, slow_b, acc_b), sb = out[1]
    np.testing.assert_array_equal(frac_a, frac_b)
    np.testing.assert_allclose(slow_a, slow_b, rtol=1e-14, atol=0)
    assert acc_a[0] == pytest.approx(acc_b[0], rel=1e-13)
    assert acc_a[1:] == pytest.approx(acc_b[1:], rel=1e-13)
    np.testing.assert_allclose(sa.temps_c, sb.temps_c, rtol=0, atol=1e-11)
    np.testing.assert_array_equal(sa.throttle_count, sb.throttle_count)
    assert sa.dtm_active == sb.dtm_active


def test_the_numpy_path_can_be_forced(monkeypatch):
    chip, wl = load_chip("tiny"), load_workload("tiny-test")
    monkeypatch.setenv(jit.ENV_VAR, "0")
    assert Engine(chip, wl, 0, 1.0).compiled is None
    assert Engine(chip, wl, 0, 1.0, compiled=False).compiled is None
    assert Engine(chip, wl, 0, 1.0, reference=True, compiled=True).compiled is None
    if HAVE_NUMBA:
        assert Engine(chip, wl, 0, 1.0, compiled=True).compiled is not None
        monkeypatch.delenv(jit.ENV_VAR)
        assert Engine(chip, wl, 0, 1.0).compiled is not None


def test_without_numba_the_numpy_path_runs():
    """numba is optional: without it every module imports and the engine runs on numpy."""
    code = (
        "import sys; sys.modules['numba'] = None\n"
        "import importlib, pkgutil, ailfmd.sim\n"
        "[importlib.import_module(m.name) for m in pkgutil.walk_packages(ailfmd.sim.__path__, 'ailfmd.sim.')]\n"
        "from ailfmd.sim import jit\n"
        "from ailfmd.sim.chip import load_chip\n"
        "from ailfmd.sim.engine import Engine\n"
        "from ailfmd.sim.workload import load_workload\n"
        "eng = Engine(load_chip('tiny'), load_workload('tiny-test'), 0, 1.0)\n"
        "eng.advance(1.0)\n"
        "assert eng.compiled is None and eng.metrics().requests_arrived > 0\n"
        "try:\n"
        "    jit.load(True)\n"
        "except ImportError as e:\n"
        "    assert 'numba' in str(e)\n"
        "else:\n"
        "    raise AssertionError('compiled kernels without numba')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@needs_numba
def test_compiled_kernels_load_without_a_writable_cache():
    """With no place numba may cache in (read-only package, no writable home), the
    kernels are still built, uncached, instead of failing at import."""
    code = (
        "from numba.core import caching\n"
        "impl = getattr(caching, 'CacheImpl', None) or getattr(caching, '_CacheImpl')\n"
        "impl._locator_classes = []  # numba finds no writable cache location\n"
        "from ailfmd.sim import jit\n"
        "kernels = jit.load(True)\n"
        "assert type(kernels.substep_tick._cache).__name__ == 'NullCache'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
