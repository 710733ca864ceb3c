"""``run_scenario`` with the daemon's safety shield between policy and platform."""

from __future__ import annotations

from ailfmd.lab.run import Scenario, run_scenario
from ailfmd.platform.base import Action, Capabilities, Observation, Topology
from ailfmd.policy.base import Decision
from ailfmd.sim.chip import load_chip
from ailfmd.sim.workload import load_workload


class FullSpeedOnTop:
    """Every thread pinned to the top die, every cap at the maximum: as hot as it gets."""

    name = "hot"

    def reset(self, topology: Topology, capabilities: Capabilities) -> None:
        self.top = sorted(topology.cpus)[-16:]

    def decide(self, obs: Observation) -> Decision:
        caps = {c: st.hw_max_khz for c, st in obs.cpus.items()}
        aff = {s.ref: frozenset({self.top[i % len(self.top)]}) for i, s in enumerate(
            sorted(obs.threads.values(), key=lambda s: s.ref.tid))}
        return Decision(Action(affinity=aff, freq_cap_khz=caps))


def test_the_shield_tames_a_reckless_policy_in_the_simulator() -> None:
    sc = Scenario(load_chip("3d-64"), load_workload("prefill-heavy"), 3, 6.0)
    bare = run_scenario(sc, FullSpeedOnTop()).metrics
    shielded = run_scenario(sc, FullSpeedOnTop(), shield=True).metrics
    assert bare.time_above_dtm_s > 0.5
    assert shielded.time_above_dtm_s < 0.5 * bare.time_above_dtm_s
    assert shielded.peak_temp_c < load_chip("3d-64").dtm.critical_c
