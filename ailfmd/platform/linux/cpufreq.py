"""cpufreq policies: read their state and cap their frequency within the driver's rules.

Policies live in ``devices/system/cpu/cpufreq/policyN`` (``cpuN/cpufreq`` links to
them); kernels before 4.x and some stripped trees only have per-CPU ``cpuN/cpufreq``
directories, each then treated as its own policy. All frequencies are kHz.

Driver rules that matter for capping:
- intel_pstate and amd-pstate(-epp) in *active* mode run their own governor
  (performance/powersave only, no ``userspace``, no frequency table). The only cap is
  ``scaling_max_freq``; EPP is left alone (writing it is EBUSY under ``performance``).
- acpi-cpufreq, cppc_cpufreq, intel_pstate passive (intel_cpufreq) and amd-pstate
  passive are classic drivers with generic governors; ``scaling_max_freq`` caps them too,
  and with a frequency table the kernel rounds the cap to a table entry, so the value is
  read back after writing.
- A cap below ``scaling_min_freq`` is refused (EINVAL) or silently moves min on
  newer kernels; we never write one: the cap is clamped to [max(min, hw_min), hw_max].
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass

from ailfmd.errors import SysfsError, WriteRefused
from ailfmd.platform.base import FreqPolicy, ThrottleCounts
from ailfmd.platform.linux.hotfiles import HotFiles
from ailfmd.platform.linux.sysfs import Root, parse_cpu_list

CPU_DIR = "devices/system/cpu"
_POLICY = re.compile(r"^policy(\d+)$")
ACTIVE_MODE_DRIVERS = ("intel_pstate", "amd-pstate-epp")
# Bounds on what a CPU frequency can be; outside them a file holds garbage.
MAX_PLAUSIBLE_KHZ = 20_000_000


@dataclass(frozen=True)
class PolicyPaths:
    policy_id: int
    dir_rel: str
    cpus: tuple[int, ...]


def discover_policies(sysfs: Root, online: tuple[int, ...]) -> list[PolicyPaths]:
    """Every cpufreq policy covering at least one online CPU."""
    online_set = set(online)
    found: list[PolicyPaths] = []
    base = f"{CPU_DIR}/cpufreq"
    for name in sysfs.listdir(base):
        m = _POLICY.match(name)
        if not m:
            continue
        d = f"{base}/{name}"
        cpus = _policy_cpus(sysfs, d, default=(int(m.group(1)),))
        cpus = tuple(c for c in cpus if c in online_set)
        if cpus:
            found.append(PolicyPaths(int(m.group(1)), d, cpus))
    if found:
        return sorted(found, key=lambda p: p.policy_id)
    # Per-CPU directories (old kernels, node_exporter's fixture): one policy per CPU.
    for cpu in sorted(online_set):
        d = f"{CPU_DIR}/cpu{cpu}/cpufreq"
        if os.path.isdir(sysfs.join(d)) and sysfs.exists(f"{d}/scaling_max_freq"):
            found.append(PolicyPaths(cpu, d, (cpu,)))
    return found


def _policy_cpus(sysfs: Root, d: str, default: tuple[int, ...]) -> tuple[int, ...]:
    text = sysfs.read_opt_str(f"{d}/affected_cpus")
    if text is None:
        return default
    try:
        # affected_cpus is space-separated ("0 1 2"), related_cpus too.
        return parse_cpu_list(text.replace(" ", ","), f"{d}/affected_cpus") or default
    except ValueError:
        return default


def _khz(hot: HotFiles, rel: str, errors: list[str]) -> int | None:
    try:
        v = hot.read_int(rel)
    except SysfsError as e:
        if e.reason != "missing":
            errors.append(f"{rel}: {e.reason}")
        return None
    if v <= 0 or v > MAX_PLAUSIBLE_KHZ:
        errors.append(f"{rel}: implausible frequency {v} kHz")
        return None
    return v


def _words(sysfs: Root, rel: str) -> tuple[str, ...]:
    text = sysfs.read_opt_str(rel)
    return tuple(text.split()) if text else ()


@dataclass(frozen=True)
class PolicyStatic:
    """What does not change between epochs: driver, tables, hardware limits."""

    paths: PolicyPaths
    driver: str
    available_khz: tuple[int, ...]
    available_governors: tuple[str, ...]
    hw_min_khz: int | None
    hw_max_khz: int | None
    active_mode: bool
    errors: tuple[str, ...]


def read_static(sysfs: Root, p: PolicyPaths) -> PolicyStatic:
    hot = HotFiles(sysfs)
    errors: list[str] = []
    try:
        driver = sysfs.read_opt_str(f"{p.dir_rel}/scaling_driver") or "unknown"
        avail: tuple[int, ...] = ()
        words = _words(sysfs, f"{p.dir_rel}/scaling_available_frequencies")
        try:
            avail = tuple(sorted(int(w) for w in words))
        except ValueError:
            errors.append(f"{p.dir_rel}/scaling_available_frequencies: not a list of integers")
        governors = _words(sysfs, f"{p.dir_rel}/scaling_available_governors")
        hw_min = _khz(hot, f"{p.dir_rel}/cpuinfo_min_freq", errors)
        hw_max = _khz(hot, f"{p.dir_rel}/cpuinfo_max_freq", errors)
        if hw_min is not None and hw_max is not None and hw_min > hw_max:
            errors.append(f"{p.dir_rel}: cpuinfo_min_freq {hw_min} > cpuinfo_max_freq {hw_max}")
            hw_min = hw_max = None
    finally:
        hot.close()
    # amd-pstate names itself amd-pstate-epp in active mode and amd-pstate in passive and
    # guided mode, so the driver name alone tells the mode.
    active = driver in ACTIVE_MODE_DRIVERS
    return PolicyStatic(p, driver, avail, governors, hw_min, hw_max, active, tuple(errors))


def read_policy(hot: HotFiles, st: PolicyStatic) -> FreqPolicy:
    """The live state of one policy (one pread per file)."""
    d = st.paths.dir_rel
    errors = list(st.errors)
    try:
        governor: str | None = hot.read_str(f"{d}/scaling_governor") or None
    except SysfsError as e:
        governor = None
        errors.append(f"{d}/scaling_governor: {e.reason}")
    epp: str | None
    try:
        epp = hot.read_str(f"{d}/energy_performance_preference") or None
    except SysfsError:
        epp = None
    return FreqPolicy(
        policy_id=st.paths.policy_id,
        cpus=st.paths.cpus,
        driver=st.driver,
        governor=governor,
        min_khz=_khz(hot, f"{d}/scaling_min_freq", errors),
        max_khz=_khz(hot, f"{d}/scaling_max_freq", errors),
        cur_khz=_khz(hot, f"{d}/scaling_cur_freq", errors),
        hw_min_khz=st.hw_min_khz,
        hw_max_khz=st.hw_max_khz,
        available_khz=st.available_khz,
        available_governors=st.available_governors,
        active_mode=st.active_mode,
        energy_perf_preference=epp,
        errors=tuple(errors),
    )


class PolicyReader:
    """:func:`read_policy` of one policy, epoch after epoch, cheaply.

    The raw content of its live files is compared with the previous read: when nothing
    changed the previous :class:`FreqPolicy` is returned (the same object), when only the
    current frequency did it is copied with the new one, and anything else (a change of
    limit, governor or EPP, an unreadable or odd value) goes through :func:`read_policy`.
    """

    def __init__(self, hot: HotFiles, st: PolicyStatic) -> None:
        self.hot = hot
        self.st = st
        d = st.paths.dir_rel
        self._rels = [f"{d}/{name}" for name in
                      ("scaling_governor", "energy_performance_preference", "scaling_min_freq", "scaling_max_freq")]
        self._cur_rel = f"{d}/scaling_cur_freq"
        self._resolve()
        self._raw: list[bytes | None] | None = None
        self._last: FreqPolicy | None = None

    def _fd(self, rel: str) -> int:
        try:
            return self.hot._fd(rel)
        except SysfsError:
            return -1  # absent (no EPP on classic drivers) or unopenable: read_policy says why

    def _resolve(self) -> None:
        """The descriptors HotFiles holds now (it re-opens a file whose device went away)."""
        self._fds = [self._fd(rel) for rel in self._rels]
        self._cur_fd = self._fd(self._cur_rel)

    def read(self) -> FreqPolicy:
        pread = os.pread
        last = self._last
        try:
            raw = [pread(fd, 4096, 0) if fd >= 0 else None for fd in self._fds]
            cur = int(pread(self._cur_fd, 64, 0)) if self._cur_fd >= 0 else None
        except (OSError, ValueError):
            raw, cur = None, None
        if last is not None and raw is not None and raw == self._raw:
            if cur == last.cur_khz:
                return last
            if cur is not None and 0 < cur <= MAX_PLAUSIBLE_KHZ and last.cur_khz is not None:
                return self.with_cur(cur)
        self._last = read_policy(self.hot, self.st)
        if raw is None:
            self._resolve()
        self._raw = raw
        return self._last

    def with_cur(self, cur_khz: int) -> FreqPolicy:
        """The last record with ``cur_khz`` (a plausible value read elsewhere this epoch)
        as its current frequency; the same record when that is already the case."""
        last = self._last
        if last is None:
            return self.read()
        if last.cur_khz != cur_khz:
            # All fields spelled out: dataclasses.replace() introspects the class each call.
            self._last = FreqPolicy(
                last.policy_id, last.cpus, last.driver, last.governor, last.min_khz, last.max_khz, cur_khz,
                last.hw_min_khz, last.hw_max_khz, last.available_khz, last.available_governors,
                last.active_mode, last.energy_perf_preference, last.errors,
            )
        return self._last

    def adopt(self, policy: FreqPolicy) -> None:
        """``policy`` is the state now (a write was read back): the next :meth:`read` reads
        every file again rather than trust the raw content it last saw."""
        self._last = policy
        self._raw = None


def clamp_cap(st: PolicyStatic, policy: FreqPolicy, cap_khz: int) -> tuple[int, str]:
    """The cap that will be written and why it differs from the request, if it does."""
    lo_candidates = [v for v in (policy.min_khz, st.hw_min_khz) if v is not None]
    lo = max(lo_candidates) if lo_candidates else None
    hi = st.hw_max_khz
    note = ""
    value = cap_khz
    if hi is not None and value > hi:
        value, note = hi, f"clamped to hardware max {hi} kHz"
    if lo is not None and value < lo:
        value, note = lo, f"clamped to minimum {lo} kHz"
    if st.available_khz:
        # Round down to a table entry so the kernel does not round up past the cap.
        below = [f for f in st.available_khz if f <= value]
        if below and below[-1] != value:
            value = below[-1]
            note = (note + "; " if note else "") + f"rounded down to table entry {value} kHz"
    return value, note


def write_max_freq(sysfs: Root, st: PolicyStatic, value_khz: int) -> int:
    """Write scaling_max_freq and return what the kernel reports afterwards."""
    rel = f"{st.paths.dir_rel}/scaling_max_freq"
    try:
        sysfs.write_str(rel, str(value_khz))
    except SysfsError as e:
        raise WriteRefused(rel, str(value_khz), e.reason) from None
    except OSError as e:
        # EBUSY: another agent holds the policy (rare for max_freq, common for EPP);
        # EINVAL: outside what the driver accepts.
        raise WriteRefused(rel, str(value_khz), errno.errorcode.get(e.errno or 0, str(e))) from None
    try:
        return sysfs.read_int(rel)
    except SysfsError as e:
        raise WriteRefused(rel, str(value_khz), f"written but unreadable: {e.reason}") from None


def read_throttle(hot: HotFiles, cpu: int) -> ThrottleCounts | None:
    """``cpuN/thermal_throttle`` counters (Intel only); None when the directory is absent."""
    base = f"{CPU_DIR}/cpu{cpu}/thermal_throttle"
    vals: list[int | None] = []
    for name in ("core_throttle_count", "package_throttle_count"):
        try:
            raw = hot.read_int(f"{base}/{name}")
        except SysfsError:
            vals.append(None)
            continue
        vals.append(raw if raw >= 0 else None)
    if vals == [None, None]:
        return None
    return ThrottleCounts(cpu, vals[0], vals[1])
