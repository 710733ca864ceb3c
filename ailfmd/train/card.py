"""The model card written beside a trained policy: data, training, scores, limits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ailfmd.policy.feature_schema import FEATURE_SCHEMA
from ailfmd.policy.learned import POLICY_FORMAT


def _pct(ratio: float | None) -> str:
    return "–" if ratio is None else f"{(ratio - 1) * 100:+.1f} %"


def _num(v: float | None, spec: str = ".3f") -> str:
    return "–" if v is None else f"{v:{spec}}"


_FLAGS = {"chips": "--chips", "workloads": "--workloads", "episodes_per_workload": "--episodes",
          "duration_s": "--duration", "rounds": "--rounds", "seed": "--seed", "eval_chips": "--eval-chips",
          "eval_workloads": "--eval-workloads", "eval_seeds": "--eval-seeds", "eval_duration_s": "--eval-duration",
          "eval_drain_s": "--eval-drain"}


def command_line(config: Any) -> str:
    """The ``ailfm train`` command that reproduces ``config`` (options that differ from
    the defaults; a configuration the options cannot express says so)."""
    from dataclasses import fields

    from ailfmd.train.dagger import QUICK, TrainConfig

    base, words = TrainConfig(), ["ailfm", "train", "--out", "DIR"]
    if config == QUICK or all(getattr(config, f.name) == getattr(QUICK, f.name)
                              for f in fields(config) if f.name not in _FLAGS):
        base = QUICK
        words.append("--quick")
    for f in fields(config):
        value, default = getattr(config, f.name), getattr(base, f.name)
        if value == default:
            continue
        flag = _FLAGS.get(f.name)
        if flag is None:
            return " ".join(words) + f"  (and {f.name} = {value!r}, set in code)"
        words += [flag, ",".join(map(str, value)) if isinstance(value, tuple) else f"{value:g}"
                  if isinstance(value, float) else str(value)]
    return " ".join(words)


def _kernels(rounds: list[dict[str, Any]]) -> str | None:
    used = {info.get("simulator") for info in rounds}
    return used.pop() if len(used) == 1 else None


def _env_prefix(rounds: list[dict[str, Any]]) -> str:
    return "AILFMD_SIM_COMPILED=0 " if _kernels(rounds) == "numpy" else ""


def _kernels_note(rounds: list[dict[str, Any]]) -> list[str]:
    kernels = _kernels(rounds)
    if kernels is None:
        return []
    other = "compiled kernels (numba)" if kernels == "numpy" else "numpy path"
    return [f"Episodes ran on the simulator's {'numpy path' if kernels == 'numpy' else 'compiled kernels (numba)'}. "
            f"The {other} {'give' if kernels == 'numpy' else 'gives'} the same physics to rounding but not the "
            "same bits; DAgger feeds "
            "the learner's decisions back into its data, so the runs drift apart after a few rounds "
            "and so does the model. The command above reproduces this one byte for byte.", ""]


def render_model_card(config: Any, rounds: list[dict[str, Any]], summary: dict[str, Any],
                      train_s: float) -> str:
    from ailfmd.train.dagger import round_beta

    lines = [
        "# Model card: ailfmd placement and V/f policy",
        "",
        f"Policy format `{POLICY_FORMAT}`, feature schema `{FEATURE_SCHEMA}`. Trained by "
        f"`ailfm train` (seed {config.seed}) in {train_s / 60:.1f} minutes of wall time, "
        "evaluation not included. Reproduce with:",
        "",
        f"    {_env_prefix(rounds)}{command_line(config)}",
        "",
        *_kernels_note(rounds),
        "## Data",
        "",
        f"- Chips: {', '.join(config.chips)}; workloads: {', '.join(config.workloads)}.",
        f"- Per round: {config.episodes_per_workload} episodes per chip and workload, "
        f"{config.duration_s:g} simulated seconds each, 100 ms decision epochs, oracle labels "
        "on every visited state (look-ahead 0.3 s, "
        f"{config.oracle_margin_c:g} °C below DTM).",
        f"- Rounds: behaviour cloning then {config.rounds} DAgger rounds, "
        f"β = {', '.join(f'{round_beta(config, r):.3g}' for r in range(config.rounds + 1))}.",
        "",
        "| round | β | episodes | steps | learner-driven steps | cap MAE | placement agreement | placement as good | moves caught | move precision | destination agreement | data sha256 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for info in rounds:
        d, im = info["data"], info["imitation"]
        lines.append(f"| {info['round']} | {info['beta']:.3g} | {d['episodes']} | {d['steps']} | "
                     f"{d['learner_steps']} | {_num(im.get('cap_mae'))} | "
                     f"{_num(im.get('placement_agreement'), '.2f')} | {_num(im.get('placement_as_good'), '.2f')} | "
                     f"{_num(im.get('move_recall'), '.2f')} | "
                     f"{_num(im.get('move_precision'), '.2f')} | {_num(im.get('destination_agreement'), '.2f')} | "
                     f"`{d['sha256'][:12]}` |")
    m = config.model
    lines += [
        "",
        "Cap MAE: mean absolute error of the cap (fraction of the hardware maximum) on held-back "
        "steps; placement agreement: share of held-back threads placed on the teacher's CPU (as good: "
        "or on a CPU of the same die at most 1 °C warmer); moves "
        "caught: share of the teacher's moves the policy also makes (move precision: the other way "
        "round); destination agreement: of the moves both make, share sent to the teacher's CPU.",
        "",
        "## Model",
        "",
        f"Three multi-layer perceptrons (ReLU) behind standard scalers, exported as one ONNX graph: "
        f"cap head {list(m.cap_hidden)} hidden units (one row per CPU: its features and chip "
        f"context), move head {list(m.move_hidden)} (one row per thread: its features, its CPU's "
        f"and where it could go; logistic), destination head {list(m.pair_hidden)} (one row per "
        f"moving thread and CPU, logistic score; trained on the teacher's moves only). A thread "
        f"moves when its move probability reaches the threshold chosen on held-back steps. "
        "The export is checked against scikit-learn on held-back steps.",
        "",
        "## Scores",
        "",
        f"Evaluation runs: {config.eval_duration_s:g} s of arrivals, then on until every request "
        f"is answered (at most {config.eval_drain_s:g} s more), so every policy answers the same "
        "requests. Ratios of mean response time, learned / reference (below 1 is better; geometric mean "
        "over scenarios). *Safe* baselines: those with no more time above DTM than the learned "
        "policy (+0.05 s). `dagger+shield`: the final policy behind the daemon's safety shield "
        "(default configuration), as `ailfmd` runs it; every other row runs without a shield.",
        "",
        "| policy | vs oracle | vs best baseline | vs best safe baseline | time above DTM, all scenarios |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, o in summary.get("overall", {}).items():
        lines.append(f"| {label} | {_pct(o.get('vs_oracle'))} | {_pct(o.get('vs_best_baseline'))} | "
                     f"{_pct(o.get('vs_best_safe_baseline'))} | {o.get('time_above_dtm_s_total', 0):.2f} s |")
    lines += ["", "Per scenario (mean response time in s; time above DTM in s):", "",
              "| chip | workload | dagger | bc | oracle | best baseline | dagger above DTM | held out |",
              "|---|---|---:|---:|---:|---|---:|---|"]
    pols = summary.get("policies", {})
    for s in summary.get("scenarios", []):
        p = s["policies"]
        d, b, o = p.get(pols.get("dagger"), {}), p.get(pols.get("bc"), {}), p.get("oracle", {})
        best = s.get("dagger", {}).get("best_baseline")
        best_txt = f"{best} {_num(p[best]['mean_response_s'])}" if best else "–"
        held = [what for what, seen in (("chip", s["chip"] in config.chips),
                                        ("workload", s["workload"] in config.workloads)) if not seen]
        lines.append(f"| {s['chip']} | {s['workload']} | {_num(d.get('mean_response_s'))} | "
                     f"{_num(b.get('mean_response_s'))} | {_num(o.get('mean_response_s'))} | {best_txt} | "
                     f"{_num(d.get('time_above_dtm_s'), '.2f')} | {', '.join(held) or 'no'} |")
    lines += [
        "",
        "## Limits",
        "",
        *_measured_limits(summary, pols.get("dagger")),
        "- Trained on the simulator only, on chips whose DTM threshold is 80 °C. Temperatures "
        "are read as headroom to each CPU's limit (the sensor's maximum or `[safety] limit_c`), "
        "so a machine with another limit is read by its distance to it; die-stack and "
        "cache-distance features are missing (masked) on real machines. The daemon's safety "
        "shield stays in charge of the limits.",
        f"- {len(config.eval_seeds)} evaluation seed(s) per scenario: differences of a few per "
        "cent in one scenario are within seed noise; every run is in evaluation.json.",
        "- It cannot see requests coming; the oracle can (its look-ahead simulates the arrivals). "
        "Its guard near each CPU's limit (docs/learned-policy.md) keeps it close to, not "
        "always below, DTM. The daemon always runs it behind the safety shield.",
        "",
    ]
    return "\n".join(lines)


def _measured_limits(summary: dict[str, Any], dagger: str | None) -> list[str]:
    """What the evaluation itself shows the policy does badly (so nobody has to dig)."""
    out = []
    for s in summary.get("scenarios", []):
        cmp, me = s.get("dagger", {}), s["policies"].get(dagger or "", {})
        where = f"`{s['chip']}` / `{s['workload']}`"
        if cmp.get("vs_oracle", 1.0) > 1.10:
            out.append(f"- {where}: mean response {_pct(cmp['vs_oracle'])} against the oracle.")
        if cmp.get("vs_best_baseline", 1.0) > 1.0:
            out.append(f"- {where}: slower than `{cmp['best_baseline']}` ({_pct(cmp['vs_best_baseline'])}).")
        if (me.get("time_above_dtm_s") or 0.0) > 0.25:
            out.append(f"- {where}: {me['time_above_dtm_s']:.2f} s above DTM (the oracle: "
                       f"{s['policies'].get('oracle', {}).get('time_above_dtm_s') or 0.0:.2f} s).")
    return out


def write_model_card(path: Path, config: Any, rounds: list[dict[str, Any]], summary: dict[str, Any],
                     train_s: float) -> None:
    path.write_text(render_model_card(config, rounds, summary, train_s))
