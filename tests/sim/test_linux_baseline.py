"""The ``linux`` baseline: defaults only, every decision explained; the registry."""

from __future__ import annotations

import pytest

from ailfmd.lab.run import Scenario, run_scenario
from ailfmd.platform.base import Action
from ailfmd.policy.base import Policy
from ailfmd.policy.baselines import UnknownPolicy, baseline_names, get_baseline
from ailfmd.sim.chip import load_chip
from ailfmd.sim.platform import SimPlatform
from ailfmd.sim.workload import load_workload


def test_registry_builds_fresh_policies_and_names_the_known_ones():
    assert "linux" in baseline_names()
    a, b = get_baseline("linux"), get_baseline("linux")
    assert a is not b and a.name == "linux"
    assert isinstance(a, Policy)
    with pytest.raises(UnknownPolicy, match="known: .*linux"):
        get_baseline("no-such-policy")


def test_linux_changes_nothing_and_says_why():
    p = SimPlatform(load_chip("tiny"), load_workload("tiny-test"), 0, duration_s=2.0)
    policy = get_baseline("linux")
    policy.reset(p.topology(), p.capabilities())
    p.advance(0.3)
    decision = policy.decide(p.observe())
    assert decision.action == Action()
    kinds = {r.kind for r in decision.reasons}
    assert kinds == {"freq_cap", "placement"}
    assert all(r.source == "policy:linux" for r in decision.reasons)
    assert any("DTM" in r.detail for r in decision.reasons)
    assert any("CFS" in r.detail for r in decision.reasons)


def test_linux_puts_a_lowered_cap_back_to_the_hardware_maximum():
    p = SimPlatform(load_chip("tiny"), load_workload("tiny-test"), 0, duration_s=2.0)
    policy = get_baseline("linux")
    policy.reset(p.topology(), p.capabilities())
    p.apply(Action(freq_cap_khz={3: 1_400_000}))
    decision = policy.decide(p.observe())
    assert decision.action.freq_cap_khz == {3: 4_000_000}
    assert not decision.action.affinity
    assert any(r.target == "cpu 3" for r in decision.reasons)
    assert p.apply(decision.action).ok
    assert policy.decide(p.observe()).action == Action()


def test_under_linux_threads_spread_and_busy_cores_run_at_the_top_unless_throttled():
    chip = load_chip("3d-64")
    seen_busy = []

    def check(obs, decision, result):
        cores = [s.last_cpu for s in obs.threads.values()]
        assert len(cores) == len(set(cores))  # one thread per core: spread, no sharing
        assert all(s.affinity == frozenset(range(64)) for s in obs.threads.values())
        for cpu in set(cores):
            st = obs.cpus[cpu]
            assert st.cap_khz == 4_000_000
            # schedutil under the cap: busy cores at the top level unless DTM holds them.
            assert st.freq_khz in (4_000_000, 1_000_000)
        seen_busy.append(len(cores))

    result = run_scenario(Scenario(chip, load_workload("tiny-test"), 0, 3.0), get_baseline("linux"),
                          on_epoch=check)
    assert result.epochs == 30 and result.refused_actions == 0
    assert max(seen_busy) > 4
    m = result.metrics
    assert m.requests_completed > 10
    assert m.migrations == 0
    # The stacked chip is thermally constrained: Linux alone relies on hardware DTM.
    assert m.dtm_throttle_events > 0 and m.peak_temp_c >= chip.dtm.threshold_c
