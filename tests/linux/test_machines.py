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


def test_repeated_observations_follow_every_change(tmp_path: Path, machine_copy) -> None:
    """Records are reused while their files read the same; any change shows at once."""
    tree = machine_copy("xeon-2s-ht")
    plat = LinuxPlatform(sysfs_root=tree, run_dir=tmp_path / "run", use_perf=False, slow_every=4)
    try:
        first = plat.observe()
        second = plat.observe()
        assert second.cpus == first.cpus and second.sensors == first.sensors
        assert second.cpus[0] is first.cpus[0]  # nothing changed: the same record
        hwmon = tree / "devices/platform/coretemp.0/hwmon/hwmon2"
        label = next(p for p in hwmon.glob("temp*_label") if p.read_text().strip() == "Core 1")
        (hwmon / label.name.replace("_label", "_input")).write_text("71000\n")
        pol = tree / "devices/system/cpu/cpufreq/policy0"
        (pol / "scaling_cur_freq").write_text("2100000\n")
        third = plat.observe()
        assert third.cpus[1].temp.temp_c == 71.0 and third.cpus[17].temp.temp_c == 71.0
        assert third.cpus[0].freq_khz == 2_100_000
        assert third.cpus[2] is second.cpus[2]
        assert [r.temp_c for r in third.sensors].count(71.0) == 1
        # Slow state (limits) is re-read in turn: a changed limit shows within slow_every.
        (pol / "scaling_max_freq").write_text("2000000\n")
        caps = [plat.observe().cpus[0].cap_khz for _ in range(4)]
        assert caps[-1] == 2_000_000
        assert plat.observe().policies[0].max_khz == 2_000_000
    finally:
        plat.close()


def test_policy_reader_reuses_only_what_read_the_same(tmp_path: Path, machine_copy) -> None:
    from ailfmd.platform.linux import cpufreq
    from ailfmd.platform.linux.hotfiles import HotFiles
    from ailfmd.platform.linux.sysfs import Root

    tree = machine_copy("xeon-2s-ht")
    plat = LinuxPlatform(sysfs_root=tree, run_dir=tmp_path / "run", use_perf=False)
    st = plat._d.policies[0]
    plat.close()
    hot = HotFiles(Root(tree))
    pol = tree / st.paths.dir_rel
    try:
        reader = cpufreq.PolicyReader(hot, st)
        first = reader.read()
        assert first == cpufreq.read_policy(hot, st)
        assert reader.read() is first  # nothing changed: the same record
        (pol / "scaling_cur_freq").write_text("2200000\n")
        cur = reader.read()
        assert cur.cur_khz == 2_200_000 and cur == cpufreq.read_policy(hot, st)
        (pol / "scaling_max_freq").write_text("garbage\n")
        bad = reader.read()
        assert bad.max_khz is None and any("scaling_max_freq" in e for e in bad.errors)
        assert bad == cpufreq.read_policy(hot, st)
        (pol / "scaling_max_freq").write_text("2500000\n")
        good = reader.read()
        assert good.max_khz == 2_500_000 and not any("scaling_max_freq" in e for e in good.errors)
        assert good == cpufreq.read_policy(hot, st)
    finally:
        hot.close()


def test_a_sensor_that_fails_and_recovers_between_observations(tmp_path: Path, machine_copy) -> None:
    tree = machine_copy("xeon-2s-ht")
    plat = LinuxPlatform(sysfs_root=tree, run_dir=tmp_path / "run", use_perf=False)
    hwmon = tree / "devices/platform/coretemp.0/hwmon/hwmon2"
    label = next(p for p in hwmon.glob("temp*_label") if p.read_text().strip() == "Core 1")
    core1 = hwmon / label.name.replace("_label", "_input")
    try:
        good = plat.observe().cpus[1].temp
        assert good.source is not None and good.source.scope == "core"
        core1.write_text("garbage\n")
        bad = plat.observe().cpus[1].temp
        assert bad.source is not None and bad.source.scope == "package"
        assert "fallback because" in bad.reason
        assert plat.observe().cpus[1].temp.reason == bad.reason  # still failing, still said
        core1.write_text("55000\n")
        again = plat.observe().cpus[1].temp
        assert again.temp_c == 55.0 and again.source == good.source and again.reason == good.reason
    finally:
        plat.close()
