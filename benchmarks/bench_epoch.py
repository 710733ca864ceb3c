"""The control rate: time above DTM and response time of the learned policy behind the
shield at several epoch lengths.

Run: ``OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/bench_epoch.py
[--epochs-ms 100 50 20] [--chips 3d-64 2d-64] [--seeds 900 901 902] [--policy policies/default.onnx]``

The training evaluation's seven workloads on each chip, 30 s of arrivals then drained,
the policy behind the daemon's shield, once per epoch length (the policy and the shield
decide every epoch; the simulator's 10 ms tick is unchanged, so epochs are whole ticks). Prints per epoch length the
time above DTM summed over the runs and the mean response time against the first epoch
length (geometric mean of the per-run ratios, runs that answered requests).
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from ailfmd.lab.run import Scenario, run_scenario  # noqa: E402
from ailfmd.sim.engine import DEFAULT_TICK_S  # noqa: E402
from ailfmd.policy.onnx_policy import OnnxPolicy  # noqa: E402
from ailfmd.sim.chip import load_chip  # noqa: E402
from ailfmd.sim.workload import load_workload  # noqa: E402

WORKLOADS = ("prefill-heavy", "decode-heavy", "bursty", "long-context", "mixed", "eval-chat", "eval-bursty-13b")
DURATION_S, DRAIN_S = 30.0, 120.0

Job = tuple[str, str, str, int, float]


def one_run(job: Job) -> tuple[Job, float | None, float]:
    """(job, mean response, time above DTM) of one run behind the shield."""
    policy, chip, workload, seed, epoch_s = job
    scenario = Scenario(load_chip(chip), load_workload(workload), seed, DURATION_S, epoch_s=epoch_s, drain_s=DRAIN_S)
    m = run_scenario(scenario, OnnxPolicy(policy, service=False), shield=True).metrics
    return job, m.mean_response_s, m.time_above_dtm_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default=str(Path(__file__).resolve().parents[1] / "policies" / "default.onnx"))
    ap.add_argument("--epochs-ms", nargs="+", type=int, default=[100, 50, 20])
    ap.add_argument("--chips", nargs="+", default=["3d-64", "2d-64"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[900, 901, 902])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    tick_ms = round(DEFAULT_TICK_S * 1000)
    for e in args.epochs_ms:
        if e <= 0 or e % tick_ms:
            # A run rounds its epoch to whole simulator ticks: 25 ms would run as 20 ms.
            ap.error(f"--epochs-ms {e}: must be a positive multiple of the {tick_ms} ms simulator tick")
    cells = [(c, w, s) for c in args.chips for w in WORKLOADS for s in args.seeds]
    jobs = [(args.policy, c, w, s, e / 1000) for c, w, s in cells for e in args.epochs_ms]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = {job[1:]: (resp, above) for job, resp, above in pool.map(one_run, jobs)}
    first = args.epochs_ms[0] / 1000
    print(f"{args.policy} behind the shield, {len(cells)} runs per epoch length "
          f"({', '.join(args.chips)}; seeds {' '.join(map(str, args.seeds))})")
    for e_ms in args.epochs_ms:
        e = e_ms / 1000
        above = sum(results[(*cell, e)][1] for cell in cells)
        ratios = [results[(*cell, e)][0] / results[(*cell, first)][0] for cell in cells
                  if results[(*cell, e)][0] and results[(*cell, first)][0]]
        change = 100 * (float(np.exp(np.mean(np.log(ratios)))) - 1)
        print(f"  epoch {e_ms:4d} ms: {above:6.2f} s above DTM, mean response {change:+5.1f} % "
              f"against {args.epochs_ms[0]} ms ({len(ratios)} runs)")


if __name__ == "__main__":
    main()
