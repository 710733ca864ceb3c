"""hwmon chips and their temperature inputs, named stably.

hwmonN numbers depend on driver load order and change across boots, so chips are named
the way node_exporter names them (collector/hwmon_linux.go): from the device the hwmon
hangs off (``<parent dir>_<device dir>``, e.g. ``platform_coretemp_0``), else from the
``name`` file, else ``hwmonN``. When several hwmons share one device (asus-nb-wmi,
multi-radio Wi-Fi), the chip name gets the ``name`` file as a suffix, or hwmonN when
the names do not tell them apart.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ailfmd.platform.linux.sysfs import Root

HWMON_CLASS = "class/hwmon"
_INVALID = re.compile(r"[^a-z0-9:_]")
_TEMP_INPUT = re.compile(r"^temp(\d+)_input$")


def clean_name(name: str) -> str:
    """node_exporter's cleanMetricName: lower case, [^a-z0-9:_] -> '_', trim '_'."""
    return _INVALID.sub("_", name.lower()).strip("_")


@dataclass(frozen=True)
class HwmonTemp:
    sensor: str  # "temp2"
    label: str  # "Core 0", or "" without a label file
    input_rel: str  # path of tempN_input relative to the sysfs root
    max_c: float | None  # tempN_max, read once at discovery
    crit_c: float | None  # tempN_crit


@dataclass(frozen=True)
class HwmonChip:
    hwmon: str  # "hwmon3": unstable, for messages only
    chip: str  # stable name, as node_exporter's `chip` label
    chip_name: str  # content of the `name` file ("coretemp", "k10temp"), may be ""
    device_rel: str | None  # resolved device path relative to the sysfs root
    temps: tuple[HwmonTemp, ...]


def _device_base_name(sysfs: Root, hwmon_dir: str) -> tuple[str | None, str | None]:
    """(device-derived name, device path rel to root), (None, None) without a device link."""
    dev = sysfs.join(f"{hwmon_dir}/device")
    if not os.path.lexists(dev):
        return None, None
    try:
        real = os.path.realpath(dev, strict=True)
    except OSError:
        return None, None  # dangling device link: treated as no device
    parent, devname = os.path.split(real)
    devtype = os.path.basename(parent)
    rel = os.path.relpath(real, os.path.realpath(sysfs.path))
    name, typ = clean_name(devname), clean_name(devtype)
    if typ and name:
        return f"{typ}_{name}", rel
    return (name or None), rel


def _limit_c(sysfs: Root, rel: str) -> float | None:
    v = sysfs.read_opt_int(rel)
    return None if v is None else v / 1000.0


def _temps(sysfs: Root, hwmon_dir: str) -> tuple[HwmonTemp, ...]:
    # Old drivers put their attributes in device/ rather than the hwmon dir.
    out: dict[str, HwmonTemp] = {}
    for sub in (hwmon_dir, f"{hwmon_dir}/device"):
        for fname in sysfs.listdir(sub):
            m = _TEMP_INPUT.match(fname)
            if not m or f"temp{m.group(1)}" in out:
                continue
            sensor = f"temp{m.group(1)}"
            out[sensor] = HwmonTemp(
                sensor=sensor,
                label=sysfs.read_opt_str(f"{sub}/{sensor}_label") or "",
                input_rel=f"{sub}/{fname}",
                max_c=_limit_c(sysfs, f"{sub}/{sensor}_max"),
                crit_c=_limit_c(sysfs, f"{sub}/{sensor}_crit"),
            )
    return tuple(sorted(out.values(), key=lambda t: int(t.sensor[4:])))


def discover_hwmon(sysfs: Root) -> list[HwmonChip]:
    """Every hwmon chip under class/hwmon with its temperature inputs."""
    entries = []
    for hw in sysfs.listdir(HWMON_CLASS):
        hw_dir = f"{HWMON_CLASS}/{hw}"
        if not os.path.isdir(sysfs.join(hw_dir)):
            continue  # dangling class link
        base, dev_rel = _device_base_name(sysfs, hw_dir)
        chip_name = sysfs.read_opt_str(f"{hw_dir}/name") or ""
        if base is None:
            base = clean_name(chip_name) or clean_name(hw)
        entries.append((hw, hw_dir, base, chip_name, dev_rel))

    groups: dict[str, list[tuple[str, str]]] = {}
    for hw, _, base, chip_name, _ in entries:
        groups.setdefault(base, []).append((hw, clean_name(chip_name)))

    chips = []
    for hw, hw_dir, base, chip_name, dev_rel in entries:
        chip = base
        members = groups[base]
        if len(members) > 1:
            suffixes = [s for _, s in members]
            mine = clean_name(chip_name)
            if mine and suffixes.count(mine) == 1:
                chip = f"{base}_{mine}"
            else:
                chip = f"{base}_{clean_name(hw)}"
        chips.append(
            HwmonChip(
                hwmon=hw,
                chip=chip,
                chip_name=chip_name,
                device_rel=dev_rel,
                temps=_temps(sysfs, hw_dir),
            )
        )
    return sorted(chips, key=lambda c: c.chip)
