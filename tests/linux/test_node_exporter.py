"""ailfmd reads node_exporter's real sysfs fixture exactly as node_exporter does."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ailfmd.platform.linux.platform import LinuxPlatform

EXPECTED = Path(__file__).parents[1] / "fixtures" / "node-exporter" / "expected.prom"
_LINE = re.compile(r"^(\w+)\{(.*)\} (\S+)$")


def expected(metric: str) -> dict[tuple[tuple[str, str], ...], float]:
    out = {}
    for line in EXPECTED.read_text().splitlines():
        m = _LINE.match(line)
        if m and m.group(1) == metric:
            labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', m.group(2))))
            out[labels] = float(m.group(3))
    return out


@pytest.fixture
def platform(node_exporter_sys: Path, tmp_path: Path):
    plat = LinuxPlatform(sysfs_root=node_exporter_sys, run_dir=tmp_path / "run", use_perf=False)
    yield plat
    plat.close()


def test_every_hwmon_temperature_matches(platform: LinuxPlatform) -> None:
    obs = platform.observe()
    ours = {
        (("chip", r.sensor.chip), ("sensor", r.sensor.sensor)): r.temp_c
        for r in obs.sensors
        if r.sensor.kind != "thermal_zone"
    }
    want = expected("node_hwmon_temp_celsius")
    assert ours == want


def test_hwmon_max_and_crit_match(platform: LinuxPlatform) -> None:
    obs = platform.observe()
    ours_max = {
        (("chip", r.sensor.chip), ("sensor", r.sensor.sensor)): r.max_c for r in obs.sensors if r.max_c is not None
    }
    ours_crit = {
        (("chip", r.sensor.chip), ("sensor", r.sensor.sensor)): r.crit_c for r in obs.sensors if r.crit_c is not None
    }
    assert ours_max == expected("node_hwmon_temp_max_celsius")
    assert ours_crit == expected("node_hwmon_temp_crit_celsius")


def test_chip_names_match(platform: LinuxPlatform) -> None:
    from ailfmd.platform.linux.hwmon import discover_hwmon

    chips = {(c.chip, c.chip_name) for c in discover_hwmon(platform.sysfs) if c.chip_name}
    want = {(dict(k)["chip"], dict(k)["chip_name"]) for k in expected("node_hwmon_chip_names")}
    # node_exporter only annotates chips with at least one sensor file it understands;
    # every chip it names, we name identically.
    assert want <= chips
    sensor_chips = {dict(k)["chip"] for k in expected("node_hwmon_sensor_label")}
    assert sensor_chips <= {c.chip for c in discover_hwmon(platform.sysfs)}


def test_thermal_zone_matches(platform: LinuxPlatform) -> None:
    obs = platform.observe()
    zones = {
        (("type", r.sensor.label), ("zone", r.sensor.chip.removeprefix("thermal_zone"))): r.temp_c
        for r in obs.sensors
        if r.sensor.kind == "thermal_zone"
    }
    assert zones == expected("node_thermal_zone_temp")


def test_scaling_frequencies_and_governors_match(platform: LinuxPlatform) -> None:
    pols = {p.cpus[0]: p for p in platform.observe().policies}
    for metric, attr in (
        ("node_cpu_scaling_frequency_hertz", "cur_khz"),
        ("node_cpu_scaling_frequency_max_hertz", "max_khz"),
        ("node_cpu_scaling_frequency_min_hertz", "min_khz"),
    ):
        want = {int(dict(k)["cpu"]): v for k, v in expected(metric).items()}
        ours = {cpu: getattr(p, attr) * 1000.0 for cpu, p in pols.items()}
        assert ours == want, metric
    govs = {int(dict(k)["cpu"]): dict(k)["governor"] for k, v in expected("node_cpu_scaling_governor").items() if v == 1}
    assert {cpu: p.governor for cpu, p in pols.items()} == govs


def test_throttle_counts_match(platform: LinuxPlatform) -> None:
    obs = platform.observe()
    topo = platform.topology()
    core = {
        (("core", str(topo.cpus[c].core_id)), ("package", str(topo.cpus[c].package_id))): float(
            s.throttle.core_throttle_count
        )
        for c, s in obs.cpus.items()
        if s.throttle is not None
    }
    assert core == expected("node_cpu_core_throttles_total")
    pkg = {
        (("package", str(topo.cpus[c].package_id)),): float(s.throttle.package_throttle_count)
        for c, s in obs.cpus.items()
        if s.throttle is not None
    }
    assert pkg == expected("node_cpu_package_throttles_total")


def test_per_core_temperatures_follow_core_ids(platform: LinuxPlatform) -> None:
    obs = platform.observe()
    # cpu3 is core 1 of package 1 -> platform_coretemp_1 "Core 1" = temp3 = 52 C.
    t = obs.cpus[3].temp
    assert t.source is not None
    assert (t.source.chip, t.source.sensor, t.source.scope, t.temp_c) == ("platform_coretemp_1", "temp3", "core", 52.0)
    # Both chips claim "Physical id 0": the mapping must fall back to the device index
    # and say so instead of putting both packages on chip 0.
    assert obs.cpus[2].temp.source.chip == "platform_coretemp_1"
    assert any("coretemp.N" in n for n in platform.capabilities().notes)
