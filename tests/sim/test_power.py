"""Power model: the formulas, and the thermal consequences the chips are designed for."""

from __future__ import annotations

import numpy as np
import pytest

from ailfmd.sim.chip import load_chip
from ailfmd.sim.power import PowerModel
from ailfmd.sim.thermal import ThermalModel, ThermalRunaway


@pytest.fixture(scope="module")
def chip():
    return load_chip("3d-64")


@pytest.fixture(scope="module")
def power(chip) -> PowerModel:
    return PowerModel(chip)


@pytest.fixture(scope="module")
def thermal(chip) -> ThermalModel:
    return ThermalModel(chip)


def test_dynamic_power_is_ceff_activity_v_squared_f(chip, power):
    freqs = np.array(chip.vf.frequencies_mhz, dtype=float)
    activity = np.linspace(0.1, 1.0, freqs.size)
    volts = np.array(chip.vf.voltages_v)
    expected = chip.power.ceff_nf * 1e-9 * activity * volts**2 * freqs * 1e6
    assert np.allclose(power.dynamic_w(activity, freqs), expected)
    assert np.all(power.dynamic_w(0.0, freqs) == 0.0)


def test_leakage_is_exponential_in_temperature_and_scales_with_voltage(chip, power):
    spec = chip.power
    f_max = chip.vf.max_mhz
    assert power.leakage_w(spec.leakage_ref_c, f_max) == pytest.approx(spec.leakage_w_at_ref)
    ratio = power.leakage_w(spec.leakage_ref_c + 10, f_max) / power.leakage_w(spec.leakage_ref_c, f_max)
    assert ratio == pytest.approx(np.exp(10 * spec.leakage_temp_coeff_per_c))
    # HotSniper's static power: 0.27 W at 1 GHz (0.8 V), 0.92 W at 4 GHz (1.4 V).
    assert power.leakage_w(spec.leakage_ref_c, chip.vf.min_mhz) == pytest.approx(0.27, rel=0.02)


def test_power_rises_with_frequency_activity_and_temperature(chip, power):
    freqs = np.array(chip.vf.frequencies_mhz, dtype=float)
    assert np.all(np.diff(power.tile_power_w(0.7, freqs, 70.0)) > 0)
    assert np.all(np.diff(power.tile_power_w(np.linspace(0, 1, 5), 3000, 70.0)) > 0)
    assert np.all(np.diff(power.tile_power_w(0.7, 3000, np.linspace(45, 95, 5))) > 0)


def test_idle_tile_is_idle_uncore_and_leakage(chip, power):
    spec = chip.power
    idle = power.idle_tile_power_w(70.0)
    expected = spec.idle_w + spec.uncore_w_per_tile + power.leakage_w(70.0, chip.vf.min_mhz)
    assert idle == pytest.approx(expected)


def test_vectorised_over_cores(chip, power):
    n = chip.n_cores
    rng = np.random.default_rng(0)
    activity = rng.uniform(0, 1, n)
    freqs = rng.choice(chip.vf.frequencies_mhz, n).astype(float)
    temps = rng.uniform(45, 90, n)
    together = power.tile_power_w(activity, freqs, temps)
    one_by_one = [float(power.tile_power_w(a, f, t)) for a, f, t in zip(activity, freqs, temps)]
    assert together.shape == (n,)
    assert np.allclose(together, one_by_one)


def test_bad_inputs_are_refused(power):
    with pytest.raises(ValueError):
        power.tile_power_w(1.2, 3000, 60.0)
    with pytest.raises(ValueError):
        power.tile_power_w(0.5, 5000, 60.0)


@pytest.mark.parametrize("temp_c", [45.0, 60.0, 80.0, 95.0])
def test_busy_core_at_4ghz_draws_8_to_15_w(power, temp_c):
    assert 8.0 <= power.tile_power_w(1.0, 4000, temp_c) <= 15.0


def test_freq_for_budget_picks_the_highest_level_that_fits(chip, power):
    budget = float(power.tile_power_w(1.0, 2600, 80.0)) + 1e-9
    assert power.freq_for_budget_mhz(budget, 1.0, 80.0)[0] == 2600
    assert power.freq_for_budget_mhz(1e3, 1.0, 80.0)[0] == chip.vf.max_mhz
    assert power.freq_for_budget_mhz(0.0, 1.0, 80.0)[0] == chip.vf.min_mhz
    per_core = power.freq_for_budget_mhz(np.array([2.0, 6.0, 20.0]), np.array([1.0, 0.5, 1.0]), 80.0)
    assert per_core.shape == (3,) and per_core[0] < per_core[1] <= per_core[2]


# ---------------------------------------------------------------- thermally constrained chip


def _settle(thermal, power, activity, freqs, limit_c=None):
    """Steady state with leakage coupled in; returns core temperatures."""
    base = power.tile_power_w(activity, freqs, 0.0) - power.leakage_w(0.0, freqs)
    result = thermal.steady_state_with_leakage(base, lambda t: power.leakage_w(t, freqs))
    return result.temps_c[thermal.core_nodes]


def test_all_cores_busy_at_max_vf_exceed_dtm_quickly(chip, power, thermal):
    n = chip.n_cores
    freqs = np.full(n, float(chip.vf.max_mhz))
    temps = thermal.ambient_temps()
    dt_s = 1e-3
    for step in range(1, 1001):
        cores = temps[thermal.core_nodes]
        temps = thermal.step(temps, power.tile_power_w(1.0, freqs, cores), dt_s)
        if temps[thermal.core_nodes].max() >= chip.dtm.threshold_c:
            break
    assert temps[thermal.core_nodes].max() >= chip.dtm.threshold_c
    assert step * dt_s <= 0.05  # well within a second: DTM matters on this chip
    with pytest.raises(ThermalRunaway):
        _settle(thermal, power, 1.0, freqs)


def test_all_cores_busy_at_min_vf_stay_below_dtm(chip, power, thermal):
    freqs = np.full(chip.n_cores, float(chip.vf.min_mhz))
    assert _settle(thermal, power, 1.0, freqs).max() < chip.dtm.threshold_c


def _tsp_run(chip, power, thermal, active, over):
    """Active cores busy at the frequency their TSP budget allows; settled core temps."""
    n, limit_c = chip.n_cores, chip.dtm.threshold_c
    # Idle power and the budget-to-frequency conversion both take leakage at the limit.
    idle_w = float(power.idle_tile_power_w(limit_c))
    budget_w = thermal.tsp_budget_w(active, limit_c, idle_w, over=over)
    activity = np.zeros(n)
    activity[active] = 1.0
    freqs = np.full(n, float(chip.vf.min_mhz))
    freqs[active] = power.freq_for_budget_mhz(budget_w, 1.0, limit_c)
    return _settle(thermal, power, activity, freqs), freqs


@pytest.mark.parametrize("which", ["all", "top layer", "bottom layer"])
def test_cores_run_at_their_tsp_budget_stay_below_the_limit(chip, power, thermal, which):
    n, per_layer, limit_c = chip.n_cores, chip.floorplan.tiles_per_layer, chip.dtm.threshold_c
    active = {"all": np.arange(n), "top layer": np.arange(n - per_layer, n),
              "bottom layer": np.arange(per_layer)}[which]
    temps, _ = _tsp_run(chip, power, thermal, active, "active")
    assert temps[active].max() <= limit_c
    temps, freqs = _tsp_run(chip, power, thermal, active, "all")
    assert temps.max() <= limit_c
    if which == "bottom layer":  # the coolest layer earns a real frequency
        assert freqs[active].min() > chip.vf.min_mhz


def test_in_a_stack_idle_cores_above_busy_ones_can_be_the_hottest(chip, power, thermal):
    """Why ``over="all"`` exists: Pagani's TSP only bounds the active cores."""
    bottom = np.arange(chip.floorplan.tiles_per_layer)
    temps, _ = _tsp_run(chip, power, thermal, bottom, "active")
    assert temps[bottom].max() <= chip.dtm.threshold_c < temps.max()
