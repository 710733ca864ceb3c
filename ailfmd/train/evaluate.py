"""Judge a trained policy against the oracle and the baselines on the simulator.

Every policy runs the same scenarios (chip, workload, seed, duration) without a safety
shield, exactly as ``ailfm bench`` runs them. Per scenario the learned policy's mean
response time is compared with the oracle's and with the best baseline's — the best
overall and the best *safe* one (no more time above DTM than the learned policy plus
:data:`SAFE_SLACK_S`), since beating a baseline by running hotter is no win.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ailfmd.lab.run import Scenario, run_scenario
from ailfmd.policy.baselines import baseline_names, get_baseline
from ailfmd.sim.chip import load_chip
from ailfmd.sim.workload import load_workload

SAFE_SLACK_S = 0.05  # time above DTM that still counts as "equally safe"


@dataclass(frozen=True)
class EvalJob:
    policy: str  # a baseline name, "oracle", "onnx:<path>", or "shielded:onnx:<path>"
    chip: str
    workload: str
    seed: int
    duration_s: float
    drain_s: float = 0.0

    def key(self) -> str:
        tag = self.policy
        if "onnx:" in tag:
            tag = tag.split("onnx:")[0].replace(":", "-") + "learned-" + Path(tag.split("onnx:")[1]).stem
        return f"{tag}__{Path(self.chip).stem}__{Path(self.workload).stem}__s{self.seed}"


def run_eval_job(job: EvalJob) -> dict[str, Any]:
    from ailfmd.policy.onnx_policy import OnnxPolicy
    from ailfmd.policy.oracle import Oracle, cost_summary

    scenario = Scenario(load_chip(job.chip), load_workload(job.workload), job.seed, job.duration_s,
                        drain_s=job.drain_s)
    extra: dict[str, Any] = {}
    if job.policy == "oracle":
        holder: dict[str, Oracle] = {}

        def factory(platform):
            holder["o"] = Oracle(platform, epoch_s=scenario.epoch_s)
            return holder["o"]
        result = run_scenario(scenario, factory)
        extra = {"decision_ms": cost_summary(holder["o"]).get("mean_ms")}
    elif "onnx:" in job.policy:
        shielded = job.policy.startswith("shielded:")
        policy = OnnxPolicy(job.policy.split("onnx:", 1)[1], service=False)
        times: list[float] = []
        result = run_scenario(scenario, policy,
                              lambda obs, d, r: times.append(float(d.info.get("inference_ms", 0.0))),
                              shield=shielded)
        extra = {"decision_ms": float(np.mean(times)) if times else None}
    else:
        result = run_scenario(scenario, get_baseline(job.policy))
    return {**asdict(job), "metrics": result.metrics.as_dict(), **extra}


def eval_jobs(policies: list[str], chips: tuple[str, ...], workloads: tuple[str, ...],
              seeds: tuple[int, ...], duration_s: float, drain_s: float = 0.0) -> list[EvalJob]:
    return [EvalJob(p, c, w, s, duration_s, drain_s) for c in chips for w in workloads for s in seeds
            for p in policies]


def default_policies() -> list[str]:
    return [*baseline_names(), "oracle"]


def summarise(results: list[dict[str, Any]], learned: dict[str, str]) -> dict[str, Any]:
    """Per scenario and overall: each learned policy vs the oracle and the baselines.

    ``learned`` maps a label ("bc", "dagger") to its policy string ("onnx:<path>").
    Ratios are learned / reference mean response times (lower is better), averaged over
    seeds per scenario and combined over scenarios by the geometric mean.
    """
    by: dict[tuple[str, str], dict[str, list[dict]]] = {}
    for r in results:
        by.setdefault((r["chip"], r["workload"]), {}).setdefault(r["policy"], []).append(r["metrics"])

    def mean(ms: list[dict], key: str) -> float | None:
        vals = [m[key] for m in ms if m.get(key) is not None]
        return float(np.mean(vals)) if vals else None

    scenarios = []
    for (chip, workload), pols in sorted(by.items()):
        row: dict[str, Any] = {"chip": chip, "workload": workload, "policies": {}}
        for p, ms in pols.items():
            row["policies"][p] = {k: mean(ms, k) for k in ("mean_response_s", "p99_response_s",
                                                           "output_tokens_per_s", "time_above_dtm_s",
                                                           "peak_temp_c", "requests_completed")}
        base = {p: v for p, v in row["policies"].items() if p in baseline_names()}
        oracle = row["policies"].get("oracle")
        for label, pol in learned.items():
            me = row["policies"].get(pol)
            if me is None or me["mean_response_s"] is None:
                continue
            cmp: dict[str, Any] = {}
            if oracle and oracle["mean_response_s"]:
                cmp["vs_oracle"] = me["mean_response_s"] / oracle["mean_response_s"]
            answered = {p: v for p, v in base.items() if v["mean_response_s"]}
            if answered:
                best = min(answered, key=lambda p: answered[p]["mean_response_s"])
                cmp["best_baseline"] = best
                cmp["vs_best_baseline"] = me["mean_response_s"] / answered[best]["mean_response_s"]
                safe = {p: v for p, v in answered.items()
                        if (v["time_above_dtm_s"] or 0.0) <= (me["time_above_dtm_s"] or 0.0) + SAFE_SLACK_S}
                if safe:
                    best_safe = min(safe, key=lambda p: safe[p]["mean_response_s"])
                    cmp["best_safe_baseline"] = best_safe
                    cmp["vs_best_safe_baseline"] = me["mean_response_s"] / safe[best_safe]["mean_response_s"]
            row[label] = cmp
        scenarios.append(row)
    overall: dict[str, Any] = {}
    for label in learned:
        for key in ("vs_oracle", "vs_best_baseline", "vs_best_safe_baseline"):
            vals = [s[label][key] for s in scenarios if label in s and key in s[label]]
            if vals:
                overall.setdefault(label, {})[key] = float(np.exp(np.mean(np.log(vals))))
        above = [s["policies"][learned[label]]["time_above_dtm_s"] or 0.0 for s in scenarios
                 if learned[label] in s["policies"]]
        overall.setdefault(label, {})["time_above_dtm_s_total"] = float(np.sum(above)) if above else 0.0
    return {"scenarios": scenarios, "overall": overall}


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
