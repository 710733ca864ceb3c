"""The control loop and shield on a real sysfs tree of a Xeon: files actually change."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from ailfmd.control.loop import ControlLoop
from ailfmd.control.shield import SafetyShield, ShieldConfig
from ailfmd.platform.base import Action, Capabilities, Observation, Topology
from ailfmd.platform.linux.platform import LinuxPlatform
from ailfmd.policy.base import Decision, Reason

HWMON0 = "devices/platform/coretemp.0/hwmon/hwmon2"  # package 0


class FixedCaps:
    """A policy that asks for the same cap on every CPU."""

    def __init__(self, name: str, cap_khz: float) -> None:
        self.name, self.cap_khz = name, cap_khz

    def reset(self, topology: Topology, capabilities: Capabilities) -> None:
        pass

    def decide(self, obs: Observation) -> Decision:
        return Decision(
            Action(freq_cap_khz={c: self.cap_khz for c in obs.cpus}),
            (Reason("all cpus", "freq_cap", f"policy:{self.name}", "fixed cap"),),
        )


class Broken:
    name = "broken"

    def __init__(self, how: str) -> None:
        self.how = how

    def reset(self, topology: Topology, capabilities: Capabilities) -> None:
        pass

    def decide(self, obs: Observation) -> Decision:
        if self.how == "raise":
            raise RuntimeError("model exploded")
        if self.how == "slow":
            time.sleep(0.05)
            return Decision(Action())
        return Decision(Action(freq_cap_khz={0: math.nan}))


def cap_of(tree: Path, cpu: int) -> int:
    return int((tree / f"devices/system/cpu/cpufreq/policy{cpu}/scaling_max_freq").read_text())


def set_core_temp(tree: Path, label: str, temp_c: float) -> None:
    d = tree / HWMON0
    for lab in d.glob("temp*_label"):
        if lab.read_text().strip() == label:
            (d / lab.name.replace("_label", "_input")).write_text(f"{int(temp_c * 1000)}\n")
            return
    raise AssertionError(f"no {label} in {d}")


@pytest.fixture
def tree(machine_copy) -> Path:
    return machine_copy("xeon-2s-ht")


def make_loop(tree: Path, tmp_path: Path, policy, mode: str = "enforce", **shield_kw) -> ControlLoop:
    plat = LinuxPlatform(sysfs_root=tree, run_dir=tmp_path / "run", use_perf=False, slow_every=1)
    cfg = ShieldConfig(**{"limit_c": 85.0, "margin_c": 3.0, "critical_c": 95.0, **shield_kw})
    return ControlLoop(plat, policy, FixedCaps("fallback", 2_000_000), SafetyShield(cfg, plat.topology()), mode=mode,
                       decide_budget_s=0.02)


def test_enforce_applies_and_observe_touches_nothing(tree: Path, tmp_path: Path) -> None:
    before = cap_of(tree, 0)
    obs_loop = make_loop(tree, tmp_path, FixedCaps("p", 1_500_000), mode="observe")
    rec = obs_loop.tick()
    assert rec.applied is None and cap_of(tree, 0) == before
    assert rec.decision.action.freq_cap_khz[0] == 1_500_000  # decided and reported all the same
    loop = make_loop(tree, tmp_path, FixedCaps("p", 1_500_000))
    rec = loop.tick()
    assert rec.applied is not None and rec.applied.ok
    assert cap_of(tree, 0) == 1_500_000 and cap_of(tree, 31) == 1_500_000
    assert rec.policy_name == "p" and rec.fallback is None


@pytest.mark.parametrize("how, why", [("raise", "model exploded"), ("nan", "nan"), ("slow", "timeout")])
def test_failing_policy_falls_back_and_says_so(tree: Path, tmp_path: Path, how: str, why: str) -> None:
    loop = make_loop(tree, tmp_path, Broken(how))
    rec = loop.tick()
    assert rec.policy_name == "fallback" and why in (rec.fallback or "")
    assert cap_of(tree, 5) == 2_000_000  # the fallback's decision was applied
    assert any(r.source == "fallback:fallback" for r in rec.decision.reasons)


def test_shield_cuts_hot_core_whatever_the_policy_says(tree: Path, tmp_path: Path) -> None:
    # cpu1 is core 1 of package 0 (its HT sibling is cpu17): put it in the guard band.
    set_core_temp(tree, "Core 1", 83.5)
    loop = make_loop(tree, tmp_path, FixedCaps("greedy", 3_700_000))
    rec = loop.tick()
    hw_min, hw_max = 1_000_000, 3_700_000
    cut = int(hw_max - 0.25 * (hw_max - hw_min))
    assert cap_of(tree, 1) == cut and cap_of(tree, 17) == cut  # both SMT siblings
    assert cap_of(tree, 0) == 3_700_000  # cool cores keep the policy's cap
    r = [r for r in rec.shield if r.target == "cpu 1"][0]
    assert r.source == "shield" and r.value_c == 83.5 and r.threshold_c == 82.0
    assert r.sensor == "platform_coretemp_0/temp3"
    # Still hot: cut further next epoch, never below the hardware minimum.
    for _ in range(6):
        loop.tick()
    assert cap_of(tree, 1) == hw_min
    # Cooled well below limit - 2 * margin: released step by step, not at once.
    set_core_temp(tree, "Core 1", 60.0)
    loop.tick()
    assert hw_min < cap_of(tree, 1) < hw_max
    for _ in range(40):
        loop.tick()
    assert cap_of(tree, 1) == hw_max and loop.shield.active_caps_khz == {}


def test_critical_core_takes_its_whole_package_to_minimum(tree: Path, tmp_path: Path) -> None:
    set_core_temp(tree, "Core 2", 96.0)
    loop = make_loop(tree, tmp_path, FixedCaps("greedy", 3_700_000))
    rec = loop.tick()
    topo = loop.platform.topology()
    for cpu in topo.packages()[0]:
        assert cap_of(tree, cpu) == 1_000_000
    for cpu in topo.packages()[1]:
        assert cap_of(tree, cpu) == 3_700_000
    assert 2 in [int(r.target.split()[1]) for r in rec.shield] and rec.violations == (2, 18)


def test_shield_never_raises_a_policy_cap(tree: Path, tmp_path: Path) -> None:
    set_core_temp(tree, "Core 1", 83.0)
    loop = make_loop(tree, tmp_path, FixedCaps("frugal", 1_200_000))
    rec = loop.tick()
    assert cap_of(tree, 1) == 1_200_000
    assert not [r for r in rec.shield if r.kind == "freq_cap"]


def test_a_broken_sink_does_not_stop_the_loop(tree: Path, tmp_path: Path) -> None:
    loop = make_loop(tree, tmp_path, FixedCaps("p", 2_500_000))
    seen = []
    loop.sinks = [lambda r: 1 / 0, seen.append]
    loop.tick()
    loop.tick()
    assert [r.epoch for r in seen] == [0, 1]


def test_paused_loop_ignores_the_policy_but_keeps_the_shield(tree: Path, tmp_path: Path) -> None:
    loop = make_loop(tree, tmp_path, FixedCaps("greedy", 1_500_000))
    loop.paused = True
    rec = loop.tick()
    assert rec.policy_name == "paused" and cap_of(tree, 0) == 3_700_000  # policy not applied
    set_core_temp(tree, "Core 1", 84.0)
    loop.tick()
    assert cap_of(tree, 1) < 3_700_000  # the shield still acts


class CapsOnce:
    """Asks for a cap once and then nothing (policies send only changes)."""

    name = "once"

    def __init__(self, cap_khz: int) -> None:
        self.cap_khz, self.sent = cap_khz, False

    def reset(self, topology: Topology, capabilities: Capabilities) -> None:
        pass

    def decide(self, obs: Observation) -> Decision:
        if self.sent:
            return Decision(Action())
        self.sent = True
        return Decision(Action(freq_cap_khz={c: self.cap_khz for c in obs.cpus}))


def test_shield_holding_or_releasing_never_lifts_a_cap_the_policy_set_earlier(tree: Path, tmp_path: Path) -> None:
    # The shield cuts cpu 1 while it is hot, with the policy's 3.7 GHz in effect ...
    loop = make_loop(tree, tmp_path, CapsOnce(1_200_000))
    set_core_temp(tree, "Core 1", 83.5)
    loop.policy.sent = True  # the policy asks nothing in this epoch
    loop.tick()
    shield_cap = cap_of(tree, 1)
    assert shield_cap < 3_700_000
    # ... then the policy lowers every CPU to 1.2 GHz, once, and goes quiet.
    loop.policy.sent = False
    loop.tick()
    assert cap_of(tree, 1) == 1_200_000
    # Holding (still warm) and releasing (cool) must not lift cpu 1 back over 1.2 GHz.
    set_core_temp(tree, "Core 1", 80.0)
    for _ in range(3):
        loop.tick()
        assert cap_of(tree, 1) == 1_200_000
    set_core_temp(tree, "Core 1", 50.0)
    for _ in range(30):
        loop.tick()
        assert cap_of(tree, 1) == 1_200_000
    assert 1 not in loop.shield.active_caps_khz


def test_shield_spreads_displaced_threads_instead_of_piling_them_on_one_cpu() -> None:
    from ailfmd.platform.base import CpuState, CpuTemp, TempSensor, ThreadRef, ThreadSample, Topology as Topo
    from ailfmd.platform.base import CpuTopology

    n = 8
    cpus = {}
    for c in range(n):
        temp = 84.0 if c < 4 else 50.0 + c  # 0-3 hot, 4 coolest
        cpus[c] = CpuState(c, CpuTemp(c, temp, TempSensor("t", "t", f"c{c}", f"c{c}", "core", ""), "test"),
                           2_000_000, 3_000_000, 1_000_000, 3_000_000)
    everything = frozenset(range(n))
    threads = {100 + i: ThreadSample(ThreadRef(1, 100 + i, 1), "w", 7, everything, {}) for i in range(3)}
    obs = Observation(time_s=1.0, cpus=cpus, threads=threads)
    topo = Topo(cpus={c: CpuTopology(c, 0, c, c) for c in range(n)})
    shield = SafetyShield(ShieldConfig(limit_c=85.0, margin_c=3.0, critical_c=95.0), topo)
    # The policy sends the three threads (all running on cpu 7) onto the hot CPUs 0-2.
    ask = {threads[100 + i].ref: frozenset({i}) for i in range(3)}
    decision, _ = shield.filter(obs, Decision(Action(affinity=ask)))
    got = [decision.action.affinity[threads[100 + i].ref] for i in range(3)]
    assert all(len(g) == 1 and not g & {0, 1, 2, 3} for g in got)
    assert len(set().union(*got)) == 3, got  # three different cool CPUs, not one


def test_a_thread_the_shield_moves_takes_the_cut_it_leaves_behind() -> None:
    from ailfmd.platform.base import CpuState, CpuTemp, TempSensor, ThreadRef, ThreadSample, Topology as Topo
    from ailfmd.platform.base import CpuTopology

    n = 4
    caps = {0: 1_800_000, 1: 3_000_000, 2: 3_000_000, 3: 3_000_000}
    cpus = {}
    for c in range(n):
        temp = 83.0 if c == 0 else 50.0 + c  # cpu 0 in the guard band, cpu 1 coolest and idle
        cpus[c] = CpuState(c, CpuTemp(c, temp, TempSensor("t", "t", f"c{c}", f"c{c}", "core", ""), "test"),
                           1_800_000, caps[c], 1_000_000, 3_000_000)
    busy = ThreadSample(ThreadRef(1, 100, 1), "w", 0, frozenset({0}), {"instructions": 1e9})
    obs = Observation(time_s=1.0, cpus=cpus, threads={100: busy})
    topo = Topo(cpus={c: CpuTopology(c, 0, c, c) for c in range(n)})
    shield = SafetyShield(ShieldConfig(limit_c=85.0, margin_c=3.0, critical_c=95.0), topo)
    decision, reasons = shield.filter(obs, Decision(Action()))
    assert decision.action.affinity[busy.ref] == frozenset({1})
    # cpu 0 is in the guard band: its 1.8 GHz cap is cut by a quarter of the 2 GHz range.
    assert decision.action.freq_cap_khz[0] == 1_300_000
    # The idle CPU's 3 GHz cap would let the thread that heated cpu 0 run faster there;
    # the cut goes with it.
    assert decision.action.freq_cap_khz[1] == 1_300_000
    assert any("capped there at the 1300 MHz it leaves on cpu 0" in r.detail for r in reasons)
    # A target already capped lower keeps its cap.
    cpus[1] = CpuState(1, cpus[1].temp, 1_000_000, 1_200_000, 1_000_000, 3_000_000)
    shield = SafetyShield(ShieldConfig(limit_c=85.0, margin_c=3.0, critical_c=95.0), topo)
    decision, _ = shield.filter(Observation(time_s=1.0, cpus=cpus, threads={100: busy}), Decision(Action()))
    assert decision.action.freq_cap_khz.get(1, 1_200_000) == 1_200_000
