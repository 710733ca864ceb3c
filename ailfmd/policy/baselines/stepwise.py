"""``stepwise``: the Linux kernel's step_wise thermal governor, per CPU.

Follows drivers/thermal/gov_step_wise.c (get_target_state) with one thermal zone per
CPU sensor and a cpufreq cooling device per CPU whose state k means "k frequency steps
below the maximum":

- at or above the trip point and the temperature rising: one more step of cooling;
- at or above the trip point and falling: one step less, but never back to no cooling
  (the kernel keeps at least ``lower + 1`` so the temperature keeps dropping);
- below the trip point and falling: one step less, down to no cooling;
- otherwise: hold.

Trend is the sign of the temperature change since the previous epoch (the kernel's
``get_tz_trend``). The trip point is ``trip_c``, or ``max_c - trip_below_max_c`` where the
sensor reports a maximum (hwmon ``tempN_max``, the simulated chip's DTM threshold).
Frequency steps are the driver's table where it has one (acpi-cpufreq, the simulated V/f
table), else ``n_steps`` even steps between the hardware limits (intel_pstate, amd-pstate,
cppc have no table). Placement is left to the scheduler, as the kernel does.
"""

from __future__ import annotations

from ailfmd.platform.base import Action, Capabilities, Observation, Topology
from ailfmd.policy.base import Decision, Reason
from ailfmd.policy.baselines.common import ladders_khz, sensor_label, sensor_max_c, trip_c


class StepwiseBaseline:
    name = "stepwise"

    def __init__(self, trip_c: float = 78.0, trip_below_max_c: float = 3.0, n_steps: int = 10) -> None:
        self.trip_c = trip_c
        self.trip_below_max_c = trip_below_max_c
        self.n_steps = n_steps
        self._state: dict[int, int] = {}  # cpu -> cooling state (0 = no cooling)
        self._last_c: dict[int, float] = {}

    def reset(self, topology: Topology, capabilities: Capabilities) -> None:
        self._state = {c: s for c, s in self._state.items() if c in topology.cpus}
        self._last_c = {c: t for c, t in self._last_c.items() if c in topology.cpus}

    def decide(self, obs: Observation) -> Decision:
        caps: dict[int, int] = {}
        reasons: list[Reason] = []
        maxima = sensor_max_c(obs)
        ladders = ladders_khz(obs, self.n_steps)
        for cpu, st in obs.cpus.items():
            t = st.temp.temp_c
            ladder = ladders.get(cpu)
            if t is None or not ladder:
                continue
            top = len(ladder) - 1
            trip = trip_c(st, maxima, self.trip_c, self.trip_below_max_c)
            last = self._last_c.get(cpu, t)
            self._last_c[cpu] = t
            rising, dropping = t > last, t < last
            cur = self._state.get(cpu, 0)
            new = cur
            if t >= trip:
                if rising:
                    new = min(cur + 1, top)
                elif dropping:
                    new = max(cur - 1, min(1, top))
            elif dropping and cur > 0:
                new = cur - 1
            self._state[cpu] = new
            caps[cpu] = ladder[new]
            if new != cur:
                sensor = sensor_label(st)
                trend = "rising" if rising else "falling" if dropping else "steady"
                reasons.append(
                    Reason(f"cpu {cpu}", "freq_cap", "policy:stepwise",
                           f"{'above' if t >= trip else 'below'} trip, {trend}: cooling state {cur} -> {new}",
                           sensor, t, trip, f"cap {ladder[new] // 1000} MHz")
                )
        return Decision(Action(freq_cap_khz=caps), tuple(reasons))
