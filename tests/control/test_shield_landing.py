"""Landing caps: idle CPUs are capped once threads landing on them ran hot, and only then."""

from __future__ import annotations

from ailfmd.control.shield import SafetyShield, ShieldConfig
from ailfmd.platform.base import (
    Action,
    CpuState,
    CpuTemp,
    CpuTopology,
    Observation,
    TempSensor,
    ThreadRef,
    ThreadSample,
    Topology,
)
from ailfmd.policy.base import Decision

N_CPUS = 4
LO_KHZ, HI_KHZ = 1_000_000, 3_000_000
CONFIG = ShieldConfig(limit_c=85.0, margin_c=3.0, critical_c=95.0)  # guard band from 82 C


def observe(time_s: float, temps_c: dict[int, float], threads_on: dict[int, int],
            caps_khz: dict[int, int] | None = None) -> Observation:
    """CPUs 0-3 at ``temps_c`` (default 50 C), thread tid -> the CPU it ran on."""
    caps_khz = caps_khz or {}
    cpus = {}
    for c in range(N_CPUS):
        sensor = TempSensor("t", "t", f"c{c}", f"c{c}", "core", "")
        cpus[c] = CpuState(c, CpuTemp(c, temps_c.get(c, 50.0), sensor, "test"), 2_000_000,
                           caps_khz.get(c, HI_KHZ), LO_KHZ, HI_KHZ)
    threads = {tid: ThreadSample(ThreadRef(1, tid, 1), "w", cpu, frozenset(range(N_CPUS)), {})
               for tid, cpu in threads_on.items()}
    return Observation(time_s=time_s, cpus=cpus, threads=threads)


def shield() -> SafetyShield:
    topo = Topology(cpus={c: CpuTopology(c, 0, c, c) for c in range(N_CPUS)})
    return SafetyShield(CONFIG, topo)


def test_landings_that_stay_cool_never_cap_an_idle_cpu() -> None:
    s = shield()
    for step, cpu in enumerate((0, 1, 2, 3, 0)):
        # A thread wakes on another idle CPU every epoch and stays well below the band.
        decision, reasons = s.filter(observe(float(step), {cpu: 60.0}, {100: cpu}), Decision(Action()))
        assert decision.action.freq_cap_khz == {} and reasons == ()
    assert s.landing_fraction == 1.0


def test_a_hot_landing_caps_the_idle_cpus_and_cool_landings_lift_it() -> None:
    s = shield()
    s.filter(observe(0.0, {}, {100: 0}), Decision(Action()))  # cpus 1-3 idle
    # A thread landed on cpu 1 (idle at the last epoch) and ran into the guard band. The
    # shield cuts cpu 1 and moves that thread to the coolest CPU, 2; cpu 3 stays idle.
    decision, reasons = s.filter(observe(0.1, {1: 82.5}, {100: 0, 101: 1}), Decision(Action()))
    assert s.landing_fraction == 0.5
    assert decision.action.affinity[ThreadRef(1, 101, 1)] == frozenset({2})
    half_khz = LO_KHZ + (HI_KHZ - LO_KHZ) // 2
    caps = decision.action.freq_cap_khz
    assert caps[3] == half_khz
    assert caps.get(0, HI_KHZ) == HI_KHZ  # busy CPUs keep their clock
    assert any(r.target == "cpu 3" and "landing cap at 50%" in r.detail for r in reasons)

    # Next epoch a thread lands on cpu 3 and stays cool: its cap goes back to the
    # hardware maximum (the policy asked for nothing), and the fraction rises a step.
    obs = observe(0.2, {1: 75.0, 2: 60.0, 3: 60.0}, {100: 0, 101: 2, 102: 3},
                  caps_khz={1: LO_KHZ, 2: LO_KHZ, 3: half_khz})
    decision, _ = s.filter(obs, Decision(Action()))
    assert s.landing_fraction == 0.5 + CONFIG.release_fraction
    caps = decision.action.freq_cap_khz
    assert caps[3] == HI_KHZ
    # cpu 1, idle now, is cooling under the shield's own cap, which rises one release step
    # and stays below the landing cap: the lower of the two holds.
    assert caps[1] == LO_KHZ + int(CONFIG.release_fraction * (HI_KHZ - LO_KHZ))


def test_a_landing_cap_never_raises_what_the_policy_asked() -> None:
    s = shield()
    low_khz = 1_200_000
    ask = Decision(Action(freq_cap_khz={3: low_khz}))
    s.filter(observe(0.0, {}, {100: 0}), ask)
    decision, _ = s.filter(observe(0.1, {1: 83.0}, {100: 0, 101: 1}, caps_khz={3: low_khz}), Decision(Action()))
    assert s.landing_fraction == 0.5
    # cpu 3 is idle, but the policy's 1.2 GHz is below the 2 GHz landing cap.
    assert 3 not in decision.action.freq_cap_khz


def test_landing_caps_can_be_switched_off() -> None:
    topo = Topology(cpus={c: CpuTopology(c, 0, c, c) for c in range(N_CPUS)})
    s = SafetyShield(ShieldConfig(limit_c=85.0, margin_c=3.0, critical_c=95.0, landing_caps=False), topo)
    s.filter(observe(0.0, {}, {100: 0}), Decision(Action()))
    decision, _ = s.filter(observe(0.1, {1: 82.5}, {100: 0, 101: 1}), Decision(Action()))
    assert s.landing_fraction == 1.0
    assert 3 not in decision.action.freq_cap_khz  # idle, and left alone
