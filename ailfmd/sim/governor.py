"""The simulated cpufreq governor under the user's cap, and hardware DTM below it.

Three layers decide a core's V/f level, as on a real machine:

1. the **cap** a user-space daemon writes (``scaling_max_freq`` in kHz), mapped onto the
   chip's V/f table like cpufreq does: the highest table level at or below the cap; a cap
   below the lowest level means the lowest level;
2. the **governor** under that cap, schedutil/ondemand-like: a busy core runs at the
   highest level the cap allows, an idle core at the lowest. A core counts as busy while
   it has a live thread assigned, even if that thread sleeps briefly at a barrier:
   schedutil keeps a blocked task's utilisation on its CPU (PELT decays it over tens of
   milliseconds), so a barrier wait of a few milliseconds does not drop the clock;
3. **hardware DTM**: a core at or above ``dtm.threshold_c`` runs at the lowest level until
   it cools below ``threshold_c - hysteresis_c``, whatever the cap and governor say.
"""

from __future__ import annotations

import numpy as np

from ailfmd.sim.chip import Chip

KHZ_PER_MHZ = 1000


class VfLevels:
    """The chip's V/f table in the units Linux speaks (kHz) and the simulator uses (MHz)."""

    def __init__(self, chip: Chip) -> None:
        self.freq_mhz = np.asarray(chip.vf.frequencies_mhz, dtype=float)
        self.freq_khz = np.asarray(chip.vf.frequencies_mhz, dtype=np.int64) * KHZ_PER_MHZ
        self.n_levels = len(self.freq_mhz)
        self.min_khz = int(self.freq_khz[0])
        self.max_khz = int(self.freq_khz[-1])
        self.top_level = self.n_levels - 1

    def levels_for_caps(self, caps_khz: np.ndarray) -> np.ndarray:
        """Highest table level at or below each cap; the lowest level below the table."""
        idx = np.searchsorted(self.freq_khz, np.asarray(caps_khz), side="right") - 1
        return np.maximum(idx, 0)

    def clamp_cap(self, cap_khz: int) -> tuple[int, str]:
        """The cap that takes effect for a request, and why it differs (cpufreq's rules).

        Like ``scaling_max_freq``: clamped to ``cpuinfo_min/max_freq``, then rounded down to a
        table entry so the core never runs above what was asked.
        """
        note = ""
        value = int(cap_khz)
        if value > self.max_khz:
            value, note = self.max_khz, f"clamped to hardware max {self.max_khz} kHz"
        if value < self.min_khz:
            value, note = self.min_khz, f"clamped to minimum {self.min_khz} kHz"
        entry = int(self.freq_khz[self.levels_for_caps(value)])
        if entry != value:
            value = entry
            note = (note + "; " if note else "") + f"rounded down to table entry {value} kHz"
        return value, note


def governor_levels(busy: np.ndarray, cap_level: np.ndarray) -> np.ndarray:
    """schedutil/ondemand-like choice per core: the cap's level when busy, else level 0."""
    return np.where(busy, cap_level, 0)


class Dtm:
    """Hardware DTM: a relay with hysteresis per core (state is a boolean mask)."""

    def __init__(self, chip: Chip) -> None:
        self.threshold_c = chip.dtm.threshold_c
        self.release_c = chip.dtm.threshold_c - chip.dtm.hysteresis_c

    def update(self, throttled: np.ndarray, temps_c: np.ndarray) -> np.ndarray:
        """The throttle mask after the cores reached ``temps_c``.

        Throttle at or above the threshold; stay throttled until below the release point.
        """
        return np.where(throttled, temps_c >= self.release_c, temps_c >= self.threshold_c)

    def would_change(self, throttled: np.ndarray, start_c: np.ndarray, end_c: np.ndarray,
                     matters: np.ndarray) -> bool:
        """Whether a step from ``start_c`` to ``end_c`` flips the relay of a core where
        that ``matters`` (its clock would change), or changes whether any core is at or
        above the threshold.

        Either makes the engine resolve the step finely: a flip changes a core's clock
        inside the step, the other changes the time counted above the threshold. An idle
        core already sits at the lowest level, so its relay changes nothing.
        """
        flips = np.where(throttled, end_c < self.release_c, end_c >= self.threshold_c)
        if np.count_nonzero(flips & matters):
            return True
        hot_before = np.maximum.reduce(start_c) >= self.threshold_c
        return bool(hot_before != (np.maximum.reduce(end_c) >= self.threshold_c))
