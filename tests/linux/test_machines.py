"""ailfmd reads each fixture machine exactly as its expected.json says a correct reader must."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ailfmd.platform.linux.platform import LinuxPlatform

FIXTURES = Path(__file__).parents[1] / "fixtures"
MACHINES = sorted(p.parent.name for p in FIXTURES.glob("*/expected.json"))


def test_all_five_layouts_are_present() -> None:
    assert {"xeon-2s-ht", "epyc-k10temp", "arm-cppc", "laptop-acpi", "vm-bare"} <= set(MACHINES)


@pytest.fixture(params=MACHINES)
def machine(request: pytest.FixtureRequest, tmp_path: Path, machine_sys):
    name = request.param
    truth = json.loads((FIXTURES / name / "expected.json").read_text())
    plat = LinuxPlatform(sysfs_root=machine_sys(name), run_dir=tmp_path / "run", use_perf=False)
    yield truth, plat
    plat.close()


def test_topology(machine) -> None:
    truth, plat = machine
    topo = plat.topology()
    assert list(topo.online_cpus) == truth["online_cpus"]
    assert list(topo.offline_cpus) == truth["offline_cpus"]
    for cpu_s, want in truth["cpus"].items():
        c = topo.cpus[int(cpu_s)]
        got = {
            "package_id": c.package_id,
            "die_id": c.die_id,
            "core_id": c.core_id,
            "cluster_id": c.cluster_id,
            "thread_siblings": list(c.thread_siblings),
            "numa_node": c.numa_node,
        }
        assert got == want, f"cpu{cpu_s}"
    caches = [
        {"level": c.level, "type": c.kind, "cpus": list(c.cpus), "size_bytes": c.size_bytes, "id": c.cache_id}
        for c in topo.caches
    ]
    order = {"Data": 0, "Instruction": 1, "Unified": 2}
    want_caches = sorted(truth["caches"], key=lambda c: (c["level"], order[c["type"]], c["cpus"]))
    got_caches = sorted(caches, key=lambda c: (c["level"], order[c["type"]], c["cpus"]))
    assert got_caches == want_caches
    nodes = {str(n): [c for c in cpus if c in topo.cpus] for n, cpus in topo.numa_nodes.items()}
    assert nodes == truth["numa_nodes"]


def test_temperature_per_cpu_and_source(machine) -> None:
    truth, plat = machine
    obs = plat.observe()
    for cpu_s, want in truth["temperatures"].items():
        t = obs.cpus[int(cpu_s)].temp
        src = None
        if t.source is not None:
            src = {k: getattr(t.source, k) for k in ("kind", "chip", "sensor", "label", "scope")}
        assert {"temp_c": t.temp_c, "source": src} == want, f"cpu{cpu_s}: {t.reason}"
        assert t.reason


def test_unreadable_sensors_are_skipped_with_a_reason(machine) -> None:
    truth, plat = machine
    obs = plat.observe()
    bad = {(r.sensor.kind, r.sensor.sensor, r.sensor.label) for r in obs.sensors if r.temp_c is None}
    want = {(u["kind"], u["sensor"], u["label"]) for u in truth["unreadable_sensors"]}
    assert bad == want
    assert all(r.error for r in obs.sensors if r.temp_c is None)


def test_cpufreq_policies(machine) -> None:
    truth, plat = machine
    pols = plat.observe().policies
    got = [
        {
            "policy_id": p.policy_id,
            "cpus": list(p.cpus),
            "driver": p.driver,
            "governor": p.governor,
            "min_khz": p.min_khz,
            "max_khz": p.max_khz,
            "cur_khz": p.cur_khz,
            "hw_min_khz": p.hw_min_khz,
            "hw_max_khz": p.hw_max_khz,
            "available_khz": list(p.available_khz),
            "available_governors": list(p.available_governors),
            "active_mode": p.active_mode,
            "energy_perf_preference": p.energy_perf_preference,
        }
        for p in pols
    ]
    assert got == truth["cpufreq_policies"]
    assert not any(p.policy_id in truth["inactive_policies"] for p in pols)


def test_throttle_counters(machine) -> None:
    truth, plat = machine
    obs = plat.observe()
    got = {
        str(c): {"core_throttle_count": s.throttle.core_throttle_count, "package_throttle_count": s.throttle.package_throttle_count}
        for c, s in obs.cpus.items()
        if s.throttle is not None
    }
    assert got == truth["throttle"]


def test_capabilities_say_what_the_box_can_do(machine) -> None:
    truth, plat = machine
    caps = plat.capabilities()
    has_temp = any(t["temp_c"] is not None for t in truth["temperatures"].values())
    assert caps.has("package_temperature") == has_temp
    assert caps.has("frequency_cap") == bool(truth["cpufreq_policies"])
    assert caps.has("throttle_counters") == bool(truth["throttle"])
    per_core = all(t["source"] and t["source"]["scope"] == "core" for t in truth["temperatures"].values())
    assert caps.has("per_core_temperature") == per_core
    if not has_temp:
        assert "frequency left untouched" in caps.items["package_temperature"].detail
