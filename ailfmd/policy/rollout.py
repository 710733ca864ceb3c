"""Roll-outs to the end of a scenario: one candidate action, then a base policy.

The oracle's roll-out mode (docs/oracle.md, "Roll-out mode") compares candidate actions
by how the whole run ends when, after the candidate, a base policy (a baseline) drives
the rest of it. A roll-out replays exactly what :func:`ailfmd.lab.run.run_scenario`
would do from the same state (same epochs, same drain rule, same calls on the
platform), so the roll-out that the oracle then follows is the run itself: that is what
makes the oracle at least as good as every base policy (the rollout algorithm's
improvement property; the proof is in docs/oracle.md).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from ailfmd.platform.base import Action
from ailfmd.policy.base import Policy
from ailfmd.sim.metrics import RunMetrics
from ailfmd.sim.platform import SimPlatform


@dataclass(frozen=True)
class RunEnd:
    """Where and in which steps a run stops, as ``run_scenario`` schedules it.

    Requests arrive during the first ``total_ticks``; then the run goes on, epoch by
    epoch, while a request is in flight and fewer than ``limit_ticks`` have passed.
    Epochs are ``epoch_ticks`` long; the last one before each bound may be shorter.
    """

    tick_s: float
    epoch_ticks: int
    total_ticks: int
    limit_ticks: int

    @classmethod
    def of(cls, platform: SimPlatform, epoch_s: float, drain_s: float) -> RunEnd:
        """The schedule of a run of ``platform`` in epochs of ``epoch_s`` drained ``drain_s``."""
        tick_s = platform.engine.tick_s
        # The same roundings as run_scenario: whole ticks only.
        total = max(1, round(platform.engine.duration_s / tick_s))
        return cls(tick_s, max(1, round(epoch_s / tick_s)), total, total + round(drain_s / tick_s))

    def next_ticks(self, done_ticks: int, in_flight: int) -> int:
        """Ticks the next epoch lasts after ``done_ticks``; 0 when the run is over."""
        if not (done_ticks < self.total_ticks or (done_ticks < self.limit_ticks and in_flight > 0)):
            return 0
        bound = self.total_ticks if done_ticks < self.total_ticks else self.limit_ticks
        return min(self.epoch_ticks, bound - done_ticks)


@dataclass(frozen=True)
class EndOutcome:
    """How a whole run ends (history and future): what roll-outs are compared by."""

    time_above_dtm_s: float
    requests_completed: int
    output_tokens: int
    prefill_tokens: int
    mean_response_s: float

    @classmethod
    def of(cls, m: RunMetrics) -> EndOutcome:
        return cls(m.time_above_dtm_s, m.requests_completed, m.output_tokens, m.prefill_tokens,
                   m.mean_response_s or 0.0)

    def key(self) -> tuple[float, int, int, int, float]:
        """Smaller is better: less time above DTM first (safety is not traded for speed),
        then more requests completed, more output and prompt tokens (more work answered),
        then a lower mean response time (only compared once the same work is done)."""
        return (self.time_above_dtm_s, -self.requests_completed, -self.output_tokens,
                -self.prefill_tokens, self.mean_response_s)


def continuation(policy: Policy, platform: SimPlatform) -> Policy:
    """A deep copy of ``policy`` (its history included) to drive one roll-out.

    The chip model some baselines hold is immutable and shared, not copied.
    """
    return copy.deepcopy(policy, {id(platform.chip): platform.chip})


def roll_out(platform: SimPlatform, snap: object, action: Action, base: Policy,
             end: RunEnd) -> EndOutcome:
    """From ``snap``: ``action`` for this epoch, then ``base`` decides every later epoch,
    to the end of the run. ``base`` is driven (pass a copy); the platform is left at the
    end of the roll-out."""
    platform.restore_snapshot(snap)
    # decide() is only asked while the run goes on; fall back to a whole epoch should a
    # caller's schedule disagree (the guarantee then does not hold, the roll-out still runs).
    ticks = _next_ticks(platform, end) or end.epoch_ticks
    platform.apply(action)
    platform.advance(ticks * end.tick_s)
    while ticks := _next_ticks(platform, end):
        platform.apply(base.decide(platform.observe()).action)
        platform.advance(ticks * end.tick_s)
    return EndOutcome.of(platform.metrics())


def _next_ticks(platform: SimPlatform, end: RunEnd) -> int:
    state = platform.engine.state
    return end.next_ticks(state.tick_no, len(state.active))
