"""Recorded episodes -> the three heads' training matrices.

Every ``step`` record gives cap rows (one per CPU, :func:`ailfmd.policy.learned.cap_inputs`),
move rows (one per thread that runs somewhere known: did the teacher move it?) and, for
each thread the teacher moved, destination rows: the teacher's CPU (positive) and up to
``negatives`` other CPUs drawn at random (seeded, so the data set is reproducible) among
those the teacher clearly passed over. Not drawn as negatives: the thread's own CPU (a
moving thread never stays), CPUs the teacher gave to other threads (taken, not worse),
and CPUs as good as the teacher's — on the same die and
at most ``SAME_AS_TARGET_C`` warmer — because the teacher picks one of several equally
cool CPUs and calling the others wrong only teaches noise.

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

from ailfmd.policy.feature_schema import CORE_COLUMNS, TEMP_SCALE_C
from ailfmd.policy.features import build_pair_matrix, build_pair_own
from ailfmd.policy.learned import (CAP_COLUMNS, DEST_COLUMNS, DEST_EXTRA_COLUMNS, MOVE_COLUMNS, cap_inputs,
                                   dest_extra, dest_own, move_inputs)
from ailfmd.train.recording import read_records

HOLDOUT_EVERY = 10
CHECK_STEPS = 3
SAME_AS_TARGET_C = 1.0
_TEMP = CORE_COLUMNS.index("temp")
_TEMP_MISSING = CORE_COLUMNS.index("temp_missing")
_SINK = CORE_COLUMNS.index("sink_distance")


@dataclass
class HeldStep:
    """One held-back step, whole: inputs and the teacher's targets."""

    cap_x: np.ndarray
    cap_y: np.ndarray
    move_x: np.ndarray
    thread_x: np.ndarray
    pair_own: np.ndarray  # the pairs' own columns, thread-major
    pair_x: np.ndarray  # every whole pair row, thread-major
    core_target: np.ndarray  # per thread, -1 = none
    last_cpu_index: np.ndarray
    n_cpus: int


@dataclass
class TrainingData:
    cap_x: np.ndarray
    cap_y: np.ndarray
    move_x: np.ndarray
    move_y: np.ndarray
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
        for a in (self.cap_x, self.cap_y, self.move_x, self.move_y, self.pair_x, self.pair_y):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()


def _held_back(stem: str, step: int) -> bool:
    return zlib.crc32(f"{stem}:{step}".encode()) % HOLDOUT_EVERY == 0


def load_dataset(paths: Iterable[str | Path], negatives: int = 8, seed: int = 0) -> TrainingData:
    """Read complete episodes (files without an ``end`` record are skipped)."""
    cap_x: list[np.ndarray] = []
    cap_y: list[np.ndarray] = []
    move_x: list[np.ndarray] = []
    move_y: list[np.ndarray] = []
    pair_x: list[np.ndarray] = []
    pair_y: list[np.ndarray] = []
    data = TrainingData(np.zeros((0, len(CAP_COLUMNS)), np.float32), np.zeros(0, np.float32),
                        np.zeros((0, len(MOVE_COLUMNS)), np.float32), np.zeros(0, np.int8),
                        np.zeros((0, len(DEST_COLUMNS)), np.float32), np.zeros(0, np.int8))
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
            last, allowed = a["last_cpu_index"], a["allowed"]
            mx = move_inputs(cx, a["thread"], last)
            full = np.concatenate([build_pair_matrix(a["thread"], a["core"], last, allowed, distance),
                                   dest_extra(a["core"], last, last).reshape(-1, len(DEST_EXTRA_COLUMNS))], axis=1)
            own = dest_own(build_pair_own(a["thread"], a["core"], last, allowed, distance), a["core"], last, last)
            whole = HeldStep(cx, cy, mx, a["thread"], own, full, target, last, n)
            if _held_back(stem, int(rec.meta["step"])):
                data.held.append(whole)
                continue
            if len(data.check) < CHECK_STEPS:
                data.check.append(whole)
            known = np.isfinite(cy)
            cap_x.append(cx[known])
            cap_y.append(cy[known])
            placed = (target >= 0) & (last >= 0)
            move_x.append(mx[placed])
            move_y.append((target[placed] != last[placed]).astype(np.int8))
            rows, labels = _sample_destinations(target, last, a["core"], negatives, rng)
            pair_x.append(full[rows])
            pair_y.append(labels)
    if data.held:
        data.check = data.held
    if cap_x:
        data.cap_x, data.cap_y = np.concatenate(cap_x), np.concatenate(cap_y)
    if move_x:
        data.move_x, data.move_y = np.concatenate(move_x), np.concatenate(move_y)
    if pair_x:
        data.pair_x, data.pair_y = np.concatenate(pair_x), np.concatenate(pair_y)
    return data


def as_good_as(core: np.ndarray, j: int) -> np.ndarray:
    """bool per CPU: as good a destination as CPU ``j`` (same die, at most
    ``SAME_AS_TARGET_C`` warmer; CPUs without a temperature count as warmer)."""
    temp = np.where(core[:, _TEMP_MISSING] < 0.5, core[:, _TEMP], np.inf)
    sink = core[:, _SINK]
    return (sink == sink[j]) & (temp <= temp[j] + SAME_AS_TARGET_C / TEMP_SCALE_C)


def _sample_destinations(target: np.ndarray, last: np.ndarray, core: np.ndarray,
                         negatives: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Pair row indices (thread-major) and labels for the threads the teacher moved."""
    n = core.shape[0]
    taken = np.zeros(n, dtype=bool)
    taken[target[target >= 0]] = True
    rows: list[int] = []
    labels: list[int] = []
    for t in np.flatnonzero((target >= 0) & (target != last)).tolist():
        j = int(target[t])
        rows.append(t * n + j)
        labels.append(1)
        as_good = as_good_as(core, j)
        passed_over = ~taken & ~as_good
        if last[t] >= 0:
            passed_over[last[t]] = False
        others = np.flatnonzero(passed_over)
        k = min(negatives, others.size)
        for c in (rng.choice(others, size=k, replace=False).tolist() if k else ()):
            rows.append(t * n + c)
            labels.append(0)
    return np.array(rows, dtype=np.intp), np.array(labels, dtype=np.int8)
