"""The learned policy's contract: model inputs, outputs and action decoding.

The trainer and the runtime (:mod:`ailfmd.policy.onnx_policy`) both build the model's
inputs and decode its outputs with this module, so what was trained is exactly what runs.
A policy model has three heads, stored together in one ONNX graph:

- **cap head** (input ``cap_input``, output ``cap_frac``): one row per CPU, the CPU's
  feature row followed by :data:`CONTEXT_COLUMNS` (chip-wide summaries every row
  shares, because the right cap depends on the whole chip's heat, not one core's); the
  output is the cap as a fraction of the CPU's hardware maximum. Decoding snaps it to
  the nearest step of the CPU's frequency ladder.
- **move head** (input ``move_input``, output ``move_prob``): one row per thread, the
  thread's columns, the row of the CPU it runs on (``here.*``) and
  :data:`RELATIVE_COLUMNS` (how much cooler, nearer the sink or nearer the caches the
  best CPU is, how many are free); the output is how likely the teacher
  moves the thread this epoch. Most epochs the teacher moves a few threads out of
  dozens: deciding *whether* to move apart from *where* keeps the rare move from being
  drowned by the common "stay" (a single pair score did that: the thread's own CPU
  always won).
- **destination head** (output ``pair_score``): one score per (moving thread, CPU)
  pair, how likely the teacher sends the thread there. It is trained on whole pair rows
  (:data:`DEST_COLUMNS`: thread, core and pair columns, then :data:`DEST_EXTRA_COLUMNS`
  — the CPU against the one the thread leaves) of moved threads only, but because its
  first layer is linear the graph takes the parts — ``thread_input`` (one row per moving
  thread), the core columns of ``cap_input`` and ``pair_input`` (only the pairs' own
  columns, :func:`dest_own`) — and adds their products: the pair matrix is never built,
  and only the few moving threads are scored (:func:`place`).

Inputs are built with a few dozen numpy operations per decision; placement rounds run
in plain Python over preference lists (cheaper than numpy calls on rows of 64). The
decisions of the shipped policy on seeded states are pinned by
``tests/policy/test_shipped_decisions.py``: a faster path must decide bit for bit the same.
"""

from __future__ import annotations

import math
import operator
from bisect import bisect_left, bisect_right
from typing import Mapping, NamedTuple

import numpy as np

from ailfmd.platform.base import Observation
from ailfmd.policy.baselines.common import ladders_khz
from ailfmd.policy.features import build_pair_own
from ailfmd.policy.feature_schema import (
    CORE_COLUMNS,
    PAIR_COLUMNS,
    PAIR_OWN_COLUMNS,
    SLOPE_SCALE_C_PER_S,
    TEMP_SCALE_C,
    THREAD_COLUMNS,
)

POLICY_FORMAT = "ailfmd.policy/2"
METADATA_KEY = "ailfmd.policy"  # ONNX metadata_props key holding the policy's JSON card

CAP_INPUT, CAP_OUTPUT = "cap_input", "cap_frac"
MOVE_INPUT, MOVE_OUTPUT = "move_input", "move_prob"
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
# Where the thread could go, against where it is (temperatures in the feature's
# normalised units; 0 when nothing is known).
RELATIVE_COLUMNS = (
    "rel.temp_above_min",  # its CPU minus the coolest CPU
    "rel.temp_above_free_min",  # ... minus the coolest CPU no managed thread runs on
    "rel.sink_above_min",  # its CPU's sink distance minus the least on the chip
    "rel.latency_above_min",  # its CPU's relative LLC latency minus the least on the chip
    "rel.free_share",  # share of the CPUs no managed thread runs on
    "rel.sharing",  # other managed threads on its CPU
)
MOVE_COLUMNS = (tuple(f"thread.{c}" for c in THREAD_COLUMNS) + tuple(f"here.{c}" for c in CAP_COLUMNS)
                + RELATIVE_COLUMNS)
DEFAULT_MOVE_THRESHOLD = 0.5
# A destination against the CPU the thread leaves (0 where unknown): a CPU is a good
# destination for *this* thread when it is cooler or nearer the sink than where it is.
DEST_EXTRA_COLUMNS = (
    "dest.temp_below_here",  # normalised temperature of its CPU minus this one's
    "dest.sink_below_here",  # sink distance of its CPU minus this one's
    "dest.occupied",  # 1 when another managed thread runs on this CPU
)
DEST_OWN_COLUMNS = PAIR_OWN_COLUMNS + DEST_EXTRA_COLUMNS
DEST_COLUMNS = PAIR_COLUMNS + DEST_EXTRA_COLUMNS

_CI = {n: i for i, n in enumerate(CORE_COLUMNS)}
_TI = {n: i for i, n in enumerate(THREAD_COLUMNS)}


class Dies(NamedTuple):
    """Which CPUs share a die: CPUs at the same distance from the sink (``die_groups``)."""

    masks: np.ndarray  # bool [n_dies, n_cpus]
    inverse: np.ndarray  # each CPU's die (row of ``masks``)


def die_groups(core: np.ndarray) -> Dies:
    """The dies of ``core``'s CPUs. They follow from the topology alone (the sink distance
    column), so a caller that decides on one machine computes them once."""
    levels, inverse = np.unique(core[:, _CI["sink_distance"]], return_inverse=True)
    return Dies(levels[:, None] == levels[inverse][None, :], inverse)


def cap_inputs(core: np.ndarray, thread: np.ndarray, dies: Dies | None = None) -> np.ndarray:
    """float32 ``[n_cpus, len(CAP_COLUMNS)]``: each CPU's row plus the chip context.
    ``dies``: :func:`die_groups` of ``core``, when the caller keeps it."""
    n = core.shape[0]
    out = np.empty((n, len(CAP_COLUMNS)), dtype=np.float32)
    k = core.shape[1]
    out[:, :k] = core
    if n == 0:
        return out
    # The context is the same on every row but ctx.group_temp_max: one row, broadcast.
    ctx = np.zeros(len(CONTEXT_COLUMNS))
    has_t = core[:, _CI["temp_missing"]] < 0.5
    temp = core[:, _CI["temp"]]
    t_known = temp if has_t.all() else temp[has_t]
    if t_known.size:
        ctx[0] = np.maximum.reduce(t_known)
        ctx[1] = _mean_f32(t_known)
    has_slope = core[:, _CI["temp_slope_missing"]] < 0.5
    if has_slope.any():
        ctx[2] = np.maximum.reduce(core[has_slope, _CI["temp_slope"]])
    m = thread.shape[0]
    ctx[4] = m / n
    if m:
        # Means over the threads that measure each value (one pass for the three).
        known = thread[:, _MEAN_MASKS] < 0.5
        count = known.sum(axis=0)
        total = np.where(known, thread[:, _MEAN_VALUES], 0.0).sum(axis=0)
        np.divide(total, count, out=ctx[5:8], where=count > 0)
    out[:, k:] = ctx
    # Hottest CPU of the same die (no temperature on the die: 0).
    dies = dies if dies is not None else die_groups(core)
    top = np.where(dies.masks & has_t, temp, -np.inf).max(axis=1)
    top[~np.isfinite(top)] = 0.0
    out[:, k + 3] = top[dies.inverse]
    return out


def _mean_f32(x: np.ndarray) -> np.float32:
    """``x.mean()`` of a float32 vector, without its Python overhead: numpy sums in
    float32 and divides in float64 by the count, then rounds to float32."""
    return np.float32(float(np.add.reduce(x)) / x.size)


_MEAN_VALUES = np.array([_TI[n] for n in ("utilisation", "mem_bound", "mpki")])
_MEAN_MASKS = np.array([_TI[f"{n}_missing"] for n in ("utilisation", "mem_bound", "mpki")])
# The here.* columns the relative columns compare, and the relative columns they give.
_REL_FROM = np.array([_CI["temp"], _CI["temp"], _CI["sink_distance"], _CI["llc_latency_rel"]])


def move_inputs(cap_x: np.ndarray, thread: np.ndarray, last_cpu_index: np.ndarray) -> np.ndarray:
    """float32 ``[n_threads, len(MOVE_COLUMNS)]`` from :func:`cap_inputs`' rows, the thread
    rows and each thread's CPU row index (-1: unknown). A thread whose CPU is unknown gets
    zeros past its own columns (it is placed anyway).

    "Where it could go" is every CPU: a thread's affinity is no guide, since the daemon
    (or the teacher) pinned it to one CPU in an earlier epoch."""
    m, n = thread.shape[0], cap_x.shape[0]
    out = np.zeros((m, len(MOVE_COLUMNS)), dtype=np.float32)
    if m == 0 or n == 0:
        return out
    kt, kc = thread.shape[1], cap_x.shape[1]
    out[:, :kt] = thread
    known = last_cpu_index >= 0
    all_known = known.all()
    here = last_cpu_index if all_known else np.where(known, last_cpu_index, 0)
    here_x = out[:, kt:kt + kc]
    np.take(cap_x, here, axis=0, out=here_x)
    counts = np.bincount(last_cpu_index if all_known else last_cpu_index[known], minlength=n)
    free = counts == 0
    has_t = cap_x[:, _CI["temp_missing"]] < 0.5
    temp = cap_x[:, _CI["temp"]]
    # The least each compared column has on the chip (NaN: no CPU with a temperature).
    least = np.array([np.nan, np.nan, np.minimum.reduce(cap_x[:, _CI["sink_distance"]]),
                      np.minimum.reduce(cap_x[:, _CI["llc_latency_rel"]])], dtype=np.float32)
    if has_t.any():
        least[0] = np.minimum.reduce(temp if has_t.all() else temp[has_t])
        free_t = has_t & free
        if free_t.any():
            least[1] = np.minimum.reduce(temp[free_t])
    rel = out[:, kt + kc:]
    compared = here_x[:, _REL_FROM]
    compared[here_x[:, _CI["temp_missing"]] >= 0.5, :2] = np.nan  # its CPU has no temperature
    np.subtract(compared, least, out=rel[:, :4])
    rel[:, 4] = free.sum() / n
    rel[:, 5] = counts[here] - 1.0
    rel[np.isnan(rel)] = 0.0
    if not all_known:
        out[~known, kt:] = 0.0
    return out


def forced_movers(last_cpu_index: np.ndarray, n_cpus: int) -> np.ndarray:
    """bool per thread: it must be placed whatever the model says — its CPU is unknown
    (new, or on a CPU now offline), or, while there are at least as many CPUs as
    threads, another thread (earlier in the order) runs on the same CPU: the teacher gives
    every thread its own CPU when it can."""
    forced = last_cpu_index < 0
    if len(last_cpu_index) <= n_cpus:
        known = np.flatnonzero(~forced)
        # Usually every thread has a CPU of its own: one bincount says so.
        if known.size and np.bincount(last_cpu_index[known]).max() > 1:
            _, first = np.unique(last_cpu_index[known], return_index=True)
            second = np.ones(known.size, dtype=bool)
            second[first] = False
            forced[known[second]] = True
    return forced


def place(last_cpu_index: np.ndarray, move: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Each thread's CPU row index: threads not in ``move`` keep theirs; the moving ones
    (``scores[k, n_cpus]``, one row per ``True`` in ``move``, in order) take CPUs other than
    their own, best scores first, CPUs no staying thread holds first.

    In rounds: every unplaced mover asks for its best free CPU, and each CPU asked for goes
    to the mover that scores it highest (the first mover on equal scores). A mover with no
    free CPU left stays where it is; a thread with no CPU of its own shares its best one.
    """
    choice = last_cpu_index.astype(np.intp, copy=True)
    movers = np.flatnonzero(move)
    if not movers.size:
        return choice
    s = scores.astype(float, copy=True)
    own = last_cpu_index[movers]
    rows = np.flatnonzero(own >= 0)
    s[rows, own[rows]] = -np.inf
    taken = np.zeros(s.shape[1], dtype=bool)
    taken[last_cpu_index[(~move) & (last_cpu_index >= 0)]] = True
    # Each mover's CPUs best first; a stable sort puts the lowest CPU first among equal
    # scores, as argmax would pick it.
    prefs = np.argsort(-s, axis=1, kind="stable")
    ranked = np.take_along_axis(s, prefs, axis=1)
    placed = _place_rounds(prefs.tolist(), ranked.tolist(), taken.tolist())
    for i, cpu in placed.items():
        if cpu >= 0:
            choice[movers[i]] = cpu
        elif own[i] < 0:  # no CPU of its own: it shares its best one
            choice[movers[i]] = int(scores[i].argmax())
        # else: it keeps its own CPU (choice already holds it)
    return choice


def _place_rounds(prefs: list[list[int]], ranked: list[list[float]], taken: list[bool]) -> dict[int, int]:
    """:func:`place`'s rounds over preference lists: mover -> CPU, or -1 for a mover that
    found no free CPU. Plain Python: each round is a few operations per mover, and numpy
    spends more on calling than on computing for rows of 64."""
    n = len(taken)
    floor = -math.inf
    position = [0] * len(prefs)
    placed: dict[int, int] = {}
    left = list(range(len(prefs)))
    while left:
        best_score: dict[int, float] = {}  # CPU -> the best score asking for it, and who
        best_mover: dict[int, int] = {}
        losers = []
        for i in left:
            p, pref = position[i], prefs[i]
            while p < n and taken[pref[p]]:  # CPUs taken since are never free again
                p += 1
            position[i] = p
            score = ranked[i][p] if p < n else floor
            if score == floor:
                placed[i] = -1
                continue
            cpu = pref[p]
            if cpu not in best_score:
                best_score[cpu], best_mover[cpu] = score, i
            elif score > best_score[cpu]:  # movers ask in order: the first keeps a tie
                losers.append(best_mover[cpu])
                best_score[cpu], best_mover[cpu] = score, i
            else:
                losers.append(i)
        for cpu, i in best_mover.items():
            placed[i] = cpu
            taken[cpu] = True
        losers.sort()
        left = losers
    return placed


def empty_pairs() -> np.ndarray:
    """The pair input when no thread moves (the graph still takes the input)."""
    return np.zeros((0, len(DEST_OWN_COLUMNS)), dtype=np.float32)


def dest_extra(core: np.ndarray, rows_last: np.ndarray, all_last: np.ndarray,
               out: np.ndarray | None = None) -> np.ndarray:
    """float32 ``[k, n_cpus, len(DEST_EXTRA_COLUMNS)]`` for threads whose CPU row indices
    are ``rows_last``; ``all_last`` (every managed thread's) tells which CPUs are taken.
    ``out``: write there instead (every element is written)."""
    k, n = rows_last.shape[0], core.shape[0]
    if out is None:
        out = np.empty((k, n, len(DEST_EXTRA_COLUMNS)), dtype=np.float32)
    if k == 0 or n == 0:
        return out
    known = rows_last >= 0
    here = np.where(known, rows_last, 0)
    has_t = core[:, _CI["temp_missing"]] < 0.5
    temp = np.where(has_t, core[:, _CI["temp"]], 0.0)
    sink = core[:, _CI["sink_distance"]]
    both = (known & has_t[here])[:, None] & has_t[None, :]
    out[:, :, 0] = np.where(both, temp[here][:, None] - temp[None, :], 0.0)
    out[:, :, 1] = np.where(known[:, None], sink[here][:, None] - sink[None, :], 0.0)
    counts = np.bincount(all_last[all_last >= 0], minlength=n).astype(np.float32)
    taken = counts[None, :] - (np.arange(n)[None, :] == rows_last[:, None])  # not counting itself
    out[:, :, 2] = taken > 0
    return out


def dest_own(own: np.ndarray, core: np.ndarray, rows_last: np.ndarray, all_last: np.ndarray) -> np.ndarray:
    """The destination head's ``pair_input``: ``own`` (``build_pair_own`` of the same
    threads, ``[k * n_cpus, len(PAIR_OWN_COLUMNS)]``) with :data:`DEST_EXTRA_COLUMNS` appended."""
    extra = dest_extra(core, rows_last, all_last)
    return np.concatenate([own, extra.reshape(-1, len(DEST_EXTRA_COLUMNS))], axis=1)


def dest_inputs(thread: np.ndarray, core: np.ndarray, rows_last: np.ndarray, allowed: np.ndarray,
                distance_padded: np.ndarray, all_last: np.ndarray) -> np.ndarray:
    """:func:`dest_own` of ``build_pair_own(thread, core, rows_last, allowed, distance_padded)``
    for the threads ``thread`` (rows) and ``rows_last`` (their CPU row indices), both parts
    written into one array instead of joined."""
    k, n = thread.shape[0], core.shape[0]
    out = np.empty((k, n, len(DEST_OWN_COLUMNS)), dtype=np.float32)
    width = len(PAIR_OWN_COLUMNS)
    build_pair_own(thread, core, rows_last, allowed, distance_padded, out=out[:, :, :width])
    dest_extra(core, rows_last, all_last, out=out[:, :, width:])
    return out.reshape(k * n, len(DEST_OWN_COLUMNS))


# What a CPU's ladder depends on (attrgetter: the key is built in C, not a Python loop).
_LADDER_FIELDS = operator.attrgetter("cpus", "available_khz", "hw_min_khz", "hw_max_khz")
_CPU_LIMITS = operator.attrgetter("hw_min_khz", "hw_max_khz")


class CapDecoder:
    """Snaps predicted cap fractions to each CPU's frequency ladder (kHz).

    The ladders come from the observation (the driver's table, or even steps between the
    hardware limits) and are cached until the policies' limits change.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._cpus_seen: tuple[int, ...] | None = None
        self._policies_seen: tuple = ()
        self._groups: list[tuple[np.ndarray | None, np.ndarray]] = []  # (cpu row indices, ladder kHz)
        self._all_laddered = True
        self._hw_max = np.zeros(0)
        self.ladders: dict[int, list[int]] = {}  # CPU -> its ladder, top down (of the last decode)

    def _prepare(self, obs: Observation, cpus: tuple[int, ...]) -> None:
        # Platforms hand out the same policy objects while nothing about them changes:
        # checking identity first spares rebuilding the key (~130 tuples) every epoch.
        if (cpus is self._cpus_seen and len(obs.policies) == len(self._policies_seen)
                and all(map(operator.is_, obs.policies, self._policies_seen))):
            return
        self._cpus_seen, self._policies_seen = cpus, obs.policies
        key = (cpus, tuple(map(_LADDER_FIELDS, obs.policies)), tuple(obs.cpus),
               tuple(map(_CPU_LIMITS, obs.cpus.values())))
        if key == self._key:
            return
        ladders = ladders_khz(obs)
        self.ladders = ladders
        by_ladder: dict[tuple[int, ...], list[int]] = {}
        for i, cpu in enumerate(cpus):
            ladder = ladders.get(cpu)
            if ladder:
                by_ladder.setdefault(tuple(sorted(ladder)), []).append(i)
        # rows None: the group is every CPU (the usual case: one table for the whole chip).
        self._groups = [(None if len(rows) == len(cpus) else np.array(rows), np.array(ladder, dtype=float))
                        for ladder, rows in by_ladder.items()]
        self._all_laddered = sum(len(rows) for rows in by_ladder.values()) == len(cpus)
        self._hw_max = np.array([float(obs.cpus[c].hw_max_khz or 0) if c in obs.cpus else 0.0
                                 for c in cpus])
        self._cpu_ids = np.array(cpus, dtype=np.int64)
        self._key = key

    def decode(self, obs: Observation, cpus: tuple[int, ...], cap_frac: np.ndarray) -> dict[int, int]:
        """CPU -> cap in kHz; CPUs without a known ladder are left out (left alone)."""
        return self.as_dict(cpus, self.decode_rows(obs, cpus, cap_frac))

    def as_dict(self, cpus: tuple[int, ...], caps_khz: np.ndarray) -> dict[int, int]:
        """:meth:`decode_rows`' result as CPU -> kHz (CPUs without a ladder left out)."""
        if self._all_laddered:
            return dict(zip(cpus, caps_khz.tolist()))
        return {cpus[i]: khz for i, khz in enumerate(caps_khz.tolist()) if khz >= 0}

    def decode_rows(self, obs: Observation, cpus: tuple[int, ...], cap_frac: np.ndarray) -> np.ndarray:
        """int64 cap in kHz per row of ``cpus``; -1 for CPUs without a known ladder."""
        self._prepare(obs, cpus)
        # np.clip is a Python wrapper around these two ufuncs.
        want_khz = np.minimum(np.maximum(cap_frac.astype(float), 0.0), 1.0)
        want_khz *= self._hw_max
        caps_khz = np.full(len(cpus), -1, dtype=np.int64)
        for rows, ladder in self._groups:
            w = want_khz if rows is None else want_khz[rows]
            # Nearest ladder step: ladders are sorted ascending; the lower one on a tie.
            hi = np.minimum(np.searchsorted(ladder, w), len(ladder) - 1)
            lo = np.maximum(hi - 1, 0)
            pick = np.where(np.abs(ladder[lo] - w) <= np.abs(ladder[hi] - w), ladder[lo], ladder[hi])
            if rows is None:
                caps_khz[:] = pick
            else:
                caps_khz[rows] = pick
        return caps_khz


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
    """Makes the model's caps safe near each CPU's limit (stateful: one per policy).

    The model imitates a teacher that looks ahead, and a thin die heats by several °C per
    epoch: half a V/f step of regression error near the limit, or a cap raised fully the
    epoch after a hot CPU was cut, is enough to cross it. So, per CPU with its limit
    ``limit`` (the features' ``limit_c``: its sensor's maximum, or the configured limit),
    with ``ahead`` = temperature + its rise over one more epoch at the current slope:

    - ``ahead >= limit - guard_c``: one ladder step below the lower of the model's cap
      and the current frequency (the CPU then counts as *recovering*);
    - a recovering CPU, or one with ``ahead >= limit - release_band_c``, may rise at most
      one ladder step per epoch; recovery ends once the model's cap is within reach.

    Without the recovery rule a cut CPU cools below the band within one epoch, the model
    sees a cool core and asks for full speed, and the core is over the limit again
    (bang-bang every other epoch).
    """

    def __init__(self, guard_c: float, release_band_c: float, release_steps: int = 1) -> None:
        self.guard_c = guard_c
        self.release_steps = release_steps
        self.release_band_c = max(guard_c, release_band_c)
        self.recovering: set[int] = set()
        self._asc: dict[int, tuple[list[int], list[int]]] = {}

    def apply(self, obs: Observation, cpus: tuple[int, ...], caps_khz: dict[int, int], core: np.ndarray,
              limit_c: np.ndarray, epoch_s: float | None,
              ladders: dict[int, list[int]] | None = None) -> dict[int, str]:
        """Lower ``caps_khz`` in place; returns why, for each CPU whose cap is now below the
        model's. ``core`` and ``limit_c`` are the feature set's (rows in ``cpus`` order);
        ``ladders`` (CPU -> frequencies, top down) defaults to the observation's."""
        if not len(cpus):
            self.recovering.clear()
            return {}
        # Back from the normalised column to °C, in float32 like the column itself.
        temp_c = core[:, _CI["temp"]] * TEMP_SCALE_C + (limit_c - TEMP_SCALE_C).astype(np.float32)
        rise_c = np.maximum(core[:, _CI["temp_slope"]], 0.0) * SLOPE_SCALE_C_PER_S * (epoch_s or 0.0)
        ahead_c = np.where(core[:, _CI["temp_missing"]] < 0.5, temp_c + rise_c, -np.inf)
        near = ahead_c >= limit_c - self.release_band_c
        flagged = np.flatnonzero(near).tolist()
        if self.recovering:
            index = {c: i for i, c in enumerate(cpus)}
            flagged = sorted(set(flagged) | {index[c] for c in self.recovering if c in index})
        if not flagged:
            return {}
        ladders = ladders_khz(obs) if ladders is None else ladders
        lowered: dict[int, str] = {}
        # Python floats for the per-CPU tests below (each float32 exactly; numpy scalars
        # cost a conversion at every comparison), and the last ladder's ascending form:
        # CPUs share a few ladder lists.
        ahead_l, limit_l = ahead_c.tolist(), limit_c.tolist()
        last_ladder: list[int] | None = None
        asc: list[int] = []
        for i in flagged:
            cpu = cpus[i]
            st = obs.cpus.get(cpu)
            limit = limit_l[i]
            ladder = ladders.get(cpu)
            if st is None or not ladder:
                self.recovering.discard(cpu)
                continue
            if ladder is not last_ladder:
                asc, last_ladder = self._ascending(ladder), ladder
            want = caps_khz.get(cpu, ladder[0])
            ahead = ahead_l[i]
            if ahead >= limit - self.guard_c:
                now = min(want, st.freq_khz or ladder[0])
                k = bisect_left(asc, now)
                new = asc[k - 1] if k > 0 else asc[0]
                cut = True
                self.recovering.add(cpu)
            elif cpu in self.recovering or ahead >= limit - self.release_band_c:
                current = st.cap_khz or ladder[0]
                k = bisect_right(asc, current)
                new = min(want, asc[min(k + self.release_steps, len(asc)) - 1] if k < len(asc) else current)
                cut = False
                recovering = cpu in self.recovering
                if new >= want:
                    self.recovering.discard(cpu)
            else:
                continue
            if new < want:
                caps_khz[cpu] = new
                # Reasons are written only for the CPUs they concern (most flagged CPUs
                # are left as the model said).
                if cut:
                    lowered[cpu] = (f"{ahead:.1f} C expected next epoch, within {self.guard_c:g} C of the "
                                    f"{limit:g} C limit: one step below {now // 1000} MHz")
                else:
                    where = ("recovering from a cut" if recovering
                             else f"within {self.release_band_c:g} C of the {limit:g} C limit")
                    lowered[cpu] = f"{where}: at most {self.release_steps} step(s) up per epoch"
        return lowered

    def _ascending(self, ladder: list[int]) -> list[int]:
        """``ladder`` (top down) sorted ascending, cached: ladders are shared lists that
        live as long as the CPUs' frequency tables do."""
        got = self._asc.get(id(ladder))
        if got is None or got[0] is not ladder:
            if len(self._asc) > 256:
                self._asc.clear()
            got = self._asc[id(ladder)] = (ladder, sorted(set(ladder)))
        return got[1]


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
    moved = np.flatnonzero((last_cpu_index >= 0) & (choice >= 0) & (choice != last_cpu_index))
    if not moved.size:
        return {}
    ladders = ladders_khz(obs) if ladders is None else ladders
    lowered: dict[int, str] = {}
    ascending: dict[int, list[int]] = {}  # CPUs share a few ladder lists: sort each once
    for src_row, dst_row in zip(last_cpu_index[moved].tolist(), choice[moved].tolist()):
        src, dst = cpus[src_row], cpus[dst_row]
        ladder = ladders.get(dst)
        src_state = obs.cpus.get(src)
        if not ladder or src_state is None or src_state.cap_khz is None:
            continue
        asc = ascending.get(id(ladder))
        if asc is None:
            asc = ascending[id(ladder)] = sorted(ladder)
        # The lowest step above the cap it ran under (the top one when none is).
        k = bisect_right(asc, src_state.cap_khz)
        allowed = asc[k] if k < len(asc) else ladder[0]
        if caps_khz.get(dst, ladder[0]) > allowed:
            caps_khz[dst] = allowed
            lowered[dst] = (f"a thread moves in from cpu {src}, where it ran under {src_state.cap_khz // 1000} MHz: "
                            "at most one step more")
    return lowered


def placement_by_tid(tids: tuple[int, ...], cpus: tuple[int, ...], choice: np.ndarray) -> Mapping[int, int]:
    """tid -> CPU id from :func:`place`'s row indices (threads at -1 are left out)."""
    return {tid: cpus[j] for tid, j in zip(tids, choice.tolist()) if j >= 0}
