"""What one control-loop epoch produced: the record every reporter reads.

The loop builds one :class:`TickRecord` per epoch and hands it to the metrics collector,
the control socket and the recorder; none of them does I/O on the machine themselves.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ailfmd.platform.base import ApplyResult, Observation
from ailfmd.policy.base import Decision, Reason

MODES = ("enforce", "observe")


@dataclass(frozen=True)
class TickRecord:
    epoch: int  # 0, 1, 2, ... since the daemon started
    time_s: float  # the platform's monotonic clock
    wall_time_s: float  # Unix time, for humans and logs
    mode: str  # "enforce" or "observe"
    paused: bool  # paused by an operator: observe only, nothing applied
    policy_name: str  # the policy that decided (may be the fallback)
    observation: Observation
    decision: Decision  # after the safety shield
    shield: tuple[Reason, ...] = ()  # what the shield changed, with reasons
    fallback: str | None = None  # why the configured policy was not used this epoch
    applied: ApplyResult | None = None  # None when nothing was applied (observe/paused)
    inference_s: float | None = None  # time in policy.decide
    timings_s: dict[str, float] = field(default_factory=dict)  # observe, decide, shield, apply, total
    limit_c: float | None = None  # the thermal limit the shield protects (the lowest CPU's)
    # Each CPU's (limit, critical) as the shield took them this epoch: configured, or
    # lower where its sensor reports lower ones (the shield's own mapping, shared while
    # unchanged: nothing is copied per epoch); empty when not known.
    cpu_limits_c: Mapping[int, tuple[float, float]] = field(default_factory=dict)
    # The shield's landing caps: idle CPUs capped at this fraction of their frequency
    # range (1.0: no landing cap); None when landing caps are off.
    landing_fraction: float | None = None
    violations: tuple[int, ...] = ()  # CPUs at or above the limit this epoch

    @property
    def reasons(self) -> tuple[Reason, ...]:
        return self.decision.reasons
