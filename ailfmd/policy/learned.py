"""The learned policy's contract: model inputs, outputs and action decoding.

The trainer and the runtime (:mod:`ailfmd.policy.onnx_policy`) both build the model's
inputs and decode its outputs with this module, so what was trained is exactly what runs.
A policy model has two heads, stored together in one ONNX graph:

- **cap head** (input ``cap_input``, output ``cap_frac``): one row per CPU, the CPU's
  feature row followed by :data:`CONTEXT_COLUMNS` (chip-wide summaries every row
  shares, because the right cap depends on the whole chip's heat, not one core's); the
  output is the cap as a fraction of the CPU's hardware maximum. Decoding snaps it to
  the nearest step of the CPU's frequency ladder.
- **pair head** (output ``pair_score``): one score per (thread, CPU) pair, how likely the
  teacher would run that thread there. It is trained on whole pair rows
  (``PAIR_COLUMNS``: thread, core and pair columns), but because its first layer is
  linear the graph takes the parts — ``thread_input`` (one row per thread), the core
  columns of ``cap_input`` and ``pair_input`` (only the pairs' own columns,
  ``build_pair_own``) — and adds their products: the 4096-row pair matrix of a 64 x 64
  decision is never built. Decoding gives every thread its own CPU, best scores first
  (:func:`assign`); with more threads than CPUs the CPUs are shared.

Everything is numpy and cheap: a 64-CPU, 64-thread decision decodes in tens of µs.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from ailfmd.platform.base import Observation
from ailfmd.policy.baselines.common import ladders_khz
from ailfmd.policy.feature_schema import (
    CORE_COLUMNS,
    PAIR_OWN_COLUMNS,
    SLOPE_SCALE_C_PER_S,
    TEMP_REF_C,
    TEMP_SCALE_C,
    THREAD_COLUMNS,
)

POLICY_FORMAT = "ailfmd.policy/1"
METADATA_KEY = "ailfmd.policy"  # ONNX metadata_props key holding the policy's JSON card

CAP_INPUT, CAP_OUTPUT = "cap_input", "cap_frac"
THREAD_INPUT = "thread_input"
PAIR_INPUT, PAIR_OUTPUT = "pair_input", "pair_score"

CONTEXT_COLUMNS = (
    "ctx.temp_max",  # hottest CPU (normalised like temp)
    "ctx.temp_mean",
    "ctx.slope_max",  # fastest-heating CPU
    "ctx.group_temp_max",  # hottest CPU at the same distance from the sink (same die)
    "ctx.threads_per_cpu",  # managed threads / CPUs
    "ctx.util_mean",  # mean thread utilisation
    "ctx.mem_bound_mean",
    "ctx.mpki_mean",
)
CAP_COLUMNS = tuple(f"core.{c}" for c in CORE_COLUMNS) + CONTEXT_COLUMNS

_CI = {n: i for i, n in enumerate(CORE_COLUMNS)}
_TI = {n: i for i, n in enumerate(THREAD_COLUMNS)}


def cap_inputs(core: np.ndarray, thread: np.ndarray) -> np.ndarray:
    """float32 ``[n_cpus, len(CAP_COLUMNS)]``: each CPU's row plus the chip context."""
    n = core.shape[0]
    out = np.empty((n, len(CAP_COLUMNS)), dtype=np.float32)
    k = core.shape[1]
    out[:, :k] = core
    ctx = out[:, k:]
    if n == 0:
        return out
    has_t = core[:, _CI["temp_missing"]] < 0.5
    temp = core[:, _CI["temp"]]
    t_known = temp[has_t]
    ctx[:, 0] = t_known.max() if t_known.size else 0.0
    ctx[:, 1] = t_known.mean() if t_known.size else 0.0
    slope_known = core[core[:, _CI["temp_slope_missing"]] < 0.5, _CI["temp_slope"]]
    ctx[:, 2] = slope_known.max() if slope_known.size else 0.0
    # Hottest CPU of the same die: CPUs with equal sink distance share a layer.
    t_or_floor = np.where(has_t, temp, -np.inf)
    dist = core[:, _CI["sink_distance"]]
    if dist.min() == dist.max():  # one die (or no die stack known): the chip's maximum
        group = np.full(n, t_or_floor.max())
    else:
        levels, inverse = np.unique(dist, return_inverse=True)
        top = np.full(len(levels), -np.inf)
        np.maximum.at(top, inverse, t_or_floor)
        group = top[inverse]
    ctx[:, 3] = np.where(np.isfinite(group), group, 0.0)
    m = thread.shape[0]
    ctx[:, 4] = m / n
    ctx[:, 5] = _masked_mean(thread, "utilisation")
    ctx[:, 6] = _masked_mean(thread, "mem_bound")
    ctx[:, 7] = _masked_mean(thread, "mpki")
    return out


def _masked_mean(thread: np.ndarray, name: str) -> float:
    if thread.shape[0] == 0:
        return 0.0
    known = thread[:, _TI[f"{name}_missing"]] < 0.5
    values = thread[known, _TI[name]]
    return float(values.mean()) if values.size else 0.0


def empty_pairs() -> np.ndarray:
    """The pair input when no thread is managed (the graph still takes the input)."""
    return np.zeros((0, len(PAIR_OWN_COLUMNS)), dtype=np.float32)


def assign(scores: np.ndarray) -> np.ndarray:
    """Each thread's CPU index from ``scores[n_threads, n_cpus]``, one thread per CPU.

    In rounds: every unplaced thread asks for its best free CPU, and each CPU asked for
    goes to the thread that scores it highest; the others ask again among the CPUs still
    free. Usually one or two rounds, each a few array operations. With more threads than
    CPUs, a new pass starts once every CPU is taken (CPUs are shared evenly).
    """
    m, n = scores.shape
    if m == 0 or n == 0:
        return np.zeros(0, dtype=np.intp)
    best = scores.argmax(axis=1)
    if m <= n and len(set(best.tolist())) == m:
        return best  # nobody wants another's best CPU: the usual steady state
    out = np.full(m, -1, dtype=np.intp)
    free = np.ones(n, dtype=bool)
    left = np.arange(m)
    while left.size:
        if not free.any():
            free[:] = True
        masked = np.where(free, scores[left], -np.inf)
        want = masked.argmax(axis=1)
        score = masked[np.arange(left.size), want]
        # Highest score first; np.unique keeps the first thread asking for each CPU.
        order = np.argsort(-score, kind="stable")
        cpus, first = np.unique(want[order], return_index=True)
        winners = order[first]
        out[left[winners]] = cpus
        free[cpus] = False
        keep = np.ones(left.size, dtype=bool)
        keep[winners] = False
        left = left[keep]
    return out


class CapDecoder:
    """Snaps predicted cap fractions to each CPU's frequency ladder (kHz).

    The ladders come from the observation (the driver's table, or even steps between the
    hardware limits) and are cached until the policies' limits change.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._groups: list[tuple[np.ndarray, np.ndarray]] = []  # (cpu row indices, ladder kHz)
        self._hw_max = np.zeros(0)
        self.ladders: dict[int, list[int]] = {}  # CPU -> its ladder, top down (of the last decode)

    def _prepare(self, obs: Observation, cpus: tuple[int, ...]) -> None:
        key = (cpus, tuple((p.cpus, p.available_khz, p.hw_min_khz, p.hw_max_khz) for p in obs.policies),
               tuple(obs.cpus[c].hw_max_khz if c in obs.cpus else None for c in cpus))
        if key == self._key:
            return
        ladders = ladders_khz(obs)
        self.ladders = ladders
        by_ladder: dict[tuple[int, ...], list[int]] = {}
        for i, cpu in enumerate(cpus):
            ladder = ladders.get(cpu)
            if ladder:
                by_ladder.setdefault(tuple(sorted(ladder)), []).append(i)
        self._groups = [(np.array(rows), np.array(ladder, dtype=float)) for ladder, rows in by_ladder.items()]
        self._hw_max = np.array([float(obs.cpus[c].hw_max_khz or 0) if c in obs.cpus else 0.0
                                 for c in cpus])
        self._cpu_ids = np.array(cpus, dtype=np.int64)
        self._key = key

    def decode(self, obs: Observation, cpus: tuple[int, ...], cap_frac: np.ndarray) -> dict[int, int]:
        """CPU -> cap in kHz; CPUs without a known ladder are left out (left alone)."""
        self._prepare(obs, cpus)
        want_khz = np.clip(cap_frac.astype(float), 0.0, 1.0) * self._hw_max
        caps: dict[int, int] = {}
        for rows, ladder in self._groups:
            w = want_khz[rows]
            # Nearest ladder step: ladders are sorted ascending.
            hi = np.clip(np.searchsorted(ladder, w), 0, len(ladder) - 1)
            lo = np.clip(hi - 1, 0, len(ladder) - 1)
            pick = np.where(np.abs(ladder[lo] - w) <= np.abs(ladder[hi] - w), ladder[lo], ladder[hi])
            caps.update(zip(self._cpu_ids[rows].tolist(), pick.astype(np.int64).tolist()))
        return caps


CAP_GROUPINGS = ("cpu", "die-median", "die-max", "die-min")


def group_caps(cap_frac: np.ndarray, core: np.ndarray, grouping: str) -> np.ndarray:
    """One cap per die (CPUs at the same distance from the sink) instead of one per CPU.

    The teacher's caps are uniform or one level per die; per-CPU regression scatters
    around them. ``die-median`` (robust), ``die-max`` and ``die-min`` take that statistic
    of the die's predictions; ``cpu`` keeps them as they are. On a machine without a die
    stack every CPU is on "die 0", so the cap becomes chip-wide.
    """
    if grouping == "cpu" or cap_frac.size == 0:
        return cap_frac
    reduce = {"die-median": np.median, "die-max": np.max, "die-min": np.min}[grouping]
    dist = core[:, _CI["sink_distance"]]
    out = np.empty_like(cap_frac)
    for d in np.unique(dist):
        same = dist == d
        out[same] = reduce(cap_frac[same])
    return out


class CapGuard:
    """Makes the model's caps safe near each sensor's maximum (stateful: one per policy).

    The model imitates a teacher that looks ahead, and a thin die heats by several °C per
    epoch: half a V/f step of regression error near the limit, or a cap raised fully the
    epoch after a hot CPU was cut, is enough to cross it. So, per CPU whose sensor reports
    a maximum ``max_c``, with ``ahead`` = temperature + its rise over one more epoch at
    the current slope:

    - ``ahead >= max_c - guard_c``: one ladder step below the lower of the model's cap
      and the current frequency (the CPU then counts as *recovering*);
    - a recovering CPU, or one with ``ahead >= max_c - release_band_c``, may rise at most
      one ladder step per epoch; recovery ends once the model's cap is within reach.

    Without the recovery rule a cut CPU cools below the band within one epoch, the model
    sees a cool core and asks for full speed, and the core is over the limit again
    (bang-bang every other epoch). CPUs without a maximum are left to the model (and, in
    the daemon, to the shield).
    """

    def __init__(self, guard_c: float, release_band_c: float, release_steps: int = 1) -> None:
        self.guard_c = guard_c
        self.release_steps = release_steps
        self.release_band_c = max(guard_c, release_band_c)
        self.recovering: set[int] = set()

    def apply(self, obs: Observation, cpus: tuple[int, ...], caps_khz: dict[int, int], core: np.ndarray,
              epoch_s: float | None, ladders: dict[int, list[int]] | None = None) -> dict[int, str]:
        """Lower ``caps_khz`` in place; returns why, for each CPU whose cap is now below the
        model's. ``ladders`` (CPU -> frequencies, top down) defaults to the observation's."""
        maxima = [r.max_c for r in obs.sensors if r.max_c is not None]
        if not maxima or not len(cpus):
            self.recovering.clear()
            return {}
        temp_c = core[:, _CI["temp"]] * TEMP_SCALE_C + TEMP_REF_C
        rise_c = np.maximum(core[:, _CI["temp_slope"]], 0.0) * SLOPE_SCALE_C_PER_S * (epoch_s or 0.0)
        ahead_c = np.where(core[:, _CI["temp_missing"]] < 0.5, temp_c + rise_c, -np.inf)
        near = ahead_c >= min(maxima) - self.release_band_c
        index = {c: i for i, c in enumerate(cpus)}
        flagged = sorted(set(np.flatnonzero(near).tolist()) |
                         {index[c] for c in self.recovering if c in index})
        if not flagged:
            return {}
        limits = {(r.sensor.chip, r.sensor.sensor): r.max_c for r in obs.sensors if r.max_c is not None}
        ladders = ladders_khz(obs) if ladders is None else ladders
        lowered: dict[int, str] = {}
        for i in flagged:
            cpu = cpus[i]
            st = obs.cpus.get(cpu)
            src = st.temp.source if st is not None else None
            limit = limits.get((src.chip, src.sensor)) if src is not None else None
            ladder = ladders.get(cpu)
            if st is None or limit is None or not ladder:
                self.recovering.discard(cpu)
                continue
            want = caps_khz.get(cpu, ladder[0])
            if ahead_c[i] >= limit - self.guard_c:
                now = min(want, st.freq_khz or ladder[0])
                below = [f for f in ladder if f < now]
                new = max(below) if below else min(ladder)
                why = (f"{ahead_c[i]:.1f} C expected next epoch, within {self.guard_c:g} C of the "
                       f"{limit:g} C maximum: one step below {now // 1000} MHz")
                self.recovering.add(cpu)
            elif cpu in self.recovering or ahead_c[i] >= limit - self.release_band_c:
                current = st.cap_khz or ladder[0]
                above = sorted(f for f in ladder if f > current)
                new = min(want, above[min(self.release_steps, len(above)) - 1] if above else current)
                why = (f"{'recovering from a cut' if cpu in self.recovering else f'within {self.release_band_c:g} C of the {limit:g} C maximum'}: "
                       f"at most {self.release_steps} step(s) up per epoch")
                if new >= want:
                    self.recovering.discard(cpu)
            else:
                continue
            if new < want:
                caps_khz[cpu] = new
                lowered[cpu] = why
        return lowered


def carry_caps(obs: Observation, cpus: tuple[int, ...], caps_khz: dict[int, int],
               last_cpu_index: np.ndarray, choice: np.ndarray,
               ladders: dict[int, list[int]] | None = None) -> dict[int, str]:
    """A thread moved to another CPU takes at most one ladder step more than the cap it
    ran under; lowers ``caps_khz`` in place and returns the CPUs it lowered.

    The cap head sees the CPU as it is now: an idle, cool CPU earns a high cap. But the
    thread the placement head moves there brings its heat with it, and a thin die goes
    from cool to over the limit within one epoch at full speed. The cap the thread ran
    under was thermally sustained; one step more is a bounded experiment. Returns why, per
    CPU lowered.
    """
    moved = np.flatnonzero((last_cpu_index >= 0) & (choice != last_cpu_index))
    if not moved.size:
        return {}
    ladders = ladders_khz(obs) if ladders is None else ladders
    lowered: dict[int, str] = {}
    for t in moved.tolist():
        src, dst = cpus[int(last_cpu_index[t])], cpus[int(choice[t])]
        ladder = ladders.get(dst)
        src_state = obs.cpus.get(src)
        if not ladder or src_state is None or src_state.cap_khz is None:
            continue
        above = [f for f in ladder if f > src_state.cap_khz]
        allowed = min(above) if above else ladder[0]
        if caps_khz.get(dst, ladder[0]) > allowed:
            caps_khz[dst] = allowed
            lowered[dst] = (f"a thread moves in from cpu {src}, where it ran under {src_state.cap_khz // 1000} MHz: "
                            "at most one step more")
    return lowered


def placement_by_tid(tids: tuple[int, ...], cpus: tuple[int, ...], choice: np.ndarray) -> Mapping[int, int]:
    """tid -> CPU id from :func:`assign`'s row indices."""
    return {tid: cpus[int(j)] for tid, j in zip(tids, choice.tolist())}
