"""The thermald, tsp, pcgov and hotpotato baselines obey their laws; all of them run."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from ailfmd.lab.run import Scenario, run_scenario
from ailfmd.platform.base import (
    Capabilities,
    CpuState,
    CpuTemp,
    CpuTopology,
    FreqPolicy,
    Observation,
    TempReading,
    TempSensor,
    ThreadRef,
    ThreadSample,
    Topology,
)
from ailfmd.policy.base import Policy
from ailfmd.policy.baselines import baseline_names, get_baseline
from ailfmd.policy.baselines.hotpotato import HotPotatoBaseline
from ailfmd.policy.baselines.pcgov import PcgovBaseline
from ailfmd.policy.baselines.thermald import ThermaldBaseline
from ailfmd.policy.baselines.tsp import TspBaseline
from ailfmd.sim.chip import load_chip
from ailfmd.sim.noc import mean_llc_latency_cycles
from ailfmd.sim.platform import SimPlatform
from ailfmd.sim.power import PowerModel
from ailfmd.sim.thermal import ThermalModel
from ailfmd.sim.workload import load_workload

LADDER_KHZ = tuple(range(1_000_000, 4_000_001, 200_000))  # tiny's V/f table
NEW = ("thermald", "tsp", "pcgov", "hotpotato")


@pytest.fixture(scope="module")
def tiny():
    return load_chip("tiny")


@pytest.fixture(scope="module")
def stack64():
    # 4 dies of 4 x 4: centre and edge tiles differ in LLC latency (on tiny all are corners).
    return load_chip("3d-64")


def topology(chip) -> Topology:
    cpus = {c: CpuTopology(c, 0, c, die_id=chip.position(c)[0], position=chip.position(c))
            for c in range(chip.n_cores)}
    return Topology(cpus=cpus)


def caps() -> Capabilities:
    return Capabilities(items={})


def thread(tid: int, cpu: int | None = None, affinity: frozenset[int] | None = None,
           **counters: float) -> ThreadSample:
    return ThreadSample(ThreadRef(tid, tid, 0), f"t{tid}", cpu,
                        affinity if affinity is not None else frozenset(range(8)), counters)


def obs(temps: dict[int, float | None], t: float = 0.0, threads=(), cap_khz=None,
        max_c: float | None = None) -> Observation:
    cpus, sensors, policies = {}, [], []
    for cpu, temp in temps.items():
        sensor = TempSensor("sim", "chip", f"core{cpu}", f"Core {cpu}", "core", "")
        cap = (cap_khz or {}).get(cpu, LADDER_KHZ[-1])
        cpus[cpu] = CpuState(cpu, CpuTemp(cpu, temp, sensor, "test"), cap, cap,
                             LADDER_KHZ[0], LADDER_KHZ[-1])
        sensors.append(TempReading(sensor, temp, None, max_c))
        policies.append(FreqPolicy(cpu, (cpu,), "sim", "schedutil", LADDER_KHZ[0], cap, cap,
                                   LADDER_KHZ[0], LADDER_KHZ[-1], LADDER_KHZ))
    return Observation(time_s=t, cpus=cpus, threads={s.ref.tid: s for s in threads},
                       sensors=tuple(sensors), policies=tuple(policies))


def steps_below_max(khz: int) -> int:
    return len(LADDER_KHZ) - 1 - LADDER_KHZ.index(khz)


# --------------------------------------------------------------------------- registry


def test_registry_builds_the_new_baselines_without_a_chip():
    for name in NEW:
        assert name in baseline_names()
        p = get_baseline(name)
        assert isinstance(p, Policy) and p.name == name
        assert get_baseline(name) is not p


# --------------------------------------------------------------------------- thermald


def run_thermald(policy, temps_by_epoch, epoch_s=0.1):
    """Feed one CPU's temperatures; returns the cooling state after each epoch."""
    states, cap = [], LADDER_KHZ[-1]
    for k, temp in enumerate(temps_by_epoch):
        d = policy.decide(obs({0: temp}, t=k * epoch_s, cap_khz={0: cap}))
        cap = d.action.freq_cap_khz.get(0, cap)
        assert all(r.source == "policy:thermald" for r in d.reasons)
        assert len(d.reasons) == len(d.action.freq_cap_khz)
        states.append(steps_below_max(cap))
    return states


def test_thermald_steps_up_one_notch_then_exponentially_while_hot():
    p = ThermaldBaseline(trip_c=70.0, hysteresis_c=2.0, debounce_s=0.0)
    states = run_thermald(p, [60, 71, 72, 72, 72, 72])
    # below, then crossing: one step; still hot: base 1 + 2, + 4, + 8, clamped at the bottom
    assert states == [0, 1, 3, 5, 9, 15]


def test_thermald_debounces_repeated_activation():
    p = ThermaldBaseline(trip_c=70.0, debounce_s=0.25)
    states = run_thermald(p, [71, 71, 71, 71, 71, 71])
    # t=0 step, t=0.1/0.2 ignored, t=0.3 exponential, t=0.4/0.5 ignored
    assert states == [1, 1, 1, 3, 3, 3]


def test_thermald_releases_one_step_at_a_time_after_debounce_when_cool():
    p = ThermaldBaseline(trip_c=70.0, hysteresis_c=2.0, debounce_s=0.25)
    hot = [71, 71, 71, 71]  # states 1, 1, 1, 3
    band = [69]  # inside the hysteresis band: hold
    cool = [60] * 8
    states = run_thermald(p, hot + band + cool)
    assert states[:4] == [1, 1, 1, 3]
    assert states[4] == 3
    released = states[5:]
    assert released == [2, 2, 2, 1, 1, 1, 0, 0]
    assert all(a - b in (0, 1) for a, b in zip(released, released[1:]))


def test_thermald_crossing_again_after_a_release_starts_with_one_step():
    p = ThermaldBaseline(trip_c=70.0, hysteresis_c=2.0, debounce_s=0.0)
    states = run_thermald(p, [71, 71, 60, 71, 71])
    assert states == [1, 3, 2, 3, 5]


def test_thermald_uses_the_sensor_maximum_and_leaves_unread_cpus_alone():
    p = ThermaldBaseline(trip_below_max_c=3.0, debounce_s=0.0)
    d = p.decide(obs({0: 77.5, 1: None, 2: 70.0}, max_c=80.0))
    assert set(d.action.freq_cap_khz) == {0}
    r = d.reasons[0]
    assert r.threshold_c == 77.0 and r.value_c == 77.5 and r.kind == "freq_cap"


def test_thermald_pid_cools_harder_the_hotter_it_is():
    p = ThermaldBaseline(trip_c=70.0, pid=(1.0, 0.0, 0.0), debounce_s=0.0)
    assert run_thermald(p, [60, 72, 75, 60]) == [0, 2, 5, 0]


def test_thermald_per_package_caps_every_cpu_of_the_package(tiny):
    p = ThermaldBaseline(trip_c=70.0, per_package=True)
    p.reset(topology(tiny), caps())
    d = p.decide(obs({c: 60.0 for c in range(7)} | {7: 75.0}))
    assert set(d.action.freq_cap_khz) == set(range(8))
    assert len(set(d.action.freq_cap_khz.values())) == 1
    assert d.reasons[0].target == "package 0"


# --------------------------------------------------------------------------- tsp


def test_tsp_budget_is_pagani_formula_and_puts_the_hottest_core_at_the_limit(tiny):
    p = TspBaseline(tiny)
    p.reset(topology(tiny), caps())
    threads = [thread(1000 + k) for k in range(6)]
    d = p.decide(obs({c: 50.0 for c in range(8)}, threads=threads))
    # Fixed mapping: thread order onto CPU id order.
    assert {r.tid: set(c) for r, c in d.action.affinity.items()} == {1000 + k: {k} for k in range(6)}
    active = list(range(6))
    limit = tiny.dtm.threshold_c - 1.0
    thermal, power = ThermalModel(tiny), PowerModel(tiny)
    idle_w = float(power.idle_tile_power_w(limit))
    expected = thermal.tsp_budget_w(active, limit, idle_w, over="all")
    budget, freq_mhz = p.budget(active)
    assert budget == pytest.approx(expected, rel=1e-12)
    # Steady state with the active cores at the budget: hottest core exactly at the limit.
    watts = np.full(tiny.n_cores, idle_w)
    watts[active] = budget
    temps = thermal.steady_state(watts)[:tiny.n_cores]
    assert temps.max() == pytest.approx(limit, abs=1e-6)
    # Cap: the highest V/f level whose power (activity 1, leakage at the limit) fits.
    levels = np.asarray(tiny.vf.frequencies_mhz, dtype=float)
    tile_w = power.tile_power_w(1.0, levels, limit)
    fitting = levels[tile_w <= budget]
    assert freq_mhz == fitting.max() < levels.max()
    assert all(k == int(freq_mhz) * 1000 for k in d.action.freq_cap_khz.values())
    assert set(d.action.freq_cap_khz) == set(range(8))
    assert any("TSP" in r.detail for r in d.reasons if r.kind == "freq_cap")


def test_tsp_on_a_stack_bounds_every_core_and_more_active_cores_get_less(tiny):
    p = TspBaseline(tiny)
    thermal = ThermalModel(tiny)
    limit = p.effective_limit_c
    idle_w = float(PowerModel(tiny).idle_tile_power_w(limit))
    one, _ = p.budget([0])
    assert one == pytest.approx(thermal.tsp_budget_w([0], limit, idle_w, over="all"))
    assert one <= thermal.tsp_budget_w([0], limit, idle_w, over="active")
    assert p.budget(list(range(8)))[0] < p.budget([0, 1])[0] < one


def test_tsp_keeps_its_mapping_no_migration(tiny):
    p = TspBaseline(tiny)
    p.reset(topology(tiny), caps())
    first = p.decide(obs({c: 50.0 for c in range(8)}, threads=[thread(1000), thread(1001)]))
    pinned = {r.tid: c for r, c in first.action.affinity.items()}
    # Thread 1000 exits; 1001 stays where it is, the newcomer takes the free CPU 0.
    second = p.decide(obs({c: 50.0 for c in range(8)},
                          threads=[thread(1001, 1, pinned[1001]), thread(1002)]))
    assert {r.tid: set(c) for r, c in second.action.affinity.items()} == {1002: {0}}


def test_tsp_without_a_chip_falls_back_to_the_lowest_frequency_and_says_so():
    p = get_baseline("tsp")
    d = p.decide(obs({0: 50.0, 1: None}, threads=[thread(1000)]))
    assert d.action.freq_cap_khz == {0: LADDER_KHZ[0], 1: LADDER_KHZ[0]}
    assert all("no chip thermal model" in r.detail for r in d.reasons if r.kind == "freq_cap")
    assert "fallback" in d.info["tsp"]


# --------------------------------------------------------------------------- pcgov


def test_pcgov_puts_memory_bound_central_and_gives_compute_bound_the_higher_cap(stack64):
    chip = stack64
    p = PcgovBaseline(chip)
    p.reset(topology(chip), caps())
    memory = thread(1000, instructions=1e6, cycles=1.4e6, llc_misses=50e3)  # 50 MPKI
    compute = thread(1001, instructions=1e6, cycles=0.4e6, llc_misses=500)  # 0.5 MPKI
    d = p.decide(obs({c: 50.0 for c in range(64)}, threads=[memory, compute]))
    where = {r.tid: next(iter(c)) for r, c in d.action.affinity.items()}
    fp = chip.floorplan
    lat = mean_llc_latency_cycles(fp.layers, fp.rows, fp.cols, chip.noc.hop_horizontal_cycles,
                                  chip.noc.hop_vertical_cycles, chip.noc.llc_bank_access_cycles)
    assert lat[where[1000]] < lat[where[1001]]
    assert lat[where[1000]] == lat.min()
    assert chip.position(where[1001])[0] == 0  # compute-bound: layer nearest the sink
    cap = {c: d.action.freq_cap_khz.get(c, LADDER_KHZ[-1]) for c in range(64)}  # unchanged: max
    assert cap[where[1001]] > cap[where[1000]]
    # The shifted budget keeps every core at or below the limit in steady state.
    budgets, uniform = p.budgets_w([where[1000]], [where[1001]])
    assert budgets[where[1000]] < uniform < budgets[where[1001]]
    power = PowerModel(chip)
    watts = np.full(chip.n_cores, float(power.idle_tile_power_w(p.effective_limit_c)))
    for cpu, b in budgets.items():
        watts[cpu] = b
    assert ThermalModel(chip).steady_state(watts)[:64].max() <= p.effective_limit_c + 1e-6
    assert all(r.source == "policy:pcgov" for r in d.reasons)


def test_pcgov_without_a_chip_still_separates_the_classes(tiny):
    p = get_baseline("pcgov")
    p.reset(topology(tiny), caps())
    memory = thread(1000, instructions=1e6, cycles=1.4e6, llc_misses=50e3)
    compute = thread(1001, instructions=1e6, cycles=0.4e6, llc_misses=500)
    d = p.decide(obs({c: 50.0 for c in range(8)}, threads=[memory, compute]))
    where = {r.tid: next(iter(c)) for r, c in d.action.affinity.items()}
    assert where[1000] != where[1001]
    assert d.action.freq_cap_khz == {where[1000]: 2_400_000}  # 60 % of 4 GHz; others stay at max


def test_pcgov_moves_a_thread_only_when_its_class_changes(stack64):
    p = PcgovBaseline(stack64)
    p.reset(topology(stack64), caps())
    compute = thread(1001, instructions=1e6, cycles=0.4e6, llc_misses=500)
    d = p.decide(obs({c: 50.0 for c in range(64)}, threads=[compute]))
    ((ref, cpus),) = d.action.affinity.items()
    again = thread(1001, next(iter(cpus)), cpus, instructions=1e6, cycles=0.4e6, llc_misses=600)
    assert not p.decide(obs({c: 50.0 for c in range(64)}, threads=[again])).action.affinity
    decode = thread(1001, next(iter(cpus)), cpus, instructions=1e6, cycles=1.4e6, llc_misses=5e4)
    moved = p.decide(obs({c: 50.0 for c in range(64)}, threads=[decode])).action.affinity
    assert moved and next(iter(moved.values())) != cpus


# --------------------------------------------------------------------------- hotpotato


def test_hotpotato_rotates_the_hottest_cores_thread_to_the_coolest_at_the_period_only():
    p = HotPotatoBaseline(period_s=0.5)
    temps = {0: 60.0, 1: 62.0, 2: 50.0, 3: 55.0}
    first = p.decide(obs(temps, t=0.0, threads=[thread(1000), thread(1001)]))
    pinned = {r.tid: c for r, c in first.action.affinity.items()}
    assert pinned == {1000: frozenset({2}), 1001: frozenset({3})}  # coolest CPUs first
    # The CPUs holding threads heat up; between periods nothing moves.
    hot = {0: 50.0, 1: 52.0, 2: 75.0, 3: 70.0}
    threads = [thread(1000, 2, pinned[1000], task_clock_ns=9e7),
               thread(1001, 3, pinned[1001], task_clock_ns=9e7)]
    for t in (0.1, 0.2, 0.3, 0.4):
        d = p.decide(obs(hot, t=t, threads=threads))
        assert not d.action.affinity and not d.action.freq_cap_khz
    d = p.decide(obs(hot, t=0.5, threads=threads))
    assert {r.tid: set(c) for r, c in d.action.affinity.items()} == {1000: {0}}
    assert "rotation" in d.reasons[0].detail and d.reasons[0].source == "policy:hotpotato"
    threads[0] = thread(1000, 0, frozenset({0}), task_clock_ns=9e7)
    assert not p.decide(obs(hot, t=0.6, threads=threads)).action.affinity


def test_hotpotato_exchanges_with_a_busy_cool_core_and_keeps_caps_at_max():
    p = HotPotatoBaseline(period_s=0.1)
    p.decide(obs({0: 50.0, 1: 50.0}, t=0.0))
    threads = [thread(1000, 0, frozenset({0}), task_clock_ns=5e7),
               thread(1001, 1, frozenset({1}), task_clock_ns=5e7)]
    p._placed = {1000: 0, 1001: 1}
    d = p.decide(obs({0: 75.0, 1: 60.0}, t=0.1, threads=threads, cap_khz={1: 2_000_000}))
    assert {r.tid: set(c) for r, c in d.action.affinity.items()} == {1000: {1}, 1001: {0}}
    assert d.action.freq_cap_khz == {1: LADDER_KHZ[-1]}


# --------------------------------------------------------------------------- every baseline


@pytest.mark.parametrize("name", NEW)
def test_every_new_baseline_runs_a_short_simulation(name, tiny):
    policy = get_baseline(name)
    if hasattr(policy, "configure"):
        policy.configure(tiny)
    reasons_seen = []

    def check(o, decision, result):
        actuations = len(decision.action.freq_cap_khz) + len(decision.action.affinity)
        assert len(decision.reasons) >= actuations
        assert all(r.source == f"policy:{name}" for r in decision.reasons)
        reasons_seen.extend(decision.reasons)

    r = run_scenario(Scenario(tiny, load_workload("tiny-test"), seed=1, duration_s=2), policy, check)
    assert r.refused_actions == 0 and r.epochs == 20
    m = r.metrics
    for value in (m.peak_temp_c, m.energy_j, m.mean_freq_mhz, m.output_tokens_per_s):
        assert math.isfinite(value)
    assert m.requests_completed > 0


@pytest.mark.parametrize("name", NEW)
def test_every_new_baseline_is_deterministic_and_copes_with_missing_data(name, tiny):
    def run():
        p = SimPlatform(tiny, load_workload("tiny-test"), 3, duration_s=1.0)
        policy = get_baseline(name)
        policy.reset(p.topology(), p.capabilities())
        out = []
        for _ in range(6):
            d = policy.decide(p.observe())
            out.append(d.action)
            p.apply(d.action)
            p.advance(0.1)
        return out

    assert run() == run()
    policy = get_baseline(name)  # no reset, no threads, no temperatures
    d = policy.decide(obs({0: None, 1: None}))
    assert not d.action.affinity


# --------------------------------------------------------------------------- stepwise


def test_stepwise_clamps_its_cooling_state_when_the_table_gets_shorter():
    from dataclasses import replace

    p = get_baseline("stepwise")
    p.reset(topology(load_chip("tiny")), caps())
    for i, temp in enumerate((78.0, 79.0, 80.0, 81.0)):  # above trip, rising from the 2nd: 3 deep
        d = p.decide(obs({0: temp}, t=0.1 * i, max_c=80.0))
    assert steps_below_max(d.action.freq_cap_khz[0]) == 3
    # The driver now offers only the top two frequencies (a new limit, a reload).
    short = obs({0: 81.0}, t=0.5, max_c=80.0)
    short = replace(short, policies=(replace(short.policies[0], available_khz=LADDER_KHZ[-2:]),))
    d = p.decide(short)  # steady above trip: it holds, as deep as the short table goes
    assert d.action.freq_cap_khz[0] == LADDER_KHZ[-2]


def test_stepwise_follows_the_kernel_step_wise_law():
    """drivers/thermal/gov_step_wise.c: above trip and rising -> one more step; above trip
    and falling -> one step less but never none; below trip and falling -> one step less;
    otherwise hold. Trip = sensor max - 3 C here (max 80 C)."""
    p = get_baseline("stepwise")
    p.reset(topology(load_chip("tiny")), caps())

    def state(temp_c: float, t: float) -> int:
        d = p.decide(obs({0: temp_c}, t=t, max_c=80.0))
        return steps_below_max(d.action.freq_cap_khz[0])

    assert state(70.0, 0.0) == 0  # below trip: no cooling
    assert state(78.0, 0.1) == 1  # above trip (77) and rising
    assert state(79.0, 0.2) == 2
    assert state(79.0, 0.3) == 2  # steady above trip: hold
    assert state(78.5, 0.4) == 1  # above trip, falling: one step less...
    assert state(78.0, 0.5) == 1  # ...but never back to none while above trip
    assert state(76.0, 0.6) == 0  # below trip and falling: released
    assert state(75.0, 0.7) == 0
    assert state(76.5, 0.8) == 0  # rising but below trip: nothing


# --------------------------------------------------------------------------- cpusets


def confined(tid: int, cpuset: frozenset[int], cpu: int | None = None, **counters: float) -> ThreadSample:
    """A thread of a process whose cgroup cpuset is ``cpuset`` (its affinity the same)."""
    return replace(thread(tid, cpu, cpuset, **counters), cpuset=cpuset)


@pytest.mark.parametrize("name", ("tsp", "pcgov", "hotpotato"))
def test_placing_baselines_put_new_threads_inside_their_cpusets(name: str) -> None:
    """Every baseline that places threads picks their CPUs inside their cpusets, as the
    kernel would otherwise refuse them (without a chip model tsp and pcgov fall back to
    their fixed orders, which start at cpu 0)."""
    high = frozenset({5, 6, 7})
    temps = {c: 50.0 + c for c in range(8)}  # cpu 0 coolest: every order starts low
    threads = [confined(1000 + i, high) for i in range(4)] + [thread(2000)]
    d = get_baseline(name).decide(obs(temps, threads=threads))
    pins = {r.tid: c for r, c in d.action.affinity.items()}
    assert all(pins[1000 + i] <= high for i in range(4))  # four threads share three CPUs
    assert pins[2000] <= frozenset({0, 1, 2, 3, 4})  # unconfined: the order's first free CPU


def test_hotpotato_rotates_a_thread_only_inside_its_cpuset() -> None:
    p = HotPotatoBaseline(period_s=0.1)
    low = frozenset({0, 1, 2, 3})
    p.decide(obs({c: 50.0 for c in range(8)}, t=0.0))
    p._placed = {1000: 1, 1001: 2}
    threads = [confined(1000, low, 1, task_clock_ns=9e7), confined(1001, low, 2, task_clock_ns=9e7)]
    # cpu 1 is the hottest; the coolest CPUs (6, 7) are outside the cpuset: cpu 3 it is.
    temps = {0: 58.0, 1: 75.0, 2: 60.0, 3: 55.0, 4: 57.0, 5: 56.0, 6: 40.0, 7: 41.0}
    d = p.decide(obs(temps, t=0.1, threads=threads))
    assert {r.tid: set(c) for r, c in d.action.affinity.items()} == {1000: {3}}
