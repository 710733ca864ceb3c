"""``ailfm train``: behaviour cloning, then DAgger rounds, then evaluation.

Round 0 is behaviour cloning: the oracle drives (β = 1) and its actions are recorded.
Round r ≥ 1 rolls out a β-mixture of the oracle and the policy of round r − 1 with
β = ``beta_decay``^r, labels every visited state with the oracle's action, aggregates
it with all earlier data and retrains. Episodes run in parallel worker processes, one
recording file each.

Everything lands in the output folder, so an interrupted training resumes where it
stopped (``--resume``): a complete episode file or a round's model is never redone, an
interrupted episode is re-run (episodes are deterministic), and the configuration must
be the one the folder was started with. Layout::

    config.json              the configuration (checked on resume)
    data/round<r>/*.rec      recorded episodes (ailfm inspect FILE)
    models/round<r>.onnx     the policy after round r, with round<r>.json (data, fit, agreement)
    eval/*.json              one evaluation run each (resumable too)
    evaluation.json          BC and DAgger vs the oracle and the baselines
    policy.onnx              the final policy, scores in its metadata
    MODEL_CARD.md            data, training, scores, limits
"""

from __future__ import annotations

import json
import os
import platform as pyplatform
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, TextIO

from ailfmd import __version__
from ailfmd.errors import AilfmError
from ailfmd.train.dataset import load_dataset
from ailfmd.train.episodes import EpisodeSpec, episode_complete, run_episode
from ailfmd.train.evaluate import default_policies, eval_jobs, run_eval_job, summarise, write_json
from ailfmd.train.model import (ModelConfig, export_onnx, fit_heads, imitation_scores, set_metadata,
                               tune_move_threshold, verify_export)

TRAINER = f"ailfm train {__version__}"


class TrainConfigError(AilfmError):
    pass


@dataclass(frozen=True)
class TrainConfig:
    chips: tuple[str, ...] = ("3d-64",)
    workloads: tuple[str, ...] = ("prefill-heavy", "decode-heavy", "bursty", "long-context", "mixed")
    episodes_per_workload: int = 6  # per chip and round, each a new arrival seed
    duration_s: float = 12.0
    rounds: int = 4  # DAgger rounds after behaviour cloning
    beta_decay: float = 0.5
    # The teacher's distance below DTM. Wider than the oracle's own 1 °C default: the
    # learner cannot see arrivals coming, and its imitation error must land below DTM.
    oracle_margin_c: float = 3.0
    negatives: int = 8
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    eval_chips: tuple[str, ...] = ("3d-64", "2d-64")
    eval_workloads: tuple[str, ...] = ("prefill-heavy", "decode-heavy", "bursty", "long-context", "mixed",
                                       "eval-chat", "eval-bursty-13b")
    eval_seeds: tuple[int, ...] = (900, 901)
    eval_duration_s: float = 30.0
    # After the arrivals, run on until every request is answered (at most this long), so
    # every policy answers the same requests and mean response times compare.
    eval_drain_s: float = 120.0
    eval_policies: tuple[str, ...] = ()  # default: every baseline and the oracle

    def as_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @staticmethod
    def from_json(data: dict[str, Any]) -> "TrainConfig":
        d = dict(data)
        d["model"] = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d["model"].items()})
        return TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# A configuration that trains in seconds: for tests and a first look.
QUICK = TrainConfig(chips=("tiny",), workloads=("tiny-test",), episodes_per_workload=2, duration_s=2.0,
                    rounds=1, model=ModelConfig(cap_hidden=(16,), move_hidden=(16,), pair_hidden=(16,), max_iter=400, learning_rate=3e-3),
                    eval_chips=("tiny",), eval_workloads=("tiny-test",), eval_seeds=(900,),
                    eval_duration_s=2.0, eval_drain_s=5.0, eval_policies=("linux", "oracle"))


def round_beta(config: TrainConfig, r: int) -> float:
    return 1.0 if r == 0 else config.beta_decay ** r


def round_specs(config: TrainConfig, r: int, learner: str | None) -> list[EpisodeSpec]:
    beta = round_beta(config, r)
    out = []
    for ci, chip in enumerate(config.chips):
        for wi, workload in enumerate(config.workloads):
            for e in range(config.episodes_per_workload):
                seed = config.seed * 1_000_000 + r * 1000 + ci * 100 + wi * 10 + e
                out.append(EpisodeSpec(chip, workload, seed, config.duration_s, beta=beta, round=r,
                                       learner=learner if beta < 1.0 else None,
                                       margin_c=config.oracle_margin_c))
    return out


class Progress:
    """A progress bar on a terminal (rich), plain lines otherwise."""

    def __init__(self, stream: TextIO | None) -> None:
        self.stream = stream
        self._rich = None
        if stream is not None and stream.isatty():
            try:
                from rich.console import Console
                from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TimeElapsedColumn

                self._rich = RichProgress("[bold]{task.description}", BarColumn(), MofNCompleteColumn(),
                                          TimeElapsedColumn(), console=Console(file=stream))
            except ImportError:
                self._rich = None

    def run(self, title: str, items: list, work: Callable[[Any], Any], jobs: int) -> list:
        """Run ``work`` over ``items`` (in ``jobs`` processes when > 1), results in order."""
        results: list = [None] * len(items)
        if not items:
            return results
        self.say(f"{title}: {len(items)} to run")
        task = None
        if self._rich is not None:
            self._rich.start()
            task = self._rich.add_task(title, total=len(items))
        try:
            if jobs > 1 and len(items) > 1:
                with ProcessPoolExecutor(max_workers=jobs) as pool:
                    futures = {pool.submit(work, it): i for i, it in enumerate(items)}
                    for done, fut in enumerate(as_completed(futures), 1):
                        results[futures[fut]] = fut.result()
                        self._step(task, title, done, len(items))
            else:
                for i, it in enumerate(items):
                    results[i] = work(it)
                    self._step(task, title, i + 1, len(items))
        finally:
            if self._rich is not None:
                self._rich.stop()
        return results

    def _step(self, task: Any, title: str, done: int, total: int) -> None:
        if self._rich is not None:
            self._rich.advance(task)
        elif self.stream is not None:
            print(f"  {title}: {done}/{total}", file=self.stream, flush=True)

    def say(self, text: str) -> None:
        if self.stream is not None:
            print(f"ailfm train: {text}", file=self.stream, flush=True)


def _episode_work(args: tuple[EpisodeSpec, str]) -> dict:
    spec, path = args
    s = run_episode(spec, path)
    return {"path": s.path, "steps": s.steps, "learner_steps": s.learner_steps}


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    tmp.replace(path)


def _check_out_dir(out: Path, config: TrainConfig, resume: bool) -> None:
    cfg_path = out / "config.json"
    if cfg_path.exists():
        if not resume:
            raise TrainConfigError(f"{out} already holds a training; pass --resume to continue it "
                                   "or choose another --out")
        stored = json.loads(cfg_path.read_text())
        if stored != config.as_json():
            changed = sorted(k for k in set(stored) | set(config.as_json())
                             if stored.get(k) != config.as_json().get(k))
            raise TrainConfigError(f"{cfg_path}: the training there used another configuration "
                                   f"(differs in: {', '.join(changed)}); resume needs the same options")
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_json(cfg_path, config.as_json())


def train(config: TrainConfig, out_dir: str | Path, jobs: int = 1, resume: bool = False,
          progress: TextIO | None = sys.stderr) -> dict[str, Any]:
    """Run (or resume) a whole training; returns the evaluation summary."""
    out = Path(out_dir)
    _check_out_dir(out, config, resume)
    show = Progress(progress)
    t_start = time.monotonic()
    (out / "models").mkdir(exist_ok=True)
    learner: str | None = None
    rounds: list[dict[str, Any]] = []
    files: list[Path] = []
    for r in range(config.rounds + 1):
        t_round = time.monotonic()
        data_dir = out / "data" / f"round{r}"
        data_dir.mkdir(parents=True, exist_ok=True)
        specs = round_specs(config, r, learner)
        paths = [data_dir / f"{s.stem()}.rec" for s in specs]
        todo = [(s, str(p)) for s, p in zip(specs, paths) if not episode_complete(p)]
        name = "behaviour cloning" if r == 0 else f"DAgger round {r} (beta {round_beta(config, r):.3g})"
        show.run(f"{name}: episodes", todo, _episode_work, jobs)
        files.extend(paths)
        model_path = out / "models" / f"round{r}.onnx"
        info_path = out / "models" / f"round{r}.json"
        if not (model_path.exists() and info_path.exists()):
            show.say(f"{name}: fitting on {len(files)} episodes")
            info = fit_round(config, files, model_path, r)
            # Episodes and fit of this round; a resumed round counts only what it redid.
            info["round_wall_s"] = time.monotonic() - t_round
            write_json(info_path, info)
        info = json.loads(info_path.read_text())
        rounds.append(info)
        show.say(f"{name}: {info['data']['steps']} steps ({info['data']['learner_steps']} learner-driven), "
                 f"cap MAE {info['imitation'].get('cap_mae', float('nan')):.3f}, placement agreement "
                 f"{info['imitation'].get('placement_agreement', float('nan')):.2f} (as good "
                 f"{info['imitation'].get('placement_as_good', float('nan')):.2f}), moves caught "
                 f"{info['imitation'].get('move_recall', float('nan')):.2f} (precision "
                 f"{info['imitation'].get('move_precision', float('nan')):.2f})")
        learner = str(model_path)
    # Training time from the rounds' own records, so a resumed training reports the
    # time its rounds took, not the time of the last (resuming) invocation.
    train_s = sum(float(i.get("round_wall_s", 0.0)) for i in rounds) or time.monotonic() - t_start
    bc, final = out / "models" / "round0.onnx", out / "models" / f"round{config.rounds}.onnx"
    # The final policy also behind the daemon's safety shield: what a deployment runs.
    summary = evaluate(config, out, {"bc": f"onnx:{bc}", "dagger": f"onnx:{final}",
                                     "dagger+shield": f"shielded:onnx:{final}"}, jobs, show)
    card_meta = {"scores": summary["overall"], "rounds": rounds, "train_wall_s": train_s}
    _write_bytes(out / "policy.onnx", set_metadata(final.read_bytes(), card_meta))
    from ailfmd.train.card import write_model_card

    write_model_card(out / "MODEL_CARD.md", config, rounds, summary, train_s)
    show.say(f"done: {out / 'policy.onnx'} and {out / 'MODEL_CARD.md'}")
    return summary


def fit_round(config: TrainConfig, files: Iterable[Path], model_path: Path, r: int) -> dict[str, Any]:
    t0 = time.monotonic()
    data = load_dataset(files, negatives=config.negatives, seed=config.seed)
    heads = fit_heads(data, config.model, seed=config.seed + r)
    meta = {
        "name": model_path.stem, "trainer": TRAINER, "round": r, "beta": round_beta(config, r),
        "trained_on": {"chips": list(config.chips), "workloads": list(config.workloads)},
        "data": {"sha256": data.sha256(), "episodes": data.episodes, "steps": data.steps,
                 "learner_steps": data.learner_steps, "cap_rows": int(len(data.cap_y)),
                 "move_rows": int(len(data.move_y)), "moves": int(data.move_y.sum()),
                 "pair_rows": int(len(data.pair_y))},
        "action_space": {"cap": "fraction of cpuinfo_max_freq per CPU, snapped to the CPU's ladder",
                         "placement": "a thread moves when its move probability reaches the threshold; "
                                      "movers take free CPUs, best destination scores first"},
        "python": pyplatform.python_version(),
    }
    model_bytes = export_onnx(heads, meta)
    check = verify_export(heads, model_bytes, data)
    threshold = tune_move_threshold(model_bytes, data)
    model_bytes = set_metadata(model_bytes, {"decoding": {"move_threshold": threshold}})
    imitation = imitation_scores(model_bytes, data, threshold)
    _write_bytes(model_path, model_bytes)
    return {"round": r, "beta": round_beta(config, r), "data": meta["data"], "export_check": check,
            "imitation": imitation, "fit_s": time.monotonic() - t0, "simulator": simulator_kernels()}


def simulator_kernels() -> str:
    """Which simulator path the episodes run on: "compiled" (numba) or "numpy". Both give
    the same physics to rounding, not the same bits, and DAgger amplifies the difference
    (the learner's decisions feed back into its data), so a model is reproduced byte for
    byte only on the path it was trained on."""
    from ailfmd.sim import jit

    return "compiled" if jit.load() is not None else "numpy"


def evaluate(config: TrainConfig, out: Path, learned: dict[str, str], jobs: int,
             show: Progress) -> dict[str, Any]:
    eval_dir = out / "eval"
    eval_dir.mkdir(exist_ok=True)
    policies = list(config.eval_policies or default_policies()) + list(learned.values())
    jobs_list = eval_jobs(policies, config.eval_chips, config.eval_workloads, config.eval_seeds,
                          config.eval_duration_s, config.eval_drain_s)
    todo = [j for j in jobs_list if not (eval_dir / f"{j.key()}.json").exists()]
    done = show.run("evaluation", todo, run_eval_job, jobs)
    for job, result in zip(todo, done):
        write_json(eval_dir / f"{job.key()}.json", result)
    # A result is found by its job's key, which names a learned policy by its file's stem;
    # the path recorded inside is where the training was when it ran, and a training
    # directory that was moved or copied since must still match its own results.
    results = [{**json.loads((eval_dir / f"{j.key()}.json").read_text()), "policy": j.policy} for j in jobs_list]
    summary = summarise(results, learned)
    summary["policies"] = {label: pol for label, pol in learned.items()}
    write_json(out / "evaluation.json", {"summary": summary, "runs": results})
    return summary


__all__ = ["QUICK", "TrainConfig", "train"]
