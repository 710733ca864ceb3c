"""Thermal zones under ``/sys/class/thermal`` and the CPUs each one covers.

A zone's ``type`` names the sensor (x86_pkg_temp, cpu-thermal, acpitz, soc_thermal...).
Which CPUs it covers is read from the kernel where it says so: a zone bound to a
cpufreq cooling device (``cdevN`` -> type ``cpufreq-cpuK``) covers that cpufreq
policy's CPUs; ``x86_pkg_temp`` zones are created one per package in package order.
Other zones are only guessed at by name (see :func:`zone_rank`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ailfmd.platform.linux.sysfs import Root

THERMAL_CLASS = "class/thermal"
_ZONE = re.compile(r"^thermal_zone(\d+)$")
_CDEV = re.compile(r"^cdev\d+$")
_CPUFREQ_CDEV = re.compile(r"^cpufreq-cpu(\d+)$")


@dataclass(frozen=True)
class ThermalZone:
    zone: str  # "thermal_zone3"
    index: int  # 3, node_exporter's `zone` label
    type: str
    temp_rel: str
    cooled_cpus: tuple[int, ...]  # first CPUs of bound cpufreq cooling devices
    trip_points_c: tuple[tuple[str, float], ...] = ()  # (type, temp_c)


def discover_zones(sysfs: Root) -> list[ThermalZone]:
    zones = []
    for name in sysfs.listdir(THERMAL_CLASS):
        m = _ZONE.match(name)
        if not m:
            continue
        base = f"{THERMAL_CLASS}/{name}"
        cooled = []
        for entry in sysfs.listdir(base):
            if _CDEV.match(entry):
                ctype = sysfs.read_opt_str(f"{base}/{entry}/type") or ""
                cm = _CPUFREQ_CDEV.match(ctype)
                if cm:
                    cooled.append(int(cm.group(1)))
        trips = []
        for i in range(64):
            t = sysfs.read_opt_int(f"{base}/trip_point_{i}_temp")
            if t is None:
                break
            trips.append((sysfs.read_opt_str(f"{base}/trip_point_{i}_type") or "", t / 1000.0))
        zones.append(
            ThermalZone(
                zone=name,
                index=int(m.group(1)),
                type=sysfs.read_opt_str(f"{base}/type") or "",
                temp_rel=f"{base}/temp",
                cooled_cpus=tuple(sorted(cooled)),
                trip_points_c=tuple(trips),
            )
        )
    return sorted(zones, key=lambda z: z.index)


def zone_rank(zone_type: str) -> int | None:
    """How likely a zone measures the CPU die: lower is better, None = not a CPU zone.

    Names follow the drivers that register them: x86_pkg_temp (Intel package DTS),
    cpu-thermal / cpuN-thermal / cpu_thermal (Arm SoC and server DTs), soc_thermal /
    soc-thermal, and acpitz (ACPI, usually a board or package proxy).
    """
    t = zone_type.lower()
    if t == "x86_pkg_temp":
        return 0
    if "cpu" in t:
        return 1
    if "soc" in t or "cluster" in t or "core" in t:
        return 2
    if t.startswith("acpitz"):
        return 3
    return None
