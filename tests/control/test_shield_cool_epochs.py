"""The shield's shortcut for cool epochs and its cached limits: the same result as the
full pass, epoch after epoch, and never stale when sensors, CPUs or settings change."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest

from ailfmd.control.loop import ControlLoop, PolicyOutputError, validate_decision
from ailfmd.control.shield import SafetyShield, ShieldConfig
from ailfmd.platform.base import (
    Action,
    Capabilities,
    CpuState,
    CpuTemp,
    CpuTopology,
    Observation,
    TempReading,
    TempSensor,
    ThreadRef,
    ThreadSample,
    Topology,
)
from ailfmd.policy.base import Decision

N_CPUS = 8
HW_MIN_KHZ, HW_MAX_KHZ = 800_000, 3_500_000
TOPO = Topology(cpus={c: CpuTopology(cpu=c, package_id=c // 4, core_id=c % 4) for c in range(N_CPUS)})
SENSORS = [TempSensor("coretemp", f"platform_coretemp_{c // 4}", f"temp{c % 4 + 2}", f"Core {c % 4}", "core",
                      f"class/hwmon/hwmon{c // 4}/temp{c % 4 + 2}_input") for c in range(N_CPUS)]


def state(cpu: int, temp_c: float | None, *, cap_khz: int = HW_MAX_KHZ, ranged: bool = True,
          sensor: bool = True) -> CpuState:
    src = SENSORS[cpu] if sensor else None
    return CpuState(cpu, CpuTemp(cpu, temp_c, src, "per-core coretemp" if src else "no sensor"), 2_000_000,
                    cap_khz, HW_MIN_KHZ if ranged else None, HW_MAX_KHZ if ranged else None)


def observe(time_s: float, states: dict[int, CpuState], max_c: dict[int, float] | None = None,
            threads: dict[int, ThreadSample] | None = None) -> Observation:
    max_c = max_c or {}
    readings = tuple(TempReading(SENSORS[c], st.temp.temp_c, max_c=max_c.get(c)) for c, st in states.items())
    return Observation(time_s=time_s, cpus=states, threads=threads or {}, sensors=readings)


def full_pass(shield: SafetyShield, obs: Observation, decision: Decision) -> tuple[Decision, tuple]:
    """The shield's step without any shortcut: every CPU examined."""
    return shield._filter_all(obs, decision, shield.limits_c(obs))


def shield_state(shield: SafetyShield) -> tuple:
    return dict(shield._caps_khz), dict(shield._policy_caps), dict(shield._last)


@pytest.mark.parametrize("seed", range(12))
def test_every_epoch_matches_the_full_pass(seed: int) -> None:
    """Random walks that wander from cool to hot and back, with jumps, missing and NaN
    readings, CPUs going offline, sensor maxima that drop, and policies asking caps."""
    rng = random.Random(seed)
    fast = SafetyShield(ShieldConfig(), TOPO)
    full = SafetyShield(ShieldConfig(), TOPO)
    temps = {c: rng.uniform(40.0, 70.0) for c in range(N_CPUS)}
    max_c: dict[int, float] = {}
    online = set(range(N_CPUS))
    states: dict[int, CpuState] = {}
    cool_epochs = acting_epochs = 0
    for epoch in range(400):
        time_s = epoch * 0.1
        event = rng.random()
        if event < 0.03 and len(online) > 2:
            online.discard(rng.choice(sorted(online)))
        elif event < 0.06:
            online = set(range(N_CPUS))
        elif event < 0.08:
            max_c[rng.randrange(N_CPUS)] = rng.choice([70.0, 80.0, 100.0])
        elif event < 0.10:
            max_c.clear()
        keep = rng.random() < 0.3  # the same records again, as the platform hands back
        if not keep or not states:
            for c in temps:
                # Drifting back towards 55 C, with rare jumps up (and down).
                step = rng.gauss(0.0, 1.5) + 0.05 * (55.0 - temps[c])
                step += 25.0 * (rng.random() < 0.01) - 20.0 * (rng.random() < 0.02)
                temps[c] = min(110.0, max(30.0, temps[c] + step))
            states = {}
            for c in sorted(online):
                t: float | None = temps[c]
                r = rng.random()
                if r < 0.005:
                    t = None
                elif r < 0.01:
                    t = math.nan
                states[c] = state(c, t, ranged=rng.random() > 0.005)
        obs = observe(time_s, states, max_c)
        caps = {c: rng.choice([HW_MAX_KHZ, 2_000_000, 1_200_000]) for c in states if rng.random() < 0.5}
        decision = Decision(Action(freq_cap_khz=caps))
        got = fast.filter(obs, decision)
        want = full_pass(full, obs, decision)
        assert got == want, f"epoch {epoch}"
        assert shield_state(fast) == shield_state(full), f"epoch {epoch}"
        assert fast.last_limits_c == full.limits_c(obs)
        acting_epochs += bool(got[1])
        if fast.last_cool_max_c is not None:
            cool_epochs += 1
            assert all(s.temp.temp_c is None or not s.temp.temp_c >= fast.last_limits_c[c][0]
                       for c, s in obs.cpus.items())
    # Both kinds of epoch, or the comparison would prove nothing.
    assert cool_epochs > 20 and acting_epochs > 20, (cool_epochs, acting_epochs)


def test_a_fast_rise_from_a_cool_epoch_is_caught() -> None:
    shield = SafetyShield(ShieldConfig(), TOPO)
    shield.filter(observe(0.0, {c: state(c, 50.0) for c in range(N_CPUS)}), Decision(Action()))
    shield.filter(observe(0.1, {c: state(c, 50.0) for c in range(N_CPUS)}), Decision(Action()))
    # 50 -> 75: below the 82 C guard band, but heading for 100 C by the next epoch.
    states = {c: state(c, 75.0 if c == 3 else 50.0) for c in range(N_CPUS)}
    _, reasons = shield.filter(observe(0.2, states), Decision(Action()))
    assert [r.target for r in reasons if r.kind == "freq_cap"] == ["cpu 3"]
    assert shield.last_cool_max_c is None


def test_a_lower_sensor_maximum_is_not_hidden_by_cached_limits() -> None:
    shield = SafetyShield(ShieldConfig(), TOPO)
    states = {c: state(c, 72.0) for c in range(N_CPUS)}
    for i in range(3):
        _, reasons = shield.filter(observe(i * 0.1, states), Decision(Action()))
        assert reasons == ()
    # Same CPU records; the sensor of cpu 5 now reports a 74 C maximum.
    _, reasons = shield.filter(observe(0.3, states, max_c={5: 74.0}), Decision(Action()))
    assert shield.last_limits_c[5] == (74.0, 95.0)
    assert [r.target for r in reasons if r.kind == "freq_cap"] == ["cpu 5"]


def test_a_new_configuration_is_used_at_once() -> None:
    shield = SafetyShield(ShieldConfig(), TOPO)
    states = {c: state(c, 72.0) for c in range(N_CPUS)}
    for i in range(3):
        assert shield.filter(observe(i * 0.1, states), Decision(Action()))[1] == ()
    shield.config = ShieldConfig(limit_c=74.0, margin_c=3.0, critical_c=95.0)
    _, reasons = shield.filter(observe(0.3, states), Decision(Action()))
    assert shield.last_min_limit_c == 74.0
    assert len([r for r in reasons if r.kind == "freq_cap"]) == N_CPUS


def test_a_cpu_going_offline_leaves_no_stale_limit() -> None:
    shield = SafetyShield(ShieldConfig(), TOPO)
    states = {c: state(c, 60.0) for c in range(N_CPUS)}
    for i in range(3):
        shield.filter(observe(i * 0.1, states, max_c={7: 70.0}), Decision(Action()))
    assert shield.last_min_limit_c == 70.0
    fewer = {c: s for c, s in states.items() if c != 7}
    shield.filter(observe(0.3, fewer, max_c={7: 70.0}), Decision(Action()))
    assert set(shield.last_limits_c) == set(fewer)
    assert shield.last_min_limit_c == 85.0


def test_a_shield_cap_of_its_own_still_steps_on_a_cool_epoch() -> None:
    """Cool again after a cut: the release must go on although nothing is near a limit."""
    shield = SafetyShield(ShieldConfig(), TOPO)
    shield.filter(observe(0.0, {c: state(c, 84.0 if c == 2 else 50.0) for c in range(N_CPUS)}), Decision(Action()))
    assert 2 in shield.active_caps_khz
    cool = {c: state(c, 50.0) for c in range(N_CPUS)}
    caps = []
    for i in range(1, 40):
        shield.filter(observe(i * 0.1, cool), Decision(Action()))
        caps.append(shield.active_caps_khz.get(2))
    assert caps[-1] is None and caps[0] is not None


def test_the_loop_counts_violations_as_before() -> None:
    class Replay:
        def __init__(self, obs: list[Observation]) -> None:
            self.obs = obs

        def topology(self) -> Topology:
            return TOPO

        def capabilities(self) -> Capabilities:
            return Capabilities(items={})

        def observe(self) -> Observation:
            return self.obs.pop(0)

    class Nothing:
        name = "nothing"

        def reset(self, topology, capabilities) -> None:  # type: ignore[no-untyped-def]
            pass

        def decide(self, obs: Observation) -> Decision:
            return Decision(Action())

    cool = {c: state(c, 60.0) for c in range(N_CPUS)}
    hot = {c: state(c, 90.0 if c in (1, 6) else 60.0) for c in range(N_CPUS)}
    plat = Replay([observe(0.0, cool), observe(0.1, cool), observe(0.2, cool), observe(0.3, hot), observe(0.4, cool)])
    shield = SafetyShield(ShieldConfig(), TOPO)
    loop = ControlLoop(plat, Nothing(), Nothing(), shield, mode="observe")  # type: ignore[arg-type]
    got = [loop.tick().violations for _ in range(5)]
    assert got == [(), (), (), (1, 6), ()]
    assert loop.last is not None and loop.last.limit_c == 85.0


def test_the_quick_check_of_caps_still_refuses_bad_ones() -> None:
    states = {c: state(c, 60.0) for c in range(N_CPUS)}
    obs = observe(0.0, states)
    good = validate_decision(Decision(Action(freq_cap_khz={c: 2_000_000 for c in states})), obs)
    assert good.action.freq_cap_khz == {c: 2_000_000 for c in states}
    assert validate_decision(Decision(Action(freq_cap_khz={0: 2_000_000.0, 1: 1_000_000})), obs
                             ).action.freq_cap_khz == {0: 2_000_000, 1: 1_000_000}
    for bad in ({0: True}, {0: 0}, {0: -5}, {99: 2_000_000}, {0: math.nan}, {0: 1_000_000, 1: "x"}):
        with pytest.raises(PolicyOutputError):
            validate_decision(Decision(Action(freq_cap_khz=bad)), obs)  # type: ignore[arg-type]


def test_hot_cpus_still_lose_their_busiest_thread_after_cool_epochs() -> None:
    ref = ThreadRef(pid=1, tid=11, start_ticks=1)
    shield = SafetyShield(ShieldConfig(), TOPO)
    cool = {c: state(c, 55.0) for c in range(N_CPUS)}
    th = {11: ThreadSample(ref, "w", 4, frozenset(range(N_CPUS)))}
    for i in range(3):
        assert shield.filter(observe(i * 0.1, cool, threads=th), Decision(Action()))[1] == ()
    hot = dict(cool)
    hot[4] = replace(cool[4], temp=replace(cool[4].temp, temp_c=83.5))
    decision, reasons = shield.filter(observe(0.3, hot, threads=th), Decision(Action()))
    assert ref in decision.action.affinity and 4 not in decision.action.affinity[ref]
    assert any(r.kind == "placement" for r in reasons)
