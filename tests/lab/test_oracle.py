"""The oracle: never over the thermal limit, and, in its roll-out mode, at least as good
as every baseline on a case small enough for its search to be exhaustive."""

from __future__ import annotations

from pathlib import Path

import pytest

from ailfmd.lab.run import Scenario, run_scenario
from ailfmd.policy.baselines import baseline_names, get_baseline
from ailfmd.policy.oracle import Oracle, cost_summary
from ailfmd.policy.rollout import EndOutcome, RunEnd, roll_out
from ailfmd.sim.chip import load_chip
from ailfmd.sim.platform import SimPlatform
from ailfmd.sim.workload import load_workload

# One or two threads at a time: every mapping of the live threads can be tried.
SMALL_WORKLOAD = """
[workload]
description = "one or two short TinyLlama requests at a time, for exhaustive search"
suite = "test"

[arrivals]
kind = "poisson"
rate_per_s = 4.0

[[mix]]
model = "tinyllama-1.1b"
prompt_tokens = { kind = "uniform", low = 8, high = 32 }
output_tokens = { kind = "uniform", low = 2, high = 6 }
threads = { kind = "choice", values = [1, 2] }
"""

# What the default oracle chose each epoch on tiny / tiny-test, seed 0, 3 s, recorded
# before the roll-out mode existed: with the mode off the search decides as it did.
# (Re-record only when the simulator's physics or the default search change on purpose.)
DEFAULT_CHOICES = (
    "keep/layered@4000MHz", "cool/uniform@4000MHz", "baseline:linux", "cool/uniform@4000MHz",
    "cool/uniform@4000MHz", "baseline:linux", "baseline:linux", "baseline:hotpotato",
    "baseline:hotpotato", "baseline:linux", "baseline:linux", "baseline:hotpotato",
    "baseline:hotpotato", "baseline:hotpotato", "baseline:hotpotato", "baseline:linux",
    "baseline:hotpotato", "baseline:hotpotato", "keep/layered@4000MHz", "cool/layered@4000MHz",
    "central/layered@4000MHz", "baseline:linux", "baseline:linux", "baseline:hotpotato",
    "baseline:hotpotato", "central/layered@4000MHz", "keep/layered@4000MHz",
    "keep/layered@4000MHz", "central/layered@4000MHz", "baseline:linux",
)


def _run(scenario: Scenario, **oracle_args):
    made: list[Oracle] = []

    def factory(platform):
        made.append(Oracle(platform, epoch_s=scenario.epoch_s, **oracle_args))
        return made[0]

    return run_scenario(scenario, factory), made[0]


def _small_scenario(tmp_path: Path, seed: int) -> Scenario:
    path = tmp_path / "small.toml"
    path.write_text(SMALL_WORKLOAD)
    # Drained: every policy answers the same requests, so mean response times compare.
    return Scenario(load_chip("tiny"), load_workload(str(path)), seed=seed, duration_s=2.0, drain_s=10.0)


@pytest.fixture(scope="module")
def default_run():
    """The default oracle on tiny-test, which drives the tiny chip into hardware DTM under
    linux within ~3 s: (scenario, result, oracle, the candidate chosen each epoch)."""
    scenario = Scenario(load_chip("tiny"), load_workload("tiny-test"), seed=0, duration_s=3.0)
    chosen: list[str] = []
    made: list[Oracle] = []

    def factory(platform):
        made.append(Oracle(platform, epoch_s=scenario.epoch_s))
        return made[0]

    result = run_scenario(scenario, factory, on_epoch=lambda o, d, r: chosen.append(str(d.info["candidate"])))
    return scenario, result, made[0], tuple(chosen)


def test_oracle_never_exceeds_the_limit_where_linux_does(default_run):
    scenario, result, oracle, _ = default_run
    linux = run_scenario(scenario, get_baseline("linux")).metrics
    m = result.metrics
    assert linux.peak_temp_c >= oracle.limit_c  # the case is thermally bound
    assert m.time_above_dtm_s == 0.0
    assert m.dtm_throttle_events == 0
    assert m.peak_temp_c < oracle.limit_c
    assert m.requests_completed >= linux.requests_completed
    cost = cost_summary(oracle)
    assert cost["decisions"] == result.epochs and cost["mean_ms"] > 0


def test_roll_out_mode_is_off_by_default_and_the_default_search_decides_as_before(default_run):
    _, _, oracle, chosen = default_run
    assert oracle.rollout is False and oracle.rollouts_ == [] and oracle.rollout_best_ == []
    assert chosen == DEFAULT_CHOICES


def test_a_roll_out_of_a_baseline_from_the_start_is_the_baseline_s_run(tmp_path: Path):
    # What roll-outs stand on: the same calls as run_scenario, the same epochs, the same end.
    scenario = _small_scenario(tmp_path, seed=5)
    for name in ("hotpotato", "stepwise"):
        p = SimPlatform(scenario.chip, scenario.workload, scenario.seed, tick_s=scenario.tick_s,
                        duration_s=scenario.duration_s)
        policy = get_baseline(name, scenario.chip)
        policy.reset(p.topology(), p.capabilities())
        first = policy.decide(p.observe()).action
        end = roll_out(p, p.snapshot(), first, policy, RunEnd.of(p, scenario.epoch_s, scenario.drain_s))
        run = run_scenario(scenario, get_baseline(name)).metrics
        assert p.metrics() == run, name
        assert end == EndOutcome.of(run)


@pytest.mark.parametrize("seed", [3, 5, 9])
def test_oracle_with_roll_outs_is_at_least_as_good_as_every_baseline_when_search_is_exhaustive(
        tmp_path: Path, seed: int):
    # Seeds: 3 and 5, where some baselines go above DTM; 9, where the greedy oracle
    # (no roll-outs, even with a 1 s horizon) is 0.04 % slower than linux.
    scenario = _small_scenario(tmp_path, seed)
    # Its own candidate: every mapping of up to 2 threads, every level of a few-level
    # ladder. margin 0: the oracle's limit is the DTM threshold the baselines are held to.
    result, oracle = _run(scenario, search="all", levels=(0, 5, 10, 15), exhaustive_threads=2,
                          margin_c=0.0, rollout=True, drain_s=scenario.drain_s)
    om = result.metrics
    assert om.time_above_dtm_s == 0.0
    assert om.requests_in_flight == 0 and om.requests_completed == om.requests_arrived > 0
    # The chain of the proof (docs/oracle.md): the chosen roll-out's end never gets worse
    # from one decision to the next, and the last one is exactly how the run ended.
    ends = [e.key() for e in oracle.rollout_best_]
    assert len(ends) == result.epochs
    assert all(later <= earlier for earlier, later in zip(ends, ends[1:]))
    assert oracle.rollout_best_[-1] == EndOutcome.of(om)
    for name in baseline_names():
        bm = run_scenario(scenario, get_baseline(name)).metrics
        assert EndOutcome.of(om).key() <= EndOutcome.of(bm).key(), name
        assert om.requests_completed >= bm.requests_completed, name
        assert om.output_tokens >= bm.output_tokens, name
        assert om.prefill_tokens >= bm.prefill_tokens, name
        if bm.time_above_dtm_s == 0.0:
            # The same requests done within the limit: strictly no slower.
            assert om.mean_response_s <= bm.mean_response_s, name
        else:
            # Safety comes first in the order: the oracle never went above DTM.
            assert om.time_above_dtm_s < bm.time_above_dtm_s, name


@pytest.mark.parametrize("rollout", [False, True], ids=["search", "roll-out"])
def test_a_decision_restores_the_platform_and_explains_itself(rollout: bool):
    p = SimPlatform(load_chip("tiny"), load_workload("tiny-test"), seed=1, duration_s=1.0 if rollout else 2.0)
    oracle = Oracle(p, rollout=rollout)
    oracle.reset(p.topology(), p.capabilities())
    p.advance(0.5)
    obs = p.observe()
    before = (p.time_s, p.metrics(), p.engine.state.temps_c.copy())
    decision = oracle.decide(obs)
    assert (p.time_s, p.metrics()) == before[:2]
    assert (p.engine.state.temps_c == before[2]).all()
    assert decision.reasons[0].source == "policy:oracle"
    if not rollout:
        assert "candidates" in decision.reasons[0].detail
        return
    assert "roll-outs" in decision.reasons[0].detail
    assert decision.info["rollout_base"] in baseline_names()
    assert decision.info["rollouts"] == oracle.rollouts_[0] >= len(baseline_names())


def test_rejects_bad_parameters():
    p = SimPlatform(load_chip("tiny"), load_workload("tiny-test"), seed=0, duration_s=1.0)
    with pytest.raises(ValueError):
        Oracle(p, horizon_s=0)
    with pytest.raises(ValueError):
        Oracle(p, search="random")
    with pytest.raises(ValueError):
        Oracle(p, rollout=True, drain_s=-1.0)
    with pytest.raises(ValueError, match="at least one baseline"):
        Oracle(p, rollout=True, baselines=()).reset(p.topology(), p.capabilities())
