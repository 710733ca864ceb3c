"""``pcgov``: cache-distance-aware mapping with power budgets shifted by thread phase.

After PCGov, Rapp, Sagi, Pathania, Herkersdorf and Henkel, "Power- and Cache-Aware Task
Mapping with Dynamic Power Budgeting for Many-Cores", IEEE Transactions on Computers
69(1), 2020 (doi:10.1109/TC.2019.2935446): on an S-NUCA many-core, cores near the centre
have the lowest mean LLC latency but the smallest thermally safe power budget, and a
memory-bound phase gains little from frequency, so power is better spent on
compute-bound phases. Our rule, per epoch:

1. **Classify** each thread from its counters over the last interval: *memory-bound* if
   its LLC misses per kilo-instruction reach ``mpki_threshold`` (or, where LLC misses
   are not measurable, its IPC is below ``ipc_threshold``); otherwise *compute-bound*.
   A thread with no measurement keeps its class; a new one starts compute-bound (an
   inference request starts with its prompt, which is compute-bound).
2. **Rank cores** by the mean S-NUCA LLC latency of their position
   (``ailfmd.sim.noc.mean_llc_latency_cycles``, with the chip's hop costs, or 6/3/8
   cycles without a chip). *Central* order: lowest latency first. *Cool* order: nearest
   the sink first (lowest layer), then the highest latency (edge tiles, where the
   spreader draws heat sideways). Without positions (real machines) every core has the
   same latency and both orders are CPU id order.
3. **Map**: a thread keeps its CPU while its class is unchanged; a new or reclassified
   thread takes the least-loaded CPU, first in the central order if memory-bound and in
   the cool order if compute-bound.
4. **Budget** (needs the chip; ``configure(chip)``): the uniform TSP budget B of the
   active CPUs (Pagani et al. 2014, ``over="all"`` on stacks). Memory-bound CPUs get
   ``memory_budget_fraction * B``; the power freed is added equally to the compute-bound
   CPUs, but no more than keeps every core at or below the limit in steady state (checked
   with the thermal model, as PCGov's dynamic budgeting checks its non-uniform budget).
   Budgets become V/f caps with leakage at the limit, as for ``tsp``. Idle CPUs get B's
   level.
   Without a chip: compute-bound CPUs at the hardware maximum, memory-bound ones at the
   highest ladder level not above ``memory_freq_fraction`` of it (hardware DTM alone
   guards the temperature; the Reasons say so).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ailfmd.platform.base import Action, Capabilities, Observation, ThreadSample, Topology
from ailfmd.policy.base import Decision
from ailfmd.policy.baselines.common import (
    cap_changes,
    ipc,
    ladders_khz,
    least_loaded,
    level_at_or_below,
    mpki,
    pin_changes,
)
from ailfmd.policy.baselines.tsp import KHZ_PER_MHZ, ChipModel, UsesChipModel

if TYPE_CHECKING:
    from ailfmd.sim.chip import Chip

SOURCE = "policy:pcgov"
MEMORY, COMPUTE = "memory-bound", "compute-bound"
# Hop costs when no chip is given: HotSniper's kingscross-nuca values (docs/chips.md).
DEFAULT_HOP_H_CYCLES, DEFAULT_HOP_V_CYCLES, DEFAULT_BANK_CYCLES = 6.0, 3.0, 8.0


class PcgovBaseline(UsesChipModel):
    name = "pcgov"

    def __init__(self, chip: Chip | None = None, mpki_threshold: float = 10.0,
                 ipc_threshold: float = 1.0, memory_budget_fraction: float = 0.6,
                 memory_freq_fraction: float = 0.6, limit_c: float | None = None,
                 limit_below_dtm_c: float = 1.0, activity: float = 1.0) -> None:
        self.chip = chip
        self.mpki_threshold = mpki_threshold
        self.ipc_threshold = ipc_threshold
        self.memory_budget_fraction = memory_budget_fraction
        self.memory_freq_fraction = memory_freq_fraction
        self.limit_c = limit_c
        self.limit_below_dtm_c = limit_below_dtm_c
        self.activity = activity
        self._model: ChipModel | None = None
        self._latency: dict[int, float] = {}
        self._layer: dict[int, int] = {}
        self._class: dict[int, str] = {}  # tid -> class
        self._placed: dict[int, int] = {}  # tid -> cpu

    def reset(self, topology: Topology, capabilities: Capabilities) -> None:
        from ailfmd.sim.noc import mean_llc_latency_cycles

        positions = {c: t.position for c, t in topology.cpus.items() if t.position is not None}
        self._latency, self._layer = {}, {}
        if positions and len(positions) == len(topology.cpus):
            layers = max(p[0] for p in positions.values()) + 1
            rows = max(p[1] for p in positions.values()) + 1
            cols = max(p[2] for p in positions.values()) + 1
            noc = self.chip.noc if self.chip is not None else None
            lat = mean_llc_latency_cycles(
                layers, rows, cols,
                noc.hop_horizontal_cycles if noc else DEFAULT_HOP_H_CYCLES,
                noc.hop_vertical_cycles if noc else DEFAULT_HOP_V_CYCLES,
                noc.llc_bank_access_cycles if noc else DEFAULT_BANK_CYCLES)
            for cpu, (l, r, c) in positions.items():
                self._latency[cpu] = float(lat[l * rows * cols + r * cols + c])
                self._layer[cpu] = l
        self._placed = {t: c for t, c in self._placed.items() if c in topology.cpus}

    # ------------------------------------------------------------------ rules

    def classify(self, sample: ThreadSample, previous: str | None) -> str:
        """Memory- or compute-bound from the last interval's counters (see module doc)."""
        m = mpki(sample)
        if m is not None:
            return MEMORY if m >= self.mpki_threshold else COMPUTE
        i = ipc(sample)
        if i is not None:
            return MEMORY if i < self.ipc_threshold else COMPUTE
        return previous or COMPUTE

    def central_order(self, cpus: list[int]) -> list[int]:
        return sorted(cpus, key=lambda c: (round(self._latency.get(c, 0.0), 9), self._layer.get(c, 0), c))

    def cool_order(self, cpus: list[int]) -> list[int]:
        return sorted(cpus, key=lambda c: (self._layer.get(c, 0), -round(self._latency.get(c, 0.0), 9), c))

    def _map(self, obs: Observation, classes: dict[int, str]) -> dict[int, int]:
        cpus = sorted(obs.cpus)
        if not cpus:
            return {}
        orders = {MEMORY: self.central_order(cpus), COMPUTE: self.cool_order(cpus)}
        placed = {t: c for t, c in self._placed.items()
                  if t in obs.threads and c in obs.cpus and self._class.get(t) == classes[t]}
        load = {c: 0 for c in cpus}
        for c in placed.values():
            load[c] += 1
        # Memory-bound first, most memory-bound first, so they get the central cores.
        pending = sorted((t for t in obs.threads if t not in placed),
                         key=lambda t: (classes[t] != MEMORY, -(mpki(obs.threads[t]) or 0.0), t))
        for tid in pending:
            cpu = least_loaded(orders[classes[tid]], load, obs.threads[tid].cpuset)
            placed[tid] = cpu
            load[cpu] += 1
        return placed

    def _caps(self, obs: Observation, classes: dict[int, str], placed: dict[int, int]
              ) -> tuple[dict[int, int], dict[int, str]]:
        ladders = ladders_khz(obs)
        mem_cpus = {c for t, c in placed.items() if classes[t] == MEMORY}
        # A CPU shared by both classes counts as compute-bound: it needs the clock.
        comp_cpus = {c for t, c in placed.items() if classes[t] == COMPUTE}
        mem_cpus -= comp_cpus
        caps: dict[int, int] = {}
        why: dict[int, str] = {}
        model, limit = self.model, self.effective_limit_c
        if model is None or limit is None:
            for cpu, ladder in ladders.items():
                if cpu in mem_cpus:
                    caps[cpu] = level_at_or_below(ladder, ladder[0] * self.memory_freq_fraction)
                    why[cpu] = (f"memory-bound: {self.memory_freq_fraction:.0%} of the maximum "
                                f"(no chip model: hardware DTM guards the temperature)")
                else:
                    caps[cpu] = ladder[0]
                    why[cpu] = "compute-bound or idle: maximum (no chip model)"
            return caps, why
        active = sorted(mem_cpus | comp_cpus)
        if not active:
            return {c: lad[0] for c, lad in ladders.items()}, {c: "no threads: maximum" for c in ladders}
        budgets, uniform = self.budgets_w(sorted(mem_cpus), sorted(comp_cpus))
        for cpu, ladder in ladders.items():
            b = budgets.get(cpu, uniform)
            f_mhz = model.freq_mhz(b, self.activity, limit)
            caps[cpu] = level_at_or_below(ladder, f_mhz * KHZ_PER_MHZ)
            kind = MEMORY if cpu in mem_cpus else COMPUTE if cpu in comp_cpus else "idle"
            why[cpu] = (f"{kind}: budget {b:.2f} W (uniform TSP {uniform:.2f} W for "
                        f"{len(active)} active cpus, limit {limit:.1f} C) -> {f_mhz:.0f} MHz")
        return caps, why

    def budgets_w(self, mem_cpus: list[int], comp_cpus: list[int]) -> tuple[dict[int, float], float]:
        """Per-CPU budgets (W) after shifting from memory- to compute-bound CPUs, and the
        uniform TSP budget they start from (needs the chip)."""
        model, limit = self.model, self.effective_limit_c
        assert model is not None and limit is not None
        active = sorted(set(mem_cpus) | set(comp_cpus))
        uniform = model.budget_w(active, limit)
        if not mem_cpus or not comp_cpus:
            return {c: uniform for c in active}, uniform
        n = model.chip.n_cores
        idle_w = float(model.power.idle_tile_power_w(limit))
        base = np.full(n, idle_w)
        base[mem_cpus] = self.memory_budget_fraction * uniform
        base[comp_cpus] = uniform
        boost = np.zeros(n)
        boost[comp_cpus] = 1.0
        t0 = model.thermal.steady_state(base)[:n]
        per_w = model.thermal.steady_state(base + boost)[:n] - t0  # K per W of boost
        wanted = (1.0 - self.memory_budget_fraction) * uniform * len(mem_cpus) / len(comp_cpus)
        room = np.where(per_w > 0, (limit - t0) / np.where(per_w > 0, per_w, 1.0), np.inf)
        extra = max(0.0, min(wanted, float(room.min())))
        out = {c: float(base[c]) for c in mem_cpus}
        out.update({c: uniform + extra for c in comp_cpus})
        return out, uniform

    # ------------------------------------------------------------------ decide

    def decide(self, obs: Observation) -> Decision:
        classes = {t: self.classify(s, self._class.get(t)) for t, s in obs.threads.items()}
        placed = self._map(obs, classes)
        self._class, self._placed = classes, placed

        def placement_why(sample: ThreadSample, cpu: int) -> str:
            m = mpki(sample)
            measured = f"{m:.1f} MPKI" if m is not None else "no LLC measurement"
            lat = self._latency.get(cpu)
            where = f"mean LLC latency {lat:.1f} cycles" if lat is not None else "no position known"
            order = "most central free cpu" if classes[sample.ref.tid] == MEMORY else "coolest free cpu"
            return f"{classes[sample.ref.tid]} ({measured}): {order} {cpu}, {where}"

        affinity, reasons = pin_changes(obs, placed, SOURCE, placement_why)
        caps, why = self._caps(obs, classes, placed)
        cap_actions, cap_reasons = cap_changes(obs, caps, SOURCE, lambda cpu, khz: why[cpu])
        return Decision(Action(affinity=affinity, freq_cap_khz=cap_actions),
                        tuple(reasons + cap_reasons))
