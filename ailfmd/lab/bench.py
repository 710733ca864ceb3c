"""``ailfm bench``: chips x workloads x policies x seeds, in parallel, into one folder.

Every combination is one offline run (:func:`ailfmd.lab.run.run_scenario`) in a worker
process. Chips, workloads and policies are checked in the parent first, so a bad file
fails once, naming it, before any work starts. Results are written as

- ``results.csv`` / ``results.json``: one row per run, every ``RunMetrics`` field plus
  chip, workload, policy, seed, wall time and (oracle only) its cost per decision;
- ``traces.json``: per run, the hottest core and each layer's hottest core per epoch;
- ``table.md``: per chip x workload, each policy's metrics averaged over seeds, the best
  value of each column in bold;
- PNG plots when matplotlib is installed (``ailfmd.lab.plots``).

A run depends only on its inputs and seed, so the numbers (not the wall times) repeat.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Callable, TextIO

import numpy as np

from ailfmd.errors import AilfmError
from ailfmd.lab.run import DEFAULT_EPOCH_S, Scenario, run_scenario
from ailfmd.sim.chip import Chip, load_chip
from ailfmd.sim.engine import DEFAULT_TICK_S
from ailfmd.sim.metrics import RunMetrics
from ailfmd.sim.workload import Workload, load_workload

ORACLE = "oracle"
KEY_FIELDS = ("chip", "workload", "policy", "seed")
METRIC_FIELDS = tuple(f.name for f in fields(RunMetrics))
EXTRA_FIELDS = ("wall_s", "epochs", "oracle_decision_ms", "oracle_lookaheads")
ROW_FIELDS = KEY_FIELDS + METRIC_FIELDS + EXTRA_FIELDS
# Columns of table.md: (RunMetrics field, heading, format, lower is better).
TABLE_COLUMNS = (
    ("mean_response_s", "mean response s", ".3f", True),
    ("p99_response_s", "p99 response s", ".3f", True),
    ("output_tokens_per_s", "tokens/s", ".2f", False),
    ("peak_temp_c", "peak °C", ".1f", True),
    ("time_above_dtm_s", "above DTM s", ".3f", True),
    ("energy_per_output_token_j", "J/token", ".2f", True),
)
QUICK = {"chips": ("tiny",), "workloads": ("tiny-test",), "seeds": (0,), "duration_s": 2.0}


class BenchError(AilfmError):
    """A bench request that cannot run (unknown policy, empty list)."""


@dataclass(frozen=True)
class BenchConfig:
    """What to run. Chips and workloads are shipped names or file paths."""

    chips: tuple[str, ...]
    workloads: tuple[str, ...]
    policies: tuple[str, ...]
    seeds: tuple[int, ...]
    duration_s: float
    epoch_s: float = DEFAULT_EPOCH_S
    tick_s: float = DEFAULT_TICK_S
    jobs: int = 0  # 0: one worker per CPU
    drain_s: float = 0.0  # after the arrivals, run on until every request is answered (at most this)

    def combinations(self) -> list[tuple[str, str, str, int]]:
        return [(c, w, p, s) for c in self.chips for w in self.workloads
                for p in self.policies for s in self.seeds]


def known_policies() -> tuple[str, ...]:
    from ailfmd.policy.baselines import baseline_names

    return (*baseline_names(), ORACLE)


def check(config: BenchConfig) -> None:
    """Fail early, naming the bad chip, workload or policy (before any worker starts)."""
    for name, items in (("chips", config.chips), ("workloads", config.workloads),
                        ("policies", config.policies), ("seeds", config.seeds)):
        if not items:
            raise BenchError(f"no {name} given")
    for chip in config.chips:
        _chip(chip)
    for workload in config.workloads:
        _workload(workload)
    unknown = [p for p in config.policies if p not in known_policies() and not p.endswith(".onnx")]
    if unknown:
        raise BenchError(f"unknown policy {', '.join(map(repr, unknown))}; known: {', '.join(known_policies())}, "
                         "or a learned policy's .onnx file")
    for p in config.policies:
        if p.endswith(".onnx"):
            from ailfmd.policy.onnx_policy import OnnxPolicy

            OnnxPolicy(p, service=False)  # refused files are named here, not in a worker


@lru_cache(maxsize=None)
def _chip(spec: str) -> Chip:
    return load_chip(spec)


@lru_cache(maxsize=None)
def _workload(spec: str) -> Workload:
    return load_workload(spec)


def run_one(config: BenchConfig, chip: str, workload: str, policy: str, seed: int) -> tuple[dict, dict]:
    """One run (in a worker): its result row and its temperature trace."""
    from ailfmd.policy.baselines import get_baseline
    from ailfmd.policy.oracle import Oracle, cost_summary

    chip_obj = _chip(chip)
    scenario = Scenario(chip_obj, _workload(workload), seed, config.duration_s, config.epoch_s, config.tick_s,
                        config.drain_s)
    layers = np.array([chip_obj.position(c)[0] for c in range(chip_obj.n_cores)])
    n_layers = int(layers.max()) + 1
    trace = {"time_s": [], "max_c": [], "layer_max_c": []}

    def record(obs, decision, result) -> None:
        temps = np.array([obs.cpus[c].temp.temp_c for c in range(chip_obj.n_cores)])
        trace["time_s"].append(round(obs.time_s, 6))
        trace["max_c"].append(float(temps.max()))
        trace["layer_max_c"].append([float(temps[layers == lv].max()) for lv in range(n_layers)])

    oracle: list[Oracle] = []
    if policy == ORACLE:
        def factory(platform):
            oracle.append(Oracle(platform, epoch_s=config.epoch_s))
            return oracle[0]
        target = factory
    elif policy.endswith(".onnx"):
        from ailfmd.policy.onnx_policy import OnnxPolicy

        target = OnnxPolicy(policy, service=False)
    else:
        target = get_baseline(policy)
    t0 = time.perf_counter()
    result = run_scenario(scenario, target, on_epoch=record)
    wall_s = time.perf_counter() - t0
    name = f"learned:{Path(policy).stem}" if policy.endswith(".onnx") else policy
    row: dict = {"chip": chip_obj.name, "workload": scenario.workload.name, "policy": name, "seed": seed}
    row.update(result.metrics.as_dict())
    row["arrival_window_s"] = config.duration_s
    cost = cost_summary(oracle[0]) if oracle else {}
    row.update(wall_s=round(wall_s, 3), epochs=result.epochs,
               oracle_decision_ms=cost.get("mean_ms"), oracle_lookaheads=cost.get("lookaheads_mean"))
    return row, {"chip": row["chip"], "workload": row["workload"], "policy": name, "seed": seed, **trace}


def run_bench(config: BenchConfig, progress: TextIO | None = sys.stderr) -> tuple[list[dict], list[dict]]:
    """Run every combination; rows and traces in the order of ``config.combinations()``."""
    check(config)
    combos = config.combinations()
    jobs = config.jobs or os.cpu_count() or 1
    jobs = max(1, min(jobs, len(combos)))
    done: dict[int, tuple[dict, dict]] = {}
    show = _Progress(len(combos), progress)
    if jobs == 1:
        for i, combo in enumerate(combos):
            done[i] = run_one(config, *combo)
            show.step(combo)
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(run_one, config, *combo): i for i, combo in enumerate(combos)}
            for fut in as_completed(futures):
                i = futures[fut]
                done[i] = fut.result()
                show.step(combos[i])
    show.close()
    rows = [done[i][0] for i in range(len(combos))]
    traces = [done[i][1] for i in range(len(combos))]
    return rows, traces


class _Progress:
    """``\\r[k/n] chip/workload/policy/seed`` on a text stream (no dependency)."""

    def __init__(self, total: int, stream: TextIO | None) -> None:
        self.total, self.stream, self.k, self.t0 = total, stream, 0, time.monotonic()

    def step(self, combo: tuple) -> None:
        self.k += 1
        if self.stream is not None:
            chip, workload, policy, seed = combo
            self.stream.write(f"\r[{self.k}/{self.total}] {time.monotonic() - self.t0:5.1f} s  "
                              f"{Path(chip).stem}/{Path(workload).stem}/{policy}/seed {seed}\033[K")
            self.stream.flush()

    def close(self) -> None:
        if self.stream is not None and self.total:
            self.stream.write("\n")
            self.stream.flush()


# --------------------------------------------------------------------------- output


def write_results(rows: list[dict], traces: list[dict], out_dir: Path,
                  plots: Callable[[list[dict], list[dict], Path], list[Path]] | None = None) -> list[str]:
    """Write the result files into ``out_dir``; returns notes for the user (skipped plots)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=ROW_FIELDS)
        w.writeheader()
        for row in rows:
            w.writerow({k: "" if row.get(k) is None else row[k] for k in ROW_FIELDS})
    (out_dir / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out_dir / "traces.json").write_text(json.dumps(traces) + "\n")
    (out_dir / "table.md").write_text(render_table(rows))
    notes = []
    try:
        from ailfmd.lab import plots as plot_mod

        (plots or plot_mod.write_plots)(rows, traces, out_dir)
    except ImportError as e:
        notes.append(f"plots skipped: {e.name or 'matplotlib'} is not installed "
                     "(pip install 'ailfmd[bench]')")
    return notes


def summarise(rows: list[dict]) -> dict[tuple[str, str], dict[str, dict[str, float | None]]]:
    """(chip, workload) -> policy -> field -> mean over seeds (None where no seed had one)."""
    groups: dict[tuple[str, str], dict[str, list[dict]]] = {}
    for row in rows:
        groups.setdefault((row["chip"], row["workload"]), {}).setdefault(row["policy"], []).append(row)
    out: dict[tuple[str, str], dict[str, dict[str, float | None]]] = {}
    for key, by_policy in groups.items():
        out[key] = {}
        for policy, runs in by_policy.items():
            means: dict[str, float | None] = {}
            for name in METRIC_FIELDS + EXTRA_FIELDS:
                values = [r[name] for r in runs if isinstance(r.get(name), (int, float))]
                means[name] = float(np.mean(values)) if values else None
            means["seeds"] = float(len(runs))
            out[key][policy] = means
    return out


def render_table(rows: list[dict]) -> str:
    """The Markdown table: one section per chip x workload, the best value in bold."""
    parts = ["# ailfm bench\n\nMeans over seeds; best of each column in **bold** "
             "(time above DTM: the DTM threshold is the chip's).\n"]
    for (chip, workload), by_policy in summarise(rows).items():
        seeds = sorted({r["seed"] for r in rows if r["chip"] == chip and r["workload"] == workload})
        duration = rows[0].get("arrival_window_s", rows[0]["duration_s"])
        parts.append(f"\n## chip `{chip}`, workload `{workload}` "
                     f"({len(seeds)} seed{'s' if len(seeds) != 1 else ''}, {duration:g} s)\n\n")
        head = ["policy"] + [h for _, h, _, _ in TABLE_COLUMNS] + ["completed"]
        parts.append("| " + " | ".join(head) + " |\n")
        parts.append("|" + "---|" + "---:|" * (len(head) - 1) + "\n")
        best = {}
        for name, _, spec, lower in TABLE_COLUMNS:
            values = [m[name] for m in by_policy.values() if m[name] is not None]
            if values:
                best[name] = min(values) if lower else max(values)
        for policy, m in by_policy.items():
            cells = [policy]
            for name, _, spec, _ in TABLE_COLUMNS:
                v = m[name]
                if v is None:
                    cells.append("-")
                    continue
                text = f"{v:{spec}}"
                cells.append(f"**{text}**" if text == f"{best[name]:{spec}}" else text)
            cells.append(f"{m['requests_completed']:g}")
            parts.append("| " + " | ".join(cells) + " |\n")
    return "".join(parts)


def numeric_rows(rows: list[dict]) -> list[dict]:
    """The rows without wall-clock fields (what must repeat for a fixed seed)."""
    return [{k: v for k, v in r.items() if k not in ("wall_s", "oracle_decision_ms")} for r in rows]
