"""Choose, for every CPU, the best temperature source the machine has, and read it.

Best first (DESIGN.md §2):
1. Intel coretemp "Core N" of the CPU's package and core id (per core);
2. AMD k10temp ``Tccd<k>`` of the CPU's CCD (per CCD = per L3 domain);
3. coretemp "Package id P" (per package);
4. k10temp ``Tdie`` then ``Tctl`` (per package; Tctl may carry a fan-control offset);
5. a thermal zone bound to the cpufreq cooling device of the CPU's policy;
6. the x86_pkg_temp zone of the CPU's package;
7. every remaining CPU-like zone (cpu*, then soc*, then acpitz; by zone number), for every CPU.
Each CPU keeps the whole ranked list: when the best source has no value this epoch
(ENODATA, EIO, garbage) the next one is used and the reason says so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ailfmd.platform.base import CpuTemp, TempReading, TempSensor, Topology
from ailfmd.platform.linux.hwmon import HwmonChip
from ailfmd.platform.linux.records import make_cpu_temp, make_temp_reading
from ailfmd.platform.linux.thermal_zones import ThermalZone, zone_rank
from ailfmd.platform.linux.topology import llc_domains

# Readings outside this range are sensor faults (0xFF.. patterns, -273 from a broken
# ACPI method), not temperatures.
PLAUSIBLE_MIN_C = -40.0
PLAUSIBLE_MAX_C = 150.0

_CORE_LABEL = re.compile(r"^Core\s+(\d+)$", re.IGNORECASE)
_PKG_LABEL = re.compile(r"^(?:Package|Physical)\s+id\s+(\d+)$", re.IGNORECASE)
_TCCD_LABEL = re.compile(r"^Tccd(\d+)$", re.IGNORECASE)
_AMD_CHIPS = ("k10temp", "zenpower")


@dataclass(frozen=True)
class Candidate:
    sensor: TempSensor
    reason: str


@dataclass(frozen=True)
class TempPlan:
    """Every temperature sensor found and, per CPU, its ranked candidates."""

    sensors: tuple[TempSensor, ...]
    per_cpu: dict[int, tuple[Candidate, ...]]
    notes: tuple[str, ...] = ()
    limits_c: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)  # path -> (max, crit)


def _hwmon_sensor(chip: HwmonChip, sensor: str, label: str, path: str, kind: str, scope: str) -> TempSensor:
    return TempSensor(kind=kind, chip=chip.chip, sensor=sensor, label=label, scope=scope, path=path)


def _coretemp_packages(chips: list[HwmonChip], notes: list[str]) -> dict[str, int]:
    """chip name -> package id, from the "Package id P" label or the coretemp.N device."""
    by_label: dict[str, int] = {}
    for chip in chips:
        for t in chip.temps:
            m = _PKG_LABEL.match(t.label)
            if m:
                by_label[chip.chip] = int(m.group(1))
                break
    if len(by_label) == len(chips) and len(set(by_label.values())) == len(chips):
        return by_label
    # Labels missing or repeated (some firmware says "Physical id 0" on every socket):
    # the platform device index coretemp.N is the package's logical id.
    out: dict[str, int] = {}
    for i, chip in enumerate(sorted(chips, key=lambda c: c.device_rel or c.chip)):
        m = re.search(r"coretemp\.(\d+)$", chip.device_rel or "")
        out[chip.chip] = int(m.group(1)) if m else i
    if by_label:
        notes.append("coretemp package labels are missing or repeated; packages mapped by coretemp.N device index")
    return out


def plan_temperatures(
    topology: Topology,
    chips: list[HwmonChip],
    zones: list[ThermalZone],
    policy_cpus: dict[int, tuple[int, ...]],
) -> TempPlan:
    """Rank temperature sources for every online CPU.

    ``policy_cpus`` maps each CPU to the CPUs of its cpufreq policy (for zones bound to a
    ``cpufreq-cpuK`` cooling device).
    """
    notes: list[str] = []
    ranked: dict[int, list[tuple[float, Candidate]]] = {cpu: [] for cpu in topology.cpus}
    sensors: dict[str, TempSensor] = {}
    packages = topology.packages()

    def add(cpus: tuple[int, ...] | list[int], rank: float, sensor: TempSensor, reason: str) -> None:
        sensors[sensor.path] = sensor
        for cpu in cpus:
            if cpu in ranked:
                ranked[cpu].append((rank, Candidate(sensor, reason)))

    coretemps = [c for c in chips if c.chip_name == "coretemp"]
    pkg_of_chip = _coretemp_packages(coretemps, notes)
    for chip in coretemps:
        pkg = pkg_of_chip[chip.chip]
        pkg_cpus = packages.get(pkg, ())
        for t in chip.temps:
            if (m := _CORE_LABEL.match(t.label)) is not None:
                core = int(m.group(1))
                cpus = [c for c in pkg_cpus if topology.cpus[c].core_id == core]
                s = _hwmon_sensor(chip, t.sensor, t.label, t.input_rel, "coretemp", "core")
                add(cpus, 1, s, f"per-core coretemp ({t.label}, package {pkg})")
            elif _PKG_LABEL.match(t.label):
                s = _hwmon_sensor(chip, t.sensor, t.label, t.input_rel, "coretemp", "package")
                add(pkg_cpus, 3, s, f"package-level coretemp ({t.label})")

    amd = sorted((c for c in chips if c.chip_name in _AMD_CHIPS), key=lambda c: c.device_rel or c.chip)
    pkg_ids = sorted(packages)
    llcs = llc_domains(topology)
    for i, chip in enumerate(amd):
        # One k10temp per package (PCI function 18.3, 19.3, ...), in bus order.
        if i >= len(pkg_ids):
            notes.append(f"{chip.chip}: more {chip.chip_name} chips than packages; ignored")
            continue
        pkg = pkg_ids[i]
        pkg_cpus = packages[pkg]
        ccds = [d for d in llcs if set(d) <= set(pkg_cpus)]
        for t in chip.temps:
            label = t.label
            if (m := _TCCD_LABEL.match(label)) is not None:
                k = int(m.group(1))
                if 1 <= k <= len(ccds):
                    s = _hwmon_sensor(chip, t.sensor, label, t.input_rel, chip.chip_name, "ccd")
                    add(ccds[k - 1], 2, s, f"per-CCD {chip.chip_name} {label} (L3 domain {k})")
                else:
                    notes.append(f"{chip.chip}/{t.sensor}: {label} has no matching L3 domain; not mapped")
            elif label.lower() == "tdie":
                s = _hwmon_sensor(chip, t.sensor, label, t.input_rel, chip.chip_name, "package")
                add(pkg_cpus, 4, s, f"package-level {chip.chip_name} Tdie")
            elif label.lower() == "tctl":
                s = _hwmon_sensor(chip, t.sensor, label, t.input_rel, chip.chip_name, "package")
                add(pkg_cpus, 5, s, f"package-level {chip.chip_name} Tctl (may include a fan-control offset)")

    pkg_zones = [z for z in zones if z.type == "x86_pkg_temp"]
    for i, z in enumerate(pkg_zones):
        if i < len(pkg_ids):
            s = TempSensor("thermal_zone", z.zone, z.zone, z.type, "package", z.temp_rel)
            add(packages[pkg_ids[i]], 7, s, f"x86_pkg_temp zone {z.zone} (package {pkg_ids[i]})")
    for z in zones:
        if z.cooled_cpus:
            cpus = sorted({c for k in z.cooled_cpus for c in policy_cpus.get(k, (k,))})
            s = TempSensor("thermal_zone", z.zone, z.zone, z.type, "zone", z.temp_rel)
            add(cpus, 6, s, f"thermal zone {z.zone} ({z.type}) cooling cpufreq CPUs {cpus[0]}..")
        elif z.type != "x86_pkg_temp" and (r := zone_rank(z.type)) is not None:
            # Every CPU-like zone stays a candidate, best name first, so one zone without
            # a reading (ENODATA) falls through to the next.
            s = TempSensor("thermal_zone", z.zone, z.zone, z.type, "zone", z.temp_rel)
            add(list(topology.cpus), 8 + r / 10 + z.index / 1e6, s, f"thermal zone {z.zone} ({z.type}), not CPU-specific")

    # Sensors that measure no CPU (board, Wi-Fi, NVMe...) are still read and reported.
    for chip in chips:
        for t in chip.temps:
            if t.input_rel not in sensors:
                kind = chip.chip_name if chip.chip_name in ("coretemp", *_AMD_CHIPS) else "hwmon"
                sensors[t.input_rel] = _hwmon_sensor(chip, t.sensor, t.label, t.input_rel, kind, "other")
    for z in zones:
        if z.temp_rel not in sensors:
            sensors[z.temp_rel] = TempSensor("thermal_zone", z.zone, z.zone, z.type, "zone", z.temp_rel)

    per_cpu = {
        cpu: tuple(c for _, c in sorted(items, key=lambda rc: rc[0])) for cpu, items in ranked.items()
    }
    limits: dict[str, tuple[float | None, float | None]] = {}
    for chip in chips:
        for t in chip.temps:
            if t.max_c is not None or t.crit_c is not None:
                limits[t.input_rel] = (t.max_c, t.crit_c)
    for z in zones:
        crit = [t for kind, t in z.trip_points_c if kind == "critical"]
        soft = [t for kind, t in z.trip_points_c if kind in ("passive", "hot")]
        if crit or soft:
            limits[z.temp_rel] = (min(soft) if soft else None, min(crit) if crit else None)
    return TempPlan(sensors=tuple(sensors.values()), per_cpu=per_cpu, notes=tuple(notes), limits_c=limits)


def readings_from_values(
    plan: TempPlan, values: list[int | None], errors: dict[int, str]
) -> dict[str, TempReading]:
    """Turn raw millidegree values (in ``plan.sensors`` order) into readings keyed by path.

    A failed read or an implausible value becomes a reading with an error, never a number.
    """
    out: dict[str, TempReading] = {}
    for i, s in enumerate(plan.sensors):
        max_c, crit_c = plan.limits_c.get(s.path, (None, None))
        raw = values[i]
        if raw is None:
            out[s.path] = TempReading(s, None, errors.get(i, "unreadable"), max_c, crit_c)
            continue
        temp_c = raw / 1000.0
        if PLAUSIBLE_MIN_C <= temp_c <= PLAUSIBLE_MAX_C:
            out[s.path] = TempReading(s, temp_c, None, max_c, crit_c)
        else:
            out[s.path] = TempReading(s, None, f"implausible temperature {raw} m°C", max_c, crit_c)
    return out


def _choose(cpu: int, cands: tuple[Candidate, ...], readings: dict[str, TempReading]) -> CpuTemp:
    """The first candidate with a value, with the reason and any fallback."""
    skipped: list[str] = []
    for cand in cands:
        r = readings.get(cand.sensor.path)
        if r is not None and r.temp_c is not None:
            reason = cand.reason
            if skipped:
                reason += "; fallback because " + "; ".join(skipped)
            return make_cpu_temp(cpu, r.temp_c, cand.sensor, reason)
        why = r.error if r is not None else "not read"
        skipped.append(f"{cand.sensor.chip}/{cand.sensor.sensor}: {why}")
    reason = "no temperature sensor for this CPU"
    if skipped:
        reason = "no readable sensor: " + "; ".join(skipped)
    return CpuTemp(cpu, None, None, reason)


def cpu_temperatures(plan: TempPlan, readings: dict[str, TempReading]) -> dict[int, CpuTemp]:
    """Per CPU: the first candidate with a value, with the reason and any fallback."""
    return {cpu: _choose(cpu, cands, readings) for cpu, cands in plan.per_cpu.items()}


class TempCache:
    """:func:`readings_from_values` and :func:`cpu_temperatures` for one plan, epoch
    after epoch, reusing last epoch's records where nothing changed: a sensor whose raw
    value is the same keeps its :class:`TempReading`, and a CPU whose best candidate
    kept its reading keeps its :class:`CpuTemp`. The records are immutable, so this
    only spares rebuilding them (and lets later stages compare them by identity)."""

    def __init__(self, plan: TempPlan) -> None:
        self.plan = plan
        n = len(plan.sensors)
        self._limits = [plan.limits_c.get(s.path, (None, None)) for s in plan.sensors]
        self._raw: list[int | None] = [None] * n
        self._readings: list[TempReading | None] = [None] * n
        self._per_cpu = [(cpu, cands, cands[0].sensor.path if cands else None) for cpu, cands in plan.per_cpu.items()]
        self._temps: dict[int, tuple[TempReading | None, CpuTemp]] = {}
        self._last: tuple[dict[str, TempReading], dict[int, CpuTemp], tuple[TempReading, ...]] | None = None

    @property
    def readings(self) -> tuple[TempReading, ...]:
        """Every reading of the last :meth:`update`, in ``plan.sensors`` order."""
        return self._last[2] if self._last is not None else ()

    def update(
        self, values: list[int | None], errors: dict[int, str]
    ) -> tuple[dict[str, TempReading], dict[int, CpuTemp]]:
        """(readings by path, temperature per CPU) for raw values in ``plan.sensors`` order.

        When every value reads as last time without error, the previous result is
        returned as it is (the same objects): callers must not modify it.
        """
        if not errors and self._last is not None and values == self._raw:
            return self._last[0], self._last[1]
        sensors = self.plan.sensors
        raws, cache = self._raw, self._readings
        readings: dict[str, TempReading] = {}
        for i, raw in enumerate(values):
            r = cache[i]
            if r is None or raw is None or raw != raws[i]:
                s = sensors[i]
                max_c, crit_c = self._limits[i]
                if raw is None:
                    r = make_temp_reading(s, None, errors.get(i, "unreadable"), max_c, crit_c)
                elif PLAUSIBLE_MIN_C <= raw / 1000.0 <= PLAUSIBLE_MAX_C:
                    r = make_temp_reading(s, raw / 1000.0, None, max_c, crit_c)
                else:
                    r = make_temp_reading(s, None, f"implausible temperature {raw} m°C", max_c, crit_c)
                cache[i], raws[i] = r, raw
            readings[sensors[i].path] = r
        temps: dict[int, CpuTemp] = {}
        last = self._temps
        for cpu, cands, first_path in self._per_cpu:
            first = readings.get(first_path) if first_path is not None else None
            if first is not None and first.temp_c is not None:
                known = last.get(cpu)
                if known is not None and known[0] is first:
                    temps[cpu] = known[1]
                    continue
                # What _choose() makes when the best candidate has a value, without its loop.
                best = cands[0]
                t = temps[cpu] = make_cpu_temp(cpu, first.temp_c, best.sensor, best.reason)
                last[cpu] = (first, t)
            else:
                # The best source has no value: the fallback's reason names why; rare,
                # so built afresh every time.
                temps[cpu] = _choose(cpu, cands, readings)
                last.pop(cpu, None)
        self._last = (readings, temps, tuple(readings.values()))
        return readings, temps
