"""Each CPU's thermal limits: the configured ones, lowered to what its sensor reports.

One rule for everyone who reads temperatures against a limit: the safety shield (its
guard band and critical temperature) and the learned policy (its features and its guard),
so that they never disagree about where a CPU's limit is.
"""

from __future__ import annotations

from ailfmd.platform.base import Observation


def cpu_limits_c(obs: Observation, limit_c: float, critical_c: float, *,
                 follow_sensors: bool = True) -> dict[int, tuple[float, float]]:
    """Per CPU of ``obs``, (limit, critical) in °C: ``limit_c`` and ``critical_c``, each
    lowered to the maximum / critical temperature the CPU's sensor reports (hwmon
    ``tempN_max``/``_crit``, the simulated chip's DTM threshold) unless
    ``follow_sensors`` is off. Critical stays above the limit. ``limit_c`` may be
    infinite: the sensor's own maximum then, and infinity for a CPU whose sensor reports
    none (the caller's default applies)."""
    hw = {(r.sensor.chip, r.sensor.sensor): (r.max_c, r.crit_c) for r in obs.sensors} if follow_sensors else {}
    configured = (limit_c, max(critical_c, limit_c + 0.1))
    out: dict[int, tuple[float, float]] = {}
    by_source: dict[int, tuple[float, float]] = {}  # id(sensor) -> limits: CPUs share sensors
    for cpu, st in obs.cpus.items():
        src = st.temp.source
        if src is None or not hw:
            out[cpu] = configured
            continue
        pair = by_source.get(id(src))
        if pair is None:
            max_c, crit_c = hw.get((src.chip, src.sensor), (None, None))
            if max_c is None and crit_c is None:
                pair = configured
            else:
                limit = limit_c if max_c is None else min(limit_c, max_c)
                crit = critical_c if crit_c is None else min(critical_c, crit_c)
                pair = (limit, max(crit, limit + 0.1))
            by_source[id(src)] = pair
        out[cpu] = pair
    return out
