"""``onnx``: the learned policy, run by onnxruntime.

``OnnxPolicy(path)`` loads a policy file written by ``ailfm train`` and refuses, with an
error naming the file and the problem, one that

- is not safe to load: when running as a service (root, or started by systemd) the file
  must be owned by root, and never writable by group or others — a root daemon that
  loads a file an unprivileged user can replace runs that user's decisions;
- is corrupt (onnxruntime cannot parse it) or is not an ailfmd policy (no metadata);
- was trained on another feature schema or policy format, or whose inputs and outputs
  do not match the columns this ailfmd builds.

Each decision: features (:mod:`ailfmd.policy.features`), one onnxruntime run of the cap
and move heads, a second run of the destination head only when threads move, decoding
(:mod:`ailfmd.policy.learned`), and a one-step guard near each sensor's maximum
(``guard_c``, :class:`ailfmd.policy.learned.CapGuard`). Inputs are built and outputs
decoded by the same code the trainer used.
"""

from __future__ import annotations

import json
import math
import os
import stat
import time
from pathlib import Path
from typing import Any

import numpy as np

from ailfmd.errors import AilfmError
from ailfmd.platform.base import Action, Capabilities, Observation, ThreadRef, Topology
from ailfmd.policy.base import Decision, Reason
from ailfmd.policy.baselines.common import sensor_label
from ailfmd.policy.feature_schema import FEATURE_SCHEMA, THREAD_COLUMNS
from ailfmd.policy.features import FeatureExtractor, FeatureSet
from ailfmd.policy.learned import (
    CAP_COLUMNS,
    CAP_GROUPINGS,
    CAP_INPUT,
    CAP_OUTPUT,
    DEFAULT_MOVE_THRESHOLD,
    DEST_COLUMNS,
    DEST_OWN_COLUMNS,
    METADATA_KEY,
    MOVE_COLUMNS,
    MOVE_INPUT,
    MOVE_OUTPUT,
    PAIR_INPUT,
    PAIR_OUTPUT,
    POLICY_FORMAT,
    THREAD_INPUT,
    CapDecoder,
    CapGuard,
    Dies,
    cap_inputs,
    carry_caps,
    dest_inputs,
    die_groups,
    empty_pairs,
    forced_movers,
    group_caps,
    move_inputs,
    place,
)

SOURCE = "policy:onnx"
DEFAULT_GUARD_C = 2.0  # see learned.CapGuard
DEFAULT_RELEASE_BAND_C = 10.0
DEFAULT_RELEASE_STEPS = 2


class PolicyFileError(AilfmError):
    """A policy file was refused; the message names the file and why."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"policy file {path}: {reason}")
        self.path = path
        self.reason = reason


def running_as_service() -> bool:
    """Root, or started by systemd (which sets INVOCATION_ID for every unit it runs)."""
    return os.geteuid() == 0 or "INVOCATION_ID" in os.environ


def check_file_safety(path: str, service: bool) -> None:
    """Refuse a file others could have replaced. Raises :class:`PolicyFileError`."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise PolicyFileError(path, f"cannot read it: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise PolicyFileError(path, "not a regular file")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PolicyFileError(path, f"writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                                    "make it 0644 or stricter")
    if service and st.st_uid != 0:
        raise PolicyFileError(path, f"owned by uid {st.st_uid}, not root; a service only loads "
                                    "policies root owns (chown root:root)")
    if not service and st.st_uid not in (0, os.geteuid()):
        raise PolicyFileError(path, f"owned by uid {st.st_uid}, neither root nor this user")


def read_metadata(path: str, session: Any) -> dict[str, Any]:
    props = session.get_modelmeta().custom_metadata_map
    text = props.get(METADATA_KEY)
    if text is None:
        raise PolicyFileError(path, f"not an ailfmd policy (no '{METADATA_KEY}' metadata)")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise PolicyFileError(path, f"metadata '{METADATA_KEY}' is not JSON: {e}") from None
    if not isinstance(meta, dict):
        raise PolicyFileError(path, f"metadata '{METADATA_KEY}' is not a JSON object")
    return meta


def check_contract(path: str, meta: dict[str, Any], session: Any) -> None:
    """The file's format, schema and tensors must be the ones this ailfmd builds."""
    if meta.get("format") != POLICY_FORMAT:
        raise PolicyFileError(path, f"policy format {meta.get('format')!r}; this ailfmd reads {POLICY_FORMAT!r}")
    if meta.get("feature_schema") != FEATURE_SCHEMA:
        raise PolicyFileError(path, f"trained on feature schema {meta.get('feature_schema')!r}; "
                                    f"this ailfmd builds {FEATURE_SCHEMA!r} (retrain the policy)")
    for key, want in (("cap_columns", CAP_COLUMNS), ("move_columns", MOVE_COLUMNS), ("pair_columns", DEST_COLUMNS)):
        if tuple(meta.get(key) or ()) != want:
            raise PolicyFileError(path, f"metadata {key} differ from this ailfmd's columns")
    inputs = {i.name: i.shape for i in session.get_inputs()}
    outputs = {o.name for o in session.get_outputs()}
    for name, width in ((CAP_INPUT, len(CAP_COLUMNS)), (MOVE_INPUT, len(MOVE_COLUMNS)),
                        (THREAD_INPUT, len(THREAD_COLUMNS)), (PAIR_INPUT, len(DEST_OWN_COLUMNS))):
        shape = inputs.get(name)
        if shape is None or len(shape) != 2 or shape[1] != width:
            raise PolicyFileError(path, f"input {name!r} should be [N, {width}], the file has {shape}")
    missing = {CAP_OUTPUT, MOVE_OUTPUT, PAIR_OUTPUT} - outputs
    if missing:
        raise PolicyFileError(path, f"missing outputs {sorted(missing)} (has {sorted(outputs)})")


class OnnxPolicy:
    """A trained placement and V/f policy in an ONNX file.

    ``service`` decides the ownership rule (default: :func:`running_as_service`);
    ``threads`` is onnxruntime's intra-op thread count (one: a decision is tiny and the
    daemon must not compete with the inference server it protects). ``limit_c`` is the
    configured thermal limit the features and the guard measure temperatures from, where
    it is below a sensor's own maximum (None: the sensors' maxima alone;
    :func:`ailfmd.policy.features.cpu_limits_c`).
    """

    def __init__(self, path: str | os.PathLike, *, service: bool | None = None, threads: int = 1,
                 guard_c: float | None = DEFAULT_GUARD_C, release_band_c: float = DEFAULT_RELEASE_BAND_C,
                 release_steps: int = DEFAULT_RELEASE_STEPS,
                 cap_grouping: str | None = None, carry: bool = True,
                 move_threshold: float | None = None, limit_c: float | None = None) -> None:
        self.path = str(Path(path))
        self.limit_c = limit_c
        try:
            import onnxruntime as ort
        except ImportError as e:
            # Debian does not package onnxruntime: the daemon must fall back, not crash.
            raise PolicyFileError(self.path, f"cannot run it: the onnxruntime Python module is not "
                                             f"installed ({e}); pip install onnxruntime") from None
        check_file_safety(self.path, running_as_service() if service is None else service)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            with open(self.path, "rb") as f:
                model_bytes = f.read()
            self._session = ort.InferenceSession(model_bytes, sess_options=opts,
                                                 providers=["CPUExecutionProvider"])
        except OSError as e:
            raise PolicyFileError(self.path, f"cannot read it: {e.strerror or e}") from None
        except Exception as e:  # onnxruntime raises its own types for bad protobufs and graphs
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PolicyFileError(self.path, f"not a loadable ONNX model ({first[:200]})") from None
        self.metadata = read_metadata(self.path, self._session)
        check_contract(self.path, self.metadata, self._session)
        self.feature_schema: str = self.metadata["feature_schema"]
        self.name = f"onnx:{Path(self.path).stem}"  # operators know their files by name
        self._extractor: FeatureExtractor | None = None
        self._prev: Observation | None = None
        self._caps = CapDecoder()
        self._first = [CAP_OUTPUT, MOVE_OUTPUT]
        self._second = [PAIR_OUTPUT]
        self.guard_c = guard_c
        self.release_band_c = release_band_c
        self.release_steps = release_steps
        grouping = cap_grouping or self.metadata.get("decoding", {}).get("cap_grouping", "cpu")
        if grouping not in CAP_GROUPINGS:
            raise PolicyFileError(self.path, f"cap grouping {grouping!r} is not one of {CAP_GROUPINGS}")
        self.cap_grouping = grouping
        threshold = (move_threshold if move_threshold is not None
                     else self.metadata.get("decoding", {}).get("move_threshold", DEFAULT_MOVE_THRESHOLD))
        if not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
            raise PolicyFileError(self.path, f"move threshold {threshold!r} is not a probability in [0, 1]")
        self.move_threshold = float(threshold)
        self._no_threads = np.zeros((0, len(THREAD_COLUMNS)), dtype=np.float32)
        self._no_pairs = empty_pairs()
        self._dies: Dies | None = None
        self.carry = carry
        self._guard = self._new_guard()

    def _new_guard(self) -> CapGuard | None:
        """A fresh guard (it remembers which CPUs are recovering from a cut)."""
        return CapGuard(self.guard_c, self.release_band_c, self.release_steps) if self.guard_c is not None else None

    def reset(self, topology: Topology, capabilities: Capabilities) -> None:
        self._extractor = FeatureExtractor(topology, limit_c=self.limit_c)
        self._dies = None
        self._prev = None
        self._caps = CapDecoder()
        self._guard = self._new_guard()

    def scores(self, obs: Observation) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(feature set, cap fraction per CPU, move probability per thread, which threads
        move, destination scores [movers, cpus]) for ``obs``."""
        if self._extractor is None:
            raise AilfmError("OnnxPolicy.decide before reset()")
        fs = self._extractor.extract(obs, self._prev)
        self._prev = obs
        if self._dies is None:  # the dies follow from the topology: once per reset
            self._dies = die_groups(fs.core_features)
        cap_x = cap_inputs(fs.core_features, fs.thread_features, self._dies)
        feeds = {CAP_INPUT: cap_x,
                 MOVE_INPUT: move_inputs(cap_x, fs.thread_features, fs.last_cpu_index),
                 THREAD_INPUT: self._no_threads, PAIR_INPUT: self._no_pairs}
        cap_out, move_out = self._session.run(self._first, feeds)
        cap_frac = np.asarray(cap_out, dtype=np.float32).reshape(-1)
        move_prob = np.asarray(move_out, dtype=np.float32).reshape(-1)
        if not (all_finite(cap_frac) and all_finite(move_prob)):
            raise AilfmError(f"{self.name}: the model returned NaN or infinity")
        move = (move_prob >= self.move_threshold) | forced_movers(fs.last_cpu_index, cpus_to_share(obs, fs))
        k = int(np.count_nonzero(move))
        pair = np.zeros((k, len(fs.cpus)), dtype=np.float32)
        if k:
            # The affinity matrix only feeds the pairs' "allowed" column, and only movers'.
            last = fs.last_cpu_index
            feeds[THREAD_INPUT] = movers = fs.thread_features[move]
            feeds[PAIR_INPUT] = dest_inputs(movers, fs.core_features, last[move], fs.allowed(move),
                                            self._extractor.distance_padded, last)
            (pair_out,) = self._session.run(self._second, feeds)
            pair = np.asarray(pair_out, dtype=np.float32).reshape(k, len(fs.cpus))
            if not all_finite(pair):
                raise AilfmError(f"{self.name}: the model returned NaN or infinity")
            outside_cpusets(pair, obs, fs, move)
        return fs, cap_frac, move_prob, move, pair

    def decide(self, obs: Observation) -> Decision:
        t0 = time.perf_counter()
        fs, cap_frac, move_prob, move, pair = self.scores(obs)
        choice = place(fs.last_cpu_index, move, pair)
        caps_khz, guarded = self._caps_khz(obs, fs, cap_frac, choice)
        caps, cap_reasons = cap_row_changes(obs, fs, caps_khz, guarded)
        affinity, pin_reasons = pin_row_changes(obs, fs, choice, move, move_prob, pair)
        info: dict[str, float | str] = {"inference_ms": (time.perf_counter() - t0) * 1e3,
                                        "threads_moved": float(k_moved(fs.last_cpu_index, choice))}
        return Decision(Action(affinity=affinity, freq_cap_khz=caps), tuple(cap_reasons + pin_reasons), info)

    def _caps_khz(self, obs: Observation, fs: FeatureSet, cap_frac: np.ndarray,
                  choice: np.ndarray) -> tuple[np.ndarray, dict[int, str]]:
        """(cap in kHz per CPU row, -1 = left alone; why, for each CPU the guard or a thread
        moved there (``choice``: each thread's CPU row) lowered)."""
        rows_khz = self._caps.decode_rows(obs, fs.cpus, group_caps(cap_frac, fs.core_features, self.cap_grouping))
        # The guard and the carried caps work on CPU -> kHz and change a few entries.
        by_cpu = self._caps.as_dict(fs.cpus, rows_khz)
        ladders = self._caps.ladders
        guarded = (self._guard.apply(obs, fs.cpus, by_cpu, fs.core_features, fs.limit_c, fs.epoch_s, ladders)
                   if self._guard is not None else {})
        if self.carry:
            guarded.update(carry_caps(obs, fs.cpus, by_cpu, fs.last_cpu_index, choice, ladders))
        index = fs.cpu_index
        for cpu in guarded:
            rows_khz[index[cpu]] = by_cpu[cpu]
        return rows_khz, guarded


def cpus_to_share(obs: Observation, fs: FeatureSet) -> int:
    """How many CPUs the managed threads may use: the online CPUs, or those of their
    cpusets when every thread has one. With more threads than that, threads must share
    CPUs, and ``forced_movers`` must not ask for a CPU of its own for each."""
    # Threads of one process share one cpuset object's value: collect the few distinct
    # sets (a frozenset caches its hash) instead of a set union per thread every epoch.
    sets = {s.cpuset for s in obs.threads.values()}
    if not sets or None in sets:
        return len(fs.cpus)
    room = frozenset().union(*sets)
    return len(room & fs.cpu_index.keys()) if room else len(fs.cpus)


def outside_cpusets(pair: np.ndarray, obs: Observation, fs: FeatureSet, move: np.ndarray) -> None:
    """Score every CPU outside a moving thread's cpuset -inf, in place: ``place`` never
    sends a thread there (a mover whose cpuset has no free CPU left stays where it is)."""
    threads = obs.threads
    tids = fs.tids
    sets = [threads[tids[t]].cpuset for t in np.flatnonzero(move).tolist()]
    if not any(cs is not None for cs in sets):
        return
    index = fs.cpu_index
    for row, inside in enumerate(sets):
        if inside is not None:
            cols = [index[c] for c in inside if c in index]
            keep = pair[row, cols]
            pair[row] = -np.inf
            pair[row, cols] = keep


def all_finite(a: np.ndarray) -> bool:
    """No NaN or infinity in ``a`` (one reduction: a float64 sum of float32 values cannot
    overflow, and NaN or infinity carries through it)."""
    return math.isfinite(np.add.reduce(a, axis=None, dtype=np.float64))


def cap_row_changes(obs: Observation, fs: FeatureSet, caps_khz: np.ndarray,
                    guarded: dict[int, str]) -> tuple[dict[int, int], list[Reason]]:
    """The caps (kHz per CPU row, -1 = left alone) that differ from the ones in effect,
    each with a Reason, in CPU order: ``baselines.common.cap_changes`` on arrays. Most
    epochs change few caps: only those rows reach Python."""
    changed = np.flatnonzero((caps_khz >= 0) & (caps_khz != fs.cap_khz))  # NaN (unknown) differs
    out: dict[int, int] = {}
    reasons: list[Reason] = []
    for j, khz in zip(changed.tolist(), caps_khz[changed].tolist()):
        cpu = fs.cpus[j]
        st = obs.cpus.get(cpu)
        if st is None:
            continue
        out[cpu] = khz
        detail = f"guarded: {guarded[cpu]}" if cpu in guarded else f"model caps cpu {cpu} at {khz // 1000} MHz"
        reasons.append(Reason(f"cpu {cpu}", "freq_cap", SOURCE, detail, sensor_label(st), st.temp.temp_c, None,
                              f"cap {khz // 1000} MHz"))
    return out, reasons


def pin_row_changes(obs: Observation, fs: FeatureSet, choice: np.ndarray, move: np.ndarray,
                    move_prob: np.ndarray, pair: np.ndarray) -> tuple[dict[ThreadRef, frozenset[int]], list[Reason]]:
    """Pin each thread to the CPU ``choice`` gives it (a row of ``fs.cpus``, -1 = none)
    where its affinity is not that CPU alone already, with a Reason, in tid order:
    ``baselines.common.pin_changes`` on arrays."""
    changed = np.flatnonzero((choice >= 0) & (choice != fs.pinned_rows()))
    out: dict[ThreadRef, frozenset[int]] = {}
    reasons: list[Reason] = []
    if not changed.size:
        return out, reasons
    mover_row = np.cumsum(move) - 1  # a mover's row of ``pair``
    for t, j in zip(changed.tolist(), choice[changed].tolist()):
        tid, cpu = fs.tids[t], fs.cpus[j]
        sample = obs.threads[tid]
        out[sample.ref] = frozenset((cpu,))
        if move[t]:
            detail = (f"model moves thread to cpu {cpu} (move probability {move_prob[t]:.2f}, "
                      f"destination score {pair[mover_row[t], j]:.2f})")
        else:
            detail = f"model keeps thread on cpu {cpu} (move probability {move_prob[t]:.2f})"
        reasons.append(Reason(f"thread {tid}", "placement", SOURCE, detail, predicted=f"runs on cpu {cpu}"))
    return out, reasons


def k_moved(last_cpu_index: np.ndarray, choice: np.ndarray) -> int:
    """Threads sent to a CPU other than the one they ran on."""
    return int(((last_cpu_index >= 0) & (choice >= 0) & (choice != last_cpu_index)).sum())
