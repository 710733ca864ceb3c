"""The safety shield: whatever the policy said, no core is left running hot.

It sits after the policy and before the platform. Per CPU with a temperature reading:

- ``temp >= limit - margin`` (the guard band): the CPU's cap is cut by ``cut_fraction``
  of the hardware range per epoch, down to the hardware minimum, and the hottest managed
  thread on it (most instructions, else most run time, last epoch) is moved to the
  coolest CPU outside the guard band;
- ``temp >= critical``: every CPU of its package goes to the hardware minimum at once;
- below ``limit - 2 * margin`` a shield cap is released by ``release_fraction`` of the
  range per epoch (slowly: thermal time constants are seconds, and releasing at once
  would oscillate); in between it holds.

The shield's caps are a ceiling on the policy's: the lower of the two is applied. CPUs
without a temperature reading are left to the policy (the shield cannot see them) and
the record says so. It never raises a cap above what the policy asked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ailfmd.platform.base import Action, CpuState, Observation, ThreadRef, ThreadSample, Topology
from ailfmd.policy.base import Decision, Reason


@dataclass(frozen=True)
class ShieldConfig:
    limit_c: float = 85.0
    margin_c: float = 3.0
    critical_c: float = 95.0
    cut_fraction: float = 0.25  # of the hardware range, per epoch in the guard band
    release_fraction: float = 0.05  # of the hardware range, per epoch when cool
    min_freq_khz: int | None = None  # floor for shield caps (never below hardware min)

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

    def reset(self, topology: Topology) -> None:
        self.topology = topology
        self._caps_khz = {c: v for c, v in self._caps_khz.items() if c in topology.cpus}

    @property
    def active_caps_khz(self) -> dict[int, int]:
        return dict(self._caps_khz)

    def filter(self, obs: Observation, decision: Decision) -> tuple[Decision, tuple[Reason, ...]]:
        """The decision to apply and the shield's own reasons (empty when it did nothing)."""
        cfg = self.config
        guard_c = cfg.limit_c - cfg.margin_c
        release_c = cfg.limit_c - 2 * cfg.margin_c
        caps = dict(decision.action.freq_cap_khz)
        affinity = dict(decision.action.affinity)
        reasons: list[Reason] = []
        hot: list[int] = []
        critical_pkgs: set[int] = set()
        for cpu, st in obs.cpus.items():
            t = st.temp.temp_c
            if t is None:
                continue
            if t >= cfg.critical_c:
                critical_pkgs.add(self.topology.cpus[cpu].package_id if cpu in self.topology.cpus else -1)
            if t >= guard_c:
                hot.append(cpu)
        for cpu, st in obs.cpus.items():
            lo, hi = self._range(st)
            if lo is None or hi is None:
                continue
            t = st.temp.temp_c
            pkg = self.topology.cpus[cpu].package_id if cpu in self.topology.cpus else -1
            sensor = f"{st.temp.source.chip}/{st.temp.source.sensor}" if st.temp.source else None
            prev = self._caps_khz.get(cpu)
            if pkg in critical_pkgs:
                new = lo
                why, thr = "package at or above the critical temperature: hardware minimum", cfg.critical_c
            elif t is not None and t >= guard_c:
                base = prev if prev is not None else (st.cap_khz or hi)
                new = max(lo, int(base - cfg.cut_fraction * (hi - lo)))
                why, thr = f"within {cfg.margin_c:g} C of the {cfg.limit_c:g} C limit: cap cut", guard_c
            elif prev is not None and t is not None and t < release_c:
                new = int(prev + cfg.release_fraction * (hi - lo))
                if new >= hi:
                    del self._caps_khz[cpu]
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
            asked = caps.get(cpu)
            if asked is None or asked > new:
                caps[cpu] = new
                reasons.append(Reason(f"cpu {cpu}", "freq_cap", "shield", why, sensor, t, thr,
                                      f"cap {new // 1000} MHz (policy asked {asked // 1000 if asked else 'none'})"))
        reasons += self._move_hottest_threads(obs, hot, guard_c, affinity)
        if not reasons:
            return decision, ()
        action = Action(affinity=affinity, freq_cap_khz=caps)
        return Decision(action, decision.reasons + tuple(reasons), dict(decision.info)), tuple(reasons)

    def _range(self, st: CpuState) -> tuple[int | None, int | None]:
        lo, hi = st.hw_min_khz, st.hw_max_khz
        if lo is None or hi is None:
            return None, None
        if self.config.min_freq_khz is not None:
            lo = min(hi, max(lo, self.config.min_freq_khz))
        return lo, hi

    def _move_hottest_threads(
        self, obs: Observation, hot: list[int], guard_c: float, affinity: dict[ThreadRef, frozenset[int]]
    ) -> list[Reason]:
        if not hot or not obs.threads:
            return []
        cool = sorted(
            (st.temp.temp_c, cpu) for cpu, st in obs.cpus.items() if st.temp.temp_c is not None and st.temp.temp_c < guard_c
        )
        if not cool:
            return []
        by_cpu: dict[int, list[ThreadSample]] = {}
        for th in obs.threads.values():
            if th.last_cpu is not None:
                by_cpu.setdefault(th.last_cpu, []).append(th)
        reasons = []
        used: set[int] = set()
        for cpu in sorted(hot, key=lambda c: -(obs.cpus[c].temp.temp_c or 0.0)):
            threads = by_cpu.get(cpu)
            if not threads:
                continue
            hottest = max(threads, key=lambda th: (th.counters.get("instructions", 0.0), th.counters.get("run_ns", 0.0)))
            target = next((c for _, c in cool if c not in used), None)
            if target is None:
                break
            used.add(target)
            affinity[hottest.ref] = frozenset({target})
            t = obs.cpus[cpu].temp.temp_c
            reasons.append(
                Reason(
                    f"thread {hottest.ref.tid}",
                    "placement",
                    "shield",
                    f"busiest thread on hot cpu {cpu} moved to the coolest cpu {target}",
                    None,
                    t,
                    guard_c,
                    f"cpu {cpu} loses its busiest thread; cpu {target} is at {obs.cpus[target].temp.temp_c:.1f} C",
                )
            )
        return reasons
