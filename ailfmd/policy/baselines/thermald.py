"""``thermald``: Intel's thermal daemon capping frequency at a trip temperature.

Follows intel/thermal_daemon (``src/thd_cdev.cpp``, the cooling-device control of a
passive trip point) with one zone per CPU sensor, or per package with
``per_package=True``, and a cpufreq cooling device whose state k means "k steps down the
CPU's frequency ladder" (state 0 = the hardware maximum):

- at or above the trip: *activate*. The first activation after a release goes one step
  (``inc_dec_val`` = 1) above the current state; every further activation doubles the
  distance from that base state (base + 2, base + 4, base + 8, ...: thermald's
  ``curr_pow`` exponential increment), clamped to the bottom of the ladder;
- below ``trip - hysteresis_c``: *deactivate*, one step less at a time, down to 0;
  the exponential run starts over;
- in between: hold;
- debounce: an action in the same direction as the previous one waits ``debounce_s``
  since that action (thermald ignores a repeated activation inside its 3 s debounce
  interval and polls every 4 s, so its releases are spaced too; we decide every epoch,
  so the debounce spaces both).

With ``pid=(kp, ki, kd)`` the state is instead thermald's PID output on the error
``temp - (trip - pid_target_below_trip_c)`` (integral over seconds, derivative per
second), rounded and clamped to the ladder, while the zone is active; the integral
restarts each time the zone leaves its minimum state.

The trip point is ``trip_c``, or ``max_c - trip_below_max_c`` where the sensor reports a
maximum (hwmon ``tempN_max``, the simulated DTM threshold). Placement is left to the
scheduler, as thermald does.
"""

from __future__ import annotations

from dataclasses import dataclass

from ailfmd.platform.base import Action, Capabilities, Observation, Topology
from ailfmd.policy.base import Decision, Reason
from ailfmd.policy.baselines.common import ladders_khz, sensor_label, sensor_max_c, trip_c

SOURCE = "policy:thermald"


@dataclass
class _Zone:
    """Cooling state of one zone (a CPU, or a package)."""

    state: int = 0
    base_state: int = 0
    power: int = 0  # consecutive activations beyond the first (thermald's curr_pow)
    last_dir: int = 0  # +1 activation, -1 release, 0 none yet
    last_action_s: float | None = None
    integral: float = 0.0
    last_err: float | None = None
    last_s: float | None = None


class ThermaldBaseline:
    name = "thermald"

    def __init__(self, trip_c: float = 78.0, trip_below_max_c: float = 3.0,
                 hysteresis_c: float = 1.0, debounce_s: float = 0.3,
                 pid: tuple[float, float, float] | None = None,
                 pid_target_below_trip_c: float = 0.0, per_package: bool = False,
                 n_steps: int = 10) -> None:
        self.trip_c = trip_c
        self.trip_below_max_c = trip_below_max_c
        self.hysteresis_c = hysteresis_c
        self.debounce_s = debounce_s
        self.pid = pid
        self.pid_target_below_trip_c = pid_target_below_trip_c
        self.per_package = per_package
        self.n_steps = n_steps
        self._zones: dict[int, _Zone] = {}
        self._zone_cpus: dict[int, tuple[int, ...]] | None = None  # zone id -> CPUs

    def reset(self, topology: Topology, capabilities: Capabilities) -> None:
        if self.per_package:
            self._zone_cpus = topology.packages()
        else:
            self._zone_cpus = {c: (c,) for c in topology.online_cpus}
        self._zones = {z: st for z, st in self._zones.items() if z in self._zone_cpus}

    def _zones_of(self, obs: Observation) -> dict[int, tuple[int, ...]]:
        if self._zone_cpus is None:  # decide() before reset(): one zone per CPU seen
            return {c: (c,) for c in sorted(obs.cpus)}
        return self._zone_cpus

    def decide(self, obs: Observation) -> Decision:
        ladders = ladders_khz(obs, self.n_steps)
        maxima = sensor_max_c(obs)
        caps: dict[int, int] = {}
        reasons: list[Reason] = []
        zones = self._zones_of(obs)
        zone_of = {c: z for z, members in zones.items() for c in members}
        for zone_id, members in zones.items():
            # The zone's reading is its hottest CPU with a reading and a ladder.
            cpus = [c for c in members if c in obs.cpus and c in ladders]
            readings = [(obs.cpus[c].temp.temp_c, c) for c in cpus
                        if obs.cpus[c].temp.temp_c is not None]
            if not readings:
                continue
            temp, hottest = max(readings)
            st = obs.cpus[hottest]
            trip = trip_c(st, maxima, self.trip_c, self.trip_below_max_c)
            top = min(len(ladders[c]) for c in cpus) - 1
            zone = self._zones.setdefault(zone_id, _Zone())
            before = zone.state
            detail = self._step(zone, temp, trip, top, obs.time_s)
            for c in cpus:
                caps[c] = ladders[c][zone.state]
            if zone.state != before:
                target = f"package {zone_id}" if self.per_package else f"cpu {zone_id}"
                reasons.append(Reason(
                    target, "freq_cap", SOURCE,
                    f"{detail}: cooling state {before} -> {zone.state}",
                    sensor_label(st), temp, trip,
                    f"cap {ladders[hottest][zone.state] // 1000} MHz"
                    + (f" on cpus {','.join(map(str, cpus))}" if len(cpus) > 1 else "")))
        changed = {c: k for c, k in caps.items() if obs.cpus[c].cap_khz != k}
        explained = {r.target for r in reasons}
        for c, khz in sorted(changed.items()):
            zone_id = zone_of[c]
            target = f"package {zone_id}" if self.per_package else f"cpu {zone_id}"
            if target not in explained:
                # Something else moved the cap: put back what the cooling state says.
                reasons.append(Reason(f"cpu {c}", "freq_cap", SOURCE,
                                      f"cap back to cooling state {self._zones[zone_id].state}",
                                      sensor_label(obs.cpus[c]), obs.cpus[c].temp.temp_c, None,
                                      f"cap {khz // 1000} MHz"))
        caps = changed
        return Decision(Action(freq_cap_khz=caps), tuple(reasons))

    def _debounced(self, zone: _Zone, direction: int, now_s: float) -> bool:
        return (zone.last_dir == direction and zone.last_action_s is not None
                and now_s - zone.last_action_s < self.debounce_s)

    def _step(self, zone: _Zone, temp: float, trip: float, top: int, now_s: float) -> str:
        """Move ``zone`` one control step; returns why, in words."""
        zone.state = min(zone.state, top)
        if self.pid is not None:
            return self._pid_step(zone, temp, trip, top, now_s)
        if temp >= trip:
            if zone.state >= top or self._debounced(zone, +1, now_s):
                return "above trip, holding"
            if zone.last_dir == +1:
                zone.power += 1
                zone.state = min(zone.base_state + 2 ** zone.power, top)
                how = f"above trip again: base {zone.base_state} + 2^{zone.power}"
            else:
                zone.power = 0
                zone.state = min(zone.state + 1, top)
                zone.base_state = zone.state
                how = "crossed trip: one step"
            zone.last_dir, zone.last_action_s = +1, now_s
            return how
        if temp < trip - self.hysteresis_c and zone.state > 0:
            if self._debounced(zone, -1, now_s):
                return "below trip, waiting for debounce"
            zone.state -= 1
            zone.power = 0
            zone.last_dir, zone.last_action_s = -1, now_s
            return f"below trip - {self.hysteresis_c:g} C: release one step"
        return "holding"

    def _pid_step(self, zone: _Zone, temp: float, trip: float, top: int, now_s: float) -> str:
        kp, ki, kd = self.pid  # type: ignore[misc]
        if temp < trip and zone.state == 0:
            return "below trip"
        err = temp - (trip - self.pid_target_below_trip_c)
        dt = 0.0 if zone.last_s is None else now_s - zone.last_s
        zone.integral += err * dt
        deriv = (err - zone.last_err) / dt if zone.last_err is not None and dt > 0 else 0.0
        zone.last_err, zone.last_s = err, now_s
        zone.state = max(0, min(top, round(kp * err + ki * zone.integral + kd * deriv)))
        if temp < trip - self.hysteresis_c:
            # Deactivation: thermald applies the output once more, then resets the PID.
            zone.integral, zone.last_err, zone.last_s = 0.0, None, None
        return f"PID on error {err:+.1f} C"
