"""Placements stay inside each thread's cpuset, and refused changes do not flood the journal."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest

from ailfmd.control.loop import RefusalLog, validate_decision
from ailfmd.control.shield import SafetyShield, ShieldConfig
from ailfmd.platform.base import (
    Action,
    ApplyOutcome,
    CpuState,
    CpuTemp,
    CpuTopology,
    Observation,
    TempSensor,
    ThreadRef,
    ThreadSample,
    Topology,
)
from ailfmd.policy.base import Decision, Reason
from ailfmd.policy.onnx_policy import OnnxPolicy
from ailfmd.sim.chip import load_chip
from ailfmd.sim.platform import SimPlatform
from ailfmd.sim.workload import load_workload

N_CPUS = 8
HI_KHZ = 3_000_000
CONFIG = ShieldConfig(limit_c=85.0, margin_c=3.0, critical_c=95.0)  # guard band from 82 C
POLICY = Path(__file__).resolve().parents[2] / "policies" / "default.onnx"


def ref(tid: int) -> ThreadRef:
    return ThreadRef(1, tid, 1)


def observe(temps_c: dict[int, float], threads: dict[int, tuple[int, frozenset[int] | None]],
            time_s: float = 1.0) -> Observation:
    """CPUs 0-7 at ``temps_c`` (default 50 C); tid -> (CPU it ran on, its cpuset)."""
    cpus = {}
    for c in range(N_CPUS):
        sensor = TempSensor("t", "t", f"c{c}", f"c{c}", "core", "")
        cpus[c] = CpuState(c, CpuTemp(c, temps_c.get(c, 50.0), sensor, "test"), 2_000_000, HI_KHZ,
                           1_000_000, HI_KHZ)
    samples = {tid: ThreadSample(ref(tid), "w", cpu, frozenset({cpu}), {"instructions": 1e9 - tid}, cpuset)
               for tid, (cpu, cpuset) in threads.items()}
    return Observation(time_s=time_s, cpus=cpus, threads=samples)


def test_placements_outside_a_cpuset_are_trimmed_or_dropped_with_a_reason() -> None:
    obs = observe({}, {10: (0, frozenset({0, 1, 2, 3})), 11: (1, frozenset({0, 1, 2, 3})), 12: (4, None)})
    asked = Decision(Action(affinity={ref(10): frozenset({3, 6}), ref(11): frozenset({6}), ref(12): frozenset({7})}),
                     (Reason("thread 11", "placement", "policy:test", "to the coolest cpu 6"),
                      Reason("thread 10", "placement", "policy:test", "to cpus 3 and 6")))
    got = validate_decision(asked, obs)
    # Inside: what is in the set; wholly outside: not moved; no cpuset known: as asked.
    assert got.action.affinity == {ref(10): frozenset({3}), ref(12): frozenset({7})}
    assert [(r.target, r.source) for r in got.reasons] == [("thread 10", "policy:test"), ("thread 11", "cpuset")]
    assert got.reasons[1].detail == "asked for cpus 6, outside its cpuset 0-3: not moved"


def test_the_shield_moves_a_hot_cpus_thread_only_inside_its_cpuset() -> None:
    shield = SafetyShield(CONFIG, Topology(cpus={c: CpuTopology(c, 0, c, c) for c in range(N_CPUS)}))
    # cpu 1 is hot; the coolest CPUs (6, 7) are outside its thread's cpuset 0-3.
    temps = {0: 60.0, 1: 84.0, 2: 58.0, 3: 57.0, 4: 55.0, 5: 52.0, 6: 40.0, 7: 41.0}
    obs = observe(temps, {20: (1, frozenset({0, 1, 2, 3})), 21: (0, frozenset({0, 1, 2, 3}))})
    decision, reasons = shield.filter(obs, Decision(Action()))
    assert decision.action.affinity[ref(20)] == frozenset({3})  # its set's coolest idle CPU
    assert any("moved to the coolest cpu 3" in r.detail for r in reasons)
    # Without a cpuset it would have gone to cpu 6: the test above is not vacuous.
    free = observe(temps, {20: (1, None), 21: (0, None)})
    decision, _ = SafetyShield(CONFIG, Topology(cpus={c: CpuTopology(c, 0, c, c) for c in range(N_CPUS)})).filter(
        free, Decision(Action()))
    assert decision.action.affinity[ref(20)] == frozenset({6})


def test_the_shield_gives_a_displaced_thread_a_cpu_of_its_cpuset() -> None:
    shield = SafetyShield(CONFIG, Topology(cpus={c: CpuTopology(c, 0, c, c) for c in range(N_CPUS)}))
    temps = {2: 84.0, 3: 60.0, 6: 40.0}
    obs = observe(temps, {30: (0, frozenset({0, 1, 2, 3}))})
    # The policy sends thread 30 to hot cpu 2 alone: the shield picks a cool CPU instead,
    # the coolest of its cpuset (1 at 50 C), not cpu 6 (40 C) outside it.
    decision, _ = shield.filter(obs, Decision(Action(affinity={ref(30): frozenset({2})})))
    assert decision.action.affinity[ref(30)] <= frozenset({0, 1, 3})


def test_the_learned_policy_places_moving_threads_inside_their_cpusets() -> None:
    chip = load_chip("3d-64")
    plat = SimPlatform(chip, load_workload("decode-heavy"), seed=3, duration_s=5.0)
    policy = OnnxPolicy(POLICY, service=False, move_threshold=0.0)  # every thread moves
    policy.reset(plat.topology(), plat.capabilities())
    plat.advance(2.0)
    obs = plat.observe()
    assert 4 <= len(obs.threads) <= 32
    outside_free = validate_decision(policy.decide(obs), obs).action.affinity
    # Unconfined, the model prefers the dies near the sink (CPUs 0-31); a cpuset of the
    # two far dies must keep every thread there.
    far_dies = frozenset(range(32, 64))
    assert any(not cpus <= far_dies for cpus in outside_free.values())
    confined = replace(obs, threads={t: replace(s, cpuset=far_dies) for t, s in obs.threads.items()})
    policy.reset(plat.topology(), plat.capabilities())
    got = validate_decision(policy.decide(confined), confined)
    assert got.action.affinity and all(cpus <= far_dies for cpus in got.action.affinity.values())
    assert not any(r.source == "cpuset" for r in got.reasons)  # chosen inside, nothing dropped


def outcome(target: str, ok: bool, detail: str = "") -> ApplyOutcome:
    return ApplyOutcome(target, "9", None if not ok else "9", ok, detail)


def test_a_refusal_repeated_every_epoch_is_logged_once_then_summarised(caplog: pytest.LogCaptureFixture) -> None:
    log = RefusalLog(every_s=60.0, forget_s=600.0)
    einval = "EINVAL: no CPU of the set is online and allowed (offline CPUs or cpuset)"
    with caplog.at_level(logging.WARNING, logger="ailfmd.loop"):
        for epoch in range(600):  # a minute at 10 Hz, the same two refusals every epoch
            log.report([outcome("thread 5", False, einval), outcome("thread 6", False, "EPERM"),
                        outcome("cpu 1", True)], epoch * 0.1)
        log.report([outcome("thread 5", False, einval)], 60.0)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:2] == [f"could not apply thread 5 = 9: {einval}", "could not apply thread 6 = 9: EPERM"]
    assert lines[2:] == ["1199 refused change(s) repeated in the last 60 s, each logged once when first refused"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ailfmd.loop"):
        log.report([outcome("thread 7", False, einval)], 61.0)  # a new target: logged at once
        log.report([outcome("thread 5", False, einval)], 700.0)  # back after forget_s: again
    assert [r.getMessage() for r in caplog.records] == [f"could not apply thread 7 = 9: {einval}",
                                                        f"could not apply thread 5 = 9: {einval}"]


def test_more_threads_than_their_cpuset_share_it_without_placements_outside() -> None:
    """Threads outnumber their cpuset's CPUs: they share them, and the policy asks for
    nothing outside (no CPU of its own for each, as on a machine with room)."""
    plat = SimPlatform(load_chip("3d-64"), load_workload("decode-heavy"), seed=3, duration_s=5.0)
    policy = OnnxPolicy(POLICY, service=False)
    policy.reset(plat.topology(), plat.capabilities())
    plat.advance(2.0)
    obs = plat.observe()
    small = frozenset({60, 61, 62, 63})
    assert len(obs.threads) > len(small)
    # As the kernel keeps them: every thread on a CPU of its cpuset.
    confined = replace(obs, threads={t: replace(s, cpuset=small, last_cpu=60 + i % 4, affinity=small)
                                     for i, (t, s) in enumerate(sorted(obs.threads.items()))})
    got = validate_decision(policy.decide(confined), confined)
    assert got.action.affinity and all(cpus <= small for cpus in got.action.affinity.values())
    assert not any(r.source == "cpuset" for r in got.reasons)
