"""The documents ``ailfmctl`` receives: built from TickRecords, never from the machine.

Pure functions over the latest :class:`TickRecord`, the :class:`Topology` and what the
daemon knows about itself (:class:`DaemonInfo`), plus a bounded :class:`History` of
recent epochs for ``explain`` and the "recent" sections of ``status``. The JSON of each
document is specified in docs/control-protocol.md; bump a ``*_SCHEMA`` on any
incompatible change.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from ailfmd.control.records import TickRecord
from ailfmd.platform.base import ApplyOutcome, ApplyResult, Topology
from ailfmd.platform.linux.sysfs import format_cpu_list
from ailfmd.policy.base import Reason

STATUS_SCHEMA = "ailfmd.status/1"
EXPLAIN_SCHEMA = "ailfmd.explain/1"
POLICY_SCHEMA = "ailfmd.policy/1"
MODE_SCHEMA = "ailfmd.mode/1"

# Heat map scale when the daemon knows no better: a data-centre inlet for the cold end,
# and a conservative limit for the hot end.
DEFAULT_AMBIENT_C = 25.0
DEFAULT_LIMIT_C = 90.0
PACKAGE_ROW_CPUS = 8  # real machines: a package's CPUs drawn in rows of 8
RECENT_EVENTS = 10  # shield / fallback entries shown by status


@dataclass(frozen=True)
class PolicyInfo:
    """The configured policy, as loaded."""

    name: str  # "onnx", "stepwise", ...
    kind: str  # "onnx" or "baseline"
    path: str | None = None  # the ONNX file
    feature_schema: str | None = None  # feature schema the model speaks
    fallback: str | None = None  # the baseline used when the policy fails


@dataclass(frozen=True)
class DaemonInfo:
    """What the daemon knows about itself when a document is built."""

    version: str
    pid: int
    platform: str  # "linux", "sim:3d-64"
    mode: str  # "enforce" or "observe"
    paused: bool
    epoch_ms: float  # configured epoch length
    uptime_s: float
    policy: PolicyInfo
    limit_c: float | None = None  # the shield's limit
    ambient_c: float | None = None  # cold end of the heat map (sim: the chip's ambient)
    # [telemetry]: {"path", "records" written since start, "error" that stopped it or
    # None}; None when telemetry is off.
    telemetry: dict[str, Any] | None = None


# --------------------------------------------------------------------------- history


@dataclass(frozen=True)
class EpochSummary:
    """What ``explain`` shows of one epoch: every action with its reason."""

    epoch: int
    wall_time_s: float
    mode: str
    paused: bool
    policy_name: str
    fallback: str | None
    applied: bool  # False in observe mode, when paused, or when nothing was applied
    actions: tuple[Reason, ...]  # decision reasons, then shield reasons not among them
    shield: frozenset[Reason]
    apply_failures: tuple[ApplyOutcome, ...]
    violations: tuple[int, ...]
    inference_s: float | None
    duration_s: float | None


@dataclass(frozen=True)
class ShieldEvent:
    epoch: int
    wall_time_s: float
    reason: Reason


@dataclass
class FallbackEpisode:
    """Consecutive epochs that fell back for the same reason, kept as one entry so a
    policy that fails every epoch does not flush everything else from the buffer."""

    reason: str
    policy_name: str
    first_epoch: int
    last_epoch: int
    first_wall_time_s: float
    last_wall_time_s: float
    epochs: int = 1


# What History keeps of an epoch until someone asks: the record's parts a summary is
# made of, minus the observation (in EpochSummary's order; the actions are the decision's
# reasons, the outcomes those of the apply, or None).
_Kept = tuple[int, float, str, bool, str, "str | None", "ApplyResult | None", tuple[Reason, ...],
              tuple[Reason, ...], tuple[int, ...], "float | None", "float | None"]


def _keep(record: TickRecord) -> _Kept:
    return (record.epoch, record.wall_time_s, record.mode, record.paused, record.policy_name, record.fallback,
            record.applied, tuple(record.decision.reasons), tuple(record.shield), tuple(record.violations),
            record.inference_s, record.timings_s.get("total"))


def _summary(kept: _Kept) -> EpochSummary:
    epoch, wall_s, mode, paused, policy_name, fallback, applied, decided, shield, violations, inference_s, total_s = kept
    # The shield's reasons usually also appear in the final decision; list each once.
    actions = decided + tuple(r for r in shield if r not in decided)
    failures = () if applied is None else tuple(o for o in applied.outcomes if not o.ok)
    return EpochSummary(
        epoch=epoch,
        wall_time_s=wall_s,
        mode=mode,
        paused=paused,
        policy_name=policy_name,
        fallback=fallback,
        applied=applied is not None,
        actions=actions,
        shield=frozenset(shield),
        apply_failures=failures,
        violations=violations,
        inference_s=inference_s,
        duration_s=total_s,
    )


def summarize(record: TickRecord) -> EpochSummary:
    """The part of a TickRecord ``explain`` needs (the observation is dropped)."""
    return _summary(_keep(record))


class History:
    """Bounded memory of recent epochs, fed by the loop, read by the control socket.

    Thread-safe: :meth:`add` runs in the control loop's thread while the documents are
    built in the control socket's thread.
    """

    def __init__(self, epochs: int = 100, events: int = 50) -> None:
        if epochs < 1 or events < 1:
            raise ValueError("History needs room for at least one epoch and one event")
        self.capacity = epochs
        self._lock = threading.Lock()
        self._epochs: deque[_Kept] = deque(maxlen=epochs)
        self._shield: deque[ShieldEvent] = deque(maxlen=events)
        self._fallbacks: deque[FallbackEpisode] = deque(maxlen=events)
        self._totals = {"epochs": 0, "shield_interventions": 0, "fallback_epochs": 0, "violation_epochs": 0}

    def add(self, record: TickRecord) -> None:
        # Summaries are built when a document asks for them, not every epoch.
        kept = _keep(record)
        with self._lock:
            self._epochs.append(kept)
            self._totals["epochs"] += 1
            for r in record.shield:
                self._shield.append(ShieldEvent(record.epoch, record.wall_time_s, r))
            self._totals["shield_interventions"] += len(record.shield)
            if record.violations:
                self._totals["violation_epochs"] += 1
            if record.fallback is not None:
                self._totals["fallback_epochs"] += 1
                last = self._fallbacks[-1] if self._fallbacks else None
                if last is not None and last.reason == record.fallback and last.last_epoch == record.epoch - 1:
                    last.last_epoch = record.epoch
                    last.last_wall_time_s = record.wall_time_s
                    last.epochs += 1
                else:
                    self._fallbacks.append(
                        FallbackEpisode(
                            record.fallback, record.policy_name, record.epoch, record.epoch,
                            record.wall_time_s, record.wall_time_s,
                        )
                    )

    def __len__(self) -> int:
        with self._lock:
            return len(self._epochs)

    def epochs(self, n: int) -> list[EpochSummary]:
        """The last ``n`` epochs, newest first."""
        with self._lock:
            kept = list(self._epochs)[::-1][: max(n, 0)]
        return [_summary(k) for k in kept]

    def shield_events(self, n: int) -> list[ShieldEvent]:
        """The last ``n`` shield interventions, newest first."""
        with self._lock:
            return list(self._shield)[::-1][: max(n, 0)]

    def fallback_episodes(self, n: int) -> list[FallbackEpisode]:
        """The last ``n`` fallback episodes, newest first (copies)."""
        with self._lock:
            return [FallbackEpisode(**asdict(e)) for e in list(self._fallbacks)[::-1][: max(n, 0)]]

    def totals(self) -> dict[str, int]:
        """Counts since the daemon started (not bounded by the buffer)."""
        with self._lock:
            return dict(self._totals)


# --------------------------------------------------------------------------- helpers


def _num(v: float | None, digits: int = 3) -> float | None:
    """A finite float for JSON (NaN/inf are not JSON), rounded to keep documents small."""
    if v is None or not math.isfinite(v):
        return None
    return round(float(v), digits)


def _ms(v_s: float | None) -> float | None:
    return None if v_s is None else _num(v_s * 1000.0)


def reason_dict(r: Reason) -> dict[str, Any]:
    return {
        "target": r.target,
        "kind": r.kind,
        "source": r.source,
        "detail": r.detail,
        "sensor": r.sensor,
        "value_c": _num(r.value_c),
        "threshold_c": _num(r.threshold_c),
        "predicted": r.predicted,
    }


def _outcome_dict(o: ApplyOutcome) -> dict[str, Any]:
    return {"target": o.target, "requested": o.requested, "applied": o.applied, "ok": o.ok, "detail": o.detail}


def _limit(record: TickRecord | None, info: DaemonInfo) -> float | None:
    if record is not None and record.limit_c is not None:
        return record.limit_c
    return info.limit_c


def _daemon_dict(info: DaemonInfo, limit_c: float | None) -> dict[str, Any]:
    return {
        "version": info.version,
        "pid": info.pid,
        "platform": info.platform,
        "mode": info.mode,
        "paused": info.paused,
        "uptime_s": _num(info.uptime_s, 1),
        "epoch_ms": _num(info.epoch_ms),
        "limit_c": _num(limit_c),
        "ambient_c": _num(info.ambient_c),
        "telemetry": info.telemetry,
    }


def _policy_summary(info: PolicyInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "kind": info.kind,
        "path": info.path,
        "feature_schema": info.feature_schema,
        "fallback": info.fallback,
    }


def heatmap(topology: Topology, temps: dict[int, float | None], min_c: float, max_c: float) -> dict[str, Any]:
    """Grids of CPU temperatures: one per layer on a simulated 3D chip (cells at their
    (row, col)), else one per package with its CPUs in rows of eight."""
    cpus = [topology.cpus[c] for c in topology.online_cpus]

    def cell(cpu: int) -> dict[str, Any]:
        return {"cpu": cpu, "temp_c": _num(temps.get(cpu))}

    grids: list[dict[str, Any]] = []
    if cpus and all(c.position is not None for c in cpus):
        kind = "layers"
        n_rows = 1 + max(c.position[1] for c in cpus)  # type: ignore[index]
        n_cols = 1 + max(c.position[2] for c in cpus)  # type: ignore[index]
        for layer in sorted({c.position[0] for c in cpus}):  # type: ignore[index]
            cells: list[list[dict[str, Any] | None]] = [[None] * n_cols for _ in range(n_rows)]
            members = []
            for c in cpus:
                if c.position[0] == layer:  # type: ignore[index]
                    cells[c.position[1]][c.position[2]] = cell(c.cpu)  # type: ignore[index]
                    members.append(c.cpu)
            grids.append({"name": f"layer {layer}", "cpus": format_cpu_list(members), "cells": cells})
    else:
        kind = "packages"
        for pkg, members in topology.packages().items():
            rows = [list(members[i : i + PACKAGE_ROW_CPUS]) for i in range(0, len(members), PACKAGE_ROW_CPUS)]
            width = min(PACKAGE_ROW_CPUS, len(members))
            cells = [[cell(c) for c in row] + [None] * (width - len(row)) for row in rows]
            grids.append({"name": f"package {pkg}", "cpus": format_cpu_list(members), "cells": cells})
    return {"kind": kind, "min_c": _num(min_c), "max_c": _num(max_c), "grids": grids}


# --------------------------------------------------------------------------- documents


def status_document(
    record: TickRecord | None,
    topology: Topology,
    info: DaemonInfo,
    history: History | None = None,
    *,
    recent: int = RECENT_EVENTS,
) -> dict[str, Any]:
    """``ailfmctl status``: state of the daemon, every CPU, the heat map, the threads.

    ``record`` is None before the first epoch completed; CPUs then have no readings.
    """
    limit_c = _limit(record, info)
    obs = record.observation if record is not None else None
    violating = set(record.violations) if record is not None else set()
    cpu_limits = record.cpu_limits_c if record is not None else {}

    cpus: list[dict[str, Any]] = []
    temps: dict[int, float | None] = {}
    for cpu in topology.online_cpus:
        t = topology.cpus[cpu]
        st = obs.cpus.get(cpu) if obs is not None else None
        src = st.temp.source if st is not None else None
        temps[cpu] = st.temp.temp_c if st is not None else None
        cpus.append(
            {
                "cpu": cpu,
                "package": t.package_id,
                "core": t.core_id,
                "position": list(t.position) if t.position is not None else None,
                "temp_c": _num(temps[cpu]),
                "source": f"{src.chip}/{src.sensor}" if src is not None else None,
                "source_scope": src.scope if src is not None else None,
                "source_reason": st.temp.reason if st is not None else "no observation yet",
                "freq_khz": st.freq_khz if st is not None else None,
                "cap_khz": st.cap_khz if st is not None else None,
                "hw_max_khz": st.hw_max_khz if st is not None else None,
                "limit_c": _num(cpu_limits[cpu][0]) if cpu in cpu_limits else None,
                "violation": cpu in violating,
            }
        )

    threads = []
    if obs is not None:
        for tid in sorted(obs.threads):
            s = obs.threads[tid]
            threads.append(
                {
                    "tid": s.ref.tid,
                    "pid": s.ref.pid,
                    "comm": s.comm,
                    "cpus": sorted(s.affinity),
                    "cpu_list": format_cpu_list(s.affinity),
                    "cpuset": None if s.cpuset is None else format_cpu_list(s.cpuset),
                    "last_cpu": s.last_cpu,
                }
            )

    last_epoch = None
    if record is not None:
        last_epoch = {
            "epoch": record.epoch,
            "wall_time_s": _num(record.wall_time_s),
            "time_s": _num(record.time_s),
            "duration_ms": _ms(record.timings_s.get("total")),
            "timings_ms": {k: _ms(v) for k, v in sorted(record.timings_s.items())},
            "inference_ms": _ms(record.inference_s),
            "policy": record.policy_name,
            "fallback": record.fallback,
            "applied": record.applied is not None,
            "apply_failures": [] if record.applied is None else [
                _outcome_dict(o) for o in record.applied.outcomes if not o.ok
            ],
            "actions": len(record.decision.reasons),
            "landing_cap_fraction": _num(record.landing_fraction),
        }

    lo = info.ambient_c if info.ambient_c is not None else DEFAULT_AMBIENT_C
    hi = limit_c if limit_c is not None else DEFAULT_LIMIT_C
    if hi <= lo:  # a nonsense scale would divide by zero when colouring
        hi = lo + 1.0
    totals = history.totals() if history is not None else {}
    return {
        "schema": STATUS_SCHEMA,
        "daemon": _daemon_dict(info, limit_c),
        "policy": _policy_summary(info.policy),
        "last_epoch": last_epoch,
        "cpus": cpus,
        "heatmap": heatmap(topology, temps, lo, hi),
        "threads": threads,
        "shield": {
            "total": totals.get("shield_interventions", len(record.shield) if record else 0),
            "recent": [
                {"epoch": e.epoch, "wall_time_s": _num(e.wall_time_s), **reason_dict(e.reason)}
                for e in (history.shield_events(recent) if history is not None else [])
            ],
        },
        "fallbacks": {
            "total_epochs": totals.get("fallback_epochs", 0),
            "recent": [_episode_dict(e) for e in (history.fallback_episodes(recent) if history is not None else [])],
        },
        "violations": {
            "cpus": sorted(violating),
            "total_epochs": totals.get("violation_epochs", 1 if violating else 0),
        },
    }


def _episode_dict(e: FallbackEpisode) -> dict[str, Any]:
    return {
        "reason": e.reason,
        "policy": e.policy_name,
        "first_epoch": e.first_epoch,
        "last_epoch": e.last_epoch,
        "first_wall_time_s": _num(e.first_wall_time_s),
        "last_wall_time_s": _num(e.last_wall_time_s),
        "epochs": e.epochs,
    }


def explain_document(history: History, epochs: int = 10) -> dict[str, Any]:
    """``ailfmctl explain``: every action of the last ``epochs`` epochs, newest first,
    each with the reason it was taken."""
    out = []
    for e in history.epochs(epochs):
        out.append(
            {
                "epoch": e.epoch,
                "wall_time_s": _num(e.wall_time_s),
                "mode": e.mode,
                "paused": e.paused,
                "policy": e.policy_name,
                "fallback": e.fallback,
                "applied": e.applied,
                "duration_ms": _ms(e.duration_s),
                "inference_ms": _ms(e.inference_s),
                "violations": list(e.violations),
                "actions": [{**reason_dict(r), "shield": r in e.shield} for r in e.actions],
                "apply_failures": [_outcome_dict(o) for o in e.apply_failures],
            }
        )
    return {
        "schema": EXPLAIN_SCHEMA,
        "epochs_requested": epochs,
        "epochs_kept": history.capacity,
        "epochs": out,
    }


def policy_document(info: DaemonInfo, record: TickRecord | None, history: History | None = None) -> dict[str, Any]:
    """``ailfmctl policy``: what is configured, what decided last, how it fared."""
    totals = history.totals() if history is not None else {}
    return {
        "schema": POLICY_SCHEMA,
        "configured": _policy_summary(info.policy),
        "active": record.policy_name if record is not None else None,
        "fallback_reason": record.fallback if record is not None else None,
        "last_epoch": record.epoch if record is not None else None,
        "inference_ms": _ms(record.inference_s) if record is not None else None,
        "info": {k: (_num(v) if isinstance(v, float) else v) for k, v in sorted(record.decision.info.items())}
        if record is not None
        else {},
        "mode": info.mode,
        "paused": info.paused,
        "fallbacks": {
            "total_epochs": totals.get("fallback_epochs", 0),
            "recent": [_episode_dict(e) for e in (history.fallback_episodes(RECENT_EVENTS) if history else [])],
        },
    }


def mode_document(info: DaemonInfo, *, changed: bool, detail: str) -> dict[str, Any]:
    """The answer to ``pause``, ``resume`` and ``reload``: the state after the command."""
    return {
        "schema": MODE_SCHEMA,
        "mode": info.mode,
        "paused": info.paused,
        "changed": changed,
        "detail": detail,
        "policy": _policy_summary(info.policy),
    }
