"""Run one scenario offline: a policy drives a SimPlatform epoch by epoch, in virtual time.

Each epoch is the control loop of the daemon without the daemon: ``observe()``, the
policy's ``decide()``, ``apply()``, then the simulation advances one epoch. The result is
the run's metrics (``ailfmd.sim.metrics.RunMetrics``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ailfmd.control.shield import SafetyShield, ShieldConfig
from ailfmd.platform.base import ApplyResult, Observation
from ailfmd.policy.base import Decision, Policy
from ailfmd.policy.baselines import configure_for_chip
from ailfmd.sim.chip import Chip
from ailfmd.sim.engine import DEFAULT_TICK_S
from ailfmd.sim.metrics import RunMetrics
from ailfmd.sim.platform import SimPlatform
from ailfmd.sim.workload import Workload

DEFAULT_EPOCH_S = 0.1

EpochHook = Callable[[Observation, Decision, ApplyResult], None]
# Builds a policy that needs the platform it controls (the oracle looks ahead on it).
PolicyFactory = Callable[[SimPlatform], Policy]


@dataclass(frozen=True)
class Scenario:
    """What to simulate: chip, request stream, seed, horizon and time resolution.

    Requests arrive during ``duration_s``. With ``drain_s`` > 0 the run then goes on,
    epoch by epoch, until no request is in flight or ``drain_s`` more seconds have
    passed: every policy then answers the same requests (same seed, same arrivals), so
    their response times compare like for like.
    """

    chip: Chip
    workload: Workload
    seed: int
    duration_s: float
    epoch_s: float = DEFAULT_EPOCH_S
    tick_s: float = DEFAULT_TICK_S
    drain_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.duration_s > 0 or not self.epoch_s > 0 or not self.tick_s > 0 or self.drain_s < 0:
            raise ValueError("duration_s, epoch_s and tick_s must be > 0, drain_s >= 0")


@dataclass(frozen=True)
class RunResult:
    scenario: Scenario
    policy: str
    metrics: RunMetrics
    epochs: int
    refused_actions: int  # apply outcomes that were not ok


def run_scenario(scenario: Scenario, policy: Policy | PolicyFactory,
                 on_epoch: EpochHook | None = None, shield: bool = False) -> RunResult:
    """Simulate ``scenario`` under ``policy``; ``on_epoch`` sees every epoch (recorders).

    ``policy`` is a Policy, or a factory called with the run's SimPlatform for policies
    that need it (the oracle). With ``shield`` every decision passes the daemon's safety
    shield before it is applied, as it would in ``ailfmd``: its default configuration
    with the chip's DTM threshold and critical temperature as its limits.
    """
    sc = scenario
    platform = SimPlatform(sc.chip, sc.workload, sc.seed, tick_s=sc.tick_s, duration_s=sc.duration_s)
    if not isinstance(policy, Policy):
        policy = policy(platform)
    configure_for_chip(policy, sc.chip)
    # The chip's DTM is the operator's limit here (the sensors report it as their maximum).
    dtm = sc.chip.dtm
    guard = (SafetyShield(ShieldConfig(limit_c=dtm.threshold_c, critical_c=dtm.critical_c), platform.topology())
             if shield else None)
    # Whole ticks only: the epoch is rounded to ticks, the last epoch may be shorter.
    epoch_ticks = max(1, round(sc.epoch_s / sc.tick_s))
    total_ticks = max(1, round(sc.duration_s / sc.tick_s))
    limit_ticks = total_ticks + round(sc.drain_s / sc.tick_s)
    epochs = refused = 0
    try:
        policy.reset(platform.topology(), platform.capabilities())
        done = 0
        while done < total_ticks or (done < limit_ticks and platform.metrics().requests_in_flight > 0):
            obs = platform.observe()
            decision = policy.decide(obs)
            if guard is not None:
                decision, _ = guard.filter(obs, decision)
            result = platform.apply(decision.action)
            refused += sum(1 for o in result.outcomes if not o.ok)
            if on_epoch is not None:
                on_epoch(obs, decision, result)
            ticks = min(epoch_ticks, (total_ticks if done < total_ticks else limit_ticks) - done)
            platform.advance(ticks * sc.tick_s)
            done += ticks
            epochs += 1
        return RunResult(sc, policy.name, platform.metrics(), epochs, refused)
    finally:
        platform.close()
