"""Physics of the thermal RC model: steady state, exact stepping, energy, monotonicity, TSP."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.integrate import solve_ivp

from ailfmd.sim.chip import load_chip
from ailfmd.sim.thermal import ThermalModel, ThermalRunaway


@pytest.fixture(scope="module", params=["tiny", "3d-64", "2d-64"])
def model(request) -> ThermalModel:
    return ThermalModel(load_chip(request.param))


@pytest.fixture(scope="module")
def default_model() -> ThermalModel:
    return ThermalModel(load_chip("3d-64"))


def _random_power(model: ThermalModel, rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.3, 12.0, model.n_cores)


def test_network_is_a_valid_rc_network(model):
    g = model.conductance_w_per_k
    assert np.allclose(g, g.T)
    assert np.all(model.capacitance_j_per_k > 0)
    off_diagonal = g - np.diag(np.diag(g))
    assert np.all(off_diagonal <= 0)
    # Every row sums to that node's conductance to ambient, which sums to 1 / R_convec.
    assert np.allclose(g.sum(axis=1), model.ambient_conductance_w_per_k)
    r_conv = model.chip.thermal.convection_resistance_k_per_w
    assert model.ambient_conductance_w_per_k.sum() == pytest.approx(1.0 / r_conv)
    c_conv = model.chip.thermal.convection_capacitance_j_per_k
    assert model.capacitance_j_per_k.sum() > c_conv


def test_steady_state_is_the_direct_solve_and_many_exact_steps_reach_it(model):
    rng = np.random.default_rng(1)
    power = _random_power(model, rng)
    b = np.zeros(model.n_nodes)
    b[model.core_nodes] = power
    direct = model.ambient_c + np.linalg.solve(model.conductance_w_per_k, b)
    assert np.max(np.abs(model.steady_state(power) - direct)) <= 1e-9

    # Slowest time constant ~20-30 s: 30 of them in 0.5 s exact steps.
    dt_s = 0.5
    n_steps = int(30 * model.time_constants_s()[0] / dt_s)
    temps = model.ambient_temps()
    for _ in range(n_steps):
        temps = model.step(temps, power, dt_s)
    assert np.max(np.abs(temps - direct)) <= 0.01


@pytest.mark.parametrize(("chip_name", "epochs"), [("tiny", 40), ("3d-64", 20)])
def test_exact_step_agrees_with_fine_reference_integration(chip_name, epochs):
    model = ThermalModel(load_chip(chip_name))
    c = model.capacitance_j_per_k
    a = -model.conductance_w_per_k / c[:, None]
    amb = model.ambient_c
    rng = np.random.default_rng(2)
    dt_s = 1e-3
    exact = model.ambient_temps() + rng.uniform(0, 20, model.n_nodes)
    reference = exact.copy()
    for _ in range(epochs):  # piecewise-constant power, changed every decision epoch
        power = _random_power(model, rng)
        drive = np.zeros(model.n_nodes)
        drive[model.core_nodes] = power / c[model.core_nodes]
        sol = solve_ivp(lambda t, x: a @ x + drive, (0.0, dt_s), reference - amb,
                        method="BDF", jac=a, rtol=1e-10, atol=1e-10)
        reference = amb + sol.y[:, -1]
        exact = model.step(exact, power, dt_s)
        assert np.max(np.abs(exact - reference)) <= 0.1
    # The exact solution is in fact far better than the 0.1 C requirement.
    assert np.max(np.abs(exact - reference)) <= 1e-3


def test_energy_balance(model):
    """Electrical energy in = heat convected to ambient + heat stored in the package."""
    rng = np.random.default_rng(3)
    temps = model.ambient_temps()
    energy_in_j = heat_out_j = 0.0
    for dt_s in [1e-3] * 50 + [0.1] * 20 + [2.0] * 5:
        power = _random_power(model, rng)
        energy_in_j += power.sum() * dt_s
        heat_out_j += model.ambient_heat_j(temps, power, dt_s)
        temps = model.step(temps, power, dt_s)
    stored_j = model.stored_heat_j(temps)
    assert energy_in_j == pytest.approx(heat_out_j + stored_j, rel=1e-9)
    assert heat_out_j > 0.1 * energy_in_j  # the sink did warm up and shed heat


def test_heat_out_matches_an_independent_quadrature(default_model):
    """The exact heat integral agrees with trapezoidal sums of g_amb (T - T_amb)."""
    model = default_model
    power = np.full(model.n_cores, 5.0)
    temps = model.steady_state(power * 0.5)  # start warm so the sink sheds heat
    sub_steps, dt_s = 200, 0.5
    exact = model.ambient_heat_j(temps, power, dt_s)
    t = temps
    rates = [model.heat_to_ambient_w(t)]
    for _ in range(sub_steps):
        t = model.step(t, power, dt_s / sub_steps)
        rates.append(model.heat_to_ambient_w(t))
    trapezoid = np.trapezoid(rates, dx=dt_s / sub_steps)
    assert exact == pytest.approx(trapezoid, rel=1e-6)
    assert np.allclose(t, model.step(temps, power, dt_s), atol=1e-9)


def test_more_power_never_cools_any_node(model):
    assert np.all(model.influence_k_per_w > 0)
    prop = model.propagator(1e-3)
    assert prop.phi.min() >= -1e-12
    assert prop.gamma_k_per_w.min() >= -1e-12
    # A concrete case: raising one tile's power raises (or keeps) every node.
    rng = np.random.default_rng(4)
    base = _random_power(model, rng)
    more = base.copy()
    more[model.n_cores // 2] += 3.0
    temps = model.ambient_temps() + 5.0
    assert np.all(model.step(temps, more, 1e-3) >= model.step(temps, base, 1e-3) - 1e-12)
    assert np.all(model.steady_state(more) >= model.steady_state(base))


@pytest.mark.parametrize("chip_name", ["tiny", "3d-64"])
def test_tile_far_from_sink_runs_hotter(chip_name):
    chip = load_chip(chip_name)
    model = ThermalModel(chip)
    fp = chip.floorplan
    for row in range(fp.rows):
        for col in range(fp.cols):
            near = chip.core_at(0, row, col)
            far = chip.core_at(fp.layers - 1, row, col)
            p_near = np.zeros(chip.n_cores)
            p_near[near] = 5.0
            p_far = np.zeros(chip.n_cores)
            p_far[far] = 5.0
            assert model.steady_state(p_far)[far] > model.steady_state(p_near)[near] + 0.5
    # Uniform power: every top-layer tile is hotter than the tile below it.
    temps = model.steady_state(np.full(chip.n_cores, 2.0))
    for layer in range(1, fp.layers):
        for row in range(fp.rows):
            for col in range(fp.cols):
                assert temps[chip.core_at(layer, row, col)] > temps[chip.core_at(layer - 1, row, col)]


def test_centre_tiles_run_hotter_than_corner_tiles(default_model):
    chip = default_model.chip
    temps = default_model.steady_state(np.full(chip.n_cores, 2.0))
    top = chip.floorplan.layers - 1
    assert temps[chip.core_at(top, 1, 1)] > temps[chip.core_at(top, 0, 0)]


@pytest.mark.parametrize("chip_name", ["tiny", "3d-64", "2d-64"])
def test_tsp_budget_puts_hottest_active_core_exactly_at_limit(chip_name):
    chip = load_chip(chip_name)
    model = ThermalModel(chip)
    rng = np.random.default_rng(5)
    n = chip.n_cores
    active_sets = [
        list(range(n)),
        list(range(chip.floorplan.tiles_per_layer)),  # the layer nearest the sink
        list(range(n - chip.floorplan.tiles_per_layer, n)),  # the layer farthest from it
        sorted(rng.choice(n, size=max(1, n // 4), replace=False).tolist()),
        [n - 1],
    ]
    for active in active_sets:
        for inactive_w in (0.0, 0.6):
            budget = model.tsp_budget_w(active, 80.0, inactive_w)
            power = np.full(n, inactive_w)
            power[active] = budget
            temps = model.steady_state(power)
            assert temps[active].max() == pytest.approx(80.0, abs=0.1)
            assert temps[active].max() == pytest.approx(80.0, abs=1e-9)
            budget_all = model.tsp_budget_w(active, 80.0, inactive_w, over="all")
            power[active] = budget_all
            temps = model.steady_state(power)[model.core_nodes]
            assert budget_all <= budget
            assert temps.max() == pytest.approx(80.0, abs=1e-9)


def test_tsp_is_larger_for_fewer_and_cooler_cores(default_model):
    chip = default_model.chip
    n, per_layer = chip.n_cores, chip.floorplan.tiles_per_layer
    all_cores = default_model.tsp_budget_w(range(n), 80.0, 0.5)
    bottom = default_model.tsp_budget_w(range(per_layer), 80.0, 0.5)
    top = default_model.tsp_budget_w(range(n - per_layer, n), 80.0, 0.5)
    assert all_cores < top < bottom


def test_tsp_is_zero_when_idle_cores_alone_reach_the_limit(default_model):
    assert default_model.tsp_budget_w([0], 80.0, 50.0) == 0.0
    with pytest.raises(ValueError):
        default_model.tsp_budget_w([], 80.0)


def _exp_leakage(ref_w: float, coeff_per_c: float = 0.036, ref_c: float = 60.0):
    return lambda temps_c: ref_w * np.exp(coeff_per_c * (temps_c - ref_c))


def test_leakage_feedback_raises_temperature(default_model):
    base = np.full(default_model.n_cores, 1.0)
    plain = default_model.steady_state(base)
    result = default_model.steady_state_with_leakage(base, _exp_leakage(0.3))
    assert result.converged and not result.runaway
    assert np.all(result.temps_c > plain)
    # It is a fixed point: the temperatures reproduce the leakage that produced them.
    leak = _exp_leakage(0.3)(result.temps_c[default_model.core_nodes])
    assert np.allclose(result.temps_c, default_model.steady_state(base + leak), atol=1e-4)
    assert np.allclose(result.leakage_w, leak, rtol=1e-5)


def test_thermal_runaway_is_detected(default_model):
    base = np.full(default_model.n_cores, 1.0)
    assert default_model.steady_state(base).max() < default_model.chip.dtm.critical_c
    with pytest.raises(ThermalRunaway) as info:
        default_model.steady_state_with_leakage(base, _exp_leakage(1.5, coeff_per_c=0.06))
    assert "runaway" in str(info.value)
    result = default_model.steady_state_with_leakage(
        base, _exp_leakage(1.5, coeff_per_c=0.06), raise_on_runaway=False)
    assert result.runaway and not result.converged
    assert result.temps_c[default_model.core_nodes].max() > default_model.chip.dtm.critical_c


def test_start_of_step_leakage_transient_settles_on_the_leakage_fixed_point(default_model):
    model = default_model
    base = np.full(model.n_cores, 1.0)
    leakage = _exp_leakage(0.3)
    expected = model.steady_state_with_leakage(base, leakage).temps_c
    temps = model.ambient_temps()
    for dt_s in [1e-3] * 200 + [0.5] * 1200:
        temps = model.step(temps, base + leakage(temps[model.core_nodes]), dt_s)
    assert np.max(np.abs(temps - expected)) <= 0.01


def test_propagators_are_cached_per_step_size(default_model):
    assert default_model.propagator(1e-3) is default_model.propagator(1e-3)
    assert default_model.propagator(2e-3) is not default_model.propagator(1e-3)
    with pytest.raises(ValueError):
        default_model.propagator(0.0)


def test_one_long_step_equals_many_short_ones(default_model):
    power = np.full(default_model.n_cores, 3.0)
    start = default_model.ambient_temps()
    short = start
    for _ in range(10):
        short = default_model.step(short, power, 1e-3)
    assert np.allclose(short, default_model.step(start, power, 1e-2), atol=1e-9)


def test_modal_fast_path_matches_node_steps(default_model):
    model = default_model
    rng = np.random.default_rng(6)
    temps = model.ambient_temps() + rng.uniform(0, 10, model.n_nodes)
    assert np.allclose(model.from_modes(model.to_modes(temps)), temps, atol=1e-9)
    modes = model.to_modes(temps)
    for dt_s in [1e-3] * 300 + [0.1] * 50:
        power = _random_power(model, rng)
        temps = model.step(temps, power, dt_s)
        modes, cores = model.step_modes(modes, power, dt_s)
        assert np.allclose(cores, temps[model.core_nodes], atol=1e-9)
    assert np.allclose(model.from_modes(modes), temps, atol=1e-9)
