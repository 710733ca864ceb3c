"""Telemetry: what the daemon saw and did, recorded on the machine it protects.

With ``[telemetry] path`` set, every ``every_epochs``-th epoch is appended to a recording
(``ailfmd.train.recording``: append-only, crash-safe, readable with ``ailfm inspect``) as
one ``step`` record: the raw readings, the policy's features of that observation (the
same extractor and schema as the learned policy's), and what was decided and applied.
There are no teacher labels (no oracle runs on a real machine): it is the record of the
states a real machine visits, for looking at and for later training.

The recorder never stops the loop: a failure to write (a full disk, a path it may not
write) is logged once and telemetry is switched off until the next reload. The file is
rotated to ``<path>.1`` when it outgrows ``max_mib`` (one old file is kept), and also when
it holds another machine's or another version's recording (its header differs). The loop
never waits for the disk: records are written to the page cache and fsynced only at
close (an fsync under an inference server's model loading can take seconds, and the
epoch is the machine's protection). A killed daemon loses nothing but a torn last
record, which the next writer cuts; a power cut loses what the kernel had not yet
written back (about the last 30 s). Format of the records: docs/telemetry.md.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ailfmd import __version__
from ailfmd.control.records import TickRecord
from ailfmd.errors import AilfmError
from ailfmd.platform.base import Observation, Topology
from ailfmd.platform.linux.sysfs import format_cpu_list
from ailfmd.policy.feature_schema import CORE_COLUMNS, FEATURE_SCHEMA, THREAD_COLUMNS
from ailfmd.policy.features import FeatureExtractor
from ailfmd.service.config import TelemetrySettings

log = logging.getLogger("ailfmd.telemetry")

FORMAT = "ailfmd.telemetry/1"  # the header's "telemetry" key: what a step record holds
MIB = 1 << 20


def _int_or(values: list[int | None], missing: int = -1) -> np.ndarray:
    return np.array([missing if v is None else v for v in values], dtype=np.int64)


class TelemetryRecorder:
    """A control-loop sink (``add``) writing every ``every_epochs``-th epoch.

    ``topology`` is asked each recorded epoch (a hotplug re-discovery gives a new one and
    the features follow it); ``limit_c`` is the configured limit, as the learned policy
    gets it; ``platform`` and ``epoch_ms`` go into the header.
    """

    def __init__(self, settings: TelemetrySettings, topology: Callable[[], Topology], *, platform: str,
                 epoch_ms: int, limit_c: float | None = None) -> None:
        if settings.path is None:
            raise ValueError("telemetry needs a path")
        self.settings = settings
        self.path = Path(settings.path)
        self._topology = topology
        self._limit_c = limit_c
        self._extractor: FeatureExtractor | None = None
        self._extractor_topology: Topology | None = None
        self._prev: Observation | None = None
        self.header: dict[str, Any] = {
            "source": "ailfmd", "telemetry": FORMAT, "version": __version__, "host": socket.gethostname(),
            "platform": platform, "epoch_ms": epoch_ms, "every_epochs": settings.every_epochs,
            "feature_schema": FEATURE_SCHEMA, "core_columns": list(CORE_COLUMNS),
            "thread_columns": list(THREAD_COLUMNS),
        }
        self.records = 0  # step records written since start
        self.error: str | None = None  # why telemetry stopped, when it did
        self._writer = None
        try:
            self._writer = self._open()
        except (AilfmError, OSError, ValueError) as e:  # ValueError: a path the OS refuses
            self._fail(e)

    # ------------------------------------------------------------------ writing

    def _open(self):  # type: ignore[no-untyped-def]
        from ailfmd.train.recording import RecordingError, RecordWriter  # numpy only

        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return RecordWriter(self.path, self.header)
        except RecordingError as e:
            if not self.path.is_file() or "cannot open" in str(e) or "another writer" in str(e):
                raise
            # Another version's or machine's recording, a damaged one or not one at all:
            # keep it as the old file and start afresh, rather than mixing or refusing.
            old = self._rotate()
            log.warning("telemetry: %s; moved it to %s and started a new recording", e, old)
            return RecordWriter(self.path, self.header)

    def _rotate(self) -> Path:
        old = self.path.with_name(self.path.name + ".1")
        os.replace(self.path, old)
        return old

    def _fail(self, e: BaseException) -> None:
        msg = str(e) or type(e).__name__
        self.error = msg if str(self.path) in msg else f"{self.path}: {msg}"
        log.error("telemetry switched off until the next reload: %s", self.error)
        if self._writer is not None:
            try:
                self._writer.close()
            except (AilfmError, OSError):
                pass
        self._writer = None

    def add(self, rec: TickRecord) -> None:
        """Record ``rec`` if it is an epoch to record; never raises."""
        prev, self._prev = self._prev, rec.observation
        if self._writer is None or rec.epoch % self.settings.every_epochs:
            return
        try:
            meta, arrays = self._step(rec, prev)
            self._writer.append("step", meta, arrays)
            self.records += 1
            if self._writer.size >= self.settings.max_mib * MIB:
                self._writer.close()
                self._rotate()
                self._writer = self._open()
        except Exception as e:  # whatever went wrong, telemetry must not cost an epoch
            self._fail(e)

    def close(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except (AilfmError, OSError) as e:
                log.error("telemetry: closing %s: %s", self.path, e)
            self._writer = None

    # ------------------------------------------------------------------ content

    def _features(self, obs: Observation, prev: Observation | None) -> Any:
        topology = self._topology()
        if self._extractor is None or topology is not self._extractor_topology:
            self._extractor = FeatureExtractor(topology, limit_c=self._limit_c)
            self._extractor_topology = topology
            prev = None  # slopes across a re-discovery would compare other CPUs
        return self._extractor.extract(obs, prev)

    def _step(self, rec: TickRecord, prev: Observation | None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        obs = rec.observation
        fs = self._features(obs, prev)
        states = [obs.cpus.get(c) for c in fs.cpus]
        temps = [s.temp.temp_c if s is not None else None for s in states]
        action = rec.decision.action
        # What was decided (after the shield): a cap per CPU (-1: left as it was) and, per
        # thread, the one CPU it was pinned to (-1: left as it was, or a wider set).
        index = fs.cpu_index
        caps = np.full(len(fs.cpus), -1, dtype=np.int64)
        for cpu, khz in action.freq_cap_khz.items():
            if cpu in index:
                caps[index[cpu]] = khz
        pinned = np.full(len(fs.tids), -1, dtype=np.int64)
        row = {tid: i for i, tid in enumerate(fs.tids)}
        for ref, cpus in action.affinity.items():
            if ref.tid in row and len(cpus) == 1:
                pinned[row[ref.tid]] = next(iter(cpus))
        # Each thread's cpuset, as an index into the epoch's distinct ones (usually one or
        # none): a [threads, CPUs] mask would double the record for what is one list.
        cpusets: list[str] = []
        seen: dict[frozenset[int], int] = {}
        cpuset_index = np.full(len(fs.tids), -1, dtype=np.int64)
        for i, tid in enumerate(fs.tids):
            cs = obs.threads[tid].cpuset
            if cs is not None:
                k = seen.get(cs)
                if k is None:
                    k = seen[cs] = len(cpusets)
                    cpusets.append(format_cpu_list(cs))
                cpuset_index[i] = k
        meta = {
            "epoch": rec.epoch, "time_s": rec.time_s, "wall_time_s": rec.wall_time_s, "mode": rec.mode,
            "paused": rec.paused, "policy": rec.policy_name, "fallback": rec.fallback,
            "applied": rec.applied is not None, "limit_c": rec.limit_c, "violations": list(rec.violations),
            "shield_actions": len(rec.shield), "epoch_s": fs.epoch_s, "cpusets": cpusets,
        }
        meta = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in meta.items()}
        arrays = {
            "cpus": np.array(fs.cpus, dtype=np.int64),
            "temp_c": np.array([math.nan if t is None else t for t in temps], dtype=np.float32),
            "freq_khz": _int_or([s.freq_khz if s is not None else None for s in states]),
            "cap_khz": _int_or([s.cap_khz if s is not None else None for s in states]),
            "limit_c": fs.limit_c.astype(np.float32),
            "core": fs.core_features,
            "tids": np.array(fs.tids, dtype=np.int64),
            "pids": np.array([r.pid for r in fs.refs], dtype=np.int64),
            "last_cpu": _int_or([obs.threads[t].last_cpu for t in fs.tids]),
            "cpuset_index": cpuset_index,
            "thread": fs.thread_features,
            "kernel_class": fs.kernel_class.astype(np.int64),
            "cap_set_khz": caps,
            "pinned_cpu": pinned,
        }
        return meta, arrays


def summarize_telemetry(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What a telemetry recording says about the machine, over all its step records:
    the time span, the hottest reading and its CPU, the lowest limit, the records with a
    CPU at or above its limit, who decided how often, fallbacks and shield actions."""
    from ailfmd.train.recording import read_records  # numpy only

    steps = 0
    first_s = last_s = None
    hottest: tuple[float, int] | None = None
    lowest_limit: float | None = None
    violating = applied = shield_actions = max_threads = 0
    policies: dict[str, int] = {}
    fallbacks: dict[str, int] = {}
    for rec in read_records(path):
        if rec.kind != "step":
            continue
        steps += 1
        meta, arrays = rec.meta, rec.arrays
        wall = meta.get("wall_time_s")
        if isinstance(wall, (int, float)):
            first_s = wall if first_s is None else min(first_s, wall)
            last_s = wall if last_s is None else max(last_s, wall)
        temps = arrays["temp_c"]
        if temps.size and not np.isnan(temps).all():
            i = int(np.nanargmax(temps))
            if hottest is None or float(temps[i]) > hottest[0]:
                hottest = (float(temps[i]), int(arrays["cpus"][i]))
        if arrays["limit_c"].size:
            low = float(arrays["limit_c"].min())
            lowest_limit = low if lowest_limit is None else min(lowest_limit, low)
        violating += bool(meta.get("violations"))
        applied += bool(meta.get("applied"))
        shield_actions += int(meta.get("shield_actions") or 0)
        max_threads = max(max_threads, int(arrays["tids"].size))
        policies[str(meta.get("policy"))] = policies.get(str(meta.get("policy")), 0) + 1
        if meta.get("fallback"):
            fallbacks[str(meta["fallback"])] = fallbacks.get(str(meta["fallback"]), 0) + 1
    return {
        "steps": steps, "first_wall_time_s": first_s, "last_wall_time_s": last_s,
        "span_s": None if first_s is None or last_s is None else last_s - first_s,
        "hottest_c": None if hottest is None else hottest[0], "hottest_cpu": None if hottest is None else hottest[1],
        "lowest_limit_c": lowest_limit, "steps_with_violations": violating, "steps_applied": applied,
        "shield_actions": shield_actions, "max_managed_threads": max_threads,
        "policies": policies, "fallbacks": fallbacks,
    }


def render_telemetry(t: dict[str, Any]) -> str:
    """:func:`summarize_telemetry` as lines for ``ailfm inspect``."""
    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = [
        f"telemetry       {t['steps']} step(s) over {num(t['span_s'], '.0f')} s",
        f"hottest         {num(t['hottest_c'], '.1f')} C on cpu {t['hottest_cpu']}"
        f" (lowest limit {num(t['lowest_limit_c'], '.1f')} C)",
        f"at the limit    {t['steps_with_violations']} step(s) with a CPU at or above its limit",
        f"applied         {t['steps_applied']} step(s) (the rest observed or paused)",
        f"shield          {t['shield_actions']} change(s) to the policy's decisions",
        f"threads         up to {t['max_managed_threads']} managed",
        "decided by      " + (", ".join(f"{p} {n}" for p, n in sorted(t["policies"].items())) or "-"),
    ]
    for why, n in sorted(t["fallbacks"].items()):
        lines.append(f"fallback        {n} step(s): {why}")
    return "\n".join(lines) + "\n"
