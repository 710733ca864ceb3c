"""Building the frozen records of :mod:`ailfmd.platform.base` at half the cost.

A frozen dataclass's ``__init__`` sets every field through ``object.__setattr__``; the
epoch loop builds a record per CPU whose frequency moved, per sensor whose reading moved
and per measured thread, so that cost adds up. The makers here create the instance and
fill its ``__dict__`` in one call instead. They are used only for a class that is still
the plain record they were written for (the same fields, kept in ``__dict__``, nothing
run after ``__init__``); otherwise the class itself is returned, so a change to a record
can never produce incomplete objects.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from ailfmd.platform.base import CpuState, CpuTemp, TempReading, ThreadSample


def is_plain_record(cls: type, fields: tuple[str, ...]) -> bool:
    """Whether ``cls`` is a dataclass with exactly ``fields``, stored in ``__dict__``,
    with no ``__post_init__``."""
    return (
        dataclasses.is_dataclass(cls)
        and tuple(f.name for f in dataclasses.fields(cls)) == fields
        and "__slots__" not in vars(cls)
        and not hasattr(cls, "__post_init__")
    )


_new = object.__new__


def _cpu_state(cpu, temp, freq_khz, cap_khz, hw_min_khz, hw_max_khz, throttle=None):  # type: ignore[no-untyped-def]
    s = _new(CpuState)
    s.__dict__.update(cpu=cpu, temp=temp, freq_khz=freq_khz, cap_khz=cap_khz, hw_min_khz=hw_min_khz,
                      hw_max_khz=hw_max_khz, throttle=throttle)
    return s


def _cpu_temp(cpu, temp_c, source, reason):  # type: ignore[no-untyped-def]
    s = _new(CpuTemp)
    s.__dict__.update(cpu=cpu, temp_c=temp_c, source=source, reason=reason)
    return s


def _temp_reading(sensor, temp_c, error=None, max_c=None, crit_c=None):  # type: ignore[no-untyped-def]
    s = _new(TempReading)
    s.__dict__.update(sensor=sensor, temp_c=temp_c, error=error, max_c=max_c, crit_c=crit_c)
    return s


def _thread_sample(ref, comm, last_cpu, affinity, counters, cpuset=None):  # type: ignore[no-untyped-def]
    s = _new(ThreadSample)
    s.__dict__.update(ref=ref, comm=comm, last_cpu=last_cpu, affinity=affinity, counters=counters, cpuset=cpuset)
    return s


def _pick(cls: type, fields: tuple[str, ...], fast: Callable[..., object]) -> Callable[..., object]:
    return fast if is_plain_record(cls, fields) else cls


# Positional arguments in field order, as the classes' own constructors take them.
make_cpu_state: Callable[..., CpuState] = _pick(  # type: ignore[assignment]
    CpuState, ("cpu", "temp", "freq_khz", "cap_khz", "hw_min_khz", "hw_max_khz", "throttle"), _cpu_state
)
make_cpu_temp: Callable[..., CpuTemp] = _pick(  # type: ignore[assignment]
    CpuTemp, ("cpu", "temp_c", "source", "reason"), _cpu_temp
)
make_temp_reading: Callable[..., TempReading] = _pick(  # type: ignore[assignment]
    TempReading, ("sensor", "temp_c", "error", "max_c", "crit_c"), _temp_reading
)
make_thread_sample: Callable[..., ThreadSample] = _pick(  # type: ignore[assignment]
    ThreadSample, ("ref", "comm", "last_cpu", "affinity", "counters", "cpuset"), _thread_sample
)
