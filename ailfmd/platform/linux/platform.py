"""``LinuxPlatform``: the real machine behind the Platform protocol.

Discovery (topology, sensors, cpufreq policies) happens at construction and again on
:meth:`rediscover` (hotplug); each epoch only re-reads the hot files through open
descriptors. Every change is journaled before it is made (see ``journal.py``) so that
:meth:`restore` — or :func:`restore_journal` in a later process after a SIGKILL — puts
the machine back.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Mapping

from ailfmd.errors import AilfmError, SysfsError, WriteRefused
from ailfmd.platform.base import (
    Action,
    ApplyOutcome,
    ApplyResult,
    Capabilities,
    Capability,
    CpuState,
    CpuTemp,
    FreqPolicy,
    Observation,
    Topology,
)
from ailfmd.platform.linux import cpufreq
from ailfmd.platform.linux.cpusets import V1_MOUNT
from ailfmd.platform.linux.hotfiles import HotFiles, IntBank
from ailfmd.platform.linux.hwmon import discover_hwmon
from ailfmd.platform.linux.journal import Journal
from ailfmd.platform.linux.others import find_other_managers
from ailfmd.platform.linux.records import make_cpu_state
from ailfmd.platform.linux.restore import restore_journal
from ailfmd.platform.linux.slowstate import SlowState
from ailfmd.platform.linux.sysfs import Root
from ailfmd.platform.linux.temps import TempCache, TempPlan, plan_temperatures
from ailfmd.platform.linux.thermal_zones import discover_zones
from ailfmd.platform.linux.threads import DEFAULT_SAMPLE_EVERY as DEFAULT_THREAD_SAMPLE_EVERY, ThreadTracker
from ailfmd.platform.linux.topology import read_topology
from ailfmd.platform.linux.targets import TargetSelector

DEFAULT_RUN_DIR = "/run/ailfmd"


def find_cgroup2(root: Path) -> tuple[Root, str | None]:
    """The cgroup v2 hierarchy to read ``cgroup.threads`` from, and a note when it is not
    ``root`` itself: on hybrid systems (v1 controllers mounted at /sys/fs/cgroup) v2 lives
    at ``/sys/fs/cgroup/unified``, and reading the v1 tree would silently find no threads."""
    if (root / "cgroup.controllers").exists():
        return Root(root), None
    unified = root / "unified"
    if (unified / "cgroup.controllers").exists():
        return Root(unified), f"cgroup v2 found at {unified} (hybrid layout); unit and cgroup targets are read there"
    return Root(root), f"no cgroup v2 hierarchy at {root}: targets by systemd unit or cgroup path will find no threads"


@dataclass(frozen=True)
class _Discovery:
    topology: Topology
    plan: TempPlan
    policies: tuple[cpufreq.PolicyStatic, ...]
    policy_of_cpu: dict[int, int]  # cpu -> index into policies
    throttle_cpus: tuple[int, ...]
    notes: tuple[str, ...]


class LinuxPlatform:
    """The running Linux machine (or a fixture tree of one)."""

    def __init__(
        self,
        sysfs_root: str | os.PathLike[str] = "/sys",
        procfs_root: str | os.PathLike[str] = "/proc",
        run_dir: str | os.PathLike[str] = DEFAULT_RUN_DIR,
        targets: TargetSelector | None = None,
        cgroupfs_root: str | os.PathLike[str] = "/sys/fs/cgroup",
        use_perf: bool = True,
        clock: Callable[[], float] = time.monotonic,
        slow_every: int = 10,
        thread_sample_every: int = DEFAULT_THREAD_SAMPLE_EVERY,
    ) -> None:
        self.sysfs = Root(sysfs_root)
        self.procfs = Root(procfs_root)
        if not os.path.isdir(self.sysfs.join("devices/system/cpu")):
            raise SysfsError(str(sysfs_root), "not a sysfs tree (no devices/system/cpu)")
        if not os.path.isdir(procfs_root):
            raise SysfsError(str(procfs_root), "procfs root is not a directory")
        self.journal = Journal(run_dir)
        self._clock = clock
        self._hot = HotFiles(self.sysfs)
        self.cgroupfs, cgroup_note = find_cgroup2(Path(cgroupfs_root))
        self._cgroup_note = cgroup_note
        self.threads = ThreadTracker(
            self.procfs, self.cgroupfs, targets or TargetSelector(), use_perf=use_perf, sample_every=thread_sample_every,
            cpuset_v1=Root(Path(cgroupfs_root) / V1_MOUNT),  # v1 controllers sit beside "unified"
        )
        self.slow_every = slow_every
        self._d = self._discover()
        self._open_banks()

    # ------------------------------------------------------------------ discovery
    def _discover(self) -> _Discovery:
        topo = read_topology(self.sysfs)
        notes: list[str] = []
        policies = []
        policy_of_cpu: dict[int, int] = {}
        for p in cpufreq.discover_policies(self.sysfs, topo.online_cpus):
            st = cpufreq.read_static(self.sysfs, p)
            for cpu in p.cpus:
                policy_of_cpu[cpu] = len(policies)
            policies.append(st)
            notes.extend(st.errors)
        policy_cpus = {cpu: policies[i].paths.cpus for cpu, i in policy_of_cpu.items()}
        plan = plan_temperatures(topo, discover_hwmon(self.sysfs), discover_zones(self.sysfs), policy_cpus)
        notes.extend(plan.notes)
        throttle = tuple(
            c for c in topo.online_cpus if self.sysfs.exists(f"devices/system/cpu/cpu{c}/thermal_throttle")
        )
        notes.extend(f"another manager is running: {m}" for m in find_other_managers(self.procfs, os.getpid()))
        if self._cgroup_note:
            notes.append(self._cgroup_note)
        return _Discovery(topo, plan, tuple(policies), policy_of_cpu, throttle, tuple(notes))

    def _open_banks(self) -> None:
        d = self._d
        self._temp_bank = IntBank(self._hot, [s.path for s in d.plan.sensors])
        self._cur_bank = IntBank(self._hot, [f"{p.paths.dir_rel}/scaling_cur_freq" for p in d.policies])
        self._temps = TempCache(d.plan)
        self._slow = SlowState(self._hot, d.policies, d.throttle_cpus, self.slow_every)
        self._epoch = 0
        # Per online CPU: (cpu, policy index or None), and the CpuState built last epoch
        # with what it was built from, reused while none of that changes.
        self._cpu_policy = [(cpu, d.policy_of_cpu.get(cpu)) for cpu in d.topology.online_cpus]
        self._cpu_states: dict[int, tuple[object, object, object, object, CpuState]] = {}
        # What the last CPU sweep was built from (temperatures, current frequencies, slow
        # state version) and its result: when none of it changed, the sweep is the same.
        self._last_sweep: tuple[object, list[int | None], int, dict[int, CpuState]] | None = None
        # Per policy: (max, hw_min, hw_max), the same tuple object while those read the same.
        self._limits: list[tuple[int | None, int | None, int | None]] = []
        self._limits_version = -1
        self._unchanged_caps: dict[int, tuple[tuple[int, int | None, int | None], ApplyOutcome]] = {}
        # The last frequency-cap request that changed nothing anywhere: (caps asked, the
        # limits they were checked against, the outcomes).
        self._unchanged_request: tuple[dict[int, int], object, list[ApplyOutcome]] | None = None
        self._cap_inputs_cached: tuple[tuple[int, int | None, int | None], ...] | None = None
        self._cap_inputs_version = -1

    def rediscover(self) -> None:
        """Re-read topology, sensors and policies (CPU or sensor hotplug)."""
        self._hot.close()
        self._d = self._discover()
        self._open_banks()

    # ------------------------------------------------------------------ protocol
    def topology(self) -> Topology:
        return self._d.topology

    def capabilities(self) -> Capabilities:
        d = self._d
        n = len(d.topology.cpus)
        scopes = [c[0].sensor.scope if c else None for c in d.plan.per_cpu.values()]
        per_core = sum(1 for s in scopes if s == "core")
        any_temp = sum(1 for s in scopes if s is not None)
        writable = [
            p for p in d.policies if os.access(self.sysfs.join(f"{p.paths.dir_rel}/scaling_max_freq"), os.W_OK)
        ]
        items = {
            "per_core_temperature": Capability(
                per_core == n and n > 0, f"{per_core} of {n} CPUs have a per-core sensor"
            ),
            "package_temperature": Capability(
                any_temp > 0,
                f"{any_temp} of {n} CPUs have some temperature source"
                + ("" if any_temp else "; placement only, frequency left untouched"),
            ),
            "frequency_read": Capability(bool(d.policies), f"{len(d.policies)} cpufreq policies"),
            "frequency_cap": Capability(
                bool(writable),
                f"scaling_max_freq writable on {len(writable)} of {len(d.policies)} policies"
                if d.policies
                else "no cpufreq (VM or cpufreq disabled)",
            ),
            "throttle_counters": Capability(
                bool(d.throttle_cpus), f"thermal_throttle on {len(d.throttle_cpus)} of {n} CPUs"
            ),
        }
        items.update(self.threads.capabilities())
        return Capabilities(items=items, notes=d.notes)

    def read_policies(self) -> tuple[FreqPolicy, ...]:
        return tuple(cpufreq.read_policy(self._hot, st) for st in self._d.policies)

    def _policy_limits(self, policies: tuple[FreqPolicy, ...]) -> list[tuple[int | None, int | None, int | None]]:
        """(max, hw_min, hw_max) per policy: what a CpuState takes from its policy. A
        policy record renewed only for its current frequency keeps its tuple."""
        if self._limits_version != self._slow.limits_version:
            old = self._limits
            new = [(p.max_khz, p.hw_min_khz, p.hw_max_khz) for p in policies]
            if len(old) == len(new):
                new = [o if o == n else n for o, n in zip(old, new)]
            self._limits, self._limits_version = new, self._slow.limits_version
        return self._limits

    def observe(self) -> Observation:
        cur_values, cur_errors = self._cur_bank.read()
        max_khz = cpufreq.MAX_PLAUSIBLE_KHZ
        if cur_values and (cur_errors or not 0 < min(cur_values) <= max(cur_values) <= max_khz):  # type: ignore[type-var]
            cur_values = [c if c is not None and 0 < c <= max_khz else None for c in cur_values]
        slow = self._slow
        slow.refresh(None if slow.policies is None else self._epoch % self.slow_every, cur_values)
        self._epoch += 1
        temp_values, temp_errors = self._temp_bank.read()
        _, temps = self._temps.update(temp_values, temp_errors)
        policies = slow.policies or ()
        last = self._last_sweep
        if last is not None and last[0] is temps and last[2] == slow.limits_version and last[1] == cur_values:
            # Nothing a CpuState is built from changed: the same states (a fresh mapping,
            # since every Observation owns its own).
            cpus = dict(last[3])
        else:
            cpus = self._cpu_sweep(temps, cur_values, policies)
            self._last_sweep = (temps, cur_values, slow.limits_version, cpus)
            cpus = dict(cpus)
        now = self._clock()
        return Observation(
            time_s=now,
            cpus=cpus,
            threads=self.threads.sample(now),
            sensors=self._temps.readings,
            policies=policies,
        )

    def _cpu_sweep(
        self, temps: dict[int, CpuTemp], cur_values: list[int | None], policies: tuple[FreqPolicy, ...]
    ) -> dict[int, CpuState]:
        """Every online CPU's state, reusing each one built from the same inputs."""
        limits = self._policy_limits(policies)
        throttle = self._slow.throttle.get
        states = self._cpu_states
        cpus = {}
        for cpu, pi in self._cpu_policy:
            temp = temps[cpu]
            thr = throttle(cpu)
            if pi is not None:
                lim: tuple[int | None, int | None, int | None] | None = limits[pi]
                cur = cur_values[pi]
            else:
                lim = cur = None
            known = states.get(cpu)
            if known is not None and known[0] is temp and known[1] == cur and known[2] is lim and known[3] is thr:
                cpus[cpu] = known[4]
                continue
            st = cpus[cpu] = make_cpu_state(
                cpu,
                temp,
                cur,
                lim[0] if lim else None,
                lim[1] if lim else None,
                lim[2] if lim else None,
                thr,
            )
            states[cpu] = (temp, cur, lim, thr, st)
        return cpus

    # ------------------------------------------------------------------ actuation
    def apply(self, action: Action) -> ApplyResult:
        outcomes = self._apply_caps(action.freq_cap_khz)
        for ref, cpus in action.affinity.items():
            outcomes.append(self.threads.set_affinity(ref, cpus, self.journal))
        return ApplyResult(tuple(outcomes))

    def _cap_inputs(self) -> tuple[tuple[int, int | None, int | None], ...] | None:
        """(policy id, min, max) per policy: all a cap's outcome depends on besides the
        request and the static policy. The same tuple while those read the same (a
        policy renewed only for its current frequency does not count); None before the
        first sweep and after restore()."""
        policies = self._slow.policies
        if policies is None:
            return None
        if self._cap_inputs_version != self._slow.limits_version:
            new = tuple((p.policy_id, p.min_khz, p.max_khz) for p in policies)
            if new != self._cap_inputs_cached:
                self._cap_inputs_cached = new
            self._cap_inputs_version = self._slow.limits_version
        return self._cap_inputs_cached

    def _apply_caps(self, caps_khz: Mapping[int, int]) -> list[ApplyOutcome]:
        inputs = self._cap_inputs()
        same = self._unchanged_request
        # Policies may restate every cap every epoch: the same request, against the same
        # limits, as one that changed nothing gets the same outcomes.
        if same is not None and inputs is not None and same[1] is inputs and same[0] == caps_khz:
            return list(same[2])
        outcomes: list[ApplyOutcome] = []
        all_unchanged = True
        for i, cap in self._caps_by_policy(caps_khz).items():
            outcome = self._apply_cap(i, cap)
            known = self._unchanged_caps.get(i)
            all_unchanged = all_unchanged and known is not None and known[1] is outcome
            outcomes.append(outcome)
        if all_unchanged and inputs is not None and self._cap_inputs() is inputs:
            self._unchanged_request = (dict(caps_khz), inputs, outcomes)
        else:
            self._unchanged_request = None
        return list(outcomes)

    def _caps_by_policy(self, caps_khz: Mapping[int, int]) -> dict[int, int]:
        # One policy may cover several CPUs: the lowest cap asked for any of them wins.
        out: dict[int, int] = {}
        policy_of_cpu = self._d.policy_of_cpu
        for cpu, cap in caps_khz.items():
            pi = policy_of_cpu.get(cpu)
            if pi is not None:
                out[pi] = min(cap, out.get(pi, cap))
        return out

    def _apply_cap(self, pi: int, cap_khz: int) -> ApplyOutcome:
        st = self._d.policies[pi]
        policies = self._slow.policies
        # The cached state is at most `slow_every` epochs old and every write is read
        # back, so re-reading the policy before each write would only cost syscalls.
        cached = policies[pi] if policies is not None and pi < len(policies) else None
        live = cached if cached is not None and cached.policy_id == st.paths.policy_id else cpufreq.read_policy(self._hot, st)
        # Policies may restate every cap every epoch: a request that changed nothing last
        # time, against the same limits, changes nothing now and gets the same outcome.
        key = (cap_khz, live.min_khz, live.max_khz)
        same = self._unchanged_caps.get(pi)
        if same is not None and same[0] == key:
            return same[1]
        target = f"policy{st.paths.policy_id}"
        rel = f"{st.paths.dir_rel}/scaling_max_freq"
        if live.max_khz is None:
            return ApplyOutcome(target, f"{cap_khz} kHz", None, False, "scaling_max_freq unreadable")
        value, note = cpufreq.clamp_cap(st, live, cap_khz)
        if value == live.max_khz:
            outcome = ApplyOutcome(target, f"{cap_khz} kHz", f"{value} kHz", True, note or "unchanged")
            self._unchanged_caps[pi] = (key, outcome)
            return outcome
        try:
            self.journal.record(
                {"kind": "sysfs", "root": str(self.sysfs.path), "path": rel, "original": str(live.max_khz)}
            )
            got = cpufreq.write_max_freq(self.sysfs, st, value)
        except (WriteRefused, AilfmError, OSError) as e:
            return ApplyOutcome(target, f"{cap_khz} kHz", None, False, str(e))
        ok = got == value
        self._slow.replace_policy(pi, dataclasses.replace(live, max_khz=got))
        detail = note if ok else f"kernel reports {got} kHz after writing {value}"
        return ApplyOutcome(target, f"{cap_khz} kHz", f"{got} kHz", ok, detail)

    def restore(self) -> ApplyResult:
        """Put back every value this or an earlier (killed) process changed."""
        try:
            return restore_journal(self.journal, self.procfs)
        finally:
            # Limits were written behind the cached records' back: read them all again.
            self._slow.invalidate()

    def close(self) -> None:
        self._hot.close()
        self.threads.close()
        self.journal.close()
