"""A policy that acts at random: the shield's adversary and the learner's floor."""

from __future__ import annotations

import numpy as np

from ailfmd.platform.base import Action, Capabilities, Observation, Topology
from ailfmd.policy.base import Decision


class RandomActions:
    """Random caps (the maximum with probability ``p_max``, else uniform in the hardware
    range) and every thread pinned to one random CPU, every epoch. ``last_cpus`` limits
    the pinning to the highest-numbered CPUs (the top die of the simulated 3D chips)."""

    name = "random"

    def __init__(self, seed: int, p_max: float = 0.0, last_cpus: int | None = None) -> None:
        self.rng = np.random.default_rng(seed)
        self.p_max = p_max
        self.last_cpus = last_cpus

    def reset(self, topology: Topology, capabilities: Capabilities) -> None:
        cpus = sorted(topology.cpus)
        self.cpus = cpus[-self.last_cpus:] if self.last_cpus else cpus

    def decide(self, obs: Observation) -> Decision:
        caps = {}
        for cpu, st in obs.cpus.items():
            lo, hi = st.hw_min_khz or 1, st.hw_max_khz or 1
            caps[cpu] = hi if self.rng.random() < self.p_max else int(self.rng.uniform(lo, hi))
        affinity = {t.ref: frozenset({int(self.rng.choice(self.cpus))}) for t in obs.threads.values()}
        return Decision(Action(affinity=affinity, freq_cap_khz=caps))
