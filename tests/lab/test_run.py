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


def test_draining_answers_every_request_that_arrived() -> None:
    from ailfmd.policy.baselines import get_baseline

    chip, wl = load_chip("3d-64"), load_workload("long-context")
    cut = run_scenario(Scenario(chip, wl, 2, 4.0), get_baseline("linux")).metrics
    drained = run_scenario(Scenario(chip, wl, 2, 4.0, drain_s=60.0), get_baseline("linux")).metrics
    assert cut.requests_in_flight > 0  # arrivals stop, requests still running
    assert drained.requests_arrived == cut.requests_arrived
    assert drained.requests_in_flight == 0 and drained.requests_completed == drained.requests_arrived
    assert 4.0 < drained.duration_s < 64.0
    # The run stops at the first epoch end with nothing in flight, not at the drain limit.
    short = run_scenario(Scenario(chip, wl, 2, 4.0, drain_s=drained.duration_s - 4.0 + 5.0),
                         get_baseline("linux")).metrics
    assert short.duration_s == drained.duration_s


def test_a_negative_drain_is_a_usage_error(capsys) -> None:
    from ailfmd.lab.cli import main

    for argv in (["sim", "--workload", "tiny-test", "--duration", "1", "--drain", "-1"],
                 ["bench", "--quick", "--drain", "-1"], ["train", "--quick", "--out", "x", "--eval-drain", "-1"]):
        try:
            main(argv)
        except SystemExit as e:
            assert e.code == 2
        else:
            raise AssertionError(f"{argv} accepted a negative drain")
        assert "must be >= 0" in capsys.readouterr().err
