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
from typing import Callable

from ailfmd.errors import AilfmError, SysfsError, WriteRefused
from ailfmd.platform.base import (
    Action,
    ApplyOutcome,
    ApplyResult,
    Capabilities,
    Capability,
    CpuState,
    FreqPolicy,
    Observation,
    ThrottleCounts,
    Topology,
)
from ailfmd.platform.linux import cpufreq
from ailfmd.platform.linux.hotfiles import HotFiles, IntBank
from ailfmd.platform.linux.hwmon import discover_hwmon
from ailfmd.platform.linux.journal import Journal
from ailfmd.platform.linux.others import find_other_managers
from ailfmd.platform.linux.restore import restore_journal
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
            self.procfs, self.cgroupfs, targets or TargetSelector(), use_perf=use_perf, sample_every=thread_sample_every
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
        self._policy_readers = [cpufreq.PolicyReader(self._hot, st) for st in d.policies]
        self._policies: tuple[FreqPolicy, ...] | None = None
        self._throttle: dict[int, ThrottleCounts | None] = {}
        self._epoch = 0
        # Per online CPU: (cpu, policy index or None), and the CpuState built last epoch
        # with what it was built from, reused while none of that changes.
        self._cpu_policy = [(cpu, d.policy_of_cpu.get(cpu)) for cpu in d.topology.online_cpus]
        self._cpu_states: dict[int, tuple[object, object, object, object, CpuState]] = {}
        self._unchanged_caps: dict[int, tuple[tuple[int, int | None, int | None], ApplyOutcome]] = {}

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

    def _refresh_slow_state(self, part: int | None = None) -> None:
        """Re-read policy limits/governors and throttle counters.

        They change rarely (or only when we write them), so each epoch re-reads one
        ``slow_every``-th of them in turn (``part``), which keeps every sweep equally
        cheap; ``part=None`` re-reads all (first sweep, after a cap was written). A
        record that reads the same as before is kept (the same object).
        """
        d = self._d
        n = self.slow_every
        old = self._policies
        readers = self._policy_readers
        if old is None or part is None:
            self._policies = tuple(r.read() for r in readers)
        else:
            pols: list[FreqPolicy] | None = None
            for i in range(part, len(readers), n):
                new = readers[i].read()
                if new is not old[i] and new != old[i]:
                    if pols is None:
                        pols = list(old)
                    pols[i] = new
            if pols is not None:
                self._policies = tuple(pols)
        throttle = self._throttle
        for c in d.throttle_cpus if part is None else d.throttle_cpus[part::n]:
            new_t = cpufreq.read_throttle(self._hot, c)
            if c not in throttle or new_t != throttle[c]:
                throttle[c] = new_t

    def observe(self) -> Observation:
        if self._policies is None:
            self._refresh_slow_state()
        else:
            self._refresh_slow_state(self._epoch % self.slow_every)
        self._epoch += 1
        temp_values, temp_errors = self._temp_bank.read()
        readings, temps = self._temps.update(temp_values, temp_errors)
        cur_values, _ = self._cur_bank.read()
        policies = self._policies or ()
        throttle = self._throttle.get
        states = self._cpu_states
        max_khz = cpufreq.MAX_PLAUSIBLE_KHZ
        cpus = {}
        for cpu, pi in self._cpu_policy:
            temp = temps[cpu]
            thr = throttle(cpu)
            if pi is not None:
                pol: FreqPolicy | None = policies[pi]
                cur = cur_values[pi]
                if cur is not None and not 0 < cur <= max_khz:
                    cur = None
            else:
                pol = cur = None
            known = states.get(cpu)
            if known is not None and known[0] is temp and known[1] == cur and known[2] is pol and known[3] is thr:
                cpus[cpu] = known[4]
                continue
            st = cpus[cpu] = CpuState(
                cpu,
                temp,
                cur,
                pol.max_khz if pol else None,
                pol.hw_min_khz if pol else None,
                pol.hw_max_khz if pol else None,
                thr,
            )
            states[cpu] = (temp, cur, pol, thr, st)
        now = self._clock()
        return Observation(
            time_s=now,
            cpus=cpus,
            threads=self.threads.sample(now),
            sensors=tuple(readings.values()),
            policies=policies,
        )

    # ------------------------------------------------------------------ actuation
    def apply(self, action: Action) -> ApplyResult:
        outcomes = [self._apply_cap(i, cap) for i, cap in self._caps_by_policy(action).items()]
        for ref, cpus in action.affinity.items():
            outcomes.append(self.threads.set_affinity(ref, cpus, self.journal))
        return ApplyResult(tuple(outcomes))

    def _caps_by_policy(self, action: Action) -> dict[int, int]:
        # One policy may cover several CPUs: the lowest cap asked for any of them wins.
        out: dict[int, int] = {}
        for cpu, cap in action.freq_cap_khz.items():
            pi = self._d.policy_of_cpu.get(cpu)
            if pi is not None:
                out[pi] = min(cap, out.get(pi, cap))
        return out

    def _apply_cap(self, pi: int, cap_khz: int) -> ApplyOutcome:
        st = self._d.policies[pi]
        # The cached state is at most `slow_every` epochs old and every write is read
        # back, so re-reading the policy before each write would only cost syscalls.
        cached = self._policies[pi] if self._policies is not None and pi < len(self._policies) else None
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
        if self._policies is not None and pi < len(self._policies):
            pols = list(self._policies)
            pols[pi] = dataclasses.replace(live, max_khz=got)
            self._policies = tuple(pols)
        detail = note if ok else f"kernel reports {got} kHz after writing {value}"
        return ApplyOutcome(target, f"{cap_khz} kHz", f"{got} kHz", ok, detail)

    def restore(self) -> ApplyResult:
        """Put back every value this or an earlier (killed) process changed."""
        return restore_journal(self.journal, self.procfs)

    def close(self) -> None:
        self._hot.close()
        self.threads.close()
        self.journal.close()
