"""A learned policy on a machine whose thermal limit is not the training chips' 80 °C.

Run: ``OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/bench_limits.py
[--policy policies/default.onnx] [--chip 3d-64] [--limits 70 80 90] [--seeds 0 1 2]
[--workloads prefill-heavy decode-heavy mixed] [--shield] [--jobs 2]``

The shipped policy was trained on simulated chips whose DTM threshold is 80 °C. A real
machine's limit is its sensors' maximum or the operator's ``[safety] limit_c``: 70, 85,
95 °C. Here the same chip runs with its DTM threshold moved to each of ``--limits`` (the
critical temperature 15 °C above it; the simulated sensors report both, as coretemp
reports ``tempN_max``/``tempN_crit``), drained runs of 20 s of arrivals, and the table
gives per limit and workload the mean response time (mean over seeds), the time above
the DTM threshold (summed over seeds) and the hottest core (max over seeds).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ailfmd.lab.run import Scenario, run_scenario  # noqa: E402
from ailfmd.policy.onnx_policy import OnnxPolicy  # noqa: E402
from ailfmd.sim.chip import load_chip  # noqa: E402
from ailfmd.sim.workload import load_workload  # noqa: E402

DURATION_S = 20.0
DRAIN_S = 120.0
CRITICAL_ABOVE_C = 15.0


def run_one(job: tuple[str, str, float, str, int, bool]) -> tuple[float, str, int, float, float, float]:
    """(limit, workload, seed, mean response s, time above DTM s, peak °C) of one run."""
    policy_path, chip_name, limit_c, workload, seed, shield = job
    chip = load_chip(chip_name)
    dtm = dataclasses.replace(chip.dtm, threshold_c=limit_c, critical_c=limit_c + CRITICAL_ABOVE_C)
    chip = dataclasses.replace(chip, dtm=dtm)
    scenario = Scenario(chip, load_workload(workload), seed, DURATION_S, drain_s=DRAIN_S)
    result = run_scenario(scenario, OnnxPolicy(policy_path, service=False), shield=shield)
    m = result.metrics
    return (limit_c, workload, seed, m.mean_response_s or float("nan"), m.time_above_dtm_s, m.peak_temp_c)


def main() -> None:
    root = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default=str(root / "policies" / "default.onnx"))
    ap.add_argument("--chip", default="3d-64")
    ap.add_argument("--limits", type=float, nargs="+", default=[70.0, 80.0, 90.0])
    ap.add_argument("--workloads", nargs="+", default=["prefill-heavy", "decode-heavy", "mixed"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--shield", action="store_true", help="behind the daemon's safety shield")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    jobs = [(args.policy, args.chip, lim, wl, seed, args.shield)
            for lim in args.limits for wl in args.workloads for seed in args.seeds]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(run_one, jobs))
    print(f"{args.policy} on {args.chip}{' behind the shield' if args.shield else ''}, "
          f"seeds {' '.join(map(str, args.seeds))}, {DURATION_S:g} s of arrivals, drained")
    print("| DTM limit | workload | mean response (s) | time above DTM (s) | peak (°C) |")
    print("|---|---|---|---|---|")
    for lim in args.limits:
        for wl in args.workloads:
            cell = [r for r in rows if r[0] == lim and r[1] == wl]
            resp = sum(r[3] for r in cell) / len(cell)
            print(f"| {lim:g} °C | {wl} | {resp:.2f} | {sum(r[4] for r in cell):.2f} | "
                  f"{max(r[5] for r in cell):.1f} |")


if __name__ == "__main__":
    main()
