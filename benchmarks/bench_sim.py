"""Speed of the simulation engine: the default chip running a busy workload.

Run: ``OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/bench_sim.py [--chip 3d-64]
[--workload mixed] [--seconds 30] [--repeats 3]``

For the default 10 ms tick and the 1 ms reference tick it prints simulated seconds per
wall-clock second and wall milliseconds per simulated second, best of ``--repeats`` runs
(the machine may be shared with other work; the best run is the least disturbed), for:

- ``loop``: the offline control loop (``ailfm sim``): the ``linux`` baseline observes,
  decides and applies every 100 ms epoch; under it the stacked chip lives on hardware
  DTM, so most ticks are resolved in 1 ms DTM sub-steps;
- ``engine``: ``Engine.advance`` alone, same scenario;
- ``engine, safe caps``: every core capped to the lowest level, so DTM never acts (what a
  thermally safe policy costs to simulate).

It also prints the share of ticks that needed DTM sub-steps. Small matrix-vector products
run best on one BLAS thread, hence ``OPENBLAS_NUM_THREADS=1`` (set here if unset).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import time  # noqa: E402
from typing import Callable  # noqa: E402

from ailfmd.lab.run import Scenario, run_scenario  # noqa: E402
from ailfmd.policy.baselines import get_baseline  # noqa: E402
from ailfmd.sim.chip import DEFAULT_CHIP, load_chip  # noqa: E402
from ailfmd.sim.engine import Engine  # noqa: E402
from ailfmd.sim.workload import load_workload  # noqa: E402


def best_wall_s(run: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chip", default=DEFAULT_CHIP)
    parser.add_argument("--workload", default="mixed")
    parser.add_argument("--seconds", type=float, default=30.0, help="simulated seconds per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    chip, workload = load_chip(args.chip), load_workload(args.workload)
    secs = args.seconds

    print(f"chip {chip.name}, workload {workload.name}, seed {args.seed}, {secs:g} simulated s, "
          f"best of {args.repeats}")
    print(f"{'tick':>6}  {'what':<20} {'sim-s per wall-s':>16} {'wall ms per sim-s':>18}  sub-stepped ticks")
    for tick_s in (0.01, 0.001):
        scenario = Scenario(chip, workload, args.seed, secs, tick_s=tick_s)
        engines: list[Engine] = []

        def engine_run(capped: bool) -> None:
            eng = Engine(chip, workload, args.seed, secs, tick_s=tick_s)
            if capped:
                for cpu in range(chip.n_cores):
                    eng.set_cap_khz(cpu, chip.vf.min_mhz * 1000)
            eng.advance(secs)
            engines.append(eng)

        cases = [
            ("loop (linux)", lambda: run_scenario(scenario, get_baseline("linux"))),
            ("engine", lambda: engine_run(False)),
            ("engine, safe caps", lambda: engine_run(True)),
        ]
        for name, run in cases:
            engines.clear()
            wall = best_wall_s(run, args.repeats)
            share = ""
            if engines:
                eng = engines[-1]
                share = f"{100.0 * eng.state.substep_ticks / max(eng.state.tick_no, 1):.0f} %"
            print(f"{tick_s * 1e3:>4g} ms  {name:<20} {secs / wall:>16.1f} "
                  f"{wall / secs * 1e3:>18.2f}  {share}")


if __name__ == "__main__":
    main()
