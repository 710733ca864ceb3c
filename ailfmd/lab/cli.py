"""``ailfm``: the offline lab. ``ailfm sim`` runs one scenario on the simulated chip.

Subcommands register themselves in :func:`build_parser` (one ``_add_*`` function each),
so ``bench``, ``record`` and ``train`` slot in beside ``sim``. Errors the user can fix (a
bad chip or workload file, an unknown policy) print one line naming the file, key and
value and exit with status 2; they never print a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from ailfmd.errors import AilfmError
from ailfmd.sim.chip import DEFAULT_CHIP, load_chip
from ailfmd.sim.engine import DEFAULT_TICK_S
from ailfmd.sim.metrics import RunMetrics

EXIT_USAGE = 2  # bad input, as argparse uses
DEFAULT_DRAIN_S = 120.0  # bench: answer every request (a long-context answer can take 40 s)


def _number(text: str, zero_ok: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value >= 0 if zero_ok else value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} must be {'>=' if zero_ok else '>'} 0")
    return value


def _positive_float(text: str) -> float:
    return _number(text, zero_ok=False)


def _non_negative_float(text: str) -> float:
    return _number(text, zero_ok=True)


# --------------------------------------------------------------------------- sim


def _add_sim(sub: argparse._SubParsersAction) -> None:
    from ailfmd.lab.run import DEFAULT_EPOCH_S
    from ailfmd.policy.baselines import baseline_names

    s = sub.add_parser("sim", help="simulate one scenario and print its metrics",
                       description="Run a workload on a simulated chip under a policy, in "
                                   "virtual time, and print response times, throughput, "
                                   "temperature and energy.")
    s.add_argument("--chip", default=DEFAULT_CHIP,
                   help=f"shipped chip name or TOML file (default {DEFAULT_CHIP})")
    s.add_argument("--workload", required=True, help="shipped workload name or TOML file")
    s.add_argument("--policy", default="linux", help=f"baseline policy ({', '.join(baseline_names())})")
    s.add_argument("--duration", type=_positive_float, required=True, metavar="S",
                   help="simulated seconds of request arrivals")
    s.add_argument("--seed", type=int, default=0, help="seed of the request stream (default 0)")
    s.add_argument("--epoch-ms", type=_positive_float, default=DEFAULT_EPOCH_S * 1e3,
                   help="control period of the policy (default %(default)g ms)")
    s.add_argument("--tick-ms", type=_positive_float, default=DEFAULT_TICK_S * 1e3,
                   help="simulation tick (default %(default)g ms; DTM is resolved to 1 ms)")
    s.add_argument("--drain", type=_non_negative_float, default=0.0, metavar="S",
                   help="after the arrivals, run on until every request is answered, at most S s (default 0)")
    s.add_argument("--json", action="store_true", help="print the metrics as JSON")
    s.set_defaults(func=_cmd_sim)


def _cmd_sim(args: argparse.Namespace) -> int:
    from ailfmd.lab.run import Scenario, run_scenario
    from ailfmd.policy.baselines import get_baseline
    from ailfmd.sim.workload import load_workload

    chip = load_chip(args.chip)
    workload = load_workload(args.workload)
    policy = get_baseline(args.policy)
    scenario = Scenario(chip, workload, args.seed, args.duration, args.epoch_ms / 1e3, args.tick_ms / 1e3,
                        args.drain)
    result = run_scenario(scenario, policy)
    head = {"chip": chip.name, "workload": workload.name, "policy": policy.name, "seed": args.seed,
            "tick_s": scenario.tick_s, "epoch_s": scenario.epoch_s}
    if args.json:
        json.dump({"scenario": head, **result.metrics.as_dict()}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render_metrics(head, result.metrics, chip.dtm.threshold_c))
    return 0


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def render_metrics(head: dict[str, object], m: RunMetrics, dtm_threshold_c: float) -> str:
    """The small human table ``ailfm sim`` prints."""
    rows = [
        ("scenario", f"chip {head['chip']}, workload {head['workload']}, policy {head['policy']}, "
                     f"seed {head['seed']}, {m.duration_s:g} s (tick {head['tick_s'] * 1e3:g} ms, "
                     f"epoch {head['epoch_s'] * 1e3:g} ms)"),
        ("requests", f"{m.requests_completed} completed, {m.requests_in_flight} in flight, "
                     f"{m.requests_arrived} arrived"),
        ("response", f"mean {_fmt(m.mean_response_s, '.3f', ' s')}, "
                     f"p99 {_fmt(m.p99_response_s, '.3f', ' s')}"),
        ("tokens/s", f"output {m.output_tokens_per_s:.2f}, prefill {m.prefill_tokens_per_s:.1f}"),
        ("peak temp", f"{m.peak_temp_c:.1f} °C (DTM threshold {dtm_threshold_c:g} °C)"),
        ("above DTM", f"{m.time_above_dtm_s:.2f} s ({100 * m.time_above_dtm_fraction:.1f} %), "
                      f"{m.dtm_throttle_events} throttle events"),
        ("energy", f"{m.energy_j:.0f} J, {_fmt(m.energy_per_output_token_j, '.2f', ' J')} per output token"),
        ("frequency", f"mean {_fmt(m.mean_freq_mhz, '.0f', ' MHz')}, "
                      f"busy cores {_fmt(m.mean_busy_freq_mhz, '.0f', ' MHz')}"),
        ("migrations", f"{m.migrations}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "".join(f"{k:<{width}}  {v}\n" for k, v in rows)


# --------------------------------------------------------------------------- bench


def _csv(text: str) -> tuple[str, ...]:
    items = tuple(t.strip() for t in text.split(",") if t.strip())
    if not items:
        raise argparse.ArgumentTypeError(f"{text!r}: empty list")
    return items


def _int_csv(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in _csv(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from ailfmd.lab.run import DEFAULT_EPOCH_S

    b = sub.add_parser("bench", help="run chips x workloads x policies x seeds; write tables and plots",
                       description="Run every combination of chips, workloads, policies and seeds "
                                   "in parallel worker processes and write results.csv, "
                                   "results.json, traces.json, table.md and PNG plots (with "
                                   "matplotlib) into the output folder.")
    b.add_argument("--chips", type=_csv, help="comma-separated chip names or TOML files")
    b.add_argument("--workloads", type=_csv, help="comma-separated workload names or TOML files")
    b.add_argument("--policies", type=_csv,
                   help="comma-separated policies: baselines, 'oracle', learned .onnx files "
                        "(default every baseline and the oracle)")
    b.add_argument("--seeds", type=_int_csv, help="comma-separated seeds (default 0)")
    b.add_argument("--duration", type=_positive_float, metavar="S", help="simulated seconds per run")
    b.add_argument("--epoch-ms", type=_positive_float, default=DEFAULT_EPOCH_S * 1e3,
                   help="control period of the policies (default %(default)g ms)")
    b.add_argument("--tick-ms", type=_positive_float, default=DEFAULT_TICK_S * 1e3,
                   help="simulation tick (default %(default)g ms)")
    b.add_argument("--drain", type=_non_negative_float, default=DEFAULT_DRAIN_S, metavar="S",
                   help="after the arrivals stop, run on until every request is answered, at most "
                        "S more seconds, so every policy answers the same requests (default %(default)g; "
                        "0: stop when arrivals stop)")
    b.add_argument("--out", default="bench-results", help="output folder (default %(default)s)")
    b.add_argument("--jobs", type=int, default=0, help="worker processes (default: one per CPU)")
    b.add_argument("--quick", action="store_true",
                   help="small CI configuration: tiny chip, tiny-test workload, 2 s, seed 0, "
                        "every policy (explicit options still override)")
    b.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ailfmd.lab import bench

    quick = bench.QUICK if args.quick else {}
    chips = args.chips or quick.get("chips")
    workloads = args.workloads or quick.get("workloads")
    duration = args.duration or quick.get("duration_s")
    missing = [opt for opt, v in (("--chips", chips), ("--workloads", workloads), ("--duration", duration))
               if not v]
    if missing:
        raise bench.BenchError(f"bench needs {', '.join(missing)} (or --quick)")
    config = bench.BenchConfig(
        chips=tuple(chips), workloads=tuple(workloads),
        policies=args.policies or bench.known_policies(),
        seeds=args.seeds or quick.get("seeds", (0,)), duration_s=duration,
        epoch_s=args.epoch_ms / 1e3, tick_s=args.tick_ms / 1e3, jobs=max(0, args.jobs),
        drain_s=args.drain)
    rows, traces = bench.run_bench(config)
    out = Path(args.out)
    for note in bench.write_results(rows, traces, out):
        print(f"ailfm bench: {note}", file=sys.stderr)
    sys.stdout.write(bench.render_table(rows))
    print(f"ailfm bench: {len(rows)} runs written to {out}/", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- record / inspect / train


def _add_record(sub: argparse._SubParsersAction) -> None:
    from ailfmd.lab.run import DEFAULT_EPOCH_S

    r = sub.add_parser("record", help="record an oracle-driven episode for training",
                       description="Run one scenario with the oracle driving (or a beta-mixture of "
                                   "the oracle and a learned policy) and append every epoch's "
                                   "features and oracle label to a crash-safe recording.")
    r.add_argument("--chip", default=DEFAULT_CHIP, help=f"chip name or TOML file (default {DEFAULT_CHIP})")
    r.add_argument("--workload", required=True, help="workload name or TOML file")
    r.add_argument("--duration", type=_positive_float, required=True, metavar="S", help="simulated seconds")
    r.add_argument("--seed", type=int, default=0, help="seed of the request stream (default 0)")
    r.add_argument("--epoch-ms", type=_positive_float, default=DEFAULT_EPOCH_S * 1e3,
                   help="decision epoch (default %(default)g ms)")
    r.add_argument("--learner", metavar="ONNX", help="learned policy acting when the coin says so")
    r.add_argument("--beta", type=float, default=1.0,
                   help="probability that the oracle acts in an epoch (default 1: the oracle drives)")
    r.add_argument("--out", required=True, help="recording file to write (replaced if it exists)")
    r.set_defaults(func=_cmd_record)


def _cmd_record(args: argparse.Namespace) -> int:
    from ailfmd.train.episodes import EpisodeSpec, run_episode

    if not 0.0 <= args.beta <= 1.0:
        raise AilfmError(f"--beta {args.beta}: must be between 0 and 1")
    if args.beta < 1.0 and not args.learner:
        raise AilfmError("--beta below 1 needs --learner (the policy acting otherwise)")
    load_chip(args.chip)  # named errors before the run starts
    spec = EpisodeSpec(args.chip, args.workload, args.seed, args.duration, beta=args.beta,
                       learner=args.learner, epoch_s=args.epoch_ms / 1e3)
    s = run_episode(spec, args.out)
    print(f"ailfm record: {s.steps} steps ({s.oracle_steps} oracle, {s.learner_steps} learner) "
          f"written to {s.path}", file=sys.stderr)
    return 0


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    i = sub.add_parser("inspect", help="summarise a recording (or dump its records)",
                       description="Print what a recording holds: header, record kinds, array "
                                   "shapes, torn tail. --dump N prints the first N records as JSON.")
    i.add_argument("file", help="recording file")
    i.add_argument("--dump", type=int, default=0, metavar="N", help="print the first N records as JSON")
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    i.set_defaults(func=_cmd_inspect)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from ailfmd.train.recording import read_records, record_as_json, render_summary, summarize

    summary = summarize(args.file)
    # A daemon's telemetry (docs/telemetry.md): also what it says about the machine.
    telemetry = None
    if summary.header.get("telemetry"):
        from ailfmd.service.telemetry import render_telemetry, summarize_telemetry

        telemetry = summarize_telemetry(args.file)
    if args.json:
        doc = asdict(summary)
        if telemetry is not None:
            doc["telemetry"] = telemetry
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render_summary(summary))
        if telemetry is not None:
            sys.stdout.write(render_telemetry(telemetry))
    for n, record in enumerate(read_records(args.file)):
        if n >= args.dump:
            break
        sys.stdout.write(json.dumps(record_as_json(record)) + "\n")
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train a policy: behaviour cloning, DAgger, evaluation",
                       description="Record oracle demonstrations, train by behaviour cloning, run "
                                   "DAgger rounds, evaluate against the oracle and the baselines "
                                   "and write policy.onnx and MODEL_CARD.md into --out. Needs the "
                                   "'train' extra (scikit-learn, onnx).")
    t.add_argument("--out", required=True, help="output folder (resumable with --resume)")
    t.add_argument("--resume", action="store_true", help="continue an interrupted training in --out")
    t.add_argument("--quick", action="store_true", help="seconds-long training on the tiny chip (tests)")
    t.add_argument("--seed", type=int, help="seed of episodes and fitting (default 0)")
    t.add_argument("--rounds", type=int, help="DAgger rounds after behaviour cloning")
    t.add_argument("--chips", type=_csv, help="training chips")
    t.add_argument("--workloads", type=_csv, help="training workloads")
    t.add_argument("--episodes", type=int, help="episodes per chip and workload per round")
    t.add_argument("--duration", type=_positive_float, metavar="S", help="simulated seconds per episode")
    t.add_argument("--eval-chips", type=_csv, help="evaluation chips")
    t.add_argument("--eval-workloads", type=_csv, help="evaluation workloads")
    t.add_argument("--eval-seeds", type=_int_csv, help="evaluation seeds")
    t.add_argument("--eval-duration", type=_positive_float, metavar="S", help="seconds of arrivals per evaluation run")
    t.add_argument("--eval-drain", type=_non_negative_float, metavar="S",
                   help="then run on until every request is answered, at most S seconds")
    t.add_argument("--jobs", type=int, default=0, help="worker processes (default: one per CPU)")
    t.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    import os
    from dataclasses import replace

    try:
        from ailfmd.train.dagger import QUICK, TrainConfig, train
    except ImportError as e:
        raise AilfmError(f"ailfm train needs the 'train' extra (pip install 'ailfmd[train]'): {e}") from None
    config = QUICK if args.quick else TrainConfig()
    overrides = {k: v for k, v in (("seed", args.seed), ("rounds", args.rounds), ("chips", args.chips),
                                   ("workloads", args.workloads), ("episodes_per_workload", args.episodes),
                                   ("duration_s", args.duration), ("eval_chips", args.eval_chips),
                                   ("eval_workloads", args.eval_workloads), ("eval_seeds", args.eval_seeds),
                                   ("eval_duration_s", args.eval_duration),
                                   ("eval_drain_s", args.eval_drain)) if v is not None}
    if overrides.get("rounds", 0) < 0 or overrides.get("episodes_per_workload", 1) < 1:
        raise AilfmError("--rounds must be >= 0 and --episodes >= 1")
    from ailfmd.sim.workload import load_workload

    for name in (*overrides.get("chips", ()), *overrides.get("eval_chips", ())):
        load_chip(name)
    for name in (*overrides.get("workloads", ()), *overrides.get("eval_workloads", ())):
        load_workload(name)
    config = replace(config, **overrides)
    jobs = args.jobs or len(os.sched_getaffinity(0))
    summary = train(config, args.out, jobs=jobs, resume=args.resume)
    for label, scores in summary["overall"].items():
        parts = ", ".join(f"{k} {v:.3f}" for k, v in scores.items())
        print(f"{label}: {parts}")
    return 0


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ailfm", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    _add_sim(sub)
    _add_bench(sub)
    _add_record(sub)
    _add_inspect(sub)
    _add_train(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except AilfmError as e:
        print(f"ailfm: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
