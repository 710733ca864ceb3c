"""Compact thermal RC network of a 3D-stacked chip, solved exactly between decisions.

The network follows HotSpot's block model (Skadron et al.; Huang et al., "HotSpot: a
compact thermal modeling methodology", DAC 2004), extended to a stack of dies:

- one node per tile per die layer, and one per tile per interface layer (the TIM under
  layer 0, the die-to-die bond under every higher layer);
- one heat-spreader node and one heat-sink node under each tile footprint, plus
  HotSpot's 4 spreader rim nodes, 4 inner and 4 outer sink rim nodes;
- lateral conductances between neighbouring tiles in every layer, vertical ones through
  half-thicknesses of adjacent layers, trapezoid conductances from the footprint into the
  rims, and convection from every sink node to ambient (the convection resistance and
  capacitance split in proportion to area, as HotSpot does).

With C diagonal and G symmetric positive definite, ``C dT/dt = -G (T - T_amb) + B P`` is
solved exactly under zero-order hold on power: ``A = C^-1/2 G C^-1/2`` is decomposed once
with ``numpy.linalg.eigh``; each step size gets its propagator ``Phi = exp(-C^-1 G dt)``
and input matrix ``Gamma = (C^-1 G)^-1 (I - Phi) C^-1 B``, so a step is two
matrix-vector products. Leakage is not inside the linear system: callers evaluate it at
the start-of-step temperature (see docs/chips.md for the size of that error).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ailfmd.errors import AilfmError
from ailfmd.sim.chip import Chip, PackagePlate, ThermalSpec

RIM_SIDES = ("row-", "row+", "col-", "col+")  # rim beyond row 0, last row, col 0, last col
PROPAGATOR_CACHE_SIZE = 32  # step sizes kept; event-driven callers may use many


class ThermalRunaway(AilfmError):
    """No steady state exists with every core below the critical temperature."""

    def __init__(self, detail: str, temps_c: np.ndarray) -> None:
        super().__init__(detail)
        self.temps_c = temps_c  # core temperatures when the iteration gave up


@dataclass(frozen=True)
class Propagator:
    """Exact zero-order-hold discretisation for one step size ``dt_s``."""

    dt_s: float
    phi: np.ndarray  # (n_nodes, n_nodes)
    gamma_k_per_w: np.ndarray  # (n_nodes, n_cores)
    offset_c: np.ndarray  # T_amb * (1 - Phi 1): lets a step work on absolute temperatures
    heat_from_state_j_per_k: np.ndarray  # row: heat to ambient during the step per K of rise
    heat_from_power_j_per_w: np.ndarray  # row: heat to ambient during the step per W of power
    decay: np.ndarray  # (n_nodes,) exp(-lambda dt): Phi in modal coordinates
    modal_input: np.ndarray  # (n_nodes, n_cores): Gamma in modal coordinates


@dataclass(frozen=True)
class LeakageSteadyState:
    temps_c: np.ndarray  # every node
    leakage_w: np.ndarray  # per core, at the final temperatures
    iterations: int
    converged: bool
    runaway: bool
    detail: str


class ThermalModel:
    """The RC network of ``chip``; stateless: temperatures are passed in and returned.

    Node order: die tiles (node index = core index), interface tiles, spreader tiles,
    spreader rims, sink tiles, inner sink rims, outer sink rims (see ``node_names``).
    """

    def __init__(self, chip: Chip) -> None:
        self.chip = chip
        self.ambient_c = chip.thermal.ambient_c
        net = _Network(chip)
        self.node_names: tuple[str, ...] = tuple(net.names)
        self.n_nodes = len(net.names)
        self.n_cores = chip.n_cores
        self.core_nodes = np.arange(self.n_cores)  # die tiles come first, in core order
        self.conductance_w_per_k = _readonly(net.g)
        self.ambient_conductance_w_per_k = _readonly(net.g_amb)
        self.capacitance_j_per_k = _readonly(net.c)

        inv_sqrt_c = 1.0 / np.sqrt(net.c)
        sym = inv_sqrt_c[:, None] * net.g * inv_sqrt_c[None, :]
        self._rates_per_s, vecs = np.linalg.eigh(sym)
        self._left = inv_sqrt_c[:, None] * vecs  # C^-1/2 V
        self._right_state = vecs.T * np.sqrt(net.c)[None, :]  # V^T C^1/2
        self._right_power = (vecs.T * inv_sqrt_c[None, :])[:, self.core_nodes]  # V^T C^-1/2 B
        self._core_readout = np.ascontiguousarray(self._left[self.core_nodes])
        # Steady state by a direct solve, independent of the eigen-decomposition.
        unit_power = np.zeros((self.n_nodes, self.n_cores))
        unit_power[self.core_nodes, np.arange(self.n_cores)] = 1.0
        self.influence_k_per_w = _readonly(np.linalg.solve(net.g, unit_power))
        self._core_influence = self.influence_k_per_w[self.core_nodes]
        self._cache: OrderedDict[float, Propagator] = OrderedDict()

    # ------------------------------------------------------------------ basics

    def core_readout(self) -> np.ndarray:
        """Core temperature rises per unit of each modal coordinate (cores x modes): what
        :meth:`step_modes` reads core temperatures with."""
        return self._core_readout.copy()

    def ambient_temps(self) -> np.ndarray:
        """Every node at ambient: a chip that has been off for a long time."""
        return np.full(self.n_nodes, self.ambient_c)

    def time_constants_s(self) -> np.ndarray:
        """Time constants of the network's modes, slowest first."""
        return 1.0 / self._rates_per_s  # eigh sorts rates ascending

    def steady_state(self, power_w: np.ndarray) -> np.ndarray:
        """Node temperatures after constant ``power_w`` (per core tile) forever."""
        return self.ambient_c + self.influence_k_per_w @ np.asarray(power_w, dtype=float)

    def heat_to_ambient_w(self, temps_c: np.ndarray) -> float:
        """Heat flowing from the sink into the air right now."""
        return float(self.ambient_conductance_w_per_k @ (temps_c - self.ambient_c))

    def stored_heat_j(self, temps_c: np.ndarray) -> float:
        """Heat stored above ambient."""
        return float(self.capacitance_j_per_k @ (temps_c - self.ambient_c))

    # ------------------------------------------------------------------ transient

    def propagator(self, dt_s: float) -> Propagator:
        """The exact discretisation for ``dt_s``, computed once and cached."""
        key = float(dt_s)
        prop = self._cache.get(key)
        if prop is not None:
            self._cache.move_to_end(key)
            return prop
        if not key > 0.0:
            raise ValueError(f"dt_s must be > 0, got {dt_s!r}")
        rates = self._rates_per_s
        decay = np.exp(-rates * key)
        one_minus = -np.expm1(-rates * key)  # 1 - exp(-x), accurate for small x
        phi = (self._left * decay) @ self._right_state
        gamma = (self._left * (one_minus / rates)) @ self._right_power
        # Exact integrals of the rise over the step, for heat-to-ambient accounting.
        g_amb_left = self.ambient_conductance_w_per_k @ self._left
        heat_state = (g_amb_left * (one_minus / rates)) @ self._right_state
        heat_power = (g_amb_left * ((key - one_minus / rates) / rates)) @ self._right_power
        offset = self.ambient_c * (1.0 - phi.sum(axis=1))
        modal_input = (one_minus / rates)[:, None] * self._right_power
        prop = Propagator(key, _readonly(phi), _readonly(gamma), _readonly(offset),
                          _readonly(heat_state), _readonly(heat_power), _readonly(decay),
                          _readonly(modal_input))
        self._cache[key] = prop
        if len(self._cache) > PROPAGATOR_CACHE_SIZE:
            self._cache.popitem(last=False)
        return prop

    def step(self, temps_c: np.ndarray, power_w: np.ndarray, dt_s: float) -> np.ndarray:
        """Node temperatures after ``dt_s`` with ``power_w`` (per core tile) held constant."""
        prop = self._cache.get(dt_s) or self.propagator(dt_s)
        return prop.phi @ temps_c + prop.gamma_k_per_w @ power_w + prop.offset_c

    # Modal fast path. In the eigenbasis z = V^T C^1/2 (T - T_amb) the propagator is
    # diagonal, so a step is an elementwise product and two thin matrix-vector products
    # (no n x n product, unlike ``step``); core temperatures are read out from z directly.

    def to_modes(self, temps_c: np.ndarray) -> np.ndarray:
        """Modal coordinates of node temperatures, for :meth:`step_modes`."""
        return self._right_state @ (np.asarray(temps_c, dtype=float) - self.ambient_c)

    def from_modes(self, modes: np.ndarray) -> np.ndarray:
        """Node temperatures of modal coordinates."""
        return self.ambient_c + self._left @ modes

    def step_modes(self, modes: np.ndarray, power_w: np.ndarray,
                   dt_s: float) -> tuple[np.ndarray, np.ndarray]:
        """The same exact step as :meth:`step` in modal coordinates.

        Returns the new modal coordinates and the core temperatures after the step.
        """
        prop = self._cache.get(dt_s) or self.propagator(dt_s)
        modes = prop.decay * modes + prop.modal_input @ power_w
        return modes, self._core_readout @ modes + self.ambient_c

    def ambient_heat_j(self, temps_c: np.ndarray, power_w: np.ndarray, dt_s: float) -> float:
        """Heat convected to ambient during the step :meth:`step` would take (exact)."""
        prop = self.propagator(dt_s)
        return float(prop.heat_from_state_j_per_k @ (temps_c - self.ambient_c)
                     + prop.heat_from_power_j_per_w @ power_w)

    # ------------------------------------------------------------------ leakage

    def steady_state_with_leakage(
        self,
        base_power_w: np.ndarray,
        leakage_w: Callable[[np.ndarray], np.ndarray],
        *,
        critical_c: float | None = None,
        tol_c: float = 1e-6,
        max_iter: int = 10_000,
        raise_on_runaway: bool = True,
    ) -> LeakageSteadyState:
        """Fixed point ``T = T_amb + H (P_base + leak(T))`` over the core temperatures.

        ``leakage_w`` maps core temperatures to per-core leakage and must not decrease
        with temperature. The iteration starts from the leakage-free steady state and then
        rises monotonically, staying below every fixed point; so once any core passes
        ``critical_c`` (default: the chip's) no steady state with all cores below it
        exists, and that is reported as runaway.
        """
        critical = self.chip.dtm.critical_c if critical_c is None else critical_c
        base = np.asarray(base_power_w, dtype=float)
        base_rise = self._core_influence @ base
        temps = self.ambient_c + base_rise
        leak = np.zeros(self.n_cores)
        if temps.max() > critical:
            return self._runaway(
                f"the base power alone puts core {int(temps.argmax())} at {temps.max():.1f} C, "
                f"above critical {critical:.1f} C", base, leak, 0, raise_on_runaway)
        for iteration in range(1, max_iter + 1):
            leak = np.asarray(leakage_w(temps), dtype=float)
            new = self.ambient_c + base_rise + self._core_influence @ leak
            if new.max() > critical:
                hot = int(new.argmax())
                return self._runaway(
                    f"thermal runaway: leakage feedback drives core {hot} past critical "
                    f"{critical:.1f} C (leakage {leak.sum():.1f} W in total and rising); no "
                    f"steady state exists below critical", base, leak, iteration, raise_on_runaway)
            done = float(np.max(np.abs(new - temps))) < tol_c
            temps = new
            if done:
                full = self.steady_state(base + leak)
                return LeakageSteadyState(full, leak, iteration, True, False, "converged")
        full = self.steady_state(base + leak)
        return LeakageSteadyState(full, leak, max_iter, False, False,
                                  f"no convergence within {max_iter} iterations (loop gain near 1)")

    def _runaway(self, detail: str, base: np.ndarray, leak: np.ndarray, iterations: int,
                 raise_it: bool) -> LeakageSteadyState:
        # The temperatures reached when the iteration stopped (not a steady state).
        temps = self.steady_state(base + leak)
        if raise_it:
            raise ThermalRunaway(detail, temps[self.core_nodes])
        return LeakageSteadyState(temps, leak, iterations, False, True, detail)

    # ------------------------------------------------------------------ TSP

    def tsp_budget_w(self, active_cores: Sequence[int], limit_c: float,
                     inactive_power_w: float | np.ndarray = 0.0, *,
                     over: str = "active") -> float:
        """Thermal Safe Power (Pagani et al., CODES+ISSS 2014) for ``active_cores``.

        The uniform per-core power that puts the hottest active core exactly at
        ``limit_c`` in steady state while every other core dissipates
        ``inactive_power_w`` (a number or one value per core). Steady state is linear in
        power, so ``P = min_i (limit - T_amb - sum_{j inactive} H_ij P_j) / sum_{j active}
        H_ij``, over active ``i`` as in the paper (``over="active"``).

        In a stack, an idle core above busy ones can be the hottest core on the chip;
        ``over="all"`` takes the minimum over every core so that no core exceeds the limit.

        The budget is total tile power, leakage included: pass idle power evaluated at
        ``limit_c`` and convert the budget to V/f with leakage at ``limit_c`` to stay on the
        safe side. Returns 0 when the inactive cores alone already reach the limit.
        """
        active = np.unique(np.asarray(active_cores, dtype=int))
        if active.size == 0:
            raise ValueError("TSP needs at least one active core")
        if active[0] < 0 or active[-1] >= self.n_cores:
            raise ValueError(f"active cores must be in 0..{self.n_cores - 1}")
        if over not in ("active", "all"):
            raise ValueError(f'over must be "active" or "all", got {over!r}')
        inactive_mask = np.ones(self.n_cores, dtype=bool)
        inactive_mask[active] = False
        idle = np.broadcast_to(np.asarray(inactive_power_w, dtype=float), (self.n_cores,))
        # Every core's budget from the same products, so that "all" (a minimum over a
        # superset) can never come out above "active" by a rounding difference.
        rows = self._core_influence
        headroom = limit_c - self.ambient_c - rows[:, inactive_mask] @ idle[inactive_mask]
        budgets = headroom / rows[:, active].sum(axis=1)
        if over == "active":
            budgets = budgets[active]
        return max(0.0, float(budgets.min()))


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=float)
    a.flags.writeable = False
    return a


class _Network:
    """Assembles G (with the ambient conductances on its diagonal), g_amb and C."""

    def __init__(self, chip: Chip) -> None:
        fp, th = chip.floorplan, chip.thermal
        self.rows, self.cols = fp.rows, fp.cols
        self.w, self.h, self.area = fp.tile_width_m, fp.tile_height_m, fp.tile_area_m2
        n_tiles, n_layers = fp.tiles_per_layer, fp.layers
        self.names: list[str] = []
        die = [self._grid(f"die{l}") for l in range(n_layers)]
        iface = [self._grid(f"iface{l}") for l in range(n_layers)]
        spreader = self._grid("spreader")
        sp_rim = [self._node(f"spreader.{s}") for s in RIM_SIDES]
        sink = self._grid("sink")
        sink_in = [self._node(f"sink.inner.{s}") for s in RIM_SIDES]
        sink_out = [self._node(f"sink.outer.{s}") for s in RIM_SIDES]
        n = len(self.names)
        self.g = np.zeros((n, n))
        self.g_amb = np.zeros(n)
        self.c = np.zeros(n)

        sp, hs = th.spreader, th.sink
        below = [spreader] + die[:-1]  # what each interface sits on
        below_half_r = [sp.thickness_m / 2 / sp.conductivity_w_per_mk] + [
            layer.die_thickness_m / 2 / layer.die_conductivity_w_per_mk for layer in th.layers[:-1]]
        for l, layer in enumerate(th.layers):
            die_half = layer.die_thickness_m / 2 / layer.die_conductivity_w_per_mk  # m^2 K / W
            if_half = layer.interface_thickness_m / 2 / layer.interface_conductivity_w_per_mk
            self._plate(die[l], layer.die_thickness_m, layer.die_conductivity_w_per_mk,
                        layer.die_heat_capacity_j_per_m3k)
            self._plate(iface[l], layer.interface_thickness_m, layer.interface_conductivity_w_per_mk,
                        layer.interface_heat_capacity_j_per_m3k)
            for t in range(n_tiles):
                self._link(die[l][t], iface[l][t], self.area / (die_half + if_half))
                self._link(iface[l][t], below[l][t], self.area / (if_half + below_half_r[l]))

        self._plate(spreader, sp.thickness_m, sp.conductivity_w_per_mk, sp.heat_capacity_j_per_m3k)
        self._plate(sink, hs.thickness_m, hs.conductivity_w_per_mk, hs.heat_capacity_j_per_m3k)
        sp_half = sp.thickness_m / 2 / sp.conductivity_w_per_mk
        hs_half = hs.thickness_m / 2 / hs.conductivity_w_per_mk
        for t in range(n_tiles):
            self._link(spreader[t], sink[t], self.area / (sp_half + hs_half))

        die_w, die_h = fp.die_width_m, fp.die_height_m
        sink_area = hs.side_m ** 2
        outer_area = (hs.side_m ** 2 - sp.side_m ** 2) / 4
        for s in range(4):
            rim_area = self._rim_area(s, die_w, die_h, sp.side_m)
            self._rim(spreader, sp_rim[s], s, sp, die_w, die_h, sp.side_m)
            self._rim(sink, sink_in[s], s, hs, die_w, die_h, sp.side_m)
            self.c[sp_rim[s]] = sp.heat_capacity_j_per_m3k * sp.thickness_m * rim_area
            self.c[sink_in[s]] = hs.heat_capacity_j_per_m3k * hs.thickness_m * rim_area
            self.c[sink_out[s]] = hs.heat_capacity_j_per_m3k * hs.thickness_m * outer_area
            self._link(sp_rim[s], sink_in[s], rim_area / (sp_half + hs_half))
            # Inner rim node (mid-depth) out to the spreader edge, then into the outer rim.
            edge = die_w if s < 2 else die_h
            depth_in = (sp.side_m - (die_h if s < 2 else die_w)) / 2
            depth_out = (hs.side_m - sp.side_m) / 2
            r = (_trapezoid_r(hs, edge, sp.side_m, depth_in, 0.5, 1.0)
                 + _trapezoid_r(hs, sp.side_m, hs.side_m, depth_out, 0.0, 0.5))
            self._link(sink_in[s], sink_out[s], 1.0 / r)
            for node, area in ((sink_in[s], rim_area), (sink_out[s], outer_area)):
                self._to_ambient(node, area, sink_area, th)
        for t in range(n_tiles):
            self._to_ambient(sink[t], self.area, sink_area, th)
        self.g += np.diag(self.g_amb)

    def _node(self, name: str) -> int:
        self.names.append(name)
        return len(self.names) - 1

    def _grid(self, prefix: str) -> list[int]:
        return [self._node(f"{prefix}[{r},{c}]") for r in range(self.rows) for c in range(self.cols)]

    def _link(self, i: int, j: int, g_w_per_k: float) -> None:
        self.g[i, i] += g_w_per_k
        self.g[j, j] += g_w_per_k
        self.g[i, j] -= g_w_per_k
        self.g[j, i] -= g_w_per_k

    def _plate(self, nodes: list[int], thickness_m: float, k: float, cv: float) -> None:
        """Heat capacity of a tile-grid layer and lateral conduction between neighbours."""
        for t in nodes:
            self.c[t] += cv * thickness_m * self.area
        g_along_row = k * thickness_m * self.h / self.w  # to the next column
        g_along_col = k * thickness_m * self.w / self.h  # to the next row
        for r in range(self.rows):
            for c in range(self.cols):
                t = nodes[r * self.cols + c]
                if c + 1 < self.cols:
                    self._link(t, nodes[r * self.cols + c + 1], g_along_row)
                if r + 1 < self.rows:
                    self._link(t, nodes[(r + 1) * self.cols + c], g_along_col)

    @staticmethod
    def _rim_area(side: int, die_w: float, die_h: float, outer: float) -> float:
        edge, depth = (die_w, (outer - die_h) / 2) if side < 2 else (die_h, (outer - die_w) / 2)
        return (edge + outer) / 2 * depth

    def _rim(self, grid: list[int], rim: int, side: int, plate: PackagePlate, die_w: float, die_h: float,
             outer: float) -> None:
        """Edge tiles of ``grid`` to the trapezoidal rim region on ``side``."""
        if side < 2:
            edge, depth = die_w, (outer - die_h) / 2
            row = 0 if side == 0 else self.rows - 1
            tiles = [grid[row * self.cols + c] for c in range(self.cols)]
            tile_len, tile_half = self.w, self.h / 2
        else:
            edge, depth = die_h, (outer - die_w) / 2
            col = 0 if side == 2 else self.cols - 1
            tiles = [grid[r * self.cols + col] for r in range(self.rows)]
            tile_len, tile_half = self.h, self.w / 2
        k_t = plate.conductivity_w_per_mk * plate.thickness_m
        # The rim's conductance is shared among the edge tiles by edge length.
        r_share = _trapezoid_r(plate, edge, outer, depth, 0.0, 0.5) * edge / tile_len
        r_tile = tile_half / (k_t * tile_len)
        for t in tiles:
            self._link(t, rim, 1.0 / (r_tile + r_share))

    def _to_ambient(self, node: int, area: float, sink_area: float, th: ThermalSpec) -> None:
        share = area / sink_area
        self.g_amb[node] += share / th.convection_resistance_k_per_w
        self.c[node] += share * th.convection_capacitance_j_per_k


def _trapezoid_r(plate: PackagePlate, inner_len: float, outer_len: float, depth: float,
                 frm: float, to: float) -> float:
    """Resistance across a trapezoid whose width grows linearly from ``inner_len`` to
    ``outer_len`` over ``depth``, between fractions ``frm`` and ``to`` of the depth."""
    k_t = plate.conductivity_w_per_mk * plate.thickness_m
    growth = outer_len - inner_len
    at_from = inner_len + growth * frm
    at_to = inner_len + growth * to
    return depth / (k_t * growth) * np.log(at_to / at_from)
