"""What the daemon's safety shield costs and buys, policy by policy, on the simulator.

Run: ``OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/bench_shield.py
[--policy onnx:policies/default.onnx linux] [--seeds 900 901 902 903 904 905] [--jobs 2]``

Every policy runs the training evaluation's scenarios (chips ``3d-64`` and ``2d-64``, its
seven workloads, 30 s of arrivals then up to 120 s of drain so every run answers the same
requests) twice: as ``ailfm bench`` runs it (no shield) and behind the shield with its
default configuration, as ``ailfmd`` runs it. Printed per policy: the shielded mean
response time relative to the unshielded one (geometric mean over the scenarios that
answered requests), the time above DTM summed over all runs, the hottest reading, and
how many epochs the shield acted in.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402

CHIPS = ("3d-64", "2d-64")
WORKLOADS = ("prefill-heavy", "decode-heavy", "bursty", "long-context", "mixed", "eval-chat", "eval-bursty-13b")


@dataclass(frozen=True)
class Run:
    policy: str  # a baseline name or "onnx:<path>"
    shield: bool
    chip: str
    workload: str
    seed: int


@dataclass(frozen=True)
class Outcome:
    mean_response_s: float | None
    time_above_dtm_s: float
    peak_temp_c: float
    shield_epochs: int


def _policy(name: str):
    from ailfmd.policy.baselines import get_baseline

    if name.startswith("onnx:"):
        from ailfmd.policy.onnx_policy import OnnxPolicy

        return OnnxPolicy(name[len("onnx:"):], service=False)
    return get_baseline(name)


def simulate(run: Run) -> Outcome:
    from ailfmd.lab.run import Scenario, run_scenario
    from ailfmd.sim.chip import load_chip
    from ailfmd.sim.workload import load_workload

    scenario = Scenario(load_chip(run.chip), load_workload(run.workload), run.seed, 30.0, drain_s=120.0)
    acted = [0]

    def count(obs, decision, result) -> None:
        acted[0] += any(r.source == "shield" for r in decision.reasons)

    result = run_scenario(scenario, _policy(run.policy), count, shield=run.shield)
    m = result.metrics
    return Outcome(m.mean_response_s, m.time_above_dtm_s, m.peak_temp_c, acted[0])


def summarise(policy: str, plain: list[Outcome], shielded: list[Outcome]) -> str:
    ratios = [s.mean_response_s / p.mean_response_s for p, s in zip(plain, shielded)
              if p.mean_response_s and s.mean_response_s]
    change = 100.0 * (float(np.exp(np.mean(np.log(ratios)))) - 1.0) if ratios else float("nan")
    lines = [f"{policy}: {len(plain)} runs per side"]
    for label, runs in (("no shield", plain), ("shield", shielded)):
        lines.append(f"  {label:9s}  above DTM {sum(o.time_above_dtm_s for o in runs):7.2f} s  "
                     f"peak {max(o.peak_temp_c for o in runs):5.1f} C  "
                     f"shield acted in {sum(o.shield_epochs for o in runs)} epochs")
    lines.append(f"  mean response time with the shield: {change:+.2f} % (geometric mean of {len(ratios)} ratios)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", nargs="+", default=["onnx:policies/default.onnx"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[900, 901, 902, 903, 904, 905])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    for policy in args.policy:
        runs = [Run(policy, shield, c, w, s) for shield in (False, True) for c in CHIPS for w in WORKLOADS
                for s in args.seeds]
        with ProcessPoolExecutor(args.jobs) as pool:
            outcomes = list(pool.map(simulate, runs))
        half = len(runs) // 2
        print(summarise(policy, outcomes[:half], outcomes[half:]), flush=True)


if __name__ == "__main__":
    main()
