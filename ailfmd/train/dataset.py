"""Recorded episodes -> the two heads' training matrices.

Every ``step`` record gives cap rows (one per CPU, :func:`ailfmd.policy.learned.cap_inputs`)
and pair rows. Scoring every (thread, CPU) pair of a 64-CPU chip would give 64 rows per
thread of which one is the teacher's choice, so pairs are sampled: the teacher's CPU
(positive), the thread's current CPU when that differs (the "stay" alternative), and
``negatives`` other CPUs drawn at random (seeded, so the data set is reproducible).

About one step in ten (chosen by a hash of its episode and index, so it does not depend
on file order or worker count) is held back whole: it checks the ONNX export against the
trained models and measures how often the learner agrees with the teacher.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from ailfmd.policy.feature_schema import PAIR_COLUMNS
from ailfmd.policy.features import build_pair_matrix, build_pair_own
from ailfmd.policy.learned import CAP_COLUMNS, cap_inputs
from ailfmd.train.recording import read_records

HOLDOUT_EVERY = 10
CHECK_STEPS = 3


@dataclass
class HeldStep:
    """One held-back step, whole: inputs and the teacher's targets."""

    cap_x: np.ndarray
    cap_y: np.ndarray
    thread_x: np.ndarray
    pair_own: np.ndarray  # the pairs' own columns, thread-major
    pair_x: np.ndarray  # every whole pair row, thread-major
    core_target: np.ndarray  # per thread, -1 = none
    n_cpus: int


@dataclass
class TrainingData:
    cap_x: np.ndarray
    cap_y: np.ndarray
    pair_x: np.ndarray
    pair_y: np.ndarray
    episodes: int = 0
    steps: int = 0
    learner_steps: int = 0  # steps where the learner acted (DAgger's own states)
    held: list[HeldStep] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    # Whole steps to check the export on: the held-back ones, else the first few
    # training steps (a tiny data set may hold nothing back).
    check: list[HeldStep] = field(default_factory=list)

    def sha256(self) -> str:
        """A hash of the training matrices (the model card's data hash)."""
        h = hashlib.sha256()
        for a in (self.cap_x, self.cap_y, self.pair_x, self.pair_y):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()


def _held_back(stem: str, step: int) -> bool:
    return zlib.crc32(f"{stem}:{step}".encode()) % HOLDOUT_EVERY == 0


def load_dataset(paths: Iterable[str | Path], negatives: int = 8, seed: int = 0) -> TrainingData:
    """Read complete episodes (files without an ``end`` record are skipped)."""
    cap_x: list[np.ndarray] = []
    cap_y: list[np.ndarray] = []
    pair_x: list[np.ndarray] = []
    pair_y: list[np.ndarray] = []
    data = TrainingData(np.zeros((0, len(CAP_COLUMNS)), np.float32), np.zeros(0, np.float32),
                        np.zeros((0, len(PAIR_COLUMNS)), np.float32), np.zeros(0, np.int8))
    for path in sorted(Path(p) for p in paths):
        records = list(read_records(path))
        if not records or records[0].kind != "run" or records[-1].kind != "end":
            continue
        distance = records[0].arrays["distance_padded"]
        stem = path.stem
        data.episodes += 1
        data.sources.append(str(path))
        rng = np.random.default_rng([seed, zlib.crc32(stem.encode())])
        for rec in records[1:-1]:
            if rec.kind != "step":
                continue
            a = rec.arrays
            data.steps += 1
            data.learner_steps += rec.meta.get("acted") == "learner"
            cx = cap_inputs(a["core"], a["thread"])
            cy = a["cap_target"]
            n = cx.shape[0]
            target = a["core_target"]
            full = build_pair_matrix(a["thread"], a["core"], a["last_cpu_index"], a["allowed"], distance)
            whole = HeldStep(cx, cy, a["thread"],
                             build_pair_own(a["thread"], a["core"], a["last_cpu_index"], a["allowed"], distance),
                             full, target, n)
            if _held_back(stem, int(rec.meta["step"])):
                data.held.append(whole)
                continue
            if len(data.check) < CHECK_STEPS:
                data.check.append(whole)
            known = np.isfinite(cy)
            cap_x.append(cx[known])
            cap_y.append(cy[known])
            rows, labels = _sample_pairs(target, a["last_cpu_index"], n, negatives, rng)
            pair_x.append(full[rows])
            pair_y.append(labels)
    if data.held:
        data.check = data.held
    if cap_x:
        data.cap_x, data.cap_y = np.concatenate(cap_x), np.concatenate(cap_y)
    if pair_x:
        data.pair_x, data.pair_y = np.concatenate(pair_x), np.concatenate(pair_y)
    return data


def _sample_pairs(target: np.ndarray, last: np.ndarray, n: int, negatives: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    rows: list[int] = []
    labels: list[int] = []
    for t, j in enumerate(target.tolist()):
        if j < 0:
            continue
        rows.append(t * n + j)
        labels.append(1)
        others = [c for c in range(n) if c != j]
        stay = int(last[t])
        if 0 <= stay != j:
            rows.append(t * n + stay)
            labels.append(0)
            others.remove(stay)
        k = min(negatives, len(others))
        for c in rng.choice(others, size=k, replace=False).tolist() if k else ():
            rows.append(t * n + c)
            labels.append(0)
    return np.array(rows, dtype=np.intp), np.array(labels, dtype=np.int8)
