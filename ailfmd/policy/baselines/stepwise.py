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

from operator import attrgetter

from ailfmd.platform.base import Action, Capabilities, Observation, Topology
from ailfmd.policy.base import Decision, Reason
from ailfmd.policy.baselines.common import ladders_khz, sensor_label, sensor_max_c, trip_c

# What a CPU's ladder and trip point are made of, read in C for every CPU each epoch.
_cpu_inputs = attrgetter("temp.source", "hw_min_khz", "hw_max_khz")
_policy_inputs = attrgetter("cpus", "available_khz")
_sensor_inputs = attrgetter("sensor", "max_c")
_temp_of = attrgetter("temp.temp_c")


class StepwiseBaseline:
    name = "stepwise"

    def __init__(self, trip_c: float = 78.0, trip_below_max_c: float = 3.0, n_steps: int = 10) -> None:
        self.trip_c = trip_c
        self.trip_below_max_c = trip_below_max_c
        self.n_steps = n_steps
        self._state: dict[int, int] = {}  # cpu -> cooling state (0 = no cooling)
        self._last_c: dict[int, float] = {}  # cpu -> temperature at the last decision
        # (inputs, per-CPU parameters) of the last decision; see _cpu_params().
        self._params: tuple[object, list[tuple[int, list[int] | None, float]]] | None = None
        # The temperatures (in obs.cpus order) and caps of the last full decision.
        self._last_temps: list[float | None] | None = None
        self._last_caps: dict[int, int] = {}
        # The CPUs, records and settings of the last decision; see decide().
        self._last_quick: tuple[object, ...] | None = None
        # Derived from the per-CPU parameters for the cool-machine case of decide().
        self._min_trip_c: float | None = None
        self._tops: dict[int, int] | None = None

    def reset(self, topology: Topology, capabilities: Capabilities) -> None:
        self._state = {c: s for c, s in self._state.items() if c in topology.cpus}
        self._last_c = {c: t for c, t in self._last_c.items() if c in topology.cpus}
        self._params = None  # the state changed outside decide(): nothing below is reused
        self._last_temps = None
        self._last_quick = None

    def _cpu_params(self, obs: Observation) -> list[tuple[int, list[int] | None, float]]:
        """Per CPU, in ``obs.cpus`` order: (cpu, ladder or None, trip point).

        These depend only on which CPUs there are, their sensors and hardware limits,
        the frequency tables and the sensors' maxima, which change rarely: they are kept
        with those inputs (compared by value, in C) and rebuilt only when they differ.
        """
        cpus = obs.cpus
        key = (
            list(cpus),
            list(map(_cpu_inputs, cpus.values())),
            list(map(_policy_inputs, obs.policies)),
            list(map(_sensor_inputs, obs.sensors)),
            (self.trip_c, self.trip_below_max_c, self.n_steps),
        )
        if self._params is not None and self._params[0] == key:
            return self._params[1]
        maxima = sensor_max_c(obs)
        ladders = ladders_khz(obs, self.n_steps)
        params = [(cpu, ladders.get(cpu) or None, trip_c(st, maxima, self.trip_c, self.trip_below_max_c))
                  for cpu, st in cpus.items()]
        self._params = (key, params)
        self._last_temps = None
        # For the cool machine (see decide()): the lowest trip point, and the uncapped
        # top of every ladder when every CPU has one.
        self._min_trip_c = min((trip for _, _, trip in params), default=None)
        tops = {cpu: ladder[0] for cpu, ladder, _ in params if ladder}
        self._tops = tops if len(tops) == len(params) else None
        return params

    def decide(self, obs: Observation) -> Decision:
        states = list(obs.cpus.values())
        # The same records as the last decision (compared in C, the same objects at
        # once): the same temperatures and inputs, so the same caps (see below).
        quick = (list(obs.cpus), states, obs.policies, obs.sensors, self.trip_c, self.trip_below_max_c, self.n_steps)
        if quick == self._last_quick:
            return Decision(Action(freq_cap_khz=dict(self._last_caps)))
        self._last_quick = None
        params = self._cpu_params(obs)
        temps = list(map(_temp_of, states))
        if temps == self._last_temps:
            # The same temperatures as the last decision with the same inputs: every
            # trend is steady, so every cooling state holds and the caps are the same.
            self._last_quick = quick
            return Decision(Action(freq_cap_khz=dict(self._last_caps)))
        state, last_c = self._state, self._last_c
        tops, min_trip = self._tops, self._min_trip_c
        if (tops is not None and min_trip is not None and None not in temps and max(temps) < min_trip
                and not any(state.values())):
            # A cool machine: no CPU is cooled and every one is below its trip point, so
            # every state stays 0 whatever the trend and every cap is the ladder's top;
            # only the temperatures are remembered. (max() gives NaN or the largest of
            # the other readings; a NaN reading holds its state, a NaN maximum fails.)
            last_c.update(zip(obs.cpus, temps))
            state.update(dict.fromkeys(obs.cpus, 0))
            self._last_temps, self._last_caps, self._last_quick = temps, tops, quick
            return Decision(Action(freq_cap_khz=dict(tops)))
        caps: dict[int, int] = {}
        reasons: list[Reason] = []
        for (cpu, ladder, trip), t in zip(params, temps):
            if t is None or ladder is None:
                continue
            top = len(ladder) - 1
            last = last_c.get(cpu, t)
            last_c[cpu] = t
            rising, dropping = t > last, t < last
            # A table that got shorter (a driver reload, a new cpufreq limit) cannot hold a
            # deeper cooling state: it is clamped to the deepest step, as the kernel does.
            cur = min(state.get(cpu, 0), top)
            new = cur
            if t >= trip:
                if rising:
                    new = min(cur + 1, top)
                elif dropping:
                    new = max(cur - 1, min(1, top))
            elif dropping and cur > 0:
                new = cur - 1
            state[cpu] = new
            caps[cpu] = ladder[new]
            if new != cur:
                sensor = sensor_label(obs.cpus[cpu])
                trend = "rising" if rising else "falling" if dropping else "steady"
                reasons.append(
                    Reason(f"cpu {cpu}", "freq_cap", "policy:stepwise",
                           f"{'above' if t >= trip else 'below'} trip, {trend}: cooling state {cur} -> {new}",
                           sensor, t, trip, f"cap {ladder[new] // 1000} MHz")
                )
        self._last_temps, self._last_caps, self._last_quick = temps, caps, quick
        return Decision(Action(freq_cap_khz=dict(caps)), tuple(reasons))
