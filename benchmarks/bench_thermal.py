"""Cost of the thermal model on the default chip: one exact step, and one propagator.

Run: ``.venv/bin/python benchmarks/bench_thermal.py [--chip 3d-64] [--dt-s 0.001]``

Prints the median wall time of one step (node form ``step`` and modal form
``step_modes``, and the power model plus a modal step, which is what a simulator tick
pays), the implied simulated seconds per wall-clock second at the given step size, and the
one-off cost of building the model and of a new step size. Small matrix-vector products
run best on one BLAS thread: ``OPENBLAS_NUM_THREADS=1`` keeps the numbers steady.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from ailfmd.sim.chip import DEFAULT_CHIP, load_chip
from ailfmd.sim.power import PowerModel
from ailfmd.sim.thermal import ThermalModel

STEPS_PER_SAMPLE = 2_000
SAMPLES = 15


def _median_per_call_s(fn, calls: int, samples: int) -> float:
    per_call = []
    for _ in range(samples):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        per_call.append((time.perf_counter() - start) / calls)
    return statistics.median(per_call)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chip", default=DEFAULT_CHIP)
    parser.add_argument("--dt-s", type=float, default=1e-3)
    args = parser.parse_args()

    chip = load_chip(args.chip)
    start = time.perf_counter()
    model = ThermalModel(chip)
    build_s = time.perf_counter() - start
    power_model = PowerModel(chip)

    fresh = iter(args.dt_s * (1.0 + 1e-9 * i) for i in range(1, 10_000))
    propagator_s = _median_per_call_s(lambda: model.propagator(next(fresh)), 1, 20)

    rng = np.random.default_rng(0)
    power_w = rng.uniform(1.0, 10.0, chip.n_cores)
    state = {"temps": model.steady_state(power_w * 0.5)}
    model.propagator(args.dt_s)

    def thermal_step() -> None:
        state["temps"] = model.step(state["temps"], power_w, args.dt_s)

    modal = {"modes": model.to_modes(state["temps"])}

    def modal_step() -> None:
        modal["modes"], _ = model.step_modes(modal["modes"], power_w, args.dt_s)

    activity = rng.uniform(0.2, 1.0, chip.n_cores)
    # Lowest V/f: thermally stable without DTM, so the loop never runs away to inf/NaN.
    freqs = np.full(chip.n_cores, float(chip.vf.min_mhz))

    def tick() -> None:
        p = power_model.tile_power_w(activity, freqs, state["cores"])
        modal["modes"], state["cores"] = model.step_modes(modal["modes"], p, args.dt_s)

    step_s = _median_per_call_s(thermal_step, STEPS_PER_SAMPLE, SAMPLES)
    modal_s = _median_per_call_s(modal_step, STEPS_PER_SAMPLE, SAMPLES)
    modal["modes"] = model.to_modes(model.ambient_temps())
    state["cores"] = model.ambient_temps()[model.core_nodes]
    tick_s = _median_per_call_s(tick, STEPS_PER_SAMPLE, SAMPLES)

    print(f"chip {chip.name}: {chip.n_cores} cores, {model.n_nodes} thermal nodes, dt {args.dt_s:g} s")
    print(f"model build (network + eigh + steady-state solve): {build_s * 1e3:.2f} ms")
    print(f"new step size (propagator precompute):             {propagator_s * 1e3:.3f} ms")
    print(f"thermal step, median:                              {step_s * 1e6:.2f} us"
          f"  -> {args.dt_s / step_s:,.0f} simulated s per wall s")
    print(f"modal thermal step (step_modes), median:           {modal_s * 1e6:.2f} us"
          f"  -> {args.dt_s / modal_s:,.0f} simulated s per wall s")
    print(f"power model + modal step (a simulator tick):       {tick_s * 1e6:.2f} us"
          f"  -> {args.dt_s / tick_s:,.0f} simulated s per wall s")


if __name__ == "__main__":
    main()
