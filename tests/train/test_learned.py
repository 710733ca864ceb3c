"""The learned policy's input building and action decoding (shared by trainer and runtime)."""

from __future__ import annotations

import numpy as np
import pytest

from ailfmd.policy.feature_schema import CORE_COLUMNS, THREAD_COLUMNS
from ailfmd.policy.features import FeatureExtractor
from ailfmd.policy.learned import CAP_COLUMNS, CONTEXT_COLUMNS, CapDecoder, assign, cap_inputs
from ailfmd.sim.chip import load_chip
from ailfmd.sim.platform import SimPlatform
from ailfmd.sim.workload import load_workload

C = {n: i for i, n in enumerate(CORE_COLUMNS)}
X = {n: i for i, n in enumerate(CAP_COLUMNS)}


def test_assign_takes_each_threads_best_cpu_when_they_differ() -> None:
    scores = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.0]])
    assert assign(scores).tolist() == [1, 0]


def test_assign_resolves_conflicts_by_best_score_first() -> None:
    # Both want CPU 0; thread 1 wants it more, so thread 0 takes its second choice.
    scores = np.array([[0.6, 0.5, 0.1], [0.9, 0.2, 0.3]])
    assert assign(scores).tolist() == [1, 0]


def test_assign_shares_cpus_evenly_when_threads_outnumber_them() -> None:
    rng = np.random.default_rng(1)
    choice = assign(rng.random((7, 3)))
    counts = np.bincount(choice, minlength=3)
    assert counts.sum() == 7 and counts.max() - counts.min() <= 1


def test_assign_with_nothing_to_place() -> None:
    assert assign(np.zeros((0, 4))).shape == (0,)


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
