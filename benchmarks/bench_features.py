"""Cost of the learned policy's feature extraction per decision.

Run: ``.venv/bin/python benchmarks/bench_features.py [--threads 64] [--repeat 2000]``

Builds two observations of the 64-core ``3d-64`` chip (4 dies of 4 x 4) with
``--threads`` managed threads carrying every counter a simulated or PMU-equipped Linux
machine reports (values drawn from a seeded generator, a few threads pinned), then times
``FeatureExtractor.extract(obs, prev)`` (core + thread arrays, with slopes) and
``FeatureSet.pair_matrix()`` separately, and once the one-off topology setup of a new
extractor. Prints median and p99 in microseconds.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ailfmd.platform.base import (  # noqa: E402
    CpuState,
    CpuTemp,
    Observation,
    TempReading,
    TempSensor,
    ThreadRef,
    ThreadSample,
)
from ailfmd.policy.features import FeatureExtractor  # noqa: E402
from ailfmd.sim.chip import load_chip  # noqa: E402
from ailfmd.sim.platform import SimPlatform  # noqa: E402
from ailfmd.sim.workload import load_workload  # noqa: E402

MAX_C = 80.0  # the sensors' maximum: the simulated chips' limit


@functools.lru_cache(maxsize=None)
def sensors(n_cpus: int) -> tuple[TempSensor, ...]:
    """One sensor per CPU, the same records in every observation (as platforms keep them)."""
    return tuple(TempSensor("sim", "bench", f"core{c}", f"Core {c}", "core", "") for c in range(n_cpus))


def observation(n_cpus: int, n_threads: int, time_s: float, rng: np.random.Generator) -> Observation:
    """Temperatures 45-85 °C, every sensor reporting an 80 °C maximum."""
    everything = frozenset(range(n_cpus))
    cpus = {}
    readings = []
    for c, sensor in enumerate(sensors(n_cpus)):
        temp = CpuTemp(c, float(rng.uniform(45, 85)), sensor, "simulated per-core sensor")
        readings.append(TempReading(sensor, temp.temp_c, max_c=MAX_C))
        cpus[c] = CpuState(c, temp, int(rng.integers(10, 41)) * 100_000, 4_000_000, 1_000_000, 4_000_000)
    threads = {}
    for i in range(n_threads):
        tid = 1000 + i
        ins = float(rng.uniform(1e6, 4e8))
        cyc = ins / float(rng.uniform(0.05, 2.5))
        counters = {
            "instructions": ins, "cycles": cyc, "llc_references": ins * 0.02,
            "llc_misses": ins * float(rng.uniform(0, 0.06)), "stalled_cycles_backend": cyc * 0.4,
            "task_clock_ns": 9e7, "run_ns": 9e7, "wait_ns": 5e6, "timeslices": 3.0,
            "context_switches": 3.0, "cpu_migrations": 0.0,
        }
        aff = frozenset({i % n_cpus}) if i % 8 == 0 else everything
        threads[tid] = ThreadSample(ThreadRef(1000, tid, 5), f"w{i}", i % n_cpus, aff, counters)
    return Observation(time_s=time_s, cpus=cpus, threads=threads, sensors=tuple(readings))


def timed(fn, repeat: int) -> tuple[float, float]:
    samples = np.empty(repeat)
    for i in range(repeat):
        t0 = time.perf_counter_ns()
        fn()
        samples[i] = time.perf_counter_ns() - t0
    return float(np.median(samples)) / 1e3, float(np.percentile(samples, 99)) / 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2000)
    args = ap.parse_args()

    chip = load_chip("3d-64")
    topo = SimPlatform(chip, load_workload("tiny-test"), seed=1).topology()
    ext = FeatureExtractor(topo, chip.noc)
    rng = np.random.default_rng(7)
    prev = observation(chip.n_cores, args.threads, 10.0, rng)
    obs = observation(chip.n_cores, args.threads, 10.1, rng)
    fs = ext.extract(obs, prev)
    # A run of observations 0.1 s apart (contents alternate), as the daemon sees them: each
    # extract gets the previous observation, whose temperatures the extractor kept.
    run = [Observation(10.0 + 0.1 * k, (prev, obs)[k % 2].cpus, (prev, obs)[k % 2].threads)
           for k in range(args.repeat + 1)]
    ext.extract(run[0])
    steps = iter(range(1, args.repeat + 1))

    def step() -> None:
        k = next(steps)
        ext.extract(run[k], run[k - 1])

    med_hot, p99_hot = timed(step, args.repeat)
    med_cold, p99_cold = timed(lambda: FeatureExtractor(topo, chip.noc).extract(obs, prev), 200)
    med_pair, p99_pair = timed(fs.pair_matrix, args.repeat)
    shape = fs.pair_matrix().shape
    print(f"{chip.n_cores} CPUs x {args.threads} threads, {args.repeat} repeats (microseconds)")
    print(f"  core + thread arrays (extract, with slopes) : median {med_hot:7.1f}  p99 {p99_hot:7.1f}")
    print(f"  pair matrix {shape}               : median {med_pair:7.1f}  p99 {p99_pair:7.1f}")
    print(f"  new extractor + extract (topology setup)   : median {med_cold:7.1f}  p99 {p99_cold:7.1f}")


if __name__ == "__main__":
    main()
