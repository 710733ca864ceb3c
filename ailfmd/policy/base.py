"""What a policy is: observation in, action plus reasons out.

Baselines, the oracle, the learned ONNX policy and the safety shield all speak this
interface, on the simulator and on Linux alike. A policy only asks for what Linux lets
a user-space daemon do: a CPU set per thread and a frequency cap per CPU. The actual
frequency under the cap is the (real or simulated) kernel governor's business, and
hardware DTM acts below everything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from ailfmd.platform.base import Action, Capabilities, Observation, Topology


@dataclass(frozen=True)
class Reason:
    """Why one actuation was chosen, for the journal, ``ailfmctl explain`` and metrics.

    ``source`` is who decided (``policy:linux``, ``policy:onnx``, ``shield``,
    ``fallback:stepwise``); ``sensor`` and ``threshold_c`` name the measurement that
    triggered it when there is one; ``predicted`` is the expected effect in words.
    """

    target: str  # "cpu 5", "thread 1234"
    kind: str  # "freq_cap", "placement"
    source: str
    detail: str
    sensor: str | None = None
    value_c: float | None = None
    threshold_c: float | None = None
    predicted: str | None = None


@dataclass(frozen=True)
class Decision:
    action: Action
    reasons: tuple[Reason, ...] = ()
    # What the policy wants reported about itself (e.g. inference latency, fallbacks).
    info: dict[str, float | str] = field(default_factory=dict)


@runtime_checkable
class Policy(Protocol):
    """A placement and frequency policy."""

    name: str

    def reset(self, topology: Topology, capabilities: Capabilities) -> None:
        """Called before the first decision and after re-discovery (hotplug)."""
        ...

    def decide(self, obs: Observation) -> Decision:
        """The action for this epoch. Must not mutate ``obs``."""
        ...
