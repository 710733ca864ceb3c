"""Broken sensors and refused writes: a named error or a skipped sensor, never a wrong value."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from ailfmd.errors import SysfsError
from ailfmd.platform.base import Action
from ailfmd.platform.linux.platform import LinuxPlatform
from ailfmd.platform.linux.sysfs import Root

CORE1_PKG0 = "devices/platform/coretemp.0/hwmon/hwmon0/temp3_input"  # cpu1's per-core sensor
ZONE0 = "devices/virtual/thermal/thermal_zone0/temp"


@pytest.fixture
def tree(node_exporter_sys: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "sys"
    shutil.copytree(node_exporter_sys, dest, symlinks=True)
    return dest


def _platform(tree: Path, tmp_path: Path) -> LinuxPlatform:
    return LinuxPlatform(sysfs_root=tree, run_dir=tmp_path / "run", use_perf=False)


@pytest.mark.parametrize(
    "content, reason",
    [
        ("garbage\n", "not an integer"),
        ("", "empty"),
        ("-300000\n", "implausible"),
        ("999999999\n", "implausible"),
    ],
)
def test_bad_core_sensor_falls_back_to_package(tree: Path, tmp_path: Path, content: str, reason: str) -> None:
    (tree / CORE1_PKG0).write_text(content)
    plat = _platform(tree, tmp_path)
    obs = plat.observe()
    bad = [r for r in obs.sensors if r.sensor.path.endswith("hwmon0/temp3_input")]
    assert len(bad) == 1 and bad[0].temp_c is None and reason in (bad[0].error or "")
    t = obs.cpus[1].temp
    # Package 0 "Physical id 0" (temp1 = 55 C) replaces the broken per-core value.
    assert t.temp_c == 55.0 and t.source is not None and t.source.scope == "package"
    assert "fallback" in t.reason and "hwmon0/temp3" not in (t.source.path if t.source else "")
    assert reason in t.reason
    # Other CPUs are untouched.
    assert obs.cpus[0].temp.temp_c == 54.0 and obs.cpus[0].temp.source.scope == "core"
    plat.close()


def test_core_without_sensor_uses_its_package(tree: Path, tmp_path: Path) -> None:
    os.unlink(tree / CORE1_PKG0)  # a core the firmware reports no sensor for
    plat = _platform(tree, tmp_path)
    obs = plat.observe()
    assert obs.cpus[1].temp.temp_c == 55.0
    assert obs.cpus[1].temp.reason.startswith("package-level coretemp")
    assert not plat.capabilities().has("per_core_temperature")
    plat.close()


def test_unreadable_zone_reports_read_error(tree: Path, tmp_path: Path) -> None:
    # A real kernel attribute that fails every read (EIO) stands in for a zone whose
    # firmware has no reading (ENODATA): both arrive as an OSError from read().
    failing = Path("/sys/devices/software/power/autosuspend_delay_ms")
    if not failing.exists():
        pytest.skip("no always-failing sysfs attribute on this kernel")
    try:
        failing.read_bytes()
        pytest.skip("attribute readable on this kernel")
    except OSError:
        pass
    os.unlink(tree / ZONE0)
    os.symlink(failing, tree / ZONE0)
    plat = _platform(tree, tmp_path)
    zone = [r for r in plat.observe().sensors if r.sensor.kind == "thermal_zone"]
    assert zone[0].temp_c is None and "read failed" in (zone[0].error or "")
    plat.close()


def test_garbage_frequency_is_not_passed_on(tree: Path, tmp_path: Path) -> None:
    (tree / "devices/system/cpu/cpu0/cpufreq/scaling_cur_freq").write_text("fast\n")
    (tree / "devices/system/cpu/cpu1/cpufreq/scaling_max_freq").write_text("-5\n")
    plat = _platform(tree, tmp_path)
    pols = {p.cpus[0]: p for p in plat.observe().policies}
    assert pols[0].cur_khz is None and any("scaling_cur_freq" in e and "not an integer" in e for e in pols[0].errors)
    assert pols[1].max_khz is None and any("implausible" in e for e in pols[1].errors)
    plat.close()


def test_cap_on_read_only_attribute_is_refused_and_named(tree: Path, tmp_path: Path) -> None:
    # The kernel refuses writes to an attribute without a store method (EACCES even
    # for root): use a real one in place of scaling_max_freq.
    ro = Path("/sys/devices/system/cpu/online")
    target = tree / "devices/system/cpu/cpu0/cpufreq/scaling_max_freq"
    plat = _platform(tree, tmp_path)
    os.unlink(target)
    os.symlink(ro, target)
    res = plat.apply(Action(freq_cap_khz={0: 2000000}))
    (o,) = res.outcomes
    assert not o.ok and o.target == "policy0" and "scaling_max_freq" in o.detail
    plat.close()


class _BusyRoot(Root):
    """A root whose cpufreq writes fail like a policy held by another agent."""

    def write_str(self, rel: str, value: str) -> None:
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))


def test_ebusy_write_is_refused_with_errno_name(tree: Path, tmp_path: Path) -> None:
    plat = _platform(tree, tmp_path)
    plat.sysfs = _BusyRoot(tree)
    (o,) = plat.apply(Action(freq_cap_khz={2: 2000000})).outcomes
    assert not o.ok and "EBUSY" in o.detail and "policy2" == o.target
    # Nothing changed on disk.
    assert (tree / "devices/system/cpu/cpu2/cpufreq/scaling_max_freq").read_text().strip() == "4200000"
    plat.close()


def test_not_a_sysfs_tree_is_named(tmp_path: Path) -> None:
    with pytest.raises(SysfsError) as e:
        LinuxPlatform(sysfs_root=tmp_path / "nope", run_dir=tmp_path / "run", use_perf=False)
    assert str(tmp_path / "nope") in str(e.value)


def test_garbage_cpu_list_is_named(tree: Path, tmp_path: Path) -> None:
    (tree / "devices/system/cpu/online").write_text("0-x\n")
    with pytest.raises(SysfsError) as e:
        _platform(tree, tmp_path)
    assert "devices/system/cpu/online" in str(e.value) and "0-x" in str(e.value)
