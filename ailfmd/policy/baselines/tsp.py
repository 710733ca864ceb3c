"""``tsp``: Thermal Safe Power budgets with a fixed mapping.

Follows Pagani, Khdr, Munawar, Chen, Shafique, Li and Henkel, "TSP: Thermal Safe Power -
Efficient power budgeting for many-core systems in dark silicon", CODES+ISSS 2014:

- **Mapping** (fixed, no migration): threads are pinned, in order of thread id, to the
  free CPU that comes first in a fixed order (ascending CPU id; on the simulated chips
  that is layer 0, the die nearest the sink, row by row, then the layers above). A pinned
  thread stays where it is until it exits. With more threads than CPUs the order starts
  over (CPUs are shared).
- **Budget**: for the set A of CPUs holding a thread, the uniform per-core power that puts
  the hottest core exactly at ``limit_c`` in steady state while every other core idles,
  ``ThermalModel.tsp_budget_w(A, limit_c, P_idle(limit_c), over=...)``. On a stack of
  dies the minimum is taken over *all* cores (``over="all"``), so idle dies above busy
  ones stay under the limit too; on one die over the active cores, as in the paper.
- **Caps**: the budget becomes the highest V/f level whose tile power at activity
  ``activity`` and leakage at ``limit_c`` fits it (``PowerModel.freq_for_budget_mhz``),
  applied to every CPU (an idle CPU that receives a new thread before the next epoch
  then runs at most at that level).

The policy needs the chip's thermal and power models. ``TspBaseline(chip)`` or
``get_baseline("tsp").configure(chip)`` provide them (a harness that knows the chip,
such as the bench, calls ``configure``). Without a chip (a real Linux machine, or nobody
called ``configure``) there is no budget to compute; the policy keeps the fixed mapping
and caps every CPU at its lowest hardware frequency, the only level a datasheet
guarantees safe with every core busy, and every Reason says so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ailfmd.platform.base import Action, Capabilities, Observation, Topology
from ailfmd.policy.base import Decision
from ailfmd.policy.baselines.common import cap_changes, ladders_khz, least_loaded, level_at_or_below, pin_changes

if TYPE_CHECKING:
    from ailfmd.sim.chip import Chip

SOURCE = "policy:tsp"
KHZ_PER_MHZ = 1000
BUDGET_CACHE_SIZE = 256  # active sets remembered; a fixed mapping revisits few of them


class ChipModel:
    """The thermal and power models of a simulated chip, built once per chip."""

    def __init__(self, chip: Chip) -> None:
        # Imported here: a policy without a chip (real Linux) never needs the simulator.
        from ailfmd.sim.power import PowerModel
        from ailfmd.sim.thermal import ThermalModel

        self.chip = chip
        self.thermal = ThermalModel(chip)
        self.power = PowerModel(chip)
        self.over = "all" if chip.floorplan.layers > 1 else "active"

    def budget_w(self, active: list[int], limit_c: float) -> float:
        idle_w = float(self.power.idle_tile_power_w(limit_c))
        return self.thermal.tsp_budget_w(active, limit_c, idle_w, over=self.over)

    def freq_mhz(self, budget_w: float, activity: float, limit_c: float) -> float:
        return float(self.power.freq_for_budget_mhz(budget_w, activity, limit_c)[0])


class UsesChipModel:
    """Shared by the baselines that need the chip's thermal and power models (tsp, pcgov):
    ``configure(chip)`` hands them the chip; without it they run their model-free fallback."""

    chip: Chip | None
    limit_c: float | None
    limit_below_dtm_c: float
    _model: ChipModel | None

    def configure(self, chip: Chip) -> "UsesChipModel":
        """Give the policy the chip it runs on; returns self."""
        self.chip = chip
        self._model = None
        self._on_configure()
        return self

    def _on_configure(self) -> None:
        """Drop whatever was derived from the previous chip."""

    @property
    def model(self) -> ChipModel | None:
        if self._model is None and self.chip is not None:
            self._model = ChipModel(self.chip)
        return self._model

    @property
    def effective_limit_c(self) -> float | None:
        """The steady-state limit: ``limit_c``, else the chip's DTM threshold minus the margin."""
        if self.limit_c is not None:
            return self.limit_c
        if self.chip is None:
            return None
        return self.chip.dtm.threshold_c - self.limit_below_dtm_c


def fixed_order_placement(obs: Observation, order: list[int], placed: dict[int, int]) -> dict[int, int]:
    """Threads (by tid) -> CPU: keep ``placed`` ones, give new ones the first free CPU
    (of their cpuset)."""
    live = {tid: cpu for tid, cpu in placed.items() if tid in obs.threads and cpu in obs.cpus}
    if not order:
        return live
    load = {cpu: 0 for cpu in order}
    for cpu in live.values():
        load[cpu] = load.get(cpu, 0) + 1
    for tid in sorted(obs.threads):
        if tid in live:
            continue
        cpu = least_loaded(order, load, obs.threads[tid].cpuset)
        live[tid] = cpu
        load[cpu] += 1
    return live


class TspBaseline(UsesChipModel):
    name = "tsp"

    def __init__(self, chip: Chip | None = None, limit_c: float | None = None,
                 limit_below_dtm_c: float = 1.0, activity: float = 1.0) -> None:
        self.chip = chip
        self.limit_c = limit_c
        self.limit_below_dtm_c = limit_below_dtm_c
        self.activity = activity
        self._model: ChipModel | None = None
        self._placed: dict[int, int] = {}
        self._order: list[int] = []
        self._budget_cache: dict[tuple[int, ...], tuple[float, float]] = {}

    def _on_configure(self) -> None:
        self._budget_cache = {}

    def reset(self, topology: Topology, capabilities: Capabilities) -> None:
        self._order = list(topology.online_cpus)
        self._placed = {t: c for t, c in self._placed.items() if c in topology.cpus}

    def budget(self, active: list[int]) -> tuple[float, float]:
        """(per-core budget W, frequency MHz) for the CPUs in ``active`` (needs the chip)."""
        key = tuple(sorted(set(active)))
        if key not in self._budget_cache:
            model, limit = self.model, self.effective_limit_c
            assert model is not None and limit is not None
            budget = model.budget_w(list(key), limit)
            if len(self._budget_cache) >= BUDGET_CACHE_SIZE:
                self._budget_cache.clear()
            self._budget_cache[key] = (budget, model.freq_mhz(budget, self.activity, limit))
        return self._budget_cache[key]

    def decide(self, obs: Observation) -> Decision:
        order = [c for c in (self._order or sorted(obs.cpus)) if c in obs.cpus]
        self._placed = fixed_order_placement(obs, order, self._placed)
        affinity, reasons = pin_changes(
            obs, self._placed, SOURCE,
            lambda s, cpu: f"fixed mapping: next free cpu in id order is {cpu} (no migration)")
        active = sorted(set(self._placed.values()))
        ladders = ladders_khz(obs)
        caps: dict[int, int] = {}
        if self.model is not None:
            if active:
                budget_w, freq_mhz = self.budget(active)
                why = (f"TSP for {len(active)} active cpus: {budget_w:.2f} W per core "
                       f"(limit {self.effective_limit_c:.1f} C, {self.model.over} cores) "
                       f"-> {freq_mhz:.0f} MHz")
                for cpu, ladder in ladders.items():
                    caps[cpu] = level_at_or_below(ladder, freq_mhz * KHZ_PER_MHZ)
            else:
                why = "no active cpus: no budget needed, caps at the maximum"
                caps = {cpu: ladder[0] for cpu, ladder in ladders.items()}
        else:
            why = ("no chip thermal model (not a simulated chip, or configure(chip) not "
                   "called): conservative fallback, cap at the lowest hardware frequency")
            caps = {cpu: ladder[-1] for cpu, ladder in ladders.items()}
        cap_actions, cap_reasons = cap_changes(obs, caps, SOURCE, lambda cpu, khz: why)
        mode = "budget" if self.model is not None else "fallback: lowest frequency, no chip model"
        return Decision(Action(affinity=affinity, freq_cap_khz=cap_actions),
                        tuple(reasons + cap_reasons), info={"tsp": mode})
