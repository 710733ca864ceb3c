"""The decision path's shortcuts give what the trainer's building blocks give."""

from __future__ import annotations

import numpy as np

from ailfmd.platform.base import CpuTopology, Topology
from ailfmd.policy.feature_schema import CORE_COLUMNS, THREAD_COLUMNS
from ailfmd.policy.features import FeatureExtractor, build_pair_own
from ailfmd.policy.learned import cap_inputs, dest_inputs, dest_own, die_groups

C = {n: i for i, n in enumerate(CORE_COLUMNS)}


def random_rows(rng: np.random.Generator, n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    core = rng.random((n, len(CORE_COLUMNS)), dtype=np.float32)
    core[:, C["temp_missing"]] = rng.random(n) < 0.2
    core[:, C["sink_distance"]] = rng.integers(0, 4, n) / 3
    return core, rng.random((m, len(THREAD_COLUMNS)), dtype=np.float32)


def test_dest_inputs_equal_dest_own_of_the_pair_rows() -> None:
    rng = np.random.default_rng(5)
    n, m = 12, 9
    core, thread = random_rows(rng, n, m)
    last = rng.integers(-1, n, m)
    allowed = rng.random((m, n)) < 0.7
    distance = np.vstack([rng.random((n, n), dtype=np.float32), np.ones((1, n), dtype=np.float32)])
    movers = np.array([0, 3, 4, 8])
    want = dest_own(build_pair_own(thread[movers], core, last[movers], allowed[movers], distance),
                    core, last[movers], last)
    got = dest_inputs(thread[movers], core, last[movers], allowed[movers], distance, last)
    assert got.dtype == want.dtype and got.tobytes() == want.tobytes()


def test_cap_inputs_with_the_dies_kept_equal_cap_inputs_without() -> None:
    rng = np.random.default_rng(6)
    core, thread = random_rows(rng, 16, 20)
    assert cap_inputs(core, thread, die_groups(core)).tobytes() == cap_inputs(core, thread).tobytes()


def test_pinned_rows_name_the_one_cpu_an_affinity_allows() -> None:
    ext = FeatureExtractor(Topology(cpus={c: CpuTopology(c, 0, c) for c in (0, 2, 5)}))
    affinities = (frozenset({5}), frozenset({0, 2}), frozenset({7}), frozenset({0}), frozenset({5}))
    # Twice: the second read comes from the cache.
    for _ in range(2):
        assert ext.pinned_rows(affinities).tolist() == [2, -1, -1, 0, 2]
