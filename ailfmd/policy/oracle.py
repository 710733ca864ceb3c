"""``oracle``: the look-ahead teacher that uses the simulator's full knowledge.

Each decision epoch the oracle takes a snapshot of the :class:`SimPlatform` it controls,
builds a small set of candidate actions, simulates each one for ``horizon_s`` from the
snapshot (the same arrivals, the same physics, the action held for the horizon), and
keeps the best *feasible* one: the one that retires the most instructions while no core
reaches ``limit_c`` (the DTM threshold minus ``margin_c``) anywhere in the look-ahead.
If no candidate is feasible it takes the coolest. The snapshot is restored before the
decision is returned, so the run continues exactly where it was.

Candidates are a placement times a cap shape (docs/oracle.md):

- placements: ``keep`` (affinities as they are), ``cool`` (each live thread pinned to
  its own core, coolest cores nearest the heat sink first), ``central`` (own cores with
  the shortest mean LLC distance first), and, when at most ``exhaustive_threads``
  threads are live, every injective thread-to-core mapping;
- cap shapes: ``uniform`` (every core at one V/f level) and ``layered`` (one level lower
  per die away from the sink); the level is bisected, or, with ``search="all"``, every
  level in ``levels`` is tried;
- the actions the registered baselines would take now (each baseline sees every
  observation, so stateful ones keep their history).

Because the simulator is deterministic and the chosen action is simulated exactly as it
will run for the first epoch, a feasible choice can never push a core over the limit.

With ``rollout=True`` (off by default) the choice is made differently: the baselines'
actions and the winner of the search above are each rolled out to the end of the run
with every baseline continuing after them (``ailfmd.policy.rollout``), and the oracle
takes the candidate of the best roll-out. It is then at least as good as every baseline
run from the start (docs/oracle.md, "Roll-out mode"), at the cost of roll-outs as long
as the rest of the run at every decision.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ailfmd.platform.base import Action, Capabilities, Observation, ThreadRef, Topology
from ailfmd.policy.base import Decision, Policy, Reason
from ailfmd.policy.rollout import EndOutcome, RunEnd, continuation, roll_out
from ailfmd.sim.platform import SimPlatform

SOURCE = "policy:oracle"
DEFAULT_HORIZON_S = 0.3
DEFAULT_EPOCH_S = 0.1
DEFAULT_MARGIN_C = 1.0
SEARCHES = ("bisect", "all")


@dataclass(frozen=True)
class Candidate:
    """One action the oracle may take, with a short name for reasons and statistics."""

    label: str
    action: Action


@dataclass(frozen=True)
class Outcome:
    """What a candidate did over the look-ahead horizon."""

    work_left: float  # instructions still to retire by admitted requests, summed over
    # the epoch ends of the horizon (work done sooner counts more)
    response_s: float  # summed response time of the requests completed so far
    peak_c: float  # hottest core at any step end within the horizon
    feasible: bool

    def key(self) -> tuple[float, float, float]:
        """Order among feasible candidates: less work left, then sooner completions,
        then cooler."""
        return (self.work_left, self.response_s, self.peak_c)


class Oracle:
    """Look-ahead search over mappings and V/f caps on ``platform``'s snapshots.

    ``horizon_s`` is the look-ahead (held action), ``epoch_s`` the control period the
    run uses (the look-ahead advances in epochs), ``margin_c`` the distance kept below
    the DTM threshold. ``levels`` restricts the V/f level indices tried (default all);
    ``search`` is ``"bisect"`` (the highest feasible level per family, assuming a lower
    level is never hotter) or ``"all"`` (every level). ``exhaustive_threads`` enumerates
    every mapping when at most that many threads are live. ``baselines`` names the
    baselines whose actions are candidates too (default every registered one).

    ``rollout`` turns on the roll-out mode: candidates are the baselines' actions and the
    search's winner, compared by roll-outs to the end of the run in which each baseline
    continues. ``drain_s`` must then be the run's drain (``Scenario.drain_s``), so that
    the roll-outs end where the run ends.
    """

    name = "oracle"

    def __init__(self, platform: SimPlatform, horizon_s: float = DEFAULT_HORIZON_S,
                 epoch_s: float = DEFAULT_EPOCH_S, margin_c: float = DEFAULT_MARGIN_C,
                 levels: Sequence[int] | None = None, search: str = "bisect",
                 exhaustive_threads: int = 0, baselines: Sequence[str] | None = None,
                 rollout: bool = False, drain_s: float = 0.0) -> None:
        if not horizon_s > 0 or not epoch_s > 0 or margin_c < 0 or drain_s < 0:
            raise ValueError("horizon_s and epoch_s must be > 0, margin_c and drain_s >= 0")
        if search not in SEARCHES:
            raise ValueError(f"search must be one of {SEARCHES}, not {search!r}")
        self.platform = platform
        self.horizon_s = horizon_s
        self.epoch_s = epoch_s
        self.margin_c = margin_c
        self.levels = levels
        self.search = search
        self.exhaustive_threads = exhaustive_threads
        self.baselines = baselines
        self.rollout = rollout
        self.drain_s = drain_s
        self.decision_s_: list[float] = []  # wall time of each decision
        self.simulations_: list[int] = []  # look-ahead runs of each decision
        self.rollouts_: list[int] = []  # roll-outs to the end of each decision (roll-out mode)
        self.rollout_best_: list[EndOutcome] = []  # the chosen roll-out's end, per decision
        self._program_work: dict[int, float] = {}  # pid -> instructions per thread
        self._baselines: dict[str, Policy] = {}

    # ------------------------------------------------------------------ policy

    def reset(self, topology: Topology, capabilities: Capabilities) -> None:
        from ailfmd.policy.baselines import baseline_names, get_baseline

        chip = self.platform.chip
        self.limit_c = chip.dtm.threshold_c - self.margin_c
        freqs = self.platform.engine.levels.freq_khz
        self._freq_khz = [int(f) for f in freqs]
        top = len(self._freq_khz) - 1
        chosen = range(top + 1) if self.levels is None else self.levels
        self._levels = sorted({min(max(int(lv), 0), top) for lv in chosen})
        self._layer = np.array([chip.position(c)[0] for c in range(chip.n_cores)])
        self._llc_rank = _llc_distance_order(self.platform)
        names = baseline_names() if self.baselines is None else self.baselines
        self._baselines = {n: get_baseline(n, chip) for n in names}
        for policy in self._baselines.values():
            policy.reset(topology, capabilities)
        if self.rollout and not self._baselines:
            raise ValueError("roll-out mode needs at least one baseline to continue")
        self._end = RunEnd.of(self.platform, self.epoch_s, self.drain_s)

    def decide(self, obs: Observation) -> Decision:
        t0 = time.perf_counter()
        p = self.platform
        snap = p.snapshot()
        candidates = self._baseline_candidates(obs)
        outcomes: dict[str, Outcome] = {}
        n_baselines = len(candidates)
        try:
            for c in candidates:
                outcomes[c.label] = self._simulate(snap, c.action)
            for placement in self._placements(obs):
                for shape in ("uniform", "layered"):
                    best = self._search_levels(snap, placement, shape, outcomes)
                    if best is not None:
                        candidates.append(best)
        finally:
            p.restore_snapshot(snap)
        by_label = {c.label: c for c in candidates}
        feasible = [lbl for lbl in by_label if outcomes[lbl].feasible]
        if feasible:
            # Most work retired; then the cooler; then the earlier (simpler) candidate.
            order = {lbl: i for i, lbl in enumerate(by_label)}
            label = min(feasible, key=lambda lbl: (*outcomes[lbl].key(), order[lbl]))
        else:
            label = min(by_label, key=lambda lbl: outcomes[lbl].peak_c)
        rolled = None
        if self.rollout:
            rolled = self._best_rollout(snap, candidates[:n_baselines] + [by_label[label]])
            label = rolled[0]
        chosen, out = by_label[label], outcomes[label]
        elapsed = time.perf_counter() - t0
        self.decision_s_.append(elapsed)
        self.simulations_.append(len(outcomes))
        verdict = ("feasible" if out.feasible else
                   f"no candidate stays below {self.limit_c:g} °C; the coolest")
        detail = (f"{label}: best of {len(by_label)} candidates ({len(outcomes)} look-aheads "
                  f"of {self.horizon_s:g} s, {len(feasible)} feasible), {verdict}")
        if rolled is not None:
            end = self.rollout_best_[-1]
            detail = (f"{label}, then {rolled[1]} to the end: the best of {rolled[2]} roll-outs "
                      f"after {len(outcomes)} look-aheads; the run would end with "
                      f"{end.time_above_dtm_s:g} s above DTM, {end.requests_completed} requests "
                      f"completed, mean response {end.mean_response_s * 1e3:.3f} ms")
        reason = Reason(
            target="all cpus and threads", kind="freq_cap+placement", source=SOURCE,
            detail=detail, value_c=out.peak_c, threshold_c=self.limit_c,
            predicted=f"peak {out.peak_c:.1f} °C, {out.work_left:.3g} instructions left")
        info: dict[str, float | str] = {"candidate": label, "lookaheads": float(len(outcomes)),
                                        "decision_ms": elapsed * 1e3}
        if rolled is not None:
            info.update({"rollout_base": rolled[1], "rollouts": float(rolled[2])})
        return Decision(chosen.action, (reason,), info)

    # ------------------------------------------------------------------ roll-outs

    def _best_rollout(self, snap: object, candidates: list[Candidate]) -> tuple[str, str, int]:
        """(candidate label, continuing baseline, roll-outs run) of the best roll-out.

        Every distinct candidate action is rolled out to the end of the run with every
        baseline continuing: a copy of the baseline instance that has decided on every
        observation of this run, this one included, as it would have in the roll-out the
        oracle followed. Among them "a baseline's own action, then that baseline" replays
        the previous decision's best roll-out exactly, so the best end never gets worse.
        Ties go to the earlier pair (baselines in ``baselines`` order, the search's winner
        last). The platform is restored to ``snap``.
        """
        distinct: list[Candidate] = []
        for c in candidates:
            if all(c.action != d.action for d in distinct):
                distinct.append(c)
        best: tuple[EndOutcome, str, str] | None = None
        try:
            for c in distinct:
                for name, policy in self._baselines.items():
                    base = continuation(policy, self.platform)
                    end = roll_out(self.platform, snap, c.action, base, self._end)
                    if best is None or end.key() < best[0].key():
                        best = (end, c.label, name)
        finally:
            self.platform.restore_snapshot(snap)
        if best is None:
            raise ValueError("roll-out mode needs at least one baseline to continue")
        runs = len(distinct) * len(self._baselines)
        self.rollouts_.append(runs)
        self.rollout_best_.append(best[0])
        return best[1], best[2], runs

    # ------------------------------------------------------------------ look-ahead

    def _simulate(self, snap: object, action: Action) -> Outcome:
        """Apply ``action`` on ``snap`` and run the horizon; the state is left there."""
        p = self.platform
        p.restore_snapshot(snap)
        start_peak = p.metrics().peak_temp_c
        p.apply(action)
        steps = max(1, round(self.horizon_s / self.epoch_s))
        end_c = float(p.engine.state.temps_c.max())
        work_left = 0.0
        for _ in range(steps):
            p.advance(self.epoch_s)
            end_c = max(end_c, float(p.engine.state.temps_c.max()))
            work_left += self._work_left()
        m = p.metrics()
        # The run's peak covers every step end (DTM sub-steps included); it tells the
        # look-ahead's own peak whenever it rose above what the run had seen before.
        peak = m.peak_temp_c if m.peak_temp_c > start_peak else end_c
        response_s = (m.mean_response_s or 0.0) * m.requests_completed
        return Outcome(work_left, response_s, peak, peak < self.limit_c)

    def _work_left(self) -> float:
        """Instructions that admitted requests still have to retire.

        Arrivals do not depend on the policy, so across candidates less work left means
        more work done. Reads the engine's live requests and threads (read only).
        """
        engine = self.platform.engine
        st = engine.state
        per_thread = self._program_work
        for active in st.active:
            if active.pid not in per_thread:
                program = self.platform.workload.program(active.request)
                per_thread[active.pid] = float(program.instructions.sum())
        if len(st.threads) == 0:
            return 0.0
        done = engine.thread_counters()[:, 0]
        total = np.array([per_thread[int(pid)] for pid in st.threads.pid.tolist()])
        return float(np.maximum(total - done, 0.0).sum())

    def _search_levels(self, snap: object, placement: tuple[str, dict[ThreadRef, frozenset[int]]],
                       shape: str, outcomes: dict[str, Outcome]) -> Candidate | None:
        """The best level of one family (placement x cap shape), by bisection or all."""
        pname, affinity = placement
        if shape == "layered" and int(self._layer.max()) == 0:
            return None  # one die: layered caps equal uniform ones

        def make(level: int) -> Candidate:
            label = f"{pname}/{shape}@{self._freq_khz[level] // 1000}MHz"
            return Candidate(label, Action(affinity=affinity, freq_cap_khz=self._caps(shape, level)))

        def run(level: int) -> tuple[Candidate, Outcome]:
            c = make(level)
            if c.label not in outcomes:
                outcomes[c.label] = self._simulate(snap, c.action)
            return c, outcomes[c.label]

        levels = self._levels
        if self.search == "all":
            results = [run(lv) for lv in levels]
            feasible = [r for r in results if r[1].feasible]
            pool = feasible or results
            key = (lambda r: r[1].key()) if feasible else (lambda r: r[1].peak_c)
            return min(pool, key=key)[0]
        # Bisection for the highest feasible level (progress grows with the level).
        top_c, top_o = run(levels[-1])
        if top_o.feasible:
            return top_c
        lo, hi = 0, len(levels) - 1  # levels[hi] infeasible
        low_c, low_o = run(levels[0])
        if not low_o.feasible:
            return low_c
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if run(levels[mid])[1].feasible:
                lo = mid
            else:
                hi = mid
        return make(levels[lo])

    def _caps(self, shape: str, level: int) -> dict[int, int]:
        if shape == "uniform":
            lv = np.full(len(self._layer), level)
        else:
            lv = np.maximum(level - self._layer, 0)
        return {cpu: self._freq_khz[int(v)] for cpu, v in enumerate(lv)}

    # ------------------------------------------------------------------ candidates

    def _baseline_candidates(self, obs: Observation) -> list[Candidate]:
        out = []
        for name, policy in self._baselines.items():
            out.append(Candidate(f"baseline:{name}", policy.decide(obs).action))
        return out

    def _placements(self, obs: Observation) -> list[tuple[str, dict[ThreadRef, frozenset[int]]]]:
        threads = sorted(obs.threads.values(), key=lambda s: s.ref.tid)
        out: list[tuple[str, dict[ThreadRef, frozenset[int]]]] = [("keep", {})]
        if not threads:
            return out
        n = len(self._layer)
        temps = np.array([obs.cpus[c].temp.temp_c or 0.0 for c in range(n)])
        cool = sorted(range(n), key=lambda c: (self._layer[c], temps[c], c))
        out.append(("cool", _pin(threads, cool)))
        out.append(("central", _pin(threads, self._llc_rank)))
        if len(threads) <= self.exhaustive_threads:
            for cores in itertools.permutations(range(n), len(threads)):
                mapping = {s.ref: frozenset((c,)) for s, c in zip(threads, cores)}
                out.append(("map" + "-".join(map(str, cores)), mapping))
        return out


def _pin(threads: list, order: list[int]) -> dict[ThreadRef, frozenset[int]]:
    """Each thread on its own core, taking cores in ``order``; a thread already on one of
    the chosen cores stays there (no needless migration). Wraps if threads outnumber cores."""
    k = min(len(threads), len(order))
    chosen = order[:k]
    free = [c for c in chosen]
    mapping: dict[ThreadRef, frozenset[int]] = {}
    rest = []
    for s in threads:
        if s.last_cpu in free:
            free.remove(s.last_cpu)
            mapping[s.ref] = frozenset((s.last_cpu,))
        else:
            rest.append(s)
    for i, s in enumerate(rest):
        core = free[i] if i < len(free) else order[i % len(order)]
        mapping[s.ref] = frozenset((core,))
    return mapping


def _llc_distance_order(platform: SimPlatform) -> list[int]:
    """Cores by mean LLC latency (S-NUCA: all banks), shortest first."""
    latency = np.asarray(platform.engine.perf.llc_latency_ns, dtype=float)
    return sorted(range(len(latency)), key=lambda c: (latency[c], c))


def cost_summary(oracle: Oracle) -> dict[str, float]:
    """Wall time per decision (mean, max, in ms) and look-aheads per decision."""
    if not oracle.decision_s_:
        return {"decisions": 0.0}
    s = np.array(oracle.decision_s_) * 1e3
    return {"decisions": float(len(s)), "mean_ms": float(s.mean()), "max_ms": float(s.max()),
            "lookaheads_mean": float(np.mean(oracle.simulations_))}
