"""Baseline policies, by name. Each implements :class:`ailfmd.policy.base.Policy`.

``get_baseline(name)`` builds a fresh instance; ``baseline_names()`` lists the names.
The registry is a mapping from names to classes, kept apart from the implementations.
Baselines that use a chip model (``tsp``, ``pcgov``) have ``configure(chip)``; a harness
that knows the simulated chip calls it (see docs/baselines.md), otherwise they run their
documented model-free fallback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from ailfmd.errors import AilfmError
from ailfmd.policy.base import Policy
from ailfmd.policy.baselines.hotpotato import HotPotatoBaseline
from ailfmd.policy.baselines.linux import LinuxBaseline
from ailfmd.policy.baselines.pcgov import PcgovBaseline
from ailfmd.policy.baselines.stepwise import StepwiseBaseline
from ailfmd.policy.baselines.thermald import ThermaldBaseline
from ailfmd.policy.baselines.tsp import TspBaseline

if TYPE_CHECKING:
    from ailfmd.sim.chip import Chip

_FACTORIES: dict[str, Callable[[], Policy]] = {
    "hotpotato": HotPotatoBaseline,
    "linux": LinuxBaseline,
    "pcgov": PcgovBaseline,
    "stepwise": StepwiseBaseline,
    "thermald": ThermaldBaseline,
    "tsp": TspBaseline,
}


class UnknownPolicy(AilfmError):
    """No baseline has this name; the message lists the known names."""

    def __init__(self, name: str) -> None:
        super().__init__(f"unknown policy {name!r}; known: {', '.join(baseline_names())}")
        self.name = name


def baseline_names() -> tuple[str, ...]:
    """Names of the built-in baselines, sorted."""
    return tuple(sorted(_FACTORIES))


def get_baseline(name: str, chip: Chip | None = None) -> Policy:
    """A new instance of the baseline called ``name``, given the chip model when known."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise UnknownPolicy(name) from None
    policy = factory()
    if chip is not None:
        configure_for_chip(policy, chip)
    return policy


def configure_for_chip(policy: object, chip: Chip) -> None:
    """Give a policy that uses a chip model (``configure(chip)``) the simulated chip."""
    configure = getattr(policy, "configure", None)
    if callable(configure):
        configure(chip)
