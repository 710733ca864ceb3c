"""One control epoch: observe -> policy -> safety shield -> apply -> report.

The loop never stops protecting the machine because of its policy: an exception, a
non-finite or out-of-range output, a schema mismatch or a decision that took longer than
its budget makes this epoch use the fallback baseline instead, and the record says why.
In ``observe`` mode everything is decided and reported but nothing is applied. While
paused the policy is not asked; only the shield acts (in ``enforce`` mode).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from ailfmd.control.records import MODES, TickRecord
from ailfmd.control.shield import SafetyShield
from ailfmd.platform.base import Action, ApplyOutcome, Observation, Platform, ThreadRef
from ailfmd.platform.linux.sysfs import format_cpu_list
from ailfmd.policy.base import Decision, Policy, Reason

log = logging.getLogger("ailfmd.loop")

Sink = Callable[[TickRecord], None]
_INT_ONLY = frozenset({int})  # the value types of a cap mapping that needs no per-cap check
SHIELD_SUMMARY_S = 60.0  # how often a still-acting shield is summarised in the journal
# The source of the note that a placement outside the thread's cpuset was not made.
CPUSET_SOURCE = "cpuset"


class RefusalLog:
    """Journals changes the platform refused, without flooding the journal.

    A refusal repeats every epoch while its cause lasts (a CPU outside a cpuset that
    nobody reported, a thread without the right to change it): each distinct refusal
    (target and reason) is logged once, repeats are counted and summarised at most once
    per ``every_s``, and a refusal not seen for ``forget_s`` is logged again when it
    comes back. ``ailfm_apply_failures_total`` counts every one.
    """

    def __init__(self, every_s: float = SHIELD_SUMMARY_S, forget_s: float = 3600.0, max_keys: int = 4096) -> None:
        self.every_s = every_s
        self.forget_s = forget_s
        self.max_keys = max_keys
        self._seen: dict[tuple[str, str], float] = {}  # (target, reason) -> last seen
        self._repeats = 0
        self._summary_s: float | None = None

    def report(self, outcomes: Iterable[ApplyOutcome], now_s: float) -> None:
        seen = self._seen
        for o in outcomes:
            if o.ok:
                continue
            key = (o.target, o.detail)
            last = seen.get(key)
            if last is None or now_s - last >= self.forget_s:
                if len(seen) >= self.max_keys:
                    seen.clear()  # bounded: threads come and go
                log.warning("could not apply %s = %s: %s", o.target, o.requested, o.detail)
            else:
                self._repeats += 1
            seen[key] = now_s
        if self._summary_s is None:
            self._summary_s = now_s
        elif self._repeats and now_s - self._summary_s >= self.every_s:
            log.warning("%d refused change(s) repeated in the last %.0f s, each logged once when first refused",
                        self._repeats, now_s - self._summary_s)
            self._repeats = 0
            self._summary_s = now_s


class PolicyOutputError(ValueError):
    """A policy produced something the platform must not be given."""


def validate_decision(decision: object, obs: Observation) -> Decision:
    """The decision if it is well-formed for this observation; PolicyOutputError otherwise."""
    if not isinstance(decision, Decision) or not isinstance(decision.action, Action):
        raise PolicyOutputError(f"policy returned {type(decision).__name__}, not a Decision")
    caps = decision.action.freq_cap_khz
    online = obs.cpus
    clean_caps: dict[int, int] = {}
    if caps and caps.keys() <= online.keys() and set(map(type, caps.values())) == _INT_ONLY and min(caps.values()) > 0:
        # The usual case (positive ints for online CPUs), checked in C for all at once.
        clean_caps = dict(caps)
        caps = {}
    for cpu, cap in caps.items():
        if type(cap) is int and cap > 0 and cpu in online:
            clean_caps[cpu] = cap  # the usual case, checked at once
            continue
        if cpu not in online:
            raise PolicyOutputError(f"frequency cap for unknown cpu {cpu!r}")
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not math.isfinite(cap) or cap <= 0:
            raise PolicyOutputError(f"frequency cap for cpu {cpu} is {cap!r}")
        clean_caps[cpu] = int(cap)
    online_set = online.keys()
    for ref, cpus in decision.action.affinity.items():
        if not isinstance(ref, ThreadRef):
            raise PolicyOutputError(f"affinity key {ref!r} is not a thread")
        if not cpus or not set(cpus) <= online_set:
            raise PolicyOutputError(f"affinity for thread {ref.tid} is {sorted(cpus)!r}, not a set of online CPUs")
    # Threads that are no longer observed are dropped: the policy saw an older world.
    affinity: dict[ThreadRef, frozenset[int]] = {}
    outside: list[Reason] = []
    threads = obs.threads
    for ref, c in decision.action.affinity.items():
        sample = threads.get(ref.tid)
        if sample is None:
            continue
        cpus = frozenset(c)
        inside = sample.cpuset
        if inside is not None and not cpus <= inside:
            # The kernel would refuse (EINVAL) or narrow it, every epoch: keep what is
            # inside the thread's cpuset, or leave the thread where it is.
            cpus = cpus & inside
            if not cpus:
                outside.append(Reason(
                    f"thread {ref.tid}", "placement", CPUSET_SOURCE,
                    f"asked for cpus {format_cpu_list(c)}, outside its cpuset {format_cpu_list(inside)}: not moved"))
                continue
        affinity[ref] = cpus
    reasons = decision.reasons
    if outside:
        # The policy's reasons for placements that are not made would mislead `explain`.
        gone = {r.target for r in outside}
        reasons = tuple(r for r in reasons if not (r.kind == "placement" and r.target in gone)) + tuple(outside)
    return Decision(Action(affinity=affinity, freq_cap_khz=clean_caps), reasons, decision.info)


@dataclass
class ControlLoop:
    platform: Platform
    policy: Policy
    fallback: Policy
    shield: SafetyShield
    mode: str = "observe"
    decide_budget_s: float = 0.05
    sinks: list[Sink] = field(default_factory=list)
    wall_clock: Callable[[], float] = time.time
    perf_clock: Callable[[], float] = time.perf_counter
    paused: bool = False
    epoch: int = 0
    last: TickRecord | None = None

    def __post_init__(self) -> None:
        self._shield_acting = False
        self._shield_logged_s = 0.0
        self._last_fallback: str | None = None
        self._refusals = RefusalLog()
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r}: must be one of {', '.join(MODES)}")
        self.reset()

    def reset(self) -> None:
        """After (re)discovery: tell the policies and the shield about the topology."""
        topo, caps = self.platform.topology(), self.platform.capabilities()
        self.shield.reset(topo)
        for p in (self.policy, self.fallback):
            try:
                p.reset(topo, caps)
            except Exception as e:  # a broken policy must not stop the loop
                log.error("policy %s failed to reset: %s", getattr(p, "name", "?"), e)

    def set_policy(self, policy: Policy) -> None:
        self.policy = policy
        self.reset()

    def _decide(self, obs: Observation) -> tuple[Decision, str, str | None, float | None]:
        """(decision, policy name, fallback reason, inference seconds)."""
        t0 = self.perf_clock()
        fallback_reason: str | None = None
        try:
            decision = validate_decision(self.policy.decide(obs), obs)
            took = self.perf_clock() - t0
            if took > self.decide_budget_s:
                fallback_reason = f"timeout: {self.policy.name} took {took * 1e3:.1f} ms > {self.decide_budget_s * 1e3:.0f} ms"
            else:
                return decision, self.policy.name, None, took
        except Exception as e:  # any policy failure: fall back, say why
            took = self.perf_clock() - t0
            fallback_reason = f"{type(e).__name__}: {e}"
        try:
            decision = validate_decision(self.fallback.decide(obs), obs)
        except Exception as e:
            # Even the fallback failed: apply nothing but what the shield adds.
            fallback_reason += f"; fallback {self.fallback.name} failed too: {type(e).__name__}: {e}"
            decision = Decision(Action())
        note = Reason("policy", "fallback", f"fallback:{self.fallback.name}", fallback_reason)
        decision = Decision(decision.action, decision.reasons + (note,), decision.info)
        return decision, self.fallback.name, fallback_reason, took

    def _log_shield(self, reasons: tuple[Reason, ...], now_s: float) -> None:
        """Journal the shield when it engages or goes idle, and a summary at most once a
        minute while it acts; every step only at debug level (a hot box would otherwise
        log dozens of lines a second)."""
        acting = bool(reasons)
        if acting and (not self._shield_acting or now_s - self._shield_logged_s >= SHIELD_SUMMARY_S):
            caps = sum(1 for r in reasons if r.kind == "freq_cap")
            moves = sum(1 for r in reasons if r.kind == "placement")
            hottest = max((r for r in reasons if r.value_c is not None), key=lambda r: r.value_c or 0.0, default=None)
            log.info(
                "shield %s: %d cap(s), %d placement change(s)%s",
                "engaged" if not self._shield_acting else "still acting",
                caps,
                moves,
                f"; hottest {hottest.target} at {hottest.value_c:.1f} C: {hottest.detail}" if hottest else "",
            )
            self._shield_logged_s = now_s
        elif not acting and self._shield_acting:
            log.info("shield idle: every core below its guard band")
        self._shield_acting = acting
        for r in reasons:
            log.debug("shield: %s %s: %s (%s)", r.kind, r.target, r.detail, r.predicted or "")

    def tick(self) -> TickRecord:
        """Run one epoch and report it to every sink."""
        t0 = self.perf_clock()
        obs = self.platform.observe()
        t1 = self.perf_clock()
        if self.paused:
            # Paused by an operator: the policy is suspended, the shield is not.
            decision, name, fallback_reason, inference_s = Decision(Action()), "paused", None, None
        else:
            decision, name, fallback_reason, inference_s = self._decide(obs)
        t2 = self.perf_clock()
        decision, shield_reasons = self.shield.filter(obs, decision)
        t3 = self.perf_clock()
        applied = None
        if self.mode == "enforce":
            applied = self.platform.apply(decision.action)
            self._refusals.report(applied.outcomes, time.monotonic())
        t4 = self.perf_clock()
        # Computed by filter() for this observation.
        shield = self.shield
        limits = shield.last_limits_c
        limit = shield.last_min_limit_c
        if limit is None:
            limit = min((lim for lim, _ in limits.values()), default=shield.config.limit_c)
        if shield.last_cool_max_c is not None and shield.last_cool_max_c < limit:
            violations: tuple[int, ...] = ()  # even the hottest CPU is below every limit
        else:
            violations = tuple(
                c for c, s in obs.cpus.items() if s.temp.temp_c is not None and s.temp.temp_c >= limits[c][0]
            )
        rec = TickRecord(
            epoch=self.epoch,
            time_s=obs.time_s,
            wall_time_s=self.wall_clock(),
            mode=self.mode,
            paused=self.paused,
            policy_name=name,
            observation=obs,
            decision=decision,
            shield=shield_reasons,
            fallback=fallback_reason,
            applied=applied,
            inference_s=inference_s,
            timings_s={"observe": t1 - t0, "decide": t2 - t1, "shield": t3 - t2, "apply": t4 - t3, "total": t4 - t0},
            limit_c=limit,
            cpu_limits_c=limits,
            violations=violations,
            landing_fraction=shield.landing_fraction if shield.config.landing_caps else None,
        )
        if fallback_reason != self._last_fallback:
            # Once per change, not every epoch: a missing model would flood the journal.
            if fallback_reason:
                log.warning("policy %s not used from epoch %d on: %s; %s decides", self.policy.name, self.epoch,
                            fallback_reason, self.fallback.name)
            else:
                log.info("policy %s decides again from epoch %d", self.policy.name, self.epoch)
            self._last_fallback = fallback_reason
        self._log_shield(shield_reasons, obs.time_s)
        self.epoch += 1
        self.last = rec
        for sink in self.sinks:
            try:
                sink(rec)
            except Exception as e:  # a reporter must never stop the loop
                log.error("reporting epoch %d failed: %s: %s", rec.epoch, type(e).__name__, e)
        return rec
