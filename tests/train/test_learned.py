"""The learned policy's input building and action decoding (shared by trainer and runtime)."""

from __future__ import annotations

import numpy as np
import pytest

from ailfmd.policy.feature_schema import CORE_COLUMNS, THREAD_COLUMNS
from ailfmd.policy.features import FeatureExtractor
from ailfmd.policy.learned import (
    CAP_COLUMNS,
    CONTEXT_COLUMNS,
    DEST_EXTRA_COLUMNS,
    MOVE_COLUMNS,
    CapDecoder,
    dest_extra,
    cap_inputs,
    forced_movers,
    move_inputs,
    place,
    group_caps,
    CapGuard,
    carry_caps,
)
from ailfmd.sim.chip import load_chip
from ailfmd.sim.platform import SimPlatform
from ailfmd.sim.workload import load_workload

C = {n: i for i, n in enumerate(CORE_COLUMNS)}
X = {n: i for i, n in enumerate(CAP_COLUMNS)}


def test_place_keeps_staying_threads_and_moves_the_others_to_free_cpus() -> None:
    last = np.array([0, 1, 2])
    move = np.array([False, True, False])
    # Thread 1 likes CPU 0 best, but thread 0 stays there: it takes the best free CPU, 3.
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.1]])
    assert place(last, move, scores).tolist() == [0, 3, 2]


def test_place_never_sends_a_mover_back_to_its_own_cpu_and_lets_movers_swap() -> None:
    last = np.array([0, 1])
    move = np.array([True, True])
    scores = np.array([[0.9, 0.8], [0.7, 0.2]])  # both rate CPU 0 highest
    assert place(last, move, scores).tolist() == [1, 0]


def test_place_resolves_conflicts_by_best_score_first() -> None:
    last = np.array([0, 1, 2, 3])
    move = np.array([True, True, False, False])
    # Both movers want CPU 4; thread 1 wants it more, thread 0 takes its next free choice.
    scores = np.array([[0.0, 0.0, 0.0, 0.0, 0.6, 0.5], [0.0, 0.0, 0.0, 0.0, 0.9, 0.3]])
    assert place(last, move, scores).tolist() == [5, 4, 2, 3]


def test_a_mover_with_no_free_cpu_stays() -> None:
    last = np.array([0, 1])
    move = np.array([True, False])
    # CPU 1 scores best but is held by a staying thread; no other CPU: thread 0 stays.
    assert place(last, move, np.array([[0.1, 0.9]])).tolist() == [0, 1]


def test_place_places_new_threads_and_shares_when_cpus_run_out() -> None:
    last = np.array([0, 1, -1])
    move = forced_movers(last, 2)
    assert move.tolist() == [False, False, True]
    # No CPU is free: the new thread shares its best one.
    assert place(last, move, np.array([[0.2, 0.7]])).tolist() == [0, 1, 1]


def test_threads_sharing_a_cpu_are_spread_while_cpus_are_free() -> None:
    last = np.array([2, 0, 2, 2])
    move = forced_movers(last, 4)
    assert move.tolist() == [False, False, True, True]
    choice = place(last, move, np.array([[0.1, 0.5, 0.2, 0.9], [0.3, 0.2, 0.1, 0.4]]))
    assert choice.tolist() == [2, 0, 3, 1]
    # More threads than CPUs: sharing is unavoidable, nobody is forced.
    assert not forced_movers(last, 2).any()


def test_destination_columns_compare_each_cpu_with_the_one_the_thread_leaves() -> None:
    n = 3
    core = np.zeros((n, len(CORE_COLUMNS)), dtype=np.float32)
    core[:, C["temp"]] = [0.9, 0.3, 0.5]
    core[:, C["temp_missing"]] = [0, 0, 1]  # CPU 2 has no temperature
    core[:, C["sink_distance"]] = [1.0, 0.0, 0.5]
    all_last = np.array([0, 1, -1])
    x = dest_extra(core, all_last, all_last)
    col = {name: i for i, name in enumerate(DEST_EXTRA_COLUMNS)}
    assert x.shape == (3, n, len(DEST_EXTRA_COLUMNS))
    assert x[0, 1, col["dest.temp_below_here"]] == pytest.approx(0.6)  # 0.9 here, 0.3 there
    assert x[0, 2, col["dest.temp_below_here"]] == 0.0  # unknown there
    assert x[0, 1, col["dest.sink_below_here"]] == pytest.approx(1.0)
    # CPU 1 is taken by thread 1, for thread 0; a thread's own CPU is not "taken" for it.
    assert x[0, :, col["dest.occupied"]].tolist() == [0.0, 1.0, 0.0]
    assert x[1, :, col["dest.occupied"]].tolist() == [1.0, 0.0, 0.0]
    assert not x[2, :, :2].any()  # a thread without a CPU compares with nothing


def test_move_inputs_say_where_the_thread_could_go() -> None:
    n, m = 4, 3
    core = np.zeros((n, len(CORE_COLUMNS)), dtype=np.float32)
    core[:, C["temp"]] = [0.8, 0.2, 0.5, 0.1]
    core[:, C["sink_distance"]] = [1.0, 0.0, 0.5, 0.0]
    thread = np.zeros((m, len(THREAD_COLUMNS)), dtype=np.float32)
    cap_x = cap_inputs(core, thread)
    last = np.array([0, 3, -1])
    x = move_inputs(cap_x, thread, last)
    col = {name: i for i, name in enumerate(MOVE_COLUMNS)}
    assert x.shape == (m, len(MOVE_COLUMNS))
    assert x[0, col["here.core.temp"]] == pytest.approx(0.8)
    assert x[0, col["rel.temp_above_min"]] == pytest.approx(0.7)  # CPU 3 is coolest
    # ... but a thread runs there: the coolest free CPU is CPU 1 (0.2).
    assert x[0, col["rel.temp_above_free_min"]] == pytest.approx(0.6)
    assert x[0, col["rel.sink_above_min"]] == pytest.approx(1.0)
    assert x[0, col["rel.free_share"]] == pytest.approx(0.5)
    assert x[0, col["rel.sharing"]] == 0.0
    assert x[1, col["rel.temp_above_min"]] == pytest.approx(0.0)
    # Unknown CPU: only its own columns.
    assert not x[2, len(THREAD_COLUMNS):].any()


def _observation(chip_name: str = "3d-64"):
    chip = load_chip(chip_name)
    plat = SimPlatform(chip, load_workload("decode-heavy"), seed=0, duration_s=2.0)
    plat.advance(0.5)
    obs = plat.observe()
    return plat, obs


def test_cap_decoder_snaps_to_the_nearest_step_of_each_cpus_ladder() -> None:
    plat, obs = _observation()
    ladder = sorted(plat.engine.levels.freq_khz)
    cpus = tuple(sorted(obs.cpus))
    hw_max = obs.cpus[cpus[0]].hw_max_khz
    # Just above a ladder step, just below the next one, beyond both ends.
    want = np.array([(ladder[2] + 10_000) / hw_max, (ladder[4] - 10_000) / hw_max, 1.7, -0.3] * (len(cpus) // 4),
                    dtype=np.float32)
    caps = CapDecoder().decode(obs, cpus, want)
    assert set(caps) == set(cpus)
    assert all(v in ladder for v in caps.values())
    assert [caps[c] for c in cpus[:4]] == [ladder[2], ladder[4], ladder[-1], ladder[0]]


def test_cap_inputs_add_the_chip_context_to_every_row() -> None:
    plat, obs = _observation()
    ext = FeatureExtractor(plat.topology())
    fs = ext.extract(obs)
    x = cap_inputs(fs.core_features, fs.thread_features)
    assert x.shape == (len(fs.cpus), len(CORE_COLUMNS) + len(CONTEXT_COLUMNS)) and x.dtype == np.float32
    temp = fs.core_features[:, C["temp"]]
    assert x[:, X["ctx.temp_max"]] == pytest.approx(np.full(len(temp), temp.max()))
    assert x[0, X["ctx.temp_mean"]] == pytest.approx(temp.mean(), rel=1e-5)
    assert x[0, X["ctx.threads_per_cpu"]] == pytest.approx(len(fs.tids) / len(fs.cpus))
    # The same-die maximum: every row of a layer sees its own layer's hottest core.
    dist = fs.core_features[:, C["sink_distance"]]
    for d in np.unique(dist):
        same = dist == d
        assert x[same, X["ctx.group_temp_max"]] == pytest.approx(np.full(same.sum(), temp[same].max()))
    assert len(np.unique(dist)) == 4  # four dies on the 3D chip


def test_cap_inputs_without_temperatures_use_zero_context() -> None:
    core = np.zeros((4, len(CORE_COLUMNS)), dtype=np.float32)
    core[:, C["temp_missing"]] = 1.0
    core[:, C["temp_slope_missing"]] = 1.0
    x = cap_inputs(core, np.zeros((0, len(THREAD_COLUMNS)), dtype=np.float32))
    assert np.isfinite(x).all()
    assert (x[:, len(CORE_COLUMNS):] == 0).all()


def test_group_caps_gives_one_cap_per_die() -> None:
    core = np.zeros((6, len(CORE_COLUMNS)), dtype=np.float32)
    core[:, C["sink_distance"]] = [0, 0, 0, 1, 1, 1]
    frac = np.array([0.5, 0.9, 0.6, 0.2, 0.4, 0.3], dtype=np.float32)
    assert group_caps(frac, core, "cpu").tolist() == pytest.approx(frac.tolist())
    assert group_caps(frac, core, "die-median").tolist() == pytest.approx([0.6] * 3 + [0.3] * 3)
    assert group_caps(frac, core, "die-max").tolist() == pytest.approx([0.9] * 3 + [0.4] * 3)
    assert group_caps(frac, core, "die-min").tolist() == pytest.approx([0.5] * 3 + [0.2] * 3)


def _hot_observation(temp_c: float, slope_c_per_s: float, cap_khz: int, freq_khz: int,
                     limit_c: float | None = None):
    """A simulated observation with CPU 0 forced to ``temp_c`` (and a slope via prev);
    ``limit_c``: the configured limit the features are built with."""
    from dataclasses import replace

    plat, obs = _observation()
    ext = FeatureExtractor(plat.topology(), limit_c=limit_c)
    st = obs.cpus[0]
    prev_cpus = dict(obs.cpus)
    prev_cpus[0] = replace(st, temp=replace(st.temp, temp_c=temp_c - slope_c_per_s * 0.1))
    prev = replace(obs, cpus=prev_cpus, time_s=obs.time_s - 0.1)
    cpus = dict(obs.cpus)
    cpus[0] = replace(st, temp=replace(st.temp, temp_c=temp_c), cap_khz=cap_khz, freq_khz=freq_khz)
    now = replace(obs, cpus=cpus)
    ext.extract(prev)
    return plat, now, ext.extract(now, prev)


def test_guard_steps_down_near_the_limit() -> None:
    plat, obs, fs = _hot_observation(temp_c=79.0, slope_c_per_s=0.0, cap_khz=4_000_000, freq_khz=3_000_000)
    ladder = sorted(int(f) for f in plat.engine.levels.freq_khz)
    limit = next(r.max_c for r in obs.sensors if r.sensor == obs.cpus[0].temp.source)
    assert limit == pytest.approx(80.0)
    caps = {c: ladder[-1] for c in fs.cpus}
    lowered = CapGuard(2.0, 10.0).apply(obs, fs.cpus, caps, fs.core_features, fs.limit_c, 0.1)
    # One step below the current 3 GHz (lower than the model's 4 GHz).
    assert list(lowered) == [0] and "within 2 C of the 80 C limit" in lowered[0] and caps[0] == max(f for f in ladder if f < 3_000_000)
    assert all(caps[c] == ladder[-1] for c in fs.cpus[1:] if obs.cpus[c].temp.temp_c < 70.0)


def test_guard_works_at_a_configured_limit_below_the_sensors() -> None:
    # 74 °C is 6 °C below the sensors' 80 °C maximum: only the release band, nothing cut.
    # With the configured limit at 75 °C it is within the 2 °C guard: one step down.
    for limit_c, cut in ((None, False), (75.0, True)):
        plat, obs, fs = _hot_observation(temp_c=74.0, slope_c_per_s=0.0, cap_khz=3_000_000,
                                         freq_khz=3_000_000, limit_c=limit_c)
        ladder = sorted(int(f) for f in plat.engine.levels.freq_khz)
        caps = {c: 3_000_000 for c in fs.cpus}
        lowered = CapGuard(2.0, 10.0).apply(obs, fs.cpus, caps, fs.core_features, fs.limit_c, 0.1)
        assert fs.limit_c[0] == (limit_c or 80.0)
        if cut:
            assert "within 2 C of the 75 C limit" in lowered[0]
            assert caps[0] == max(f for f in ladder if f < 3_000_000)
        else:
            assert 0 not in lowered and caps[0] == 3_000_000


def test_guard_sees_a_fast_rise_coming() -> None:
    # 74 °C rising at 40 °C/s: 78 °C after one more epoch, inside the 2 °C guard.
    plat, obs, fs = _hot_observation(temp_c=74.0, slope_c_per_s=40.0, cap_khz=2_000_000, freq_khz=2_000_000)
    caps = {c: 4_000_000 for c in fs.cpus}
    CapGuard(2.0, 10.0).apply(obs, fs.cpus, caps, fs.core_features, fs.limit_c, 0.1)
    assert caps[0] < 2_000_000


def test_guard_releases_one_step_at_a_time_in_the_band() -> None:
    plat, obs, fs = _hot_observation(temp_c=73.0, slope_c_per_s=0.0, cap_khz=1_000_000, freq_khz=1_000_000)
    ladder = sorted(int(f) for f in plat.engine.levels.freq_khz)
    caps = {c: ladder[-1] for c in fs.cpus}
    CapGuard(2.0, 10.0).apply(obs, fs.cpus, caps, fs.core_features, fs.limit_c, 0.1)
    assert caps[0] == min(f for f in ladder if f > 1_000_000)
    # Below the band the model's cap stands.
    plat, obs, fs = _hot_observation(temp_c=60.0, slope_c_per_s=0.0, cap_khz=1_000_000, freq_khz=1_000_000)
    caps = {c: ladder[-1] for c in fs.cpus}
    assert CapGuard(2.0, 10.0).apply(obs, fs.cpus, caps, fs.core_features, fs.limit_c, 0.1) == {}
    assert caps[0] == ladder[-1]


def test_a_cut_cpu_recovers_step_by_step_even_once_cool() -> None:
    guard = CapGuard(2.0, 10.0, release_steps=2)
    plat, obs, fs = _hot_observation(temp_c=79.5, slope_c_per_s=0.0, cap_khz=3_000_000, freq_khz=3_000_000)
    ladder = sorted(int(f) for f in plat.engine.levels.freq_khz)
    caps = {c: ladder[-1] for c in fs.cpus}
    guard.apply(obs, fs.cpus, caps, fs.core_features, fs.limit_c, 0.1)
    assert caps[0] < 3_000_000 and 0 in guard.recovering
    # One epoch later it is cool (the cut worked); the model asks for full speed again.
    cut = caps[0]
    plat, obs, fs = _hot_observation(temp_c=60.0, slope_c_per_s=0.0, cap_khz=cut, freq_khz=cut)
    caps = {c: ladder[-1] for c in fs.cpus}
    guard.apply(obs, fs.cpus, caps, fs.core_features, fs.limit_c, 0.1)
    assert caps[0] == sorted(f for f in ladder if f > cut)[1]  # two steps up, not a jump
    # Recovery ends once the model's own cap is within reach.
    plat, obs, fs = _hot_observation(temp_c=60.0, slope_c_per_s=0.0, cap_khz=ladder[-2], freq_khz=ladder[-2])
    caps = {c: ladder[-1] for c in fs.cpus}
    guard.apply(obs, fs.cpus, caps, fs.core_features, fs.limit_c, 0.1)
    assert caps[0] == ladder[-1] and 0 not in guard.recovering


def test_a_moved_thread_takes_at_most_one_step_more_than_it_had() -> None:
    plat, obs = _observation()
    ladder = sorted(int(f) for f in plat.engine.levels.freq_khz)
    cpus = tuple(sorted(obs.cpus))
    from dataclasses import replace

    states = dict(obs.cpus)
    states[3] = replace(states[3], cap_khz=2_000_000)
    obs = replace(obs, cpus=states)
    caps = {c: ladder[-1] for c in cpus}
    last = np.array([3, 5])
    choice = np.array([10, 5])  # the first thread moves from cpu 3 to cpu 10, the second stays
    assert list(carry_caps(obs, cpus, caps, last, choice)) == [10]
    assert caps[10] == min(f for f in ladder if f > 2_000_000)
    assert caps[5] == ladder[-1]
