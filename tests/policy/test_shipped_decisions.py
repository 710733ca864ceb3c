"""The shipped policy decides exactly as recorded, and the model inputs are bit for bit the same.

The decision path (features, model inputs, decoding, reasons) is tuned for speed; a
faster path must not change a single decision. ``fixtures/shipped_decisions.json``
holds what ``policies/default.onnx`` decided on seeded states: simulator runs the policy
drives itself (3d-64 under decode-heavy and prefill-heavy, the tiny chip with more
threads than CPUs), synthetic 64 x 64 states at move thresholds 0, 1 and the default,
and a Linux-like machine (no mesh positions, SMT siblings and shared caches) with
missing temperatures, counters and CPUs. It also holds digests of the trainer's arrays
(core and thread features, cap, move, pair and destination rows) for the same states.

Regenerate only when decisions are meant to change:
``.venv/bin/python tests/policy/test_shipped_decisions.py --write``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))

from ailfmd.platform.base import (  # noqa: E402
    CacheDomain,
    CpuState,
    CpuTemp,
    CpuTopology,
    FreqPolicy,
    Observation,
    TempReading,
    TempSensor,
    ThreadRef,
    ThreadSample,
    Topology,
)
from ailfmd.policy.base import Decision  # noqa: E402
from ailfmd.policy.features import FeatureExtractor, build_pair_matrix, build_pair_own  # noqa: E402
from ailfmd.policy.learned import cap_inputs, dest_extra, dest_own, move_inputs  # noqa: E402
from ailfmd.policy.onnx_policy import OnnxPolicy  # noqa: E402
from ailfmd.sim import jit  # noqa: E402
from ailfmd.sim.chip import load_chip  # noqa: E402
from ailfmd.sim.platform import SimPlatform  # noqa: E402
from ailfmd.sim.workload import load_workload  # noqa: E402

POLICY = ROOT / "policies" / "default.onnx"
EXPECTED = Path(__file__).parent / "fixtures" / "shipped_decisions.json"
EPOCH_S = 0.1
# The decoding rules, by the words their reasons start with.
RULES = ("model caps", "guarded:", "a thread moves in from", "model moves thread", "model keeps thread")

# (chip, workload, seed, epochs, advance before the first decision in s)
SIM_RUNS = (("3d-64", "decode-heavy", 0, 40, 0.3), ("3d-64", "prefill-heavy", 1, 30, 0.5),
            ("tiny", "tiny-test", 5, 30, 0.2))


def digest(a: np.ndarray) -> str:
    """dtype, shape and bytes: equal digests mean bit-identical arrays."""
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()[:16]


def text_digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data).encode()).hexdigest()[:16]


def decision_record(d: Decision) -> dict[str, Any]:
    """Everything a decision says except how long it took (the reasons' text as a digest:
    thousands of them)."""
    return {
        "caps": sorted(d.action.freq_cap_khz.items()),
        "affinity": sorted((r.tid, sorted(c)) for r, c in d.action.affinity.items()),
        "refs": text_digest(sorted((r.pid, r.tid, r.start_ticks) for r in d.action.affinity)),
        "reasons": [len(d.reasons), text_digest([
            [r.target, r.kind, r.source, r.detail, r.sensor, r.value_c, r.threshold_c, r.predicted]
            for r in d.reasons])],
        "rules": [sum(words in r.detail for r in d.reasons) for words in RULES],
        "threads_moved": d.info.get("threads_moved"),
    }


def array_record(ext: FeatureExtractor, obs: Observation, prev: Observation | None) -> dict[str, str]:
    """Digests of what the trainer builds from the same observation."""
    fs = ext.extract(obs, prev)
    core, thread, last = fs.core_features, fs.thread_features, fs.last_cpu_index
    allowed = fs.allowed()
    cap_x = cap_inputs(core, thread)
    own = build_pair_own(thread, core, last, allowed, ext.distance_padded)
    return {
        "core": digest(core), "thread": digest(thread), "last": digest(last.astype(np.int64)),
        "kernel": digest(fs.kernel_class.astype(np.int64)), "allowed": digest(allowed),
        "cap_x": digest(cap_x), "move_x": digest(move_inputs(cap_x, thread, last)),
        "pairs": digest(build_pair_matrix(thread, core, last, allowed, ext.distance_padded)),
        "dest_extra": digest(dest_extra(core, last, last)), "dest_own": digest(dest_own(own, core, last, last)),
    }


def settled(obs: Observation, d: Decision, time_s: float) -> Observation:
    """``obs`` a little later, as it reads once ``d`` is in effect."""
    cpus = {c: replace(st, cap_khz=d.action.freq_cap_khz.get(c, st.cap_khz)) for c, st in obs.cpus.items()}
    threads = {}
    for tid, s in obs.threads.items():
        aff = d.action.affinity.get(s.ref, s.affinity)
        threads[tid] = replace(s, affinity=aff, last_cpu=min(aff) if len(aff) == 1 else s.last_cpu)
    return replace(obs, time_s=time_s, cpus=cpus, threads=threads)


# --------------------------------------------------------------------------- states


def sim_run(chip_name: str, workload: str, seed: int, epochs: int, warm_s: float) -> Iterator[tuple]:
    """(topology, observation, previous, policy) per epoch of a run the policy drives."""
    chip = load_chip(chip_name)
    plat = SimPlatform(chip, load_workload(workload), seed=seed, duration_s=epochs * EPOCH_S + warm_s)
    policy = OnnxPolicy(POLICY, service=False)
    policy.reset(plat.topology(), plat.capabilities())
    plat.advance(warm_s)
    prev = None
    for _ in range(epochs):
        obs = plat.observe()
        yield plat.topology(), obs, prev, policy
        prev = obs
        plat.advance(EPOCH_S)


def counters(rng: np.random.Generator) -> dict[str, float]:
    ins = float(rng.uniform(1e6, 4e8))
    cyc = ins / float(rng.uniform(0.05, 2.5))
    return {"instructions": ins, "cycles": cyc, "llc_references": ins * float(rng.uniform(0, 0.05)),
            "llc_misses": ins * float(rng.uniform(0, 0.06)), "stalled_cycles_backend": cyc * float(rng.uniform(0, 1)),
            "run_ns": float(rng.uniform(0, 1e8)), "wait_ns": float(rng.uniform(0, 2e7)),
            "page_faults": float(rng.integers(0, 50)), "cpu_migrations": float(rng.integers(0, 3))}


def synthetic(topology: Topology, n_threads: int, time_s: float, rng: np.random.Generator,
              max_c: float | None = None) -> Observation:
    """Every CPU and counter present, a few threads pinned, ``max_c`` on every sensor."""
    cpus, sensors = {}, []
    ids = topology.online_cpus
    for c in ids:
        sensor = TempSensor("sim", "synthetic", f"core{c}", f"Core {c}", "core", "")
        temp_c = float(rng.uniform(45, 90))
        cpus[c] = CpuState(c, CpuTemp(c, temp_c, sensor, "synthetic"), int(rng.integers(10, 41)) * 100_000,
                           int(rng.integers(10, 41)) * 100_000, 1_000_000, 4_000_000)
        sensors.append(TempReading(sensor, temp_c, max_c=max_c))
    everything = frozenset(ids)
    threads = {}
    for i in range(n_threads):
        tid = 2000 + 3 * i
        aff = frozenset({ids[i % len(ids)]}) if i % 8 == 0 else everything
        threads[tid] = ThreadSample(ThreadRef(2000, tid, 7), f"w{i}", ids[int(rng.integers(len(ids)))], aff,
                                    counters(rng))
    return Observation(time_s=time_s, cpus=cpus, threads=threads, sensors=tuple(sensors))


def degraded(obs: Observation, rng: np.random.Generator) -> Observation:
    """Missing temperatures, limits and counters, a new thread, one on an offline CPU."""
    cpus = dict(obs.cpus)
    ids = sorted(cpus)
    for c in ids[::5]:
        st = cpus[c]
        cpus[c] = replace(st, temp=CpuTemp(c, None, None, "no sensor"))
    for c in ids[1::7]:
        cpus[c] = replace(cpus[c], freq_khz=None, cap_khz=None)
    del cpus[ids[-1]]
    threads = dict(obs.threads)
    tids = sorted(threads)
    for k, tid in enumerate(tids[::4]):
        s = threads[tid]
        dropped = ("cycles", "llc_misses", "run_ns", "page_faults")[k % 4]
        threads[tid] = replace(s, counters={n: v for n, v in s.counters.items() if n != dropped})
    threads[tids[1]] = replace(threads[tids[1]], last_cpu=None)
    threads[tids[2]] = replace(threads[tids[2]], last_cpu=10_000)
    threads[tids[3]] = replace(threads[tids[3]], counters={})
    threads[tids[5]] = replace(threads[tids[5]], last_cpu=threads[tids[6]].last_cpu)
    return replace(obs, cpus=cpus, threads=threads)


def linux_like_topology() -> Topology:
    """2 packages x 4 cores x 2 SMT threads, L2 per core, L3 per package, sparse ids."""
    ids = [c for c in range(18) if c not in (3, 12)]
    cpus = {c: CpuTopology(c, c // 9, (c // 2) % 4, thread_siblings=(c - c % 2, c - c % 2 + 1)) for c in ids}
    caches = tuple(CacheDomain(2, "Unified", (2 * k, 2 * k + 1)) for k in range(9)) + (
        CacheDomain(3, "Unified", tuple(range(9))), CacheDomain(3, "Unified", tuple(range(9, 18))))
    return Topology(cpus=cpus, caches=caches)


def with_freq_table(obs: Observation) -> Observation:
    """One cpufreq policy per SMT pair with a driver table (acpi-cpufreq style)."""
    table = tuple(range(1_000_000, 4_000_001, 300_000))
    pairs: dict[int, list[int]] = {}
    for c in sorted(obs.cpus):
        pairs.setdefault(c // 2, []).append(c)
    policies = tuple(FreqPolicy(k, tuple(cs), "acpi-cpufreq", "schedutil", 1_000_000, None, None,
                                1_000_000, 4_000_000, table) for k, cs in pairs.items())
    return replace(obs, policies=policies)


def synthetic_runs() -> Iterator[tuple[str, Topology, list[Observation], float | None]]:
    """(label, topology, observations in order, move threshold) of the synthetic cases."""
    sim_topo = SimPlatform(load_chip("3d-64"), load_workload("tiny-test"), seed=1).topology()
    rng = np.random.default_rng(20240611)
    for threshold in (0.0, 1.0, None):
        obs = [synthetic(sim_topo, 64, 10.0 + EPOCH_S * k, rng, max_c=80.0) for k in range(4)]
        yield f"3d-64 x 64 threads, threshold {threshold}", sim_topo, obs, threshold
    obs = [synthetic(sim_topo, 80, 10.0 + EPOCH_S * k, rng) for k in range(3)]
    obs += [degraded(synthetic(sim_topo, 80, 10.3 + EPOCH_S * k, rng), rng) for k in range(3)]
    yield "3d-64 x 80 threads, degraded", sim_topo, obs, None
    topo = linux_like_topology()
    obs = [with_freq_table(synthetic(topo, 12, 5.0 + EPOCH_S * k, rng, max_c=85.0)) for k in range(3)]
    obs += [with_freq_table(degraded(synthetic(topo, 20, 5.3 + EPOCH_S * k, rng, max_c=85.0), rng))
            for k in range(3)]
    yield "linux-like, 16 CPUs", topo, obs, 0.3


# --------------------------------------------------------------------------- record


def collect() -> dict[str, list[dict[str, Any]]]:
    """Decisions and array digests, per case, in order."""
    prior = os.environ.get(jit.ENV_VAR)
    # The numpy simulator path: the same states whether or not numba is installed.
    os.environ[jit.ENV_VAR] = "0"
    try:
        out: dict[str, list[dict[str, Any]]] = {}
        for chip, workload, seed, epochs, warm_s in SIM_RUNS:
            rows = out[f"sim {chip}/{workload}/{seed}"] = []
            ext = None
            for topo, obs, prev, policy in sim_run(chip, workload, seed, epochs, warm_s):
                ext = ext or FeatureExtractor(topo)
                rows.append({"decision": decision_record(policy.decide(obs)), "arrays": array_record(ext, obs, prev)})
    finally:
        if prior is None:
            os.environ.pop(jit.ENV_VAR, None)
        else:
            os.environ[jit.ENV_VAR] = prior
    for label, topo, observations, threshold in synthetic_runs():
        policy = OnnxPolicy(POLICY, service=False, move_threshold=threshold)
        policy.reset(topo, None)  # type: ignore[arg-type]
        ext = FeatureExtractor(topo)
        rows = out[label] = []
        prev = None
        for obs in observations:
            d = policy.decide(obs)
            rows.append({"decision": decision_record(d), "arrays": array_record(ext, obs, prev)})
            # The same state again with the decision in effect: the steady epoch.
            again = settled(obs, d, obs.time_s + EPOCH_S / 2)
            rows.append({"decision": decision_record(policy.decide(again)), "arrays": array_record(ext, again, obs)})
            prev = again
    return out


def normalised(data: Any) -> Any:
    """JSON's view of ``data`` (tuples become lists)."""
    return json.loads(json.dumps(data))


@pytest.fixture(scope="module")
def recorded() -> dict[str, list[dict[str, Any]]]:
    return normalised(collect())


@pytest.fixture(scope="module")
def expected() -> dict[str, list[dict[str, Any]]]:
    return json.loads(EXPECTED.read_text())


def test_the_cases_exercise_every_decoding_rule(expected) -> None:
    counts = np.sum([row["decision"]["rules"] for rows in expected.values() for row in rows], axis=0)
    assert (counts > 0).all(), dict(zip(RULES, counts.tolist()))
    assert any(row["decision"]["caps"] == [] and row["decision"]["affinity"] == []
               for rows in expected.values() for row in rows), "a steady epoch that changes nothing"


def test_model_inputs_are_bit_identical(recorded, expected) -> None:
    assert recorded.keys() == expected.keys()
    for case, rows in expected.items():
        assert len(recorded[case]) == len(rows), case
        for k, (got, want) in enumerate(zip(recorded[case], rows)):
            differ = [name for name in want["arrays"] if got["arrays"][name] != want["arrays"][name]]
            assert not differ, f"{case}, state {k}: {differ} changed"


def test_the_shipped_policy_decides_as_recorded(recorded, expected) -> None:
    for case, rows in expected.items():
        for k, (got, want) in enumerate(zip(recorded[case], rows)):
            for part in ("caps", "affinity", "refs", "threads_moved", "rules", "reasons"):
                assert got["decision"][part] == want["decision"][part], f"{case}, state {k}: {part} differ"


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(__doc__)
    EXPECTED.parent.mkdir(exist_ok=True)
    # One state per line: a changed decision shows as a changed line.
    cases = [f"{json.dumps(case)}:[\n" + ",\n".join(json.dumps(row, separators=(",", ":")) for row in rows) + "]"
             for case, rows in collect().items()]
    EXPECTED.write_text("{\n" + ",\n".join(cases) + "\n}\n")
    print(f"wrote {EXPECTED} ({EXPECTED.stat().st_size} bytes)")
