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
