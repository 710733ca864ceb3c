"""The record makers build exactly what the records' own constructors build."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from ailfmd.platform.base import CpuState, CpuTemp, TempReading, TempSensor, ThreadRef, ThreadSample, ThrottleCounts
from ailfmd.platform.linux import records

SENSOR = TempSensor("coretemp", "platform_coretemp_0", "temp2", "Core 0", "core", "class/hwmon/hwmon2/temp2_input")
TEMP = CpuTemp(0, 55.0, SENSOR, "per-core coretemp")

CASES = [
    (records.make_cpu_state, CpuState, (0, TEMP, 2_400_000, 3_000_000, 800_000, 3_500_000, ThrottleCounts(0, 1, 2))),
    (records.make_cpu_state, CpuState, (0, TEMP, None, None, None, None)),  # the default throttle
    (records.make_cpu_temp, CpuTemp, (3, None, None, "no sensor")),
    (records.make_temp_reading, TempReading, (SENSOR, 55.0, None, 90.0, 100.0)),
    (records.make_temp_reading, TempReading, (SENSOR, None, "read failed: EIO")),
    (records.make_thread_sample, ThreadSample, (ThreadRef(1, 2, 3), "worker", 5, frozenset({1, 5}), {"run_ns": 1.0})),
]


@pytest.mark.parametrize("make, cls, args", CASES)
def test_a_maker_builds_what_the_constructor_builds(make, cls, args) -> None:  # type: ignore[no-untyped-def]
    fast, slow = make(*args), cls(*args)
    assert type(fast) is cls and fast == slow and repr(fast) == repr(slow) and vars(fast) == vars(slow)
    assert make is not cls  # the shortcut is in use for today's records
    with pytest.raises(AttributeError):
        fast.cpu = 1  # still frozen


def test_a_record_that_is_no_longer_plain_gets_its_own_constructor() -> None:
    @dataclass(frozen=True)
    class Grown:
        cpu: int
        extra: int = 0

    @dataclass(frozen=True)
    class Checked:
        cpu: int
        seen: list[int] = field(default_factory=list)

        def __post_init__(self) -> None:
            self.seen.append(self.cpu)

    @dataclass(frozen=True, slots=True)
    class Slotted:
        cpu: int

    assert records.is_plain_record(Grown, ("cpu", "extra"))
    assert not records.is_plain_record(Grown, ("cpu",))  # a field was added
    assert not records.is_plain_record(Checked, ("cpu", "seen"))
    assert not records.is_plain_record(Slotted, ("cpu",))
    assert records._pick(Grown, ("cpu",), lambda *a: None) is Grown
