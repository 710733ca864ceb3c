"""Small helpers the baselines share: frequency ladders, trip points, actuation records.

Every helper reads an :class:`Observation` only; none keeps state. Actuations are turned
into an :class:`Action` plus one :class:`Reason` each, and only where something changes,
so that a decision lists exactly what it asks the platform to do.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

from ailfmd.platform.base import CpuState, Observation, ThreadRef, ThreadSample
from ailfmd.policy.base import Reason

DEFAULT_LADDER_STEPS = 10


def ladders_khz(obs: Observation, n_steps: int = DEFAULT_LADDER_STEPS) -> dict[int, list[int]]:
    """Each CPU's frequency ladder from the top down, in kHz.

    The driver's table where it has one (acpi-cpufreq, the simulated V/f table), else
    ``n_steps`` even steps between the hardware limits (intel_pstate, amd-pstate and cppc
    have no table). A CPU without known limits has no ladder and is left alone.
    """
    # CPUs share a handful of distinct tables: sort each once (this runs every epoch).
    # The lists are shared between CPUs; callers read them, never change them.
    sorted_tables: dict[tuple[int, ...], list[int]] = {}
    tables: dict[int, list[int]] = {}
    for p in obs.policies:
        if p.available_khz:
            table = sorted_tables.get(p.available_khz)
            if table is None:
                table = sorted_tables[p.available_khz] = sorted(set(p.available_khz), reverse=True)
            for c in p.cpus:
                tables[c] = table
    even: dict[tuple[int, int], list[int]] = {}
    out: dict[int, list[int]] = {}
    for cpu, st in obs.cpus.items():
        if cpu in tables:
            out[cpu] = tables[cpu]
        elif st.hw_min_khz is not None and st.hw_max_khz is not None:
            lo, hi = st.hw_min_khz, st.hw_max_khz
            steps = even.get((lo, hi))
            if steps is None:
                steps = even[(lo, hi)] = sorted({int(hi - (hi - lo) * k / n_steps) for k in range(n_steps + 1)},
                                                reverse=True)
            out[cpu] = steps
    return out


def level_at_or_below(ladder: list[int], khz: float) -> int:
    """The highest ladder entry not above ``khz`` (the lowest entry when none is)."""
    fitting = [f for f in ladder if f <= khz]
    return max(fitting) if fitting else min(ladder)


def sensor_max_c(obs: Observation) -> dict[tuple[str, str], float]:
    """Sensor (chip, name) -> its reported maximum (hwmon ``tempN_max``, simulated DTM)."""
    return {(r.sensor.chip, r.sensor.sensor): r.max_c for r in obs.sensors if r.max_c is not None}


def trip_c(st: CpuState, maxima: Mapping[tuple[str, str], float], fixed_c: float,
           below_max_c: float) -> float:
    """``max_c - below_max_c`` where the CPU's sensor reports a maximum, else ``fixed_c``."""
    src = st.temp.source
    sensor_max = maxima.get((src.chip, src.sensor)) if src is not None else None
    return fixed_c if sensor_max is None else sensor_max - below_max_c


def sensor_label(st: CpuState) -> str | None:
    src = st.temp.source
    return f"{src.chip}/{src.sensor}" if src is not None else None


def cap_changes(obs: Observation, caps_khz: Mapping[int, int], source: str,
                detail: Callable[[int, int], str]) -> tuple[dict[int, int], list[Reason]]:
    """The caps that differ from what is in effect, each with a Reason."""
    out: dict[int, int] = {}
    reasons: list[Reason] = []
    for cpu, khz in sorted(caps_khz.items()):
        st = obs.cpus.get(cpu)
        if st is None or st.cap_khz == khz:
            continue
        out[cpu] = khz
        reasons.append(Reason(f"cpu {cpu}", "freq_cap", source, detail(cpu, khz),
                              sensor_label(st), st.temp.temp_c, None,
                              f"cap {khz // 1000} MHz"))
    return out, reasons


def pin_changes(obs: Observation, placement: Mapping[int, int], source: str,
                detail: Callable[[ThreadSample, int], str]
                ) -> tuple[dict[ThreadRef, frozenset[int]], list[Reason]]:
    """Pin each thread (by tid) to one CPU where its affinity is not that already."""
    out: dict[ThreadRef, frozenset[int]] = {}
    reasons: list[Reason] = []
    for tid, cpu in sorted(placement.items()):
        sample = obs.threads.get(tid)
        want = frozenset((cpu,))
        if sample is None or sample.affinity == want:
            continue
        out[sample.ref] = want
        reasons.append(Reason(f"thread {tid}", "placement", source, detail(sample, cpu),
                              predicted=f"runs on cpu {cpu}"))
    return out, reasons


def least_loaded(order: Sequence[int], load: Mapping[int, int], cpuset: frozenset[int] | None) -> int:
    """The first CPU of ``order`` with the fewest threads (``load``) among those the
    thread's ``cpuset`` holds; among all of ``order`` when it holds none of them or is
    None (unknown: unrestricted). ``order`` must not be empty."""
    allowed = ([c for c in order if c in cpuset] if cpuset is not None else None) or order
    least = min(load.get(c, 0) for c in allowed)
    return next(c for c in allowed if load.get(c, 0) == least)


def mpki(sample: ThreadSample) -> float | None:
    """LLC misses per kilo-instruction over the last interval, None when not measured."""
    c = sample.counters
    instructions, misses = c.get("instructions"), c.get("llc_misses")
    if instructions is None or misses is None or instructions <= 0:
        return None
    return 1000.0 * misses / instructions


def ipc(sample: ThreadSample) -> float | None:
    """Instructions per cycle over the last interval, None when not measured."""
    c = sample.counters
    instructions, cycles = c.get("instructions"), c.get("cycles")
    if instructions is None or cycles is None or cycles <= 0 or instructions <= 0:
        return None
    return instructions / cycles
