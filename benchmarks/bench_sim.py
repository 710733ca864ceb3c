"""Speed of the simulation engine: the default chip running a busy workload.

Run: ``OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/bench_sim.py [--chip 3d-64]
[--workload mixed [decode-heavy ...]] [--seconds 30] [--repeats 3] [--ticks-ms 10 1]``

For each workload and tick (default: the 10 ms tick and the 1 ms reference tick) it
prints simulated seconds per wall-clock second and wall milliseconds per simulated second,
best of ``--repeats`` runs (the machine may be shared with other work; the best run is the
least disturbed), for:

- ``loop (linux)``: the offline control loop (``ailfm sim``): the ``linux`` baseline
  observes, decides and applies every 100 ms epoch; under it the stacked chip lives on
  hardware DTM, so most ticks are resolved in 1 ms DTM sub-steps;
- ``engine``: ``Engine.advance`` alone, same scenario;
- ``engine, reference``: the same with ``reference=True`` (no steady-segment path, the
  plain sub-step loop): what the fast paths gain;
- ``engine, 1 GHz caps``: every core capped to the lowest level (1 GHz on ``3d-64``), so
  DTM never acts (what a thermally safe policy costs to simulate).

Each case runs on the compiled kernels (numba, when installed) and again on the numpy
path (``, numpy``); ``engine, reference`` is numpy throughout. ``--numpy-only`` skips the
compiled runs.

It also prints the share of ticks resolved in DTM sub-steps and of ticks taken by the
steady-segment path. Small matrix-vector products run best on one BLAS thread, hence
``OPENBLAS_NUM_THREADS=1`` (set here if unset).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import time  # noqa: E402
from typing import Callable  # noqa: E402

from ailfmd.lab.run import Scenario, run_scenario  # noqa: E402
from ailfmd.sim import jit  # noqa: E402
from ailfmd.policy.baselines import get_baseline  # noqa: E402
from ailfmd.sim.chip import DEFAULT_CHIP, Chip, load_chip  # noqa: E402
from ailfmd.sim.engine import Engine  # noqa: E402
from ailfmd.sim.workload import Workload, load_workload  # noqa: E402


def best_wall_s(run: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def loop_run(scenario: Scenario, compiled: bool) -> None:
    """The offline control loop under ``linux``; the numpy path through the environment
    (the loop builds its engine itself)."""
    saved = os.environ.get(jit.ENV_VAR)
    os.environ[jit.ENV_VAR] = "1" if compiled else "0"
    try:
        run_scenario(scenario, get_baseline("linux"))
    finally:
        if saved is None:
            del os.environ[jit.ENV_VAR]
        else:
            os.environ[jit.ENV_VAR] = saved


def bench(chip: Chip, workload: Workload, seed: int, secs: float, tick_s: float, repeats: int,
          paths: list[bool]) -> None:
    scenario = Scenario(chip, workload, seed, secs, tick_s=tick_s)
    engines: list[Engine] = []

    def engine_run(compiled: bool, capped: bool = False, reference: bool = False) -> None:
        eng = Engine(chip, workload, seed, secs, tick_s=tick_s, reference=reference, compiled=compiled)
        if capped:
            for cpu in range(chip.n_cores):
                eng.set_cap_khz(cpu, chip.vf.min_mhz * 1000)
        eng.advance(secs)
        engines.append(eng)

    def named(name: str, compiled: bool) -> str:
        return name if compiled else f"{name}, numpy"

    caps = f"engine, {chip.vf.min_mhz / 1000:g} GHz caps"
    cases: list[tuple[str, Callable[[], object]]] = []
    for c in paths:
        cases += [(named("loop (linux)", c), lambda c=c: loop_run(scenario, c)),
                  (named("engine", c), lambda c=c: engine_run(c))]
    cases.append(("engine, reference", lambda: engine_run(False, reference=True)))
    for c in paths:
        cases.append((named(caps, c), lambda c=c: engine_run(c, capped=True)))
    for name, run in cases:
        engines.clear()
        wall = best_wall_s(run, repeats)
        shares = ""
        if engines:
            st = engines[-1].state
            ticks = max(st.tick_no, 1)
            shares = f"{100.0 * st.substep_ticks / ticks:>10.0f} % {100.0 * st.steady_ticks / ticks:>8.0f} %"
        print(f"{workload.name:<14} {tick_s * 1e3:>4g} ms  {name:<29} {secs / wall:>9.1f} "
              f"{wall / secs * 1e3:>10.2f}  {shares}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chip", default=DEFAULT_CHIP)
    parser.add_argument("--workload", nargs="+", default=["mixed"])
    parser.add_argument("--seconds", type=float, default=30.0, help="simulated seconds per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ticks-ms", type=float, nargs="+", default=[10.0, 1.0])
    parser.add_argument("--numpy-only", action="store_true", help="skip the compiled kernels")
    args = parser.parse_args()
    chip = load_chip(args.chip)
    have_compiled = not args.numpy_only and jit.load(None) is not None
    paths = [True, False] if have_compiled else [False]
    print(f"chip {chip.name}, seed {args.seed}, {args.seconds:g} simulated s, best of {args.repeats}, "
          f"compiled kernels: {'yes' if have_compiled else 'no (numpy path only)'}")
    print(f"{'workload':<14} {'tick':>7}  {'what':<29} {'sim-s/s':>9} {'ms/sim-s':>10}  "
          f"{'sub-stepped':>12} {'steady':>10}")
    for name in args.workload:
        workload = load_workload(name)
        for tick_ms in args.ticks_ms:
            bench(chip, workload, args.seed, args.seconds, tick_ms * 1e-3, args.repeats, paths)


if __name__ == "__main__":
    main()
