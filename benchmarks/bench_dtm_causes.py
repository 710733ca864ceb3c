"""Where a policy's time above DTM comes from, by what the hottest core was doing.

Run: ``OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/bench_dtm_causes.py
[--policy onnx:policies/default.onnx] [--shield] [--chips 3d-64] [--seeds 900 901 902]``

Runs the policy (behind the daemon's shield with ``--shield``) on the training
evaluation's workloads, 30 s of arrivals then drained, in 10 ms steps. Every step that
ends with a core at or above the DTM threshold is put down to the hottest core, by what
it was at the start of that epoch, when the policy and the shield last decided:

- ``landing``: idle then, now running a thread of a request that was not there
  (a request's threads woke on an idle core between two decisions);
- ``idle, heated``: idle then and still without a thread (heat from its neighbours);
- ``busy, was cool``: running a thread then, and below the shield's guard band
  (limit - margin): it rose past the limit within one epoch;
- ``busy, was hot``: running a thread then, and already in the guard band (the cuts
  were too slow);
- ``other``: the rest (a thread that moved there, or one that finished).

Prints the seconds per cause over all runs and the engine's own time above DTM.
"""

from __future__ import annotations

import argparse
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from ailfmd.control.shield import SafetyShield, ShieldConfig  # noqa: E402
from ailfmd.policy.baselines import configure_for_chip, get_baseline  # noqa: E402
from ailfmd.policy.onnx_policy import OnnxPolicy  # noqa: E402
from ailfmd.sim.chip import load_chip  # noqa: E402
from ailfmd.sim.platform import SimPlatform  # noqa: E402
from ailfmd.sim.workload import load_workload  # noqa: E402

WORKLOADS = ("prefill-heavy", "decode-heavy", "bursty", "long-context", "mixed", "eval-chat", "eval-bursty-13b")
DURATION_S, DRAIN_S, EPOCH_S, STEP_S = 30.0, 120.0, 0.1, 0.01
CAUSES = ("landing", "idle, heated", "busy, was cool", "busy, was hot", "other")


def one_run(job: tuple[str, bool, str, str, int]) -> tuple[Counter, float]:
    """(seconds per cause, the engine's time above DTM) of one run."""
    policy_name, shield, chip_name, workload, seed = job
    chip = load_chip(chip_name)
    plat = SimPlatform(chip, load_workload(workload), seed, tick_s=STEP_S, duration_s=DURATION_S)
    policy = (OnnxPolicy(policy_name.split(":", 1)[1], service=False) if policy_name.startswith("onnx:")
              else get_baseline(policy_name, chip))
    configure_for_chip(policy, chip)
    policy.reset(plat.topology(), plat.capabilities())
    dtm = chip.dtm
    config = ShieldConfig(limit_c=dtm.threshold_c, critical_c=dtm.critical_c)
    guard = SafetyShield(config, plat.topology()) if shield else None
    guard_band_c = dtm.threshold_c - config.margin_c
    causes: Counter = Counter()
    t = 0.0
    while t < DURATION_S - 1e-9 or (t < DURATION_S + DRAIN_S and plat.metrics().requests_in_flight > 0):
        obs = plat.observe()
        decision = policy.decide(obs)
        if guard is not None:
            decision, _ = guard.filter(obs, decision)
        plat.apply(decision.action)
        busy = {s.last_cpu for s in obs.threads.values()}
        known_pids = {s.ref.pid for s in obs.threads.values()}
        start_c = {c: st.temp.temp_c for c, st in obs.cpus.items()}
        for _ in range(round(EPOCH_S / STEP_S)):
            plat.advance(STEP_S)
            t += STEP_S
            state = plat.engine.state
            temps = state.temps_c
            hot = int(np.argmax(temps))
            if temps[hot] < dtm.threshold_c:
                continue
            on_it = [int(p) for p, c in zip(state.threads.pid.tolist(), state.threads.core.tolist()) if c == hot]
            if hot not in busy:
                cause = ("landing" if any(p not in known_pids for p in on_it) else
                         "idle, heated" if not on_it else "other")
            else:
                was = start_c.get(hot)
                cause = "busy, was hot" if was is not None and was >= guard_band_c else "busy, was cool"
            causes[cause] += STEP_S
    return causes, plat.metrics().time_above_dtm_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="onnx:policies/default.onnx")
    ap.add_argument("--shield", action="store_true")
    ap.add_argument("--chips", nargs="+", default=["3d-64"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[900, 901, 902])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    jobs = [(args.policy, args.shield, c, w, s) for c in args.chips for w in WORKLOADS for s in args.seeds]
    total: Counter = Counter()
    engine_s = 0.0
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for causes, above_s in pool.map(one_run, jobs):
            total += causes
            engine_s += above_s
    print(f"{args.policy}{' behind the shield' if args.shield else ''}: {len(jobs)} runs on "
          f"{', '.join(args.chips)}; the engine counted {engine_s:.2f} s above DTM")
    steps = sum(total.values())
    for cause in CAUSES:
        share = total[cause] / steps if steps else 0.0
        print(f"  {cause:15s} {total[cause]:7.2f} s  {share:6.1%}")


if __name__ == "__main__":
    main()
