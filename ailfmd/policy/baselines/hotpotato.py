"""``hotpotato``: periodic rotation of threads from hot cores to cool ones.

A HotPotato-style scheduler: instead of slowing a hot core down, move its work away
before it gets too hot and let the core cool while another one heats up (the idea of
spatio-temporal power multiplexing, Cho et al., "Power Multiplexing for Thermal Field
Management in Many-Core Processors", IEEE TCPMT 3(1), 2013). Frequency is not touched:
caps stay at the hardware maximum and hardware DTM remains the last resort. The rule:

- **Arrival**: a thread not yet pinned goes to the least-loaded CPU, coolest first
  (ties: CPU id).
- **Rotation**, every ``period_s`` of platform time (not between): take the CPUs that
  hold threads, hottest first, and all CPUs, coolest first. For each of up to
  ``max_moves`` pairs (hot h, cool c) with ``T(h) - T(c) >= min_delta_c``, the busiest
  thread on h (most CPU time over the last interval) moves to c; if c held threads, the
  busiest of them moves to h in exchange, so loads stay balanced. Each CPU takes part in
  at most one exchange per rotation.
- CPUs without a temperature reading take no part in rotation.
"""

from __future__ import annotations

from ailfmd.platform.base import Action, Capabilities, Observation, ThreadSample, Topology
from ailfmd.policy.base import Decision
from ailfmd.policy.baselines.common import cap_changes, ladders_khz, least_loaded, pin_changes

SOURCE = "policy:hotpotato"


def busy_ns(sample: ThreadSample) -> float:
    """CPU time of the thread over the last interval (task clock, else schedstat run time)."""
    c = sample.counters
    for name in ("task_clock_ns", "run_ns", "cycles", "instructions"):
        if c.get(name) is not None:
            return float(c[name])
    return 0.0


class HotPotatoBaseline:
    name = "hotpotato"

    def __init__(self, period_s: float = 0.5, max_moves: int = 1, min_delta_c: float = 2.0) -> None:
        self.period_s = period_s
        self.max_moves = max_moves
        self.min_delta_c = min_delta_c
        self._placed: dict[int, int] = {}  # tid -> cpu
        self._last_rotation_s: float | None = None

    def reset(self, topology: Topology, capabilities: Capabilities) -> None:
        self._placed = {t: c for t, c in self._placed.items() if c in topology.cpus}

    def decide(self, obs: Observation) -> Decision:
        temps = {c: st.temp.temp_c for c, st in obs.cpus.items() if st.temp.temp_c is not None}
        placed = {t: c for t, c in self._placed.items() if t in obs.threads and c in obs.cpus}
        why: dict[int, str] = {}
        load = {c: 0 for c in obs.cpus}
        for c in placed.values():
            load[c] += 1
        # Coolest first; a CPU without a reading counts as neither hot nor cool (last).
        by_cool = sorted(obs.cpus, key=lambda c: (c not in temps, temps.get(c, 0.0), c))
        for tid in sorted(t for t in obs.threads if t not in placed and load):
            cpu = least_loaded(by_cool, load, obs.threads[tid].cpuset)
            placed[tid], load[cpu] = cpu, load[cpu] + 1
            why[tid] = f"new thread: coolest least-loaded cpu {cpu}"

        if self._last_rotation_s is None:
            self._last_rotation_s = obs.time_s
        elif obs.time_s - self._last_rotation_s >= self.period_s - 1e-9:
            self._last_rotation_s = obs.time_s
            self._rotate(obs, temps, placed, why)

        self._placed = placed
        affinity, reasons = pin_changes(
            obs, {t: placed[t] for t in why}, SOURCE, lambda s, cpu: why[s.ref.tid])
        # Frequency stays the hardware's business: put back any lowered cap.
        caps = {c: lad[0] for c, lad in ladders_khz(obs).items()}
        cap_actions, cap_reasons = cap_changes(
            obs, caps, SOURCE, lambda c, khz: "caps stay at the maximum; rotation cools")
        return Decision(Action(affinity=affinity, freq_cap_khz=cap_actions),
                        tuple(reasons + cap_reasons))

    def _rotate(self, obs: Observation, temps: dict[int, float], placed: dict[int, int],
                why: dict[int, str]) -> None:
        on_cpu: dict[int, list[int]] = {}
        for tid, cpu in placed.items():
            on_cpu.setdefault(cpu, []).append(tid)

        def busiest(cpu: int) -> int:
            return max(on_cpu[cpu], key=lambda t: (busy_ns(obs.threads[t]), -t))

        hot = sorted((c for c in on_cpu if c in temps), key=lambda c: (-temps[c], c))
        cool = sorted(temps, key=lambda c: (temps[c], c))
        used: set[int] = set()
        moves = 0
        for h in hot:
            if moves >= self.max_moves:
                break
            if h in used:
                continue
            out = busiest(h)
            inside = obs.threads[out].cpuset
            c = next((c for c in cool if c not in used and c != h and (inside is None or c in inside)), None)
            if c is None or temps[h] - temps[c] < self.min_delta_c:
                break
            used.update((h, c))
            moves += 1
            placed[out] = c
            why[out] = (f"rotation: hottest busy cpu {h} ({temps[h]:.1f} C) -> "
                        f"coolest cpu {c} ({temps[c]:.1f} C)")
            if on_cpu.get(c):
                back = busiest(c)
                back_set = obs.threads[back].cpuset
                if back_set is None or h in back_set:  # else it stays and shares cpu c
                    placed[back] = h
                    why[back] = f"rotation: exchanged from cpu {c} to cpu {h}"
