"""The Platform protocol and the records it speaks.

Both the real machine (``LinuxPlatform``) and the simulated chip (``SimPlatform``)
implement :class:`Platform`, so the control loop, the baselines, the oracle and the
trainer drive exactly the same interface. Records are frozen dataclasses in SI-ish
units named in the field (``temp_c``, ``freq_khz``, ``time_ns``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Protocol, runtime_checkable


# --------------------------------------------------------------------------- topology


@dataclass(frozen=True)
class CacheDomain:
    """A cache shared by a set of CPUs (from ``cache/index*/shared_cpu_list``)."""

    level: int
    kind: str  # "Unified", "Data", "Instruction"
    cpus: tuple[int, ...]
    size_bytes: int | None = None
    cache_id: int | None = None


@dataclass(frozen=True)
class CpuTopology:
    """Where one logical CPU sits. Ids are the kernel's and may be sparse."""

    cpu: int
    package_id: int
    core_id: int
    die_id: int = 0
    cluster_id: int | None = None
    thread_siblings: tuple[int, ...] = ()
    numa_node: int | None = None
    # (layer, row, col) on a simulated 3D chip; None on real machines.
    position: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class Topology:
    """Online CPUs and how they share packages, cores, caches and memory."""

    cpus: Mapping[int, CpuTopology]
    caches: tuple[CacheDomain, ...] = ()
    numa_nodes: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    offline_cpus: tuple[int, ...] = ()

    @property
    def online_cpus(self) -> tuple[int, ...]:
        return tuple(sorted(self.cpus))

    def packages(self) -> dict[int, tuple[int, ...]]:
        """package id -> CPUs in it."""
        out: dict[int, list[int]] = {}
        for c in self.cpus.values():
            out.setdefault(c.package_id, []).append(c.cpu)
        return {p: tuple(sorted(v)) for p, v in sorted(out.items())}


# --------------------------------------------------------------------------- sensors


@dataclass(frozen=True)
class TempSensor:
    """One temperature input, named stably.

    ``chip`` follows node_exporter's naming (device-path based, e.g.
    ``platform_coretemp_0``) so it survives hwmonN renumbering across boots.
    ``scope`` says what the reading covers: ``core``, ``ccd``, ``package``, ``zone``.
    """

    kind: str  # "coretemp", "k10temp", "thermal_zone", "hwmon", "sim"
    chip: str
    sensor: str  # "temp2", or the zone name "thermal_zone3"
    label: str
    scope: str
    path: str  # file read, relative to the sysfs root


@dataclass(frozen=True)
class TempReading:
    sensor: TempSensor
    temp_c: float | None
    error: str | None = None  # why temp_c is missing
    max_c: float | None = None
    crit_c: float | None = None


@dataclass(frozen=True)
class CpuTemp:
    """The temperature ailfmd uses for one CPU and where it came from."""

    cpu: int
    temp_c: float | None
    source: TempSensor | None
    reason: str  # e.g. "per-core coretemp", "package-level k10temp Tctl", "no sensor"


# --------------------------------------------------------------------------- frequency


@dataclass(frozen=True)
class FreqPolicy:
    """One cpufreq policy (frequencies in kHz)."""

    policy_id: int
    cpus: tuple[int, ...]  # affected_cpus that are online
    driver: str
    governor: str | None
    min_khz: int | None
    max_khz: int | None  # scaling_max_freq: the current cap
    cur_khz: int | None
    hw_min_khz: int | None  # cpuinfo_min_freq
    hw_max_khz: int | None  # cpuinfo_max_freq
    available_khz: tuple[int, ...] = ()
    available_governors: tuple[str, ...] = ()
    active_mode: bool = False  # intel_pstate / amd-pstate-epp active: no userspace governor
    energy_perf_preference: str | None = None
    errors: tuple[str, ...] = ()


@dataclass(frozen=True)
class ThrottleCounts:
    """``thermal_throttle`` counters of one CPU (None where the file is absent)."""

    cpu: int
    core_throttle_count: int | None
    package_throttle_count: int | None


# --------------------------------------------------------------------------- threads


@dataclass(frozen=True)
class ThreadRef:
    """A thread, identified so that a reused tid is never mistaken for it."""

    pid: int
    tid: int
    start_ticks: int  # field 22 of /proc/<pid>/task/<tid>/stat


@dataclass(frozen=True)
class ThreadSample:
    """What was measured of one managed thread during the last interval."""

    ref: ThreadRef
    comm: str
    last_cpu: int | None
    affinity: frozenset[int]
    # Counter deltas since the previous observation, by name. A name missing from
    # the mapping means "not measurable here", never zero. A platform that measures a
    # thread less often than every observation reports the per-observation share of
    # the window it measured (deltas x interval / window), so rates stay right.
    counters: Mapping[str, float] = field(default_factory=dict)
    # The CPUs its cgroup's cpuset lets it run on (cpuset.cpus.effective): a placement
    # outside them is refused by the kernel. None when not known or not restricted.
    cpuset: frozenset[int] | None = None


# --------------------------------------------------------------------------- capabilities


@dataclass(frozen=True)
class Capability:
    available: bool
    detail: str


# Names used in Capabilities.items; documented in docs/sensors-json.md.
CAPABILITY_NAMES = (
    "per_core_temperature",
    "package_temperature",
    "frequency_read",
    "frequency_cap",
    "throttle_counters",
    "hw_counters",
    "sw_counters",
    "schedstat",
    "affinity",
)


@dataclass(frozen=True)
class Capabilities:
    items: Mapping[str, Capability]
    notes: tuple[str, ...] = ()  # what discovery noticed: quirks, guesses, conflicts

    def has(self, name: str) -> bool:
        item = self.items.get(name)
        return bool(item and item.available)


# --------------------------------------------------------------------------- observe/act


@dataclass(frozen=True)
class CpuState:
    cpu: int
    temp: CpuTemp
    freq_khz: int | None
    cap_khz: int | None
    hw_min_khz: int | None
    hw_max_khz: int | None
    throttle: ThrottleCounts | None = None


@dataclass(frozen=True)
class Observation:
    time_s: float  # monotonic clock of the platform
    cpus: Mapping[int, CpuState]
    threads: Mapping[int, ThreadSample]  # by tid
    sensors: tuple[TempReading, ...] = ()
    policies: tuple[FreqPolicy, ...] = ()


@dataclass(frozen=True)
class Action:
    """What a policy wants applied.

    ``affinity`` maps a thread to the CPUs it may run on. ``freq_cap_khz`` maps a CPU to
    its frequency cap; where one cpufreq policy covers several CPUs the platform applies
    the lowest cap asked for any of them (the safe choice) and says so in the result.
    """

    affinity: Mapping[ThreadRef, frozenset[int]] = field(default_factory=dict)
    freq_cap_khz: Mapping[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ApplyOutcome:
    target: str  # "thread 1234", "policy0"
    requested: str
    applied: str | None  # what is in effect now (read back); None when refused
    ok: bool
    detail: str = ""


@dataclass(frozen=True)
class ApplyResult:
    outcomes: tuple[ApplyOutcome, ...]

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outcomes)


@runtime_checkable
class Platform(Protocol):
    """What the control loop needs of a machine, real or simulated."""

    def topology(self) -> Topology: ...

    def capabilities(self) -> Capabilities: ...

    def observe(self) -> Observation: ...

    def apply(self, action: Action) -> ApplyResult: ...

    def restore(self) -> ApplyResult: ...

    def close(self) -> None: ...
