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
import os
import stat
import time
from pathlib import Path
from typing import Any

import numpy as np

from ailfmd.errors import AilfmError
from ailfmd.platform.base import Action, Capabilities, Observation, Topology
from ailfmd.policy.base import Decision
from ailfmd.policy.baselines.common import cap_changes, pin_changes
from ailfmd.policy.feature_schema import FEATURE_SCHEMA, THREAD_COLUMNS
from ailfmd.policy.features import FeatureExtractor
from ailfmd.policy.learned import (
    CAP_COLUMNS,
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
    CAP_GROUPINGS,
    cap_inputs,
    group_caps,
    CapGuard,
    carry_caps,
    dest_own,
    empty_pairs,
    forced_movers,
    move_inputs,
    place,
    placement_by_tid,
)
from ailfmd.policy.features import build_pair_own

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
    daemon must not compete with the inference server it protects).
    """

    def __init__(self, path: str | os.PathLike, *, service: bool | None = None, threads: int = 1,
                 guard_c: float | None = DEFAULT_GUARD_C, release_band_c: float = DEFAULT_RELEASE_BAND_C,
                 release_steps: int = DEFAULT_RELEASE_STEPS,
                 cap_grouping: str | None = None, carry: bool = True,
                 move_threshold: float | None = None) -> None:
        self.path = str(Path(path))
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
        self.carry = carry
        self._guard = self._new_guard()

    def _new_guard(self) -> CapGuard | None:
        """A fresh guard (it remembers which CPUs are recovering from a cut)."""
        return CapGuard(self.guard_c, self.release_band_c, self.release_steps) if self.guard_c is not None else None

    def reset(self, topology: Topology, capabilities: Capabilities) -> None:
        self._extractor = FeatureExtractor(topology)
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
        cap_x = cap_inputs(fs.core_features, fs.thread_features)
        feeds = {CAP_INPUT: cap_x,
                 MOVE_INPUT: move_inputs(cap_x, fs.thread_features, fs.last_cpu_index),
                 THREAD_INPUT: self._no_threads, PAIR_INPUT: empty_pairs()}
        cap_out, move_out = self._session.run(self._first, feeds)
        cap_frac = np.asarray(cap_out, dtype=np.float32).reshape(-1)
        move_prob = np.asarray(move_out, dtype=np.float32).reshape(-1)
        if not (np.isfinite(cap_frac).all() and np.isfinite(move_prob).all()):
            raise AilfmError(f"{self.name}: the model returned NaN or infinity")
        move = (move_prob >= self.move_threshold) | forced_movers(fs.last_cpu_index, len(fs.cpus))
        k = int(move.sum())
        pair = np.zeros((k, len(fs.cpus)), dtype=np.float32)
        if k:
            # The affinity matrix only feeds the pairs' "allowed" column, and only movers'.
            allowed = fs.allowed(move)
            feeds[THREAD_INPUT] = fs.thread_features[move]
            last = fs.last_cpu_index
            own = build_pair_own(fs.thread_features[move], fs.core_features, last[move], allowed,
                                 self._extractor.distance_padded)
            feeds[PAIR_INPUT] = dest_own(own, fs.core_features, last[move], last)
            (pair_out,) = self._session.run(self._second, feeds)
            pair = np.asarray(pair_out, dtype=np.float32).reshape(k, len(fs.cpus))
            if not np.isfinite(pair).all():
                raise AilfmError(f"{self.name}: the model returned NaN or infinity")
        return fs, cap_frac, move_prob, move, pair

    def decide(self, obs: Observation) -> Decision:
        t0 = time.perf_counter()
        fs, cap_frac, move_prob, move, pair = self.scores(obs)
        caps_khz = self._caps.decode(obs, fs.cpus, group_caps(cap_frac, fs.core_features, self.cap_grouping))
        ladders = self._caps.ladders
        guarded = (self._guard.apply(obs, fs.cpus, caps_khz, fs.core_features, fs.epoch_s, ladders)
                   if self._guard is not None else {})
        choice = place(fs.last_cpu_index, move, pair)
        if self.carry:
            guarded.update(carry_caps(obs, fs.cpus, caps_khz, fs.last_cpu_index, choice, ladders))
        placement = placement_by_tid(fs.tids, fs.cpus, choice)
        caps, cap_reasons = cap_changes(
            obs, caps_khz, SOURCE,
            lambda cpu, khz: (f"guarded: {guarded[cpu]}" if cpu in guarded else f"model caps cpu {cpu} at {khz // 1000} MHz"))
        row = {t: i for i, t in enumerate(np.flatnonzero(move).tolist())}
        index = {tid: t for t, tid in enumerate(fs.tids)}

        def why(sample: Any, cpu: int) -> str:
            t = index[sample.ref.tid]
            if t not in row:
                return f"model keeps thread on cpu {cpu} (move probability {move_prob[t]:.2f})"
            j = fs.cpus.index(cpu)
            return (f"model moves thread to cpu {cpu} (move probability {move_prob[t]:.2f}, "
                    f"destination score {pair[row[t], j]:.2f})")

        affinity, pin_reasons = pin_changes(obs, placement, SOURCE, why)
        info: dict[str, float | str] = {"inference_ms": (time.perf_counter() - t0) * 1e3,
                                        "threads_moved": float(k_moved(fs.last_cpu_index, choice))}
        return Decision(Action(affinity=affinity, freq_cap_khz=caps), tuple(cap_reasons + pin_reasons), info)


def k_moved(last_cpu_index: np.ndarray, choice: np.ndarray) -> int:
    """Threads sent to a CPU other than the one they ran on."""
    return int(((last_cpu_index >= 0) & (choice >= 0) & (choice != last_cpu_index)).sum())
