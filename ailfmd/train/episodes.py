"""One recorded episode: a β-mixture roll-out on the simulator with oracle labels.

Every epoch the oracle is asked what it would do in the state the run is in (its label);
then, with probability ``beta``, its action is applied, else the learner's. ``beta = 1``
is behaviour cloning's data (the oracle drives); smaller ``beta`` visits the states the
learner itself gets into, which is what DAgger needs labels for. Demonstrations have no
safety shield: the oracle never crosses its limit on its own, and the shield would hide
the learner's mistakes from the labels.

The episode is written to one recording (:mod:`ailfmd.train.recording`): a ``run``
record (scenario, β, learner, the CPU-to-CPU migration distances), one ``step`` record
per epoch, and an ``end`` record with the run's metrics. A file without ``end`` is an
interrupted episode; episodes are deterministic, so it is simply run again.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ailfmd.lab.run import DEFAULT_EPOCH_S
from ailfmd.policy.baselines import configure_for_chip
from ailfmd.policy.features import FeatureExtractor
from ailfmd.policy.oracle import DEFAULT_HORIZON_S, DEFAULT_MARGIN_C, Oracle
from ailfmd.sim.chip import load_chip
from ailfmd.sim.engine import DEFAULT_TICK_S
from ailfmd.sim.platform import SimPlatform
from ailfmd.sim.workload import load_workload
from ailfmd.train.labels import cap_targets, placement_targets
from ailfmd.train.recording import RecordingError, RecordWriter, read_records

SOURCE_ORACLE, SOURCE_LEARNER = "oracle", "learner"


@dataclass(frozen=True)
class EpisodeSpec:
    """What to roll out. ``learner`` is the ONNX policy file acting when the coin says so."""

    chip: str
    workload: str
    seed: int
    duration_s: float
    beta: float = 1.0
    round: int = 0
    learner: str | None = None
    epoch_s: float = DEFAULT_EPOCH_S
    tick_s: float = DEFAULT_TICK_S
    horizon_s: float = DEFAULT_HORIZON_S
    margin_c: float = DEFAULT_MARGIN_C

    def stem(self) -> str:
        """A file name for the episode: readable, and unique per chip/workload/seed."""
        def clean(s: str) -> str:
            name = Path(s).stem if s.endswith(".toml") else s
            return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)
        return f"{clean(self.chip)}__{clean(self.workload)}__s{self.seed}"


@dataclass(frozen=True)
class EpisodeSummary:
    path: str
    steps: int
    oracle_steps: int
    learner_steps: int
    metrics: dict


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run_episode(spec: EpisodeSpec, path: str | Path) -> EpisodeSummary:
    """Roll ``spec`` out and write it to ``path`` (replacing an interrupted file)."""
    from ailfmd.policy.onnx_policy import OnnxPolicy

    path = Path(path)
    path.unlink(missing_ok=True)
    chip, workload = load_chip(spec.chip), load_workload(spec.workload)
    platform = SimPlatform(chip, workload, spec.seed, tick_s=spec.tick_s, duration_s=spec.duration_s)
    oracle = Oracle(platform, horizon_s=spec.horizon_s, epoch_s=spec.epoch_s, margin_c=spec.margin_c)
    topology, caps = platform.topology(), platform.capabilities()
    oracle.reset(topology, caps)
    learner = None
    if spec.learner is not None and spec.beta < 1.0:
        learner = OnnxPolicy(spec.learner, service=False)
        configure_for_chip(learner, chip)
        learner.reset(topology, caps)
    extractor = FeatureExtractor(topology)
    # The coin is seeded by the episode and the round: reproducible, different per round.
    rng = np.random.default_rng([spec.seed, spec.round, 0xDA66E2])
    epoch_ticks = max(1, round(spec.epoch_s / spec.tick_s))
    total_ticks = max(1, round(spec.duration_s / spec.tick_s))
    header = {"kind": "episode", "chip": chip.name, "workload": workload.name, "seed": spec.seed,
              "round": spec.round}
    counts = {SOURCE_ORACLE: 0, SOURCE_LEARNER: 0}
    with RecordWriter(path, header) as w:
        run_meta = {**asdict(spec), "chip_name": chip.name, "workload_name": workload.name,
                    "learner_sha256": file_sha256(spec.learner) if learner is not None else None,
                    "cpus": list(extractor.cpus)}
        w.append("run", run_meta, {"distance_padded": extractor.distance_padded})
        prev = None
        done = 0
        step = 0
        while done < total_ticks:
            obs = platform.observe()
            fs = extractor.extract(obs, prev)
            prev = obs
            label = oracle.decide(obs)
            acted = SOURCE_ORACLE if learner is None or rng.random() < spec.beta else SOURCE_LEARNER
            action = label.action if acted == SOURCE_ORACLE else learner.decide(obs).action
            counts[acted] += 1
            w.append("step", {
                "step": step, "time_s": obs.time_s, "acted": acted,
                "candidate": str(label.info.get("candidate", "")),
                "tids": list(fs.tids),
            }, {
                "core": fs.core_features, "thread": fs.thread_features,
                "last_cpu_index": fs.last_cpu_index.astype(np.int64), "allowed": fs.allowed(),
                "cap_target": cap_targets(obs, fs, label.action),
                "core_target": placement_targets(obs, fs, label.action),
            })
            platform.apply(action)
            ticks = min(epoch_ticks, total_ticks - done)
            platform.advance(ticks * spec.tick_s)
            done += ticks
            step += 1
        metrics = platform.metrics().as_dict()
        w.append("end", {"steps": step, "acted": counts, "metrics": metrics})
    return EpisodeSummary(str(path), step, counts[SOURCE_ORACLE], counts[SOURCE_LEARNER], metrics)


def episode_complete(path: str | Path) -> bool:
    """The file holds a whole episode (its ``end`` record was written)."""
    p = Path(path)
    if not p.exists():
        return False
    try:
        return any(r.kind == "end" for r in read_records(p))
    except (RecordingError, OSError):  # unreadable is as good as missing: the episode reruns
        return False
