"""Cost of one learned-policy decision, and how much cheaper it is than the oracle's.

Run: ``OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/bench_decision.py [--policy policies/default.onnx]
[--every-ms 100]``

1. **64 CPUs x 64 threads**: ``OnnxPolicy.decide`` (features, onnxruntime runs of the
   cap and move heads on 64 + 64 rows and of the destination head on 64 rows per moving
   thread, cap snapping, placement, reasons) on synthetic observations of the ``3d-64``
   chip with every counter present (``bench_features.observation``), alternating two
   observations so slopes are live. How many threads move is the model's call and the
   synthetic states are not ones it was trained on, so the two ends are measured by
   setting the move threshold: no thread moves (1.0: the usual epoch of a running
   daemon, its last decision in effect), every thread moves (0.0) and every cap changes.
2. **Same states as the oracle**: a ``decode-heavy`` run on ``3d-64`` driven by the oracle;
   at every epoch both the oracle and the learned policy decide on the same observation.
   Prints both costs and their ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_features import observation  # noqa: E402

from ailfmd.lab.run import Scenario, run_scenario  # noqa: E402
from ailfmd.platform.base import Action, Observation  # noqa: E402
from ailfmd.policy.onnx_policy import OnnxPolicy  # noqa: E402
from ailfmd.policy.oracle import Oracle  # noqa: E402
from ailfmd.sim.chip import load_chip  # noqa: E402
from ailfmd.sim.platform import SimPlatform  # noqa: E402
from ailfmd.sim.workload import load_workload  # noqa: E402


def percentiles(samples_ns: list[float]) -> str:
    a = np.array(samples_ns) / 1e3
    return f"median {np.median(a):.0f} µs, p99 {np.percentile(a, 99):.0f} µs, max {a.max():.0f} µs"


def settled(obs: Observation, action: Action) -> Observation:
    """``obs`` as it reads once ``action`` is in effect (caps and affinities applied)."""
    cpus = {c: replace(st, cap_khz=action.freq_cap_khz.get(c, st.cap_khz)) for c, st in obs.cpus.items()}
    threads = {t: replace(s, affinity=action.affinity.get(s.ref, s.affinity), last_cpu=next(iter(
        action.affinity.get(s.ref, frozenset({s.last_cpu}))))) for t, s in obs.threads.items()}
    return replace(obs, cpus=cpus, threads=threads)


def synthetic(policy_path: str, threads: int, repeat: int) -> None:
    chip = load_chip("3d-64")
    topo = SimPlatform(chip, load_workload("tiny-test"), seed=1).topology()
    rng = np.random.default_rng(7)
    raw = [observation(chip.n_cores, threads, 10.0 + 0.1 * i, rng) for i in range(2)]
    for label, steady in (("every thread moves, every cap changes", False),
                          ("no thread moves, the last decision in effect", True)):
        policy = OnnxPolicy(policy_path, service=False)
        policy.move_threshold = 1.0 if steady else 0.0
        policy.reset(topo, None)  # type: ignore[arg-type]
        obs = raw
        if steady:
            # Settle each observation under the policy's own decision, twice, so the
            # next decision on it changes little (as in a running daemon).
            for _ in range(2):
                obs = [settled(o, policy.decide(o).action) for o in obs]
        for i in range(50):  # warm-up: onnxruntime allocates on the first runs
            policy.decide(obs[i % 2])
        samples = []
        for i in range(repeat):
            o = obs[i % 2]
            t0 = time.perf_counter_ns()
            policy.decide(o)
            samples.append(time.perf_counter_ns() - t0)
        print(f"decide, {chip.n_cores} CPUs x {threads} threads, {label}, {repeat} decisions: "
              f"{percentiles(samples)}")


def paced(policy_path: str, threads: int, every_ms: float, repeat: int) -> None:
    """The steady state once every ``every_ms``, as the daemon decides, in the thread's
    CPU time: between two decisions the caches go cold, as they do in ``ailfmd``."""
    chip = load_chip("3d-64")
    topo = SimPlatform(chip, load_workload("tiny-test"), seed=1).topology()
    rng = np.random.default_rng(7)
    obs = [observation(chip.n_cores, threads, 10.0 + 0.1 * i, rng) for i in range(2)]
    policy = OnnxPolicy(policy_path, service=False)
    policy.move_threshold = 1.0
    policy.reset(topo, None)  # type: ignore[arg-type]
    for _ in range(2):
        obs = [settled(o, policy.decide(o).action) for o in obs]
    for i in range(50):
        policy.decide(obs[i % 2])
    cold, warm = [], []
    for i in range(repeat):
        time.sleep(every_ms / 1000.0)
        t0 = time.thread_time_ns()
        policy.decide(obs[i % 2])
        t1 = time.thread_time_ns()
        policy.decide(obs[(i + 1) % 2])  # right after: caches warm
        cold.append(t1 - t0)
        warm.append(time.thread_time_ns() - t1)
    print(f"decide, {chip.n_cores} CPUs x {threads} threads, no thread moves, CPU time: "
          f"once every {every_ms:g} ms {percentiles(cold)}; right after another {percentiles(warm)}")


def same_states(policy_path: str, seconds: float) -> None:
    chip, workload = load_chip("3d-64"), load_workload("decode-heavy")
    scenario = Scenario(chip, workload, 0, seconds)
    learned = OnnxPolicy(policy_path, service=False)
    oracle_ns: list[float] = []
    learned_ns: list[float] = []
    holder: dict[str, object] = {}

    class Timed:
        name = "oracle"

        def __init__(self, platform: SimPlatform) -> None:
            self.oracle = Oracle(platform, epoch_s=scenario.epoch_s)

        def reset(self, topology, capabilities) -> None:
            self.oracle.reset(topology, capabilities)
            learned.reset(topology, capabilities)

        def decide(self, obs):
            t0 = time.perf_counter_ns()
            learned.decide(obs)
            t1 = time.perf_counter_ns()
            d = self.oracle.decide(obs)
            t2 = time.perf_counter_ns()
            learned_ns.append(t1 - t0)
            oracle_ns.append(t2 - t1)
            return d

    run_scenario(scenario, lambda p: holder.setdefault("p", Timed(p)))  # type: ignore[arg-type]
    ratio = np.mean(oracle_ns) / np.mean(learned_ns)
    print(f"same {len(oracle_ns)} states of 3d-64/decode-heavy: learned {percentiles(learned_ns)}; "
          f"oracle mean {np.mean(oracle_ns) / 1e6:.1f} ms; oracle / learned = {ratio:.0f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default=str(Path(__file__).resolve().parents[1] / "policies" / "default.onnx"))
    ap.add_argument("--threads", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3000)
    ap.add_argument("--seconds", type=float, default=10.0, help="simulated seconds of the oracle run")
    ap.add_argument("--every-ms", type=float, default=None,
                    help="only the steady state, one decision per this many ms (the daemon: 100)")
    args = ap.parse_args()
    if args.every_ms is not None:
        paced(args.policy, args.threads, args.every_ms, min(args.repeat, 600))
        return
    synthetic(args.policy, args.threads, args.repeat)
    same_states(args.policy, args.seconds)


if __name__ == "__main__":
    main()
