"""The ``linux`` baseline: what an untouched Linux box does.

What it follows:

- placement: the kernel's CFS scheduler (fork/wake balancing spreads threads over idle
  CPUs, periodic and idle load balancing evens out run queues); the policy sets no
  affinity, so every thread may run anywhere;
- frequency: the cpufreq governor (schedutil or ondemand) with ``scaling_max_freq`` at
  ``cpuinfo_max_freq``: a busy core runs at the top level, an idle one at the bottom;
- temperature: hardware DTM alone (PROCHOT-style throttling at the trip point).

Each decision is therefore "no change". If something else left a cap below the hardware
maximum, the policy puts it back, so that it always describes the default machine.
"""

from __future__ import annotations

from ailfmd.platform.base import Action, Capabilities, Observation, Topology
from ailfmd.policy.base import Decision, Reason

SOURCE = "policy:linux"


class LinuxBaseline:
    """Leave placement to CFS and frequency to the governor; hardware DTM only."""

    name = "linux"

    def __init__(self) -> None:
        self._reasons: tuple[Reason, ...] = ()

    def reset(self, topology: Topology, capabilities: Capabilities) -> None:
        n = len(topology.cpus)
        self._reasons = (
            Reason(target=f"all {n} cpus", kind="freq_cap", source=SOURCE,
                   detail="caps at the hardware maximum; the kernel governor (schedutil/"
                          "ondemand) picks the clock, hardware DTM throttles hot cores"),
            Reason(target="all threads", kind="placement", source=SOURCE,
                   detail="affinity untouched: CFS spreads threads over all CPUs"),
        )

    def decide(self, obs: Observation) -> Decision:
        restore = {cpu: st.hw_max_khz for cpu, st in obs.cpus.items()
                   if st.cap_khz is not None and st.hw_max_khz is not None
                   and st.cap_khz < st.hw_max_khz}
        reasons = self._reasons
        if restore:
            reasons = reasons + tuple(
                Reason(target=f"cpu {cpu}", kind="freq_cap", source=SOURCE,
                       detail=f"cap back to the hardware maximum {khz} kHz")
                for cpu, khz in sorted(restore.items()))
        return Decision(action=Action(freq_cap_khz=restore), reasons=reasons)
