"""The policy's features: one schema on Linux and the simulator, masks for what is missing."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest

from ailfmd.platform.base import (
    CacheDomain,
    CpuState,
    CpuTemp,
    CpuTopology,
    Observation,
    ThreadRef,
    ThreadSample,
    Topology,
)
from ailfmd.platform.linux.platform import LinuxPlatform
from ailfmd.platform.linux.targets import TargetSelector
from ailfmd.policy import feature_schema as fsch
from ailfmd.policy.feature_schema import (
    CORE_COLUMNS,
    FEATURE_SCHEMA,
    PAIR_COLUMNS,
    THREAD_COLUMNS,
    describe_schema,
    schema_json,
)
from ailfmd.policy.features import (
    FeatureExtractor,
    FeatureSet,
    infer_kernel_class,
    kernel_class_rule,
)
from ailfmd.sim.chip import load_chip
from ailfmd.sim.kernels import Kernel
from ailfmd.sim.noc import mean_llc_latency_cycles
from ailfmd.sim.platform import SimPlatform
from ailfmd.sim.workload import load_workload
from childproc import THREADS_CHILD, child_process

C = {n: i for i, n in enumerate(CORE_COLUMNS)}
T = {n: i for i, n in enumerate(THREAD_COLUMNS)}
P = {n: i for i, n in enumerate(PAIR_COLUMNS)}


def check_schema(fs: FeatureSet, n_cpus: int, n_threads: int) -> None:
    assert fs.schema == FEATURE_SCHEMA
    assert fs.core_features.dtype == np.float32 and fs.thread_features.dtype == np.float32
    assert fs.core_features.shape == (n_cpus, len(CORE_COLUMNS))
    assert fs.thread_features.shape == (n_threads, len(THREAD_COLUMNS))
    assert list(fs.cpus) == sorted(fs.cpus) and list(fs.tids) == sorted(fs.tids)
    pairs = fs.pair_matrix()
    assert pairs.dtype == np.float32 and pairs.shape == (n_threads * n_cpus, len(PAIR_COLUMNS))
    for arr in (fs.core_features, fs.thread_features, pairs):
        assert np.isfinite(arr).all()
    masks = [i for n, i in C.items() if n.endswith("_missing")]
    assert set(np.unique(fs.core_features[:, masks])) <= {0.0, 1.0}


def sim_features(chip_name: str = "tiny", epochs: int = 4) -> tuple[SimPlatform, FeatureExtractor, list]:
    chip = load_chip(chip_name)
    plat = SimPlatform(chip, load_workload("tiny-test"), seed=1)
    ext = FeatureExtractor(plat.topology(), chip.noc)
    out, prev = [], None
    for _ in range(epochs):
        plat.advance(0.1)
        obs = plat.observe()
        out.append((obs, ext.extract(obs, prev)))
        prev = obs
    return plat, ext, out


# --------------------------------------------------------------------------- schema


def test_schema_json_describes_every_column() -> None:
    d = json.loads(schema_json())
    assert d["schema"] == FEATURE_SCHEMA == "ailfmd.features/2"
    assert d["core"]["columns"] == list(CORE_COLUMNS)
    assert d["thread"]["columns"] == list(THREAD_COLUMNS)
    assert d["pair"]["all_columns"] == list(PAIR_COLUMNS)
    assert describe_schema()["constants"]["TEMP_SCALE_C"] == fsch.TEMP_SCALE_C
    # Every mask named by a feature is a column, and every *_missing column is some feature's mask.
    for block in ("core", "thread", "pair"):
        named = {f["mask"] for f in d[block]["features"] if f["mask"]}
        assert named == set(d[block]["masks"]) == {c for c in d[block]["columns"] if c.endswith("_missing")}
    assert len(set(PAIR_COLUMNS)) == len(PAIR_COLUMNS)


# --------------------------------------------------------------------------- simulator


def test_sim_schema_and_values() -> None:
    plat, ext, runs = sim_features()
    obs, fs = runs[-1]
    check_schema(fs, 8, len(obs.threads))
    assert len(obs.threads) > 0
    core = fs.core_features
    # The simulator measures everything the core block asks for.
    assert (core[:, [i for n, i in C.items() if n.endswith("_missing")]] == 0).all()
    temps = np.array([obs.cpus[c].temp.temp_c for c in fs.cpus])
    # The simulated sensors report the chip's DTM threshold as their maximum: the limit.
    assert fs.limit_c.tolist() == [80.0] * len(fs.cpus)
    np.testing.assert_allclose(core[:, C["temp"]], (temps - (80.0 - fsch.TEMP_SCALE_C)) / fsch.TEMP_SCALE_C,
                               rtol=1e-6)
    caps = np.array([obs.cpus[c].cap_khz / obs.cpus[c].hw_max_khz for c in fs.cpus])
    np.testing.assert_allclose(core[:, C["cap"]], caps, rtol=1e-6)
    # tiny: layer 0 at the sink, layer 1 farthest.
    assert core[:4, C["sink_distance"]].tolist() == [0.0] * 4 and core[4:, C["sink_distance"]].tolist() == [1.0] * 4
    # The sim reports no page faults: missing, not zero.
    th = fs.thread_features
    assert (th[:, T["page_fault_rate_missing"]] == 1).all() and (th[:, T["page_fault_rate"]] == 0).all()
    assert (th[:, T["ipc_missing"]] == 0).all() and (th[:, T["mem_bound_missing"]] == 0).all()
    assert (th[:, T["utilisation_missing"]] == 0).all()
    for i, tid in enumerate(fs.tids):
        c = obs.threads[tid].counters
        if c["cycles"] > 0:
            assert th[i, T["ipc"]] == pytest.approx(c["instructions"] / c["cycles"] / fsch.IPC_SCALE, rel=1e-5)
        assert th[i, T["utilisation"]] == pytest.approx(min(c["run_ns"] / 0.1e9, 1.0), rel=1e-4)
    # The first observation has no previous one: no slope, no epoch.
    first = runs[0][1]
    assert (first.core_features[:, C["temp_slope_missing"]] == 1).all()
    assert (first.thread_features[:, T["utilisation_missing"]] == 1).all()


def test_sim_neighbours_follow_positions() -> None:
    chip = load_chip("3d-64")
    plat = SimPlatform(chip, load_workload("tiny-test"), seed=1)
    ext = FeatureExtractor(plat.topology(), chip.noc)
    nb = ext.neighbours > 0
    centre = chip.core_at(1, 1, 1)
    want = {chip.core_at(1, 0, 1), chip.core_at(1, 2, 1), chip.core_at(1, 1, 0), chip.core_at(1, 1, 2),
            chip.core_at(0, 1, 1), chip.core_at(2, 1, 1)}
    assert set(np.flatnonzero(nb[centre]).tolist()) == want
    corner = chip.core_at(0, 0, 0)
    assert set(np.flatnonzero(nb[corner]).tolist()) == {chip.core_at(0, 0, 1), chip.core_at(0, 1, 0),
                                                         chip.core_at(1, 0, 0)}
    assert (nb == nb.T).all() and not nb.diagonal().any()
    # Neighbour temperature is the mean of exactly those CPUs' temperatures.
    temps = {c: 50.0 + c for c in range(chip.n_cores)}
    fs = ext.extract(hand_obs(1.0, temps, {}))
    got = fs.core_features[centre, C["neighbour_temp"]]
    zero_c = fsch.DEFAULT_LIMIT_C - fsch.TEMP_SCALE_C  # no sensor reports a maximum here
    assert got == pytest.approx((np.mean([temps[c] for c in want]) - zero_c) / fsch.TEMP_SCALE_C, rel=1e-6)
    # Relative LLC latency is noc.mean_llc_latency_cycles / its minimum - 1.
    fp, noc = chip.floorplan, chip.noc
    lat = mean_llc_latency_cycles(fp.layers, fp.rows, fp.cols, noc.hop_horizontal_cycles,
                                  noc.hop_vertical_cycles, noc.llc_bank_access_cycles)
    np.testing.assert_allclose(fs.core_features[:, C["llc_latency_rel"]], lat / lat.min() - 1, rtol=1e-6)
    assert fs.core_features[:, C["llc_latency_rel_missing"]].max() == 0
    # Layers 0..3 -> 0, 1/3, 2/3, 1.
    assert fs.core_features[chip.core_at(3, 0, 0), C["sink_distance"]] == 1.0
    assert fs.core_features[chip.core_at(1, 0, 0), C["sink_distance"]] == pytest.approx(1 / 3)


# --------------------------------------------------------------------------- Linux


@pytest.mark.parametrize("machine", ["xeon-2s-ht", "vm-bare"])
def test_linux_same_schema_and_masks(machine: str, machine_sys, tmp_path: Path) -> None:
    with child_process(THREADS_CHILD, "") as (proc, words):
        plat = LinuxPlatform(sysfs_root=machine_sys(machine), run_dir=tmp_path / "run",
                             targets=TargetSelector(pids=(proc.pid,)))
        try:
            ext = FeatureExtractor(plat.topology())
            o1 = plat.observe()
            time.sleep(0.02)
            o2 = plat.observe()
        finally:
            plat.close()
    f1, f2 = ext.extract(o1), ext.extract(o2, o1)
    tids = sorted(int(w) for w in words)
    for fs in (f1, f2):
        check_schema(fs, len(plat.topology().cpus), 4)
        assert list(fs.tids) == tids
    core, th = f2.core_features, f2.thread_features
    # Real machines report no die stack and no mesh position.
    assert (core[:, C["sink_distance_missing"]] == 1).all() and (core[:, C["sink_distance"]] == 0).all()
    assert (core[:, C["llc_latency_rel_missing"]] == 1).all()
    if machine == "vm-bare":
        for name in ("temp", "temp_slope", "neighbour_temp", "freq", "cap", "power_proxy"):
            assert (core[:, C[f"{name}_missing"]] == 1).all(), name
        assert (core[:, C["temp"]] == 0).all() and (core[:, C["freq"]] == 1).all()
    else:
        assert (core[:, C["temp_missing"]] == 0).all() and (core[:, C["neighbour_temp_missing"]] == 0).all()
        assert (core[:, C["temp_slope_missing"]] == 0).all() and (core[:, C["freq_missing"]] == 0).all()
        assert (f1.core_features[:, C["temp_slope_missing"]] == 1).all()
    # A counter this machine cannot measure is masked, one it can is not.
    for i, tid in enumerate(f2.tids):
        counters = o2.threads[tid].counters
        for col, needs in (("ipc", ("instructions", "cycles")), ("mpki", ("llc_misses", "instructions")),
                           ("mem_bound", ("stalled_cycles_backend", "cycles")),
                           ("utilisation", ("run_ns",)), ("page_fault_rate", ("page_faults",))):
            if not all(k in counters for k in needs):
                assert th[i, T[f"{col}_missing"]] == 1 and th[i, T[col]] == 0, (col, counters)
        if "run_ns" in counters:
            assert th[i, T["utilisation_missing"]] == 0
    # The first observation has no run-time deltas yet (schedstat needs two reads).
    assert (f1.thread_features[:, T["utilisation_missing"]] == 1).all()
    # Temperatures are read from each CPU's limit: the sensor's maximum (coretemp's
    # tempN_max, 86 °C in this tree), lowered to a configured limit below it; a
    # configured limit above it does not raise it. Without sensors: the configured limit,
    # else the default.
    sensor_max_c = 86.0 if machine == "xeon-2s-ht" else None
    temps = np.array([o2.cpus[c].temp.temp_c or math.nan for c in f2.cpus])
    for configured, want_c in ((None, sensor_max_c or fsch.DEFAULT_LIMIT_C), (80.0, 80.0),
                               (95.0, sensor_max_c or 95.0)):
        fs = FeatureExtractor(plat.topology(), limit_c=configured).extract(o2, o1)
        assert fs.limit_c.tolist() == [want_c] * len(fs.cpus), configured
        if sensor_max_c is not None:
            np.testing.assert_allclose(fs.core_features[:, C["temp"]],
                                       (temps - (want_c - fsch.TEMP_SCALE_C)) / fsch.TEMP_SCALE_C, rtol=1e-6)
        # Everything else is the same, whatever the limit.
        other = [i for n, i in C.items() if n not in ("temp", "neighbour_temp")]
        assert (fs.core_features[:, other] == core[:, other]).all()


def test_linux_neighbours_and_distances_from_shared_caches() -> None:
    # 2 packages x 2 cores x 2 SMT threads; L2 per core, L3 per package.
    cpus = {c: CpuTopology(c, c // 4, (c // 2) % 2, thread_siblings=(c - c % 2, c - c % 2 + 1))
            for c in range(8)}
    caches = tuple(CacheDomain(2, "Unified", (2 * k, 2 * k + 1)) for k in range(4)) + (
        CacheDomain(3, "Unified", (0, 1, 2, 3)), CacheDomain(3, "Unified", (4, 5, 6, 7)))
    ext = FeatureExtractor(Topology(cpus=cpus, caches=caches))
    assert np.flatnonzero(ext.neighbours[0]).tolist() == [1, 2, 3]
    assert ext.migration_distance[0].tolist() == [0.0, 0.25, 0.75, 0.75, 1.0, 1.0, 1.0, 1.0]


# --------------------------------------------------------------------------- hand-built


def hand_obs(time_s: float, temps: dict[int, float | None], threads: dict[int, ThreadSample],
             freq_khz: int | None = 2_000_000) -> Observation:
    cpus = {c: CpuState(c, CpuTemp(c, t, None, "test"), freq_khz, 4_000_000 if freq_khz else None,
                        1_000_000 if freq_khz else None, 4_000_000 if freq_khz else None)
            for c, t in temps.items()}
    return Observation(time_s=time_s, cpus=cpus, threads=threads)


def flat_topology(n: int) -> Topology:
    return Topology(cpus={c: CpuTopology(c, 0, c, thread_siblings=(c,)) for c in range(n)})


def test_slopes_from_two_observations() -> None:
    ext = FeatureExtractor(flat_topology(3))
    o1 = hand_obs(10.0, {0: 50.0, 1: 60.0, 2: None}, {})
    o2 = hand_obs(10.5, {0: 55.0, 1: 58.0, 2: 70.0}, {})
    ext.extract(o1)
    fs = ext.extract(o2, o1)
    slope = fs.core_features[:, C["temp_slope"]] * fsch.SLOPE_SCALE_C_PER_S
    assert slope[:2].tolist() == pytest.approx([10.0, -4.0])
    assert fs.core_features[:, C["temp_slope_missing"]].tolist() == [0.0, 0.0, 1.0]
    assert fs.core_features[2, C["temp_slope"]] == 0.0
    assert fs.epoch_s == pytest.approx(0.5)
    # The same without the extractor's memory of o1 (a fresh extractor re-reads prev).
    fresh = FeatureExtractor(flat_topology(3)).extract(o2, o1)
    np.testing.assert_array_equal(fresh.core_features, fs.core_features)
    # Not moving forward in time: no slope.
    assert (ext.extract(o1, o2).core_features[:, C["temp_slope_missing"]] == 1).all()


def sample(tid: int, cpu: int | None, **counters: float) -> ThreadSample:
    return ThreadSample(ThreadRef(1, tid, 7), "t", cpu, frozenset({0, 1}), counters)


def test_thread_ratios_utilisation_and_power() -> None:
    ext = FeatureExtractor(flat_topology(3))
    threads = {
        20: sample(20, 0, instructions=2e8, cycles=1e8, llc_misses=1e6, llc_references=2e6,
                   stalled_cycles_backend=2.5e7, run_ns=5e7, wait_ns=1e7, page_faults=10.0, cpu_migrations=1.0),
        10: sample(10, 0, instructions=1e8, cycles=2e8, llc_misses=5e6, run_ns=1e8),
        30: sample(30, None),
    }
    fs = ext.extract(hand_obs(1.0, {0: 60.0, 1: 60.0, 2: 60.0}, threads), epoch_s=0.1)
    assert fs.tids == (10, 20, 30)
    th = fs.thread_features
    row = th[1]
    assert row[T["ipc"]] * fsch.IPC_SCALE == pytest.approx(2.0)
    assert row[T["mpki"]] * fsch.MPKI_SCALE == pytest.approx(5.0)
    assert row[T["mem_bound"]] == pytest.approx(0.25)
    assert row[T["utilisation"]] == pytest.approx(0.5) and row[T["wait_share"]] == pytest.approx(0.1)
    assert row[T["page_fault_rate"]] * fsch.PAGE_FAULT_SCALE_PER_S == pytest.approx(100.0)
    assert row[T["migration_rate"]] * fsch.MIGRATION_SCALE_PER_S == pytest.approx(10.0)
    assert th[0, T["mem_bound_missing"]] == 1 and th[0, T["wait_share_missing"]] == 1
    assert th[2, T["ipc_missing"]] == 1 and th[2, T["kernel_class_missing"]] == 1
    assert th[2, [T[f"kernel_{k.key}"] for k in Kernel]].sum() == 0
    core = fs.core_features
    # CPU 0 carries both measured threads: 0.5 + 1.0 -> clipped to 1; CPU 1 has none (0, known).
    assert core[0, C["utilisation"]] == 1.0 and core[0, C["threads_here"]] * fsch.THREADS_SCALE == 2
    assert core[1, C["utilisation"]] == 0.0 and core[1, C["utilisation_missing"]] == 0
    x = 0.5
    v = fsch.V_FLOOR + (1 - fsch.V_FLOOR) * x
    assert core[0, C["power_proxy"]] == pytest.approx(x * v * v)
    # The pair rows: thread 20 on CPU 0 stays put; migration distance to CPU 2 is far.
    pairs = fs.pair_matrix()
    r = fs.pair_index(1, 0)
    assert pairs[r, P["pair.on_core"]] == 1 and pairs[r, P["pair.migration_distance"]] == 0
    assert pairs[fs.pair_index(1, 2), P["pair.allowed"]] == 0 and pairs[fs.pair_index(1, 1), P["pair.allowed"]] == 1
    assert pairs[fs.pair_index(2, 0), P["pair.migration_distance_missing"]] == 1
    np.testing.assert_array_equal(pairs[fs.pair_index(1, 2), :len(THREAD_COLUMNS)], th[1])
    np.testing.assert_array_equal(
        pairs[fs.pair_index(1, 2), len(THREAD_COLUMNS):len(THREAD_COLUMNS) + len(CORE_COLUMNS)], core[2])


@pytest.mark.parametrize(("ipc", "mpki", "apki", "util", "want"), [
    (2.3, 0.5, 2.0, 1.0, Kernel.PREFILL_GEMM),
    (0.7, 50.0, 55.0, 1.0, Kernel.DECODE_GEMV),
    (0.5, 20.0, 40.0, 1.0, Kernel.ATTENTION),
    (1.2, 0.2, 20.0, 1.0, Kernel.ATTENTION),  # KV cache resident in the LLC
    (1.4, 1.0, 8.0, 1.0, Kernel.NORM_ELEMENTWISE),
    (1.4, 1.0, math.nan, 1.0, Kernel.NORM_ELEMENTWISE),
    (0.03, 0.0, 0.0, 1.0, Kernel.SPIN_WAIT),
    (0.0, 0.0, 0.0, math.nan, Kernel.IDLE),
    (1.0, 1.0, 1.0, 0.001, Kernel.IDLE),
    (math.nan, 3.0, 3.0, 1.0, -1),
    (1.0, math.nan, 3.0, 1.0, -1),
])
def test_kernel_rule(ipc: float, mpki: float, apki: float, util: float, want: int) -> None:
    assert kernel_class_rule(ipc, mpki, apki, util) == want
    got = infer_kernel_class(np.array([ipc]), np.array([mpki]), np.array([apki]), np.array([util]))
    assert got.tolist() == [int(want)]


def test_vectorised_rule_equals_scalar_rule() -> None:
    rng = np.random.default_rng(0)
    n = 5000
    pick = lambda values: rng.choice(np.array(values, dtype=float), n)  # noqa: E731
    ipc = pick([0, 0.05, 0.1, 0.5, 1.79, 1.8, 2.5, math.nan])
    mpki = pick([0, 0.5, 1, 4.9, 5, 20, 35, 60, math.nan])
    apki = pick([0, 14.9, 15, 40, math.nan])
    util = pick([0, 0.005, 0.01, 0.5, math.nan])
    want = [kernel_class_rule(*x) for x in zip(ipc, mpki, apki, util)]
    assert infer_kernel_class(ipc, mpki, apki, util).tolist() == want


def test_kernel_classes_from_hand_built_counters() -> None:
    ext = FeatureExtractor(flat_topology(1))
    ins = 1e8
    threads = {
        1: sample(1, 0, instructions=ins, cycles=ins / 2.3, llc_misses=ins * 0.5e-3, llc_references=ins * 2e-3,
                  run_ns=1e8),
        2: sample(2, 0, instructions=ins, cycles=ins / 0.7, llc_misses=ins * 50e-3, run_ns=1e8),
        3: sample(3, 0, instructions=0.0, cycles=0.0, llc_misses=0.0, run_ns=0.0),
        4: sample(4, 0, run_ns=1e8),  # no PMU: unknown
    }
    fs = ext.extract(hand_obs(1.0, {0: 50.0}, threads), epoch_s=0.1)
    assert fs.kernel_class.tolist() == [Kernel.PREFILL_GEMM, Kernel.DECODE_GEMV, Kernel.IDLE, -1]
    assert fs.thread_features[0, T["kernel_prefill_gemm"]] == 1
    # Nothing retired while measured: IPC 0, not missing.
    assert fs.thread_features[2, T["ipc"]] == 0 and fs.thread_features[2, T["ipc_missing"]] == 0


def test_no_threads_and_unknown_cpu_stay_finite() -> None:
    ext = FeatureExtractor(flat_topology(2))
    fs = ext.extract(Observation(time_s=1.0, cpus={}, threads={}))
    check_schema(fs, 2, 0)
    assert (fs.core_features[:, C["temp_missing"]] == 1).all()
    assert (fs.core_features[:, C["cap_missing"]] == 1).all()
