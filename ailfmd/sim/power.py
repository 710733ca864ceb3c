"""Per-tile power: dynamic, idle, temperature-dependent leakage and uncore.

For each tile (core + private caches + LLC bank), vectorised over cores::

    P = idle_w + P_dyn + P_leak + uncore_w_per_tile
    P_dyn  = ceff * activity * V(f)^2 * f                    (CMOS switching power)
    P_leak = leakage_w_at_ref * (V / V_nom)^k_v * exp(beta * (T - T_ref))

``activity`` (0..1) is the switching activity of the kernel class running on the core (0
for an idle, clock-gated core); ``V(f)`` comes from the chip's V/f table; ``V_nom`` is the
top of that table. The exponential temperature law and ``beta`` are HotSpot's
(``calc_leakage``); the voltage exponent ``k_v`` is fitted to HotSniper's static power at
1 and 4 GHz. Sources of every default: docs/chips.md.
"""

from __future__ import annotations

import numpy as np

from ailfmd.sim.chip import Chip

HZ_PER_MHZ = 1e6
F_PER_NF = 1e-9


class PowerModel:
    """Turns per-core activity, frequency and temperature into watts per tile.

    Inputs are numbers or arrays (one entry per core) and broadcast together; the tile
    power is what :class:`ailfmd.sim.thermal.ThermalModel` takes as input.
    """

    def __init__(self, chip: Chip) -> None:
        self.chip = chip
        spec = chip.power
        self.frequencies_mhz = np.asarray(chip.vf.frequencies_mhz, dtype=float)
        self.voltages_v = np.asarray(chip.vf.voltages_v, dtype=float)
        self.nominal_voltage_v = chip.vf.nominal_voltage_v
        self._f_min, self._f_max = self.frequencies_mhz[0], self.frequencies_mhz[-1]
        self._constant_w = spec.idle_w + spec.uncore_w_per_tile
        self._beta_per_c = spec.leakage_temp_coeff_per_c
        self._leak_ref_c = spec.leakage_ref_c
        # Per operating point: watts per unit activity, and leakage at T_ref. Between table
        # points these are interpolated linearly, like the voltage (a core normally sits
        # on a table point; cpufreq snaps requests to the table).
        volts, freqs_hz = self.voltages_v, self.frequencies_mhz * HZ_PER_MHZ
        self._dynamic_w_per_activity = spec.ceff_nf * F_PER_NF * volts * volts * freqs_hz
        self._leakage_w_at_ref_temp = (spec.leakage_w_at_ref * (volts / self.nominal_voltage_v)
                                       ** spec.leakage_voltage_exponent)

    def voltage_v(self, freq_mhz: np.ndarray | float) -> np.ndarray:
        """Supply voltage per core: table value, linear between table points."""
        return self._per_level(freq_mhz, self.voltages_v)

    def dynamic_w(self, activity: np.ndarray | float, freq_mhz: np.ndarray | float) -> np.ndarray:
        """Switching power ``ceff * activity * V^2 * f`` per core."""
        return _activity(activity) * self._per_level(freq_mhz, self._dynamic_w_per_activity)

    def leakage_w(self, temp_c: np.ndarray | float, freq_mhz: np.ndarray | float) -> np.ndarray:
        """Leakage per core at its temperature and the voltage its frequency needs."""
        return self._per_level(freq_mhz, self._leakage_w_at_ref_temp) * self._heat_factor(temp_c)

    def tile_power_w(self, activity: np.ndarray | float, freq_mhz: np.ndarray | float,
                     temp_c: np.ndarray | float) -> np.ndarray:
        """Total power per tile: idle + dynamic + leakage + uncore."""
        # Hot path (every tick): an off-table frequency or a NaN temperature turns into NaN
        # and is caught by one finite check instead of two range reductions.
        f = np.asarray(freq_mhz, dtype=float)
        table = self.frequencies_mhz
        dynamic = _activity(activity) * np.interp(f, table, self._dynamic_w_per_activity,
                                                  left=np.nan, right=np.nan)
        leakage = np.interp(f, table, self._leakage_w_at_ref_temp, left=np.nan, right=np.nan)
        total = self._constant_w + dynamic + leakage * self._heat_factor(temp_c)
        if not np.isfinite(np.add.reduce(total, axis=None)):
            self._checked(f)
            raise ValueError(f"tile power is not finite (runaway without DTM?); temperatures: {temp_c!r}")
        return total

    def idle_tile_power_w(self, temp_c: np.ndarray | float,
                          freq_mhz: np.ndarray | float | None = None) -> np.ndarray:
        """Power of a tile whose core is idle (clock-gated, not power-gated).

        Without ``freq_mhz`` the core is assumed parked at the lowest V/f level.
        """
        f = self._f_min if freq_mhz is None else freq_mhz
        return self.tile_power_w(0.0, f, temp_c)

    def freq_for_budget_mhz(self, budget_w: np.ndarray | float, activity: np.ndarray | float,
                            temp_c: np.ndarray | float) -> np.ndarray:
        """Highest table frequency per core whose tile power fits ``budget_w`` at ``temp_c``.

        Cores that do not fit even at the lowest level get the lowest level (the floor the
        hardware cannot go below). Evaluate at the limit temperature to be conservative.
        """
        a, t, budget = np.broadcast_arrays(
            np.atleast_1d(_activity(activity)), np.atleast_1d(np.asarray(temp_c, dtype=float)),
            np.atleast_1d(np.asarray(budget_w, dtype=float)))
        levels = self.frequencies_mhz[:, None]  # (n_levels, 1) against (n_cores,)
        power = self.tile_power_w(a, levels, t)
        # Power rises with the level, so the number of fitting levels indexes the answer.
        best = np.maximum((power <= budget).sum(axis=0) - 1, 0)
        return self.frequencies_mhz[best]

    def _checked(self, freq_mhz: np.ndarray | float) -> np.ndarray:
        f = np.asarray(freq_mhz, dtype=float)
        if f.size and (np.minimum.reduce(f, axis=None) < self._f_min
                       or np.maximum.reduce(f, axis=None) > self._f_max):
            raise ValueError(
                f"frequency outside the V/f table ({self._f_min:.0f}-{self._f_max:.0f} MHz): "
                f"{f.min():.0f}-{f.max():.0f} MHz")
        return f

    def _per_level(self, freq_mhz: np.ndarray | float, table: np.ndarray) -> np.ndarray:
        return np.interp(self._checked(freq_mhz), self.frequencies_mhz, table)

    def _heat_factor(self, temp_c: np.ndarray | float) -> np.ndarray:
        return np.exp(self._beta_per_c * (np.asarray(temp_c, dtype=float) - self._leak_ref_c))


def _activity(activity: np.ndarray | float) -> np.ndarray:
    a = np.asarray(activity, dtype=float)
    if a.size and (np.minimum.reduce(a, axis=None) < 0.0 or np.maximum.reduce(a, axis=None) > 1.0):
        raise ValueError(f"activity must be within 0..1, got {a.min():g}..{a.max():g}")
    return a
