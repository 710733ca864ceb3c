"""The safety shield: whatever the policy said, no core is left running hot.

It sits after the policy and before the platform, per CPU with a temperature reading.

The limit is the configured ``limit_c``, or the sensor's own maximum where it reports one
and that is lower (likewise for critical). Then:

- ``temp >= limit - margin`` (the guard band): the CPU's cap is cut by ``cut_fraction``
  of the hardware range per epoch, down to the hardware minimum, and the hottest managed
  thread on it (most instructions, else most run time, last epoch) is moved to the
  coolest CPU outside the guard band;
- ``temp >= critical``: every CPU of its package goes to the hardware minimum at once;
- below ``limit - 2 * margin`` a shield cap is released by ``release_fraction`` of the
  range per epoch (slowly: thermal time constants are seconds, and releasing at once
  would oscillate); in between it holds.

Landing caps (``landing_caps``): a thread that wakes on an idle core between two epochs
runs there at whatever cap the idle core has, usually a high one, for up to an epoch
before anyone sees it; on a thin stacked die that is enough to go from idle to DTM.
When a thread that landed on a CPU idle at the last epoch finds it in the guard band,
the shield halves a landing fraction (from 1, no effect) and caps every idle CPU at
that fraction of its range; each epoch without such a landing raises it again by
``release_fraction``. A machine whose landings never run hot never sees a landing cap.

The shield's caps are a ceiling on the policy's: the lower of the two is applied. CPUs
without a temperature reading are left to the policy (the shield cannot see them) and
the record says so. It never raises a cap above what the policy asked.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import repeat
from operator import attrgetter, sub

from ailfmd.platform.base import Action, CpuState, Observation, ThreadRef, ThreadSample, Topology
from ailfmd.platform.limits import cpu_limits_c
from ailfmd.policy.base import Decision, Reason

# Read in C for every CPU / sensor each epoch: what the per-CPU limits are made of, and
# the temperatures.
_cpu_inputs = attrgetter("temp.source", "hw_min_khz", "hw_max_khz")
_sensor_inputs = attrgetter("sensor", "max_c", "crit_c")
_temp_of = attrgetter("temp.temp_c")


@dataclass(frozen=True)
class ShieldConfig:
    limit_c: float = 85.0
    margin_c: float = 3.0
    critical_c: float = 95.0
    cut_fraction: float = 0.25  # of the hardware range, per epoch in the guard band
    release_fraction: float = 0.05  # of the hardware range, per epoch when cool
    min_freq_khz: int | None = None  # floor for shield caps (never below hardware min)
    follow_sensor_limits: bool = True  # lower the limits to what sensors report as their max/crit
    landing_caps: bool = True  # cap idle CPUs once landings on them have run hot (see above)

    def __post_init__(self) -> None:
        if not self.critical_c > self.limit_c > self.margin_c > 0:
            raise ValueError(
                f"shield needs critical_c > limit_c > margin_c > 0, got "
                f"critical_c={self.critical_c}, limit_c={self.limit_c}, margin_c={self.margin_c}"
            )


@dataclass
class SafetyShield:
    config: ShieldConfig
    topology: Topology
    _caps_khz: dict[int, int] = field(default_factory=dict)  # shield's own ceiling per CPU
    _policy_caps: dict[int, int] = field(default_factory=dict)  # the policy's last ask per CPU
    _last: dict[int, tuple[float, float]] = field(default_factory=dict)  # cpu -> (time_s, temp_c)
    # The per-CPU (limit, critical) of the last filter() call, for the loop's report.
    # Shared with the shield's cache: read it, never change it.
    last_limits_c: dict[int, tuple[float, float]] = field(default_factory=dict)
    # The lowest of last_limits_c's limits (the configured limit when there are no CPUs).
    last_min_limit_c: float | None = None
    # The hottest CPU temperature of the last filter() call when every CPU had a reading
    # and it was below every guard band, else None (then nothing is known about it).
    last_cool_max_c: float | None = None
    # (records, inputs, limits, lowest limit, lowest guard band, CPUs without a frequency
    # range) of the last limits computed; see _limits().
    _limits_cache: tuple[object, object, dict[int, tuple[float, float]], float, float, frozenset[int]] | None = None
    # (CPUs, their states, their temperatures), all in obs.cpus order, of the last
    # filter() call when every CPU had a reading, all of them now in _last; else None.
    _prev_temps: tuple[list[int], list[CpuState], list[float]] | None = None
    # Idle CPUs get at most this fraction of their range (1: no landing cap).
    landing_fraction: float = 1.0
    # What the last filter() saw and sent, to tell next epoch which CPUs were idle then.
    _landing_view: tuple[Mapping[int, ThreadSample], Mapping[ThreadRef, frozenset[int]]] | None = None
    _landing_capped: set[int] = field(default_factory=set)  # CPUs holding a landing cap

    def reset(self, topology: Topology) -> None:
        self.topology = topology
        self._caps_khz = {c: v for c, v in self._caps_khz.items() if c in topology.cpus}
        self._policy_caps = {c: v for c, v in self._policy_caps.items() if c in topology.cpus}
        self._landing_capped &= set(topology.cpus)

    def forget_policy_caps(self) -> None:
        """The policy's caps were undone (pause restores them): the shield caps alone
        count until the policy asks again."""
        self._policy_caps.clear()

    @property
    def active_caps_khz(self) -> dict[int, int]:
        return dict(self._caps_khz)

    def limits_c(self, obs: Observation) -> dict[int, tuple[float, float]]:
        """Per CPU (limit, critical): the configured ones, or lower where the sensor itself
        reports a maximum / critical temperature (hwmon ``tempN_max``/``_crit``, the
        simulated chip's DTM threshold)."""
        cfg = self.config
        return cpu_limits_c(obs, cfg.limit_c, cfg.critical_c, follow_sensors=cfg.follow_sensor_limits)

    def _limits(
        self, obs: Observation, keys: list[int], states: list[CpuState]
    ) -> tuple[dict[int, tuple[float, float]], float, float, frozenset[int]]:
        """:meth:`limits_c` with the lowest limit and guard band, and the CPUs without a
        frequency range, for ``obs`` (whose CPUs and states are ``keys`` and ``states``).

        Kept with their inputs and recomputed only when those differ: sensors' thresholds
        and CPUs' sensors rarely change. The inputs are compared in C: first the records
        themselves (the same objects as last time compare equal at once), then, when the
        readings moved, just the parts the limits are made of.
        """
        cfg = self.config
        quick = (cfg, keys, states, obs.sensors)
        cached = self._limits_cache
        if cached is not None and cached[0] == quick:
            return cached[2], cached[3], cached[4], cached[5]
        key = (
            cfg,
            keys,
            list(map(_cpu_inputs, states)),
            list(map(_sensor_inputs, obs.sensors)) if cfg.follow_sensor_limits else None,
        )
        if cached is not None and cached[1] == key:
            self._limits_cache = (quick, *cached[1:])
            return cached[2], cached[3], cached[4], cached[5]
        limits = self.limits_c(obs)
        min_limit = min((lim for lim, _ in limits.values()), default=cfg.limit_c)
        min_guard = min((lim - cfg.margin_c for lim, _ in limits.values()), default=cfg.limit_c - cfg.margin_c)
        unranged = frozenset(c for c, st in obs.cpus.items() if st.hw_min_khz is None or st.hw_max_khz is None)
        self._limits_cache = (quick, key, limits, min_limit, min_guard, unranged)
        return limits, min_limit, min_guard, unranged

    def filter(self, obs: Observation, decision: Decision) -> tuple[Decision, tuple[Reason, ...]]:
        """The decision to apply and the shield's own reasons (empty when it did nothing)."""
        keys, states = list(obs.cpus), list(obs.cpus.values())
        limits, min_limit, min_guard, unranged = self._limits(obs, keys, states)
        self.last_limits_c = limits
        self.last_min_limit_c = min_limit
        self.last_cool_max_c = None
        prev, self._prev_temps = self._prev_temps, None
        if prev is not None and prev[1] == states and prev[0] == keys:
            temps = prev[2]  # the same CPU states: the same temperatures
        else:
            temps = list(map(_temp_of, states))
        landing_idle = self.landing_fraction >= 1.0 and not self._landing_capped
        if (temps and not self._caps_khz and landing_idle and None not in temps and prev is not None
                and prev[0] == keys):
            # The usual epoch: no shield cap of its own, and even the hottest CPU, were it
            # to rise again by as much as any CPU just did (the look-ahead's largest
            # step), stays below the lowest guard band. Then no CPU is hot or critical and
            # there is nothing to do but what the full pass would also do: remember the
            # temperatures and the policy's caps. max() gives either NaN or the largest
            # of the other values; a NaN reading or rise never makes a CPU hot, and a NaN
            # maximum fails the test.
            hottest = max(temps)
            rise = max(map(sub, temps, prev[2]))
            if rise == rise and hottest + max(0.0, rise) < min_guard:
                self._last.update(zip(keys, zip(repeat(obs.time_s), temps)))
                caps = decision.action.freq_cap_khz
                if not unranged and caps.keys() <= obs.cpus.keys() and None not in caps.values():
                    self._policy_caps.update(caps)
                else:
                    self._policy_caps.update(
                        (c, v) for c, v in caps.items() if c in obs.cpus and c not in unranged and v is not None)
                self._prev_temps = (keys, states, temps)
                self.last_cool_max_c = hottest
                # No landing can have run hot (every CPU is below its guard band).
                self._landing_view = (obs.threads, decision.action.affinity)
                return decision, ()
        result = self._filter_all(obs, decision, limits)
        if temps and None not in temps:
            self._prev_temps = (keys, states, temps)
        return result

    def _filter_all(self, obs: Observation, decision: Decision,
                    limits: dict[int, tuple[float, float]]) -> tuple[Decision, tuple[Reason, ...]]:
        """Every CPU's step of :meth:`filter`, whether or not any is near a limit."""
        cfg = self.config
        caps = dict(decision.action.freq_cap_khz)
        affinity = dict(decision.action.affinity)
        reasons: list[Reason] = []
        hot: list[int] = []
        critical_pkgs: set[int] = set()
        predicted: dict[int, float] = {}
        time_s = obs.time_s
        last = self._last
        margin_c = cfg.margin_c
        for cpu, st in obs.cpus.items():
            t = st.temp.temp_c
            if t is None:
                continue
            # As _predict(), inline: this runs for every CPU every epoch.
            seen = last.get(cpu)
            last[cpu] = (time_s, t)
            p = t if seen is None or time_s <= seen[0] else t + max(0.0, t - seen[1])
            predicted[cpu] = p
            limit_c, critical_c = limits[cpu]
            if t >= critical_c:
                critical_pkgs.add(self.topology.cpus[cpu].package_id if cpu in self.topology.cpus else -1)
            if t >= limit_c - margin_c or p >= limit_c:
                hot.append(cpu)
        hot_set = set(hot)
        shield_caps = self._caps_khz
        policy_caps = self._policy_caps
        for cpu, st in obs.cpus.items():
            if st.hw_min_khz is None or st.hw_max_khz is None:
                continue
            # What the policy wants in effect: its ask now, else its last ask (policies
            # send only changes), else no cap. The shield's cap is a ceiling on it and
            # must never raise a cap the policy set lower.
            asked = caps.get(cpu)
            if asked is not None:
                policy_caps[cpu] = asked
            if (cpu not in hot_set and cpu not in shield_caps
                    and (not critical_pkgs or self._package(cpu) not in critical_pkgs)):
                continue  # cool, no shield cap of its own, no critical package: nothing to do
            lo, hi = self._range(st)
            assert lo is not None and hi is not None
            policy_cap = policy_caps.get(cpu, hi)
            limit_c, critical_c = limits[cpu]
            guard_c = limit_c - cfg.margin_c
            release_c = limit_c - 2 * cfg.margin_c
            t = st.temp.temp_c
            pkg = self._package(cpu)
            sensor = f"{st.temp.source.chip}/{st.temp.source.sensor}" if st.temp.source else None
            prev = self._caps_khz.get(cpu)
            if pkg in critical_pkgs:
                new = lo
                why, thr = "package at or above the critical temperature: hardware minimum", critical_c
            elif t is not None and (t >= limit_c or predicted[cpu] >= limit_c):
                # At the limit, or heading past it before the next epoch: no half measures.
                new = lo
                why, thr = f"at or heading past the {limit_c:g} C limit (next epoch ~{predicted[cpu]:.1f} C): minimum", limit_c
            elif t is not None and t >= guard_c:
                base = prev if prev is not None else (st.cap_khz or hi)
                new = max(lo, int(base - cfg.cut_fraction * (hi - lo)))
                why, thr = f"within {cfg.margin_c:g} C of the {limit_c:g} C limit: cap cut", guard_c
            elif prev is not None and t is not None and t < release_c:
                new = int(prev + cfg.release_fraction * (hi - lo))
                if new >= policy_cap:
                    del self._caps_khz[cpu]
                    if asked is None and st.cap_khz != policy_cap:
                        caps[cpu] = policy_cap
                    reasons.append(Reason(f"cpu {cpu}", "freq_cap", "shield", "cooled down: shield cap released",
                                          sensor, t, release_c, "policy cap applies again"))
                    continue
                why, thr = "cooling down: shield cap raised one step", release_c
            elif prev is not None:
                new = prev
                why, thr = "holding the shield cap until the core cools", release_c
            else:
                continue
            self._caps_khz[cpu] = new
            if new < policy_cap:
                if asked is not None or st.cap_khz != new:
                    caps[cpu] = new
                reasons.append(Reason(f"cpu {cpu}", "freq_cap", "shield", why, sensor, t, thr,
                                      f"cap {new // 1000} MHz (policy asked {policy_cap // 1000} MHz)"))
            elif asked is None and st.cap_khz != policy_cap:
                caps[cpu] = policy_cap  # the policy's own cap is the lower one again
        reasons += self._keep_work_off(hot, obs, limits, affinity)
        reasons += self._move_hottest_threads(obs, hot, limits, affinity, caps)
        if cfg.landing_caps:
            reasons += self._landing_caps(obs, limits, affinity, caps)
        self._landing_view = (obs.threads, affinity)
        if not reasons:
            return decision, ()
        action = Action(affinity=affinity, freq_cap_khz=caps)
        return Decision(action, decision.reasons + tuple(reasons), dict(decision.info)), tuple(reasons)

    def _landing_caps(self, obs: Observation, limits: dict[int, tuple[float, float]],
                      affinity: dict[ThreadRef, frozenset[int]], caps: dict[int, int]) -> list[Reason]:
        """Adapt the landing fraction to the last epoch's landings and cap the idle CPUs
        at it (module docstring); lift the landing caps of CPUs no longer idle."""
        cfg = self.config
        if self._landing_view is not None:
            landed = {th.last_cpu for th in obs.threads.values()} - _occupied(*self._landing_view)
            landings = [(st.temp.temp_c, limits[cpu][0] - cfg.margin_c) for cpu, st in obs.cpus.items()
                        if cpu in landed and cpu in limits and st.temp.temp_c is not None]
            # Evidence only: a landing that ran hot halves the fraction, one that stayed
            # clear of the guard band raises it a step; no landing changes nothing (the
            # die's physics do not change between arrivals).
            if any(t >= guard for t, guard in landings):
                self.landing_fraction /= 2.0
            elif landings:
                self.landing_fraction = min(1.0, self.landing_fraction + cfg.release_fraction)
        idle = set(obs.cpus) - _occupied(obs.threads, affinity)
        reasons: list[Reason] = []
        landed: set[int] = set()
        for cpu in sorted(idle | self._landing_capped):
            st = obs.cpus.get(cpu)
            if st is None or st.hw_min_khz is None or st.hw_max_khz is None:
                continue
            lo, hi = self._range(st)
            assert lo is not None and hi is not None
            ceiling = min(self._policy_caps.get(cpu, hi), self._caps_khz.get(cpu, hi), caps.get(cpu, hi))
            if cpu in idle and self.landing_fraction < 1.0:
                landing = max(lo, int(lo + self.landing_fraction * (hi - lo)))
                if landing < ceiling:
                    landed.add(cpu)
                    if st.cap_khz != landing:
                        caps[cpu] = landing
                        reasons.append(Reason(
                            f"cpu {cpu}", "freq_cap", "shield",
                            f"idle: landing cap at {self.landing_fraction:.0%} of the range (threads that "
                            "landed on idle CPUs ran into the guard band)", None, st.temp.temp_c, None,
                            f"cap {landing // 1000} MHz until a thread runs here"))
                    continue
            if cpu in self._landing_capped and cpu not in caps and st.cap_khz != ceiling:
                caps[cpu] = ceiling  # busy again, or the fraction rose past the policy's cap
        self._landing_capped = landed
        return reasons

    def _package(self, cpu: int) -> int:
        return self.topology.cpus[cpu].package_id if cpu in self.topology.cpus else -1

    def _predict(self, cpu: int, time_s: float, temp_c: float) -> float:
        """Temperature expected one epoch ahead if it keeps rising as it did (never lower
        than now: a falling core is judged on where it is)."""
        last = self._last.get(cpu)
        self._last[cpu] = (time_s, temp_c)
        self._prev_temps = None  # _last changed outside filter()
        if last is None or time_s <= last[0]:
            return temp_c
        return temp_c + max(0.0, temp_c - last[1])

    def _keep_work_off(
        self,
        hot: list[int],
        obs: Observation,
        limits: dict[int, tuple[float, float]],
        affinity: dict[ThreadRef, frozenset[int]],
    ) -> list[Reason]:
        """No new work onto a hot CPU: hot CPUs are taken out of every CPU set the policy
        asks for, except a thread's own CPU when it is asked to stay there (that is not
        new work; moving the busiest thread off is :meth:`_move_hottest_threads`' job).
        A set left empty gets the next coolest CPU no other displaced thread got, so
        displaced threads spread out instead of piling onto the single coolest CPU, inside
        the thread's cpuset."""
        if not hot or not affinity:
            return []
        hot_set = set(hot)
        margin = self.config.margin_c
        cool = _coolest_first(obs, limits, margin, hot_set)
        last_cpu = {s.ref: s.last_cpu for s in obs.threads.values()}
        cpuset = {s.ref: s.cpuset for s in obs.threads.values()}
        given: set[int] = set()
        changed = 0
        for ref, cpus in list(affinity.items()):
            if not cpus & hot_set:
                continue
            if cpus == {last_cpu.get(ref)}:
                continue  # staying put on its own CPU
            keep = cpus - hot_set
            if not keep:
                inside = cpuset.get(ref)
                mine = cool if inside is None else [c for c in cool if c in inside]
                free = [c for c in mine if c not in given] or mine
                if not free:
                    continue  # nowhere cooler to go; caps and DTM protect
                keep = frozenset(free[: len(cpus)])
                given.update(keep)
            affinity[ref] = keep
            changed += 1
        if not changed:
            return []
        return [
            Reason(
                f"{changed} thread(s)",
                "placement",
                "shield",
                f"hot CPUs {sorted(hot_set)[:8]}{'...' if len(hot_set) > 8 else ''} removed from the CPU sets asked for",
                None,
                None,
                None,
                "no new work lands on a CPU near its limit",
            )
        ]

    def _range(self, st: CpuState) -> tuple[int | None, int | None]:
        lo, hi = st.hw_min_khz, st.hw_max_khz
        if lo is None or hi is None:
            return None, None
        if self.config.min_freq_khz is not None:
            lo = min(hi, max(lo, self.config.min_freq_khz))
        return lo, hi

    def _move_hottest_threads(
        self,
        obs: Observation,
        hot: list[int],
        limits: dict[int, tuple[float, float]],
        affinity: dict[ThreadRef, frozenset[int]],
        caps: dict[int, int],
    ) -> list[Reason]:
        """Each hot CPU's busiest thread goes to the coolest CPU of its cpuset (idle ones first), and
        takes no faster clock there than the shield leaves on the CPU it leaves (its cut
        cap, else the cap it ran under): a cool idle CPU usually carries a high cap
        (nothing runs there), and the thread that just heated one core would heat the
        next within the epoch at full speed. Measured on the simulated 3D chip, a thread
        moved at the clock it ran under took its destination from ~56 to 80 °C within the
        epoch, and the shield added time above DTM instead of removing it. The policy
        decides the target's cap again next epoch."""
        if not hot or not obs.threads:
            return []
        margin = self.config.margin_c
        by_cpu: dict[int, list[ThreadSample]] = {}
        for th in obs.threads.values():
            if th.last_cpu is not None:
                by_cpu.setdefault(th.last_cpu, []).append(th)
        # Coolest first, and among those the CPUs with no thread on them and none sent
        # there by this decision: a moved thread should not land on someone else's core.
        busy = set(by_cpu) | {next(iter(c)) for c in affinity.values() if len(c) == 1}
        order = _coolest_first(obs, limits, margin, set())
        cool = [(0.0, c) for c in order if c not in busy] + [(0.0, c) for c in order if c in busy]
        if not cool:
            return []
        reasons = []
        used: set[int] = set()
        for cpu in sorted(hot, key=lambda c: -(obs.cpus[c].temp.temp_c or 0.0)):
            threads = by_cpu.get(cpu)
            if not threads:
                continue
            hottest = max(threads, key=lambda th: (th.counters.get("instructions", 0.0), th.counters.get("run_ns", 0.0)))
            inside = hottest.cpuset
            target = next((c for _, c in cool if c not in used and (inside is None or c in inside)), None)
            if target is None:
                continue  # no cool CPU left (inside its cpuset): its CPU's cap protects it
            used.add(target)
            affinity[hottest.ref] = frozenset({target})
            src, dst = obs.cpus[cpu], obs.cpus[target]
            # caps holds this epoch's cut for a hot CPU, so the cut travels with the thread.
            had_khz = caps.get(cpu, src.cap_khz or src.hw_max_khz)
            target_khz = caps.get(target, dst.cap_khz or dst.hw_max_khz)
            if had_khz is not None and target_khz is not None and target_khz > had_khz:
                caps[target] = had_khz
            t = obs.cpus[cpu].temp.temp_c
            reasons.append(
                Reason(
                    f"thread {hottest.ref.tid}",
                    "placement",
                    "shield",
                    f"busiest thread on hot cpu {cpu} moved to the coolest cpu {target}"
                    + (f", capped there at the {had_khz // 1000} MHz it leaves on cpu {cpu}" if caps.get(target) == had_khz
                       and had_khz is not None else ""),
                    None,
                    t,
                    limits[cpu][0] - margin,
                    f"cpu {cpu} loses its busiest thread; cpu {target} is at {obs.cpus[target].temp.temp_c:.1f} C",
                )
            )
        return reasons


def _occupied(threads: Mapping[int, ThreadSample], affinity: Mapping[ThreadRef, frozenset[int]]) -> set[int]:
    """CPUs a managed thread ran on, or was sent to alone."""
    busy = {th.last_cpu for th in threads.values() if th.last_cpu is not None}
    busy.update(next(iter(cpus)) for cpus in affinity.values() if len(cpus) == 1)
    return busy


def _coolest_first(obs: Observation, limits: dict[int, tuple[float, float]], margin_c: float,
                   exclude: set[int]) -> list[int]:
    """CPUs below their guard band, coolest first."""
    return [cpu for _, cpu in sorted(
        (st.temp.temp_c, cpu) for cpu, st in obs.cpus.items()
        if st.temp.temp_c is not None and cpu not in exclude and st.temp.temp_c < limits[cpu][0] - margin_c)]
