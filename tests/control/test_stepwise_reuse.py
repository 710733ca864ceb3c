"""``stepwise`` reuses its per-CPU ladders and trip points, and its caps while nothing
moved: every decision must equal one worked out from scratch, and nothing kept may go
stale when sensors, frequency tables, CPUs or settings change."""

from __future__ import annotations

import random

import pytest

from ailfmd.platform.base import (
    Capabilities,
    CpuState,
    CpuTemp,
    CpuTopology,
    FreqPolicy,
    Observation,
    TempReading,
    TempSensor,
    Topology,
)
from ailfmd.policy.baselines.stepwise import StepwiseBaseline

N_CPUS = 6
TOPO = Topology(cpus={c: CpuTopology(cpu=c, package_id=0, core_id=c) for c in range(N_CPUS)})
CAPS = Capabilities(items={})
SENSORS = [TempSensor("coretemp", "platform_coretemp_0", f"temp{c + 2}", f"Core {c}", "core",
                      f"class/hwmon/hwmon1/temp{c + 2}_input") for c in range(N_CPUS)]
TABLE = (3_000_000, 2_500_000, 2_000_000, 1_500_000, 1_000_000)


def observe(temps: dict[int, float | None], max_c: dict[int, float], tables: dict[int, tuple[int, ...]],
            hw_max_khz: int = 3_500_000) -> Observation:
    cpus = {c: CpuState(c, CpuTemp(c, t, SENSORS[c], "per-core coretemp"), 2_000_000, hw_max_khz, 800_000, hw_max_khz)
            for c, t in temps.items()}
    sensors = tuple(TempReading(SENSORS[c], t, max_c=max_c.get(c)) for c, t in temps.items())
    policies = tuple(FreqPolicy(c, (c,), "acpi-cpufreq", "userspace", 800_000, hw_max_khz, 2_000_000, 800_000,
                                hw_max_khz, available_khz=tables.get(c, ())) for c in temps)
    return Observation(time_s=0.0, cpus=cpus, threads={}, sensors=sensors, policies=policies)


def from_scratch(policy: StepwiseBaseline, obs: Observation):  # type: ignore[no-untyped-def]
    policy._params = policy._last_temps = policy._last_quick = None
    return policy.decide(obs)


def outcome(decide, obs: Observation) -> object:  # type: ignore[no-untyped-def]
    """The decision (a cooling state deeper than a table that just got shorter is clamped
    to the deepest step, with or without reuse)."""
    return decide(obs)


@pytest.mark.parametrize("seed", range(8))
def test_every_decision_matches_one_from_scratch(seed: int) -> None:
    rng = random.Random(seed)
    kept, fresh = StepwiseBaseline(), StepwiseBaseline()
    for p in (kept, fresh):
        p.reset(TOPO, CAPS)
    temps: dict[int, float | None] = {c: 70.0 for c in range(N_CPUS)}
    max_c: dict[int, float] = {}
    tables: dict[int, tuple[int, ...]] = {}
    hw_max = 3_500_000
    obs = observe(temps, max_c, tables)
    cool_epochs = hot_epochs = 0
    for epoch in range(300):
        event = rng.random()
        if event < 0.04:
            max_c[rng.randrange(N_CPUS)] = rng.choice([75.0, 80.0, 90.0])
        elif event < 0.06:
            max_c.clear()
        elif event < 0.09:
            tables[rng.randrange(N_CPUS)] = TABLE
        elif event < 0.11:
            tables.clear()
        elif event < 0.13:
            hw_max = rng.choice([3_500_000, 3_000_000])
        elif event < 0.15:
            temps.pop(rng.randrange(N_CPUS), None)  # offline
        elif event < 0.18:
            temps = {c: temps.get(c, 70.0) for c in range(N_CPUS)}
        elif event < 0.20:
            trip = rng.choice([72.0, 78.0])
            for p in (kept, fresh):
                p.trip_c = trip
        elif event < 0.22:
            for p in (kept, fresh):
                p.reset(TOPO, CAPS)
        if rng.random() < 0.6:  # else: the very same records again
            for c in temps:
                if rng.random() < 0.5:
                    # Cool spells (every CPU below its trip point) between hot ones.
                    low, high = (55.0, 71.0) if (epoch // 40) % 2 else (65.0, 85.0)
                    temps[c] = None if rng.random() < 0.03 else round(rng.uniform(low, high))
            obs = observe(temps, max_c, tables, hw_max)
        got, want = outcome(kept.decide, obs), outcome(lambda o: from_scratch(fresh, o), obs)
        assert got == want, f"epoch {epoch}"
        assert (kept._state, kept._last_c) == (fresh._state, fresh._last_c), f"epoch {epoch}"
        cool_epochs += not any(fresh._state.values())
        hot_epochs += any(fresh._state.values())
    assert cool_epochs > 20 and hot_epochs > 20, (cool_epochs, hot_epochs)


def test_a_lower_sensor_maximum_moves_the_trip_point_at_once() -> None:
    p = StepwiseBaseline()
    temps: dict[int, float | None] = {c: 77.0 for c in range(N_CPUS)}
    for t in (76.0, 77.0, 77.0):  # rising, then steady below the 78 C trip point
        temps[0] = t
        d = p.decide(observe(temps, {}, {}))
    assert d.reasons == ()
    temps[0] = 77.5  # rising, now above the 75 - 3 C trip of a sensor reporting 75 C
    d = p.decide(observe(temps, {0: 75.0}, {}))
    assert [r.target for r in d.reasons] == ["cpu 0"]


def test_reset_forgets_the_caps_kept() -> None:
    p = StepwiseBaseline()
    hot = observe({c: 90.0 for c in range(N_CPUS)}, {}, {})
    p.decide(observe({c: 80.0 for c in range(N_CPUS)}, {}, {}))
    first = p.decide(hot).action.freq_cap_khz  # rising above the trip: one step down
    assert all(v < 3_500_000 for v in first.values())
    p.reset(Topology(cpus={}), CAPS)  # every CPU gone: its cooling state too
    again = p.decide(hot).action.freq_cap_khz
    assert again == {c: 3_500_000 for c in range(N_CPUS)}


def test_the_caps_handed_out_are_the_policys_own_copy() -> None:
    p = StepwiseBaseline()
    obs = observe({c: 60.0 for c in range(N_CPUS)}, {}, {})
    first = p.decide(obs).action.freq_cap_khz
    first.clear()  # type: ignore[attr-defined]
    assert len(p.decide(obs).action.freq_cap_khz) == N_CPUS
