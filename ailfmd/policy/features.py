"""Observation -> the learned policy's input, the same way on the simulator and on Linux.

:class:`FeatureExtractor` is built once per topology (rebuild it after a hotplug): it
precomputes what follows from where CPUs sit (neighbours, distance to the heat sink,
relative LLC latency, migration distances). :meth:`FeatureExtractor.extract` then turns
one :class:`Observation` (and the previous one, for slopes and the epoch length) into
float32 arrays laid out by :mod:`ailfmd.policy.feature_schema`:

- ``core_features[n_cpus, len(CORE_COLUMNS)]``, rows in CPU id order;
- ``thread_features[n_threads, len(THREAD_COLUMNS)]``, rows in tid order;
- ``pair_matrix()[n_threads * n_cpus, len(PAIR_COLUMNS)]``, thread-major, for a model
  that scores (thread, CPU) placements.

Temperatures are read against each CPU's thermal limit (:func:`feature_limits_c`): the
sensor's own maximum, lowered to the configured limit where one is given, so that a
policy trained on a simulated 80 °C chip reads a real machine by its headroom.

What a platform cannot measure goes to the mask columns with the documented default in
the value column; nothing missing is passed off as a measured zero. Everything is
vectorised numpy: the per-decision Python work is one pass over CPUs and threads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import chain, repeat
from operator import attrgetter, itemgetter
from typing import Callable, Mapping
import numpy as np

from ailfmd.platform.base import Observation, ThreadRef, Topology
from ailfmd.platform.limits import cpu_limits_c
from ailfmd.policy import feature_schema as fsch
from ailfmd.policy.feature_schema import (
    CORE_COLUMNS,
    CORE_FEATURES,
    FEATURE_SCHEMA,
    PAIR_COLUMNS,
    PAIR_OWN_COLUMNS,
    PAIR_OWN_FEATURES,
    THREAD_COLUMNS,
    THREAD_FEATURES,
)
from ailfmd.sim.kernels import Kernel
from ailfmd.sim.noc import mean_llc_latency_cycles

# NoC costs used when the chip is not given (HotSniper's kingscross-nuca, as pcgov).
# Only their ratios matter for the relative latency.
DEFAULT_HOP_H_CYCLES, DEFAULT_HOP_V_CYCLES, DEFAULT_BANK_CYCLES = 6.0, 3.0, 8.0

# Linux migration distance by the closest thing two CPUs share.
DIST_SAME, DIST_SMT, DIST_L2, DIST_L3, DIST_FAR = 0.0, 0.25, 0.5, 0.75, 1.0

_COUNTERS = ("instructions", "cycles", "llc_references", "llc_misses",
             "stalled_cycles_backend", "run_ns", "wait_ns", "page_faults", "cpu_migrations")
_NO_CPU = (None, None, None, None)
_SAMPLE_PARTS = attrgetter("counters", "last_cpu", "ref", "affinity")
_SENSOR_LIMIT = attrgetter("sensor", "max_c")
_MAX_C = attrgetter("max_c")
_MAX_IPC, _MAX_PKI = 8.0, 1000.0  # clip absurd ratios from scaled perf counts


def _col(columns: tuple[str, ...]) -> dict[str, int]:
    return {n: i for i, n in enumerate(columns)}


_C, _T, _P = _col(CORE_COLUMNS), _col(THREAD_COLUMNS), _col(PAIR_OWN_COLUMNS)
_CORE_DEFAULTS = {s.name: s.default for s in CORE_FEATURES}
_THREAD_DEFAULTS = {s.name: s.default for s in THREAD_FEATURES}
_PAIR_DEFAULTS = {s.name: s.default for s in PAIR_OWN_FEATURES}
_KERNEL_COL0 = _T[f"kernel_{fsch.KERNEL_CLASSES[0].key}"]


def kernel_class_rule(ipc: float, mpki: float, apki: float = math.nan,
                      utilisation: float = math.nan) -> int:
    """The kernel class (``Kernel`` value) one thread's counters point to; -1 = unknown.

    NaN marks an input that was not measured. First matching rule wins:

    1. utilisation < ``IDLE_UTILISATION_BELOW`` or IPC == 0 (nothing retired): IDLE;
    2. IPC or MPKI unknown: -1;
    3. IPC < ``SPIN_IPC_BELOW`` and MPKI < ``SPIN_MPKI_BELOW``: SPIN_WAIT (PAUSE loops);
    4. MPKI >= ``DECODE_MPKI_AT_LEAST``: DECODE_GEMV (weights streamed from DRAM);
    5. MPKI >= ``ATTENTION_MPKI_AT_LEAST``: ATTENTION (KV cache from DRAM);
    6. IPC >= ``GEMM_IPC_AT_LEAST``: PREFILL_GEMM (blocked GEMM);
    7. LLC references per kilo-instruction >= ``ATTENTION_APKI_AT_LEAST`` (where
       measured): ATTENTION (KV cache resident in the LLC);
    8. otherwise NORM_ELEMENTWISE.
    """
    if utilisation < fsch.IDLE_UTILISATION_BELOW or ipc == 0.0:
        return int(Kernel.IDLE)
    if math.isnan(ipc) or math.isnan(mpki):
        return -1
    if ipc < fsch.SPIN_IPC_BELOW and mpki < fsch.SPIN_MPKI_BELOW:
        return int(Kernel.SPIN_WAIT)
    if mpki >= fsch.DECODE_MPKI_AT_LEAST:
        return int(Kernel.DECODE_GEMV)
    if mpki >= fsch.ATTENTION_MPKI_AT_LEAST:
        return int(Kernel.ATTENTION)
    if ipc >= fsch.GEMM_IPC_AT_LEAST:
        return int(Kernel.PREFILL_GEMM)
    if apki >= fsch.ATTENTION_APKI_AT_LEAST:
        return int(Kernel.ATTENTION)
    return int(Kernel.NORM_ELEMENTWISE)


# The rule compares each input with a few thresholds only, so it is a lookup table over
# the bins those thresholds cut (NaN gets a bin of its own: searchsorted puts it last).
_IPC_EDGES = np.array([fsch.SPIN_IPC_BELOW, fsch.GEMM_IPC_AT_LEAST, np.inf])
_MPKI_EDGES = np.array([fsch.SPIN_MPKI_BELOW, fsch.ATTENTION_MPKI_AT_LEAST,
                        fsch.DECODE_MPKI_AT_LEAST, np.inf])
_APKI_EDGES = np.array([fsch.ATTENTION_APKI_AT_LEAST, np.inf])


def _bin_values(edges: np.ndarray) -> list[float]:
    """A representative input of every bin ``searchsorted(edges, x, "right")`` yields."""
    lows = [0.5 * edges[0]] + [float(e) for e in edges[:-1]]
    return lows + [math.nan]


_RULE_TABLE = np.array([[[kernel_class_rule(i, m, a) for a in _bin_values(_APKI_EDGES)]
                         for m in _bin_values(_MPKI_EDGES)]
                        for i in _bin_values(_IPC_EDGES)], dtype=np.int64)


def infer_kernel_class(ipc: np.ndarray, mpki: np.ndarray, apki: np.ndarray | None = None,
                       utilisation: np.ndarray | None = None) -> np.ndarray:
    """:func:`kernel_class_rule` over arrays (NaN = not measured); int64, -1 = unknown."""
    ipc = np.asarray(ipc, dtype=float)
    apki_bin = (_APKI_EDGES.searchsorted(np.asarray(apki, dtype=float), "right") if apki is not None
                else len(_APKI_EDGES))
    return _kernel_class(ipc, np.asarray(mpki, dtype=float), apki_bin,
                         None if utilisation is None else np.asarray(utilisation, dtype=float))


def _kernel_class(ipc: np.ndarray, mpki: np.ndarray, apki_bin: np.ndarray | int,
                  utilisation: np.ndarray | None) -> np.ndarray:
    """:func:`infer_kernel_class` of float64 arrays (``apki`` already binned)."""
    k = _RULE_TABLE[_IPC_EDGES.searchsorted(ipc, "right"), _MPKI_EDGES.searchsorted(mpki, "right"), apki_bin]
    idle = ipc == 0.0
    if utilisation is not None:
        with np.errstate(invalid="ignore"):  # NaN (not measured) is not idle
            idle |= utilisation < fsch.IDLE_UTILISATION_BELOW
    k[idle] = Kernel.IDLE
    return k


@dataclass
class FeatureSet:
    """The policy's input for one observation, rows in the stable orders ``cpus``/``tids``."""

    cpus: tuple[int, ...]
    tids: tuple[int, ...]
    refs: tuple[ThreadRef, ...]
    core_features: np.ndarray  # float32 [n_cpus, len(CORE_COLUMNS)]
    thread_features: np.ndarray  # float32 [n_threads, len(THREAD_COLUMNS)]
    kernel_class: np.ndarray  # int [n_threads], Kernel value or -1 (unknown)
    epoch_s: float | None
    # Each thread's last CPU as a row index of ``cpus`` (-1: unknown or not online).
    last_cpu_index: np.ndarray
    schema: str = FEATURE_SCHEMA
    _affinities: tuple[frozenset[int], ...] = field(default=(), repr=False)
    _extractor: "FeatureExtractor | None" = field(default=None, repr=False)
    # Each CPU's cap in effect in kHz (NaN: unknown or not in the observation), to tell
    # which caps a decision changes.
    cap_khz: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    # Each CPU's thermal limit in °C (what its temperature columns are measured from).
    limit_c: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    core_columns = CORE_COLUMNS
    thread_columns = THREAD_COLUMNS
    pair_columns = PAIR_COLUMNS

    def pair_index(self, thread_index: int, cpu_index: int) -> int:
        """Row of the pair matrix for (``tids[thread_index]``, ``cpus[cpu_index]``)."""
        return thread_index * len(self.cpus) + cpu_index

    def allowed(self, rows: np.ndarray | None = None) -> np.ndarray:
        """bool ``[n_threads, n_cpus]``: the CPU is in the thread's current affinity
        (only the threads where the bool mask ``rows`` is true, when given)."""
        assert self._extractor is not None
        affinities = self._affinities if rows is None else tuple(a for a, r in zip(self._affinities, rows) if r)
        return self._extractor.affinity_matrix(affinities)

    @property
    def cpu_index(self) -> Mapping[int, int]:
        """CPU id -> its row."""
        assert self._extractor is not None
        return self._extractor.index

    def pinned_rows(self) -> np.ndarray:
        """intp per thread: the row of the one CPU its affinity allows, -1 when it allows
        several (or an offline one)."""
        assert self._extractor is not None
        return self._extractor.pinned_rows(self._affinities)

    def pair_matrix(self) -> np.ndarray:
        """float32 ``[n_threads * n_cpus, len(PAIR_COLUMNS)]``: thread, core, pair columns."""
        assert self._extractor is not None
        return build_pair_matrix(self.thread_features, self.core_features, self.last_cpu_index,
                                 self.allowed(), self._extractor.distance_padded)

    def pair_own(self) -> np.ndarray:
        """float32 ``[n_threads * n_cpus, len(PAIR_OWN_COLUMNS)]``: the pairs' own columns."""
        assert self._extractor is not None
        return build_pair_own(self.thread_features, self.core_features, self.last_cpu_index,
                              self.allowed(), self._extractor.distance_padded)


def build_pair_matrix(thread: np.ndarray, core: np.ndarray, last_cpu_index: np.ndarray,
                      allowed: np.ndarray, distance_padded: np.ndarray) -> np.ndarray:
    """The pair rows from their parts (what a recording stores instead of the rows).

    ``distance_padded`` is the CPU-to-CPU migration distance with one extra last row
    holding the default for threads whose last CPU is unknown (index -1).
    """
    T, C = thread, core
    m, n = T.shape[0], C.shape[0]
    kt, kc = T.shape[1], C.shape[1]
    out = np.empty((m, n, len(PAIR_COLUMNS)), dtype=np.float32)
    out[:, :, :kt] = T[:, None, :]
    out[:, :, kt:kt + kc] = C[None, :, :]
    out[:, :, kt + kc:] = build_pair_own(T, C, last_cpu_index, allowed, distance_padded).reshape(
        m, n, len(PAIR_OWN_COLUMNS))
    return out.reshape(m * n, len(PAIR_COLUMNS))


def build_pair_own(thread: np.ndarray, core: np.ndarray, last_cpu_index: np.ndarray,
                   allowed: np.ndarray, distance_padded: np.ndarray,
                   out: np.ndarray | None = None) -> np.ndarray:
    """float32 ``[n_threads * n_cpus, len(PAIR_OWN_COLUMNS)]``: only the pair's own columns.

    A model whose first layer is linear can score pairs from these plus the thread and
    core rows without ever building the full pair matrix (the ONNX policy does).
    ``out`` (``[n_threads, n_cpus, len(PAIR_OWN_COLUMNS)]``, e.g. the first columns of a
    wider array): write there instead; every element is written.
    """
    m, n = thread.shape[0], core.shape[0]
    own = np.empty((m, n, len(PAIR_OWN_COLUMNS)), dtype=np.float32) if out is None else out
    idx = last_cpu_index
    known = idx >= 0
    own[:, :, _P["on_core"]] = idx[:, None] == np.arange(n)[None, :]
    own[:, :, _P["allowed"]] = allowed
    own[:, :, _P["migration_distance"]] = distance_padded[idx]
    own[:, :, _P["migration_distance_missing"]] = ~known[:, None]
    mem = thread[:, _T["mem_bound"], None]
    np.multiply(mem, core[None, :, _C["llc_latency_rel"]], out=own[:, :, _P["mem_x_latency"]])
    np.multiply(1.0 - mem, core[None, :, _C["cap"]], out=own[:, :, _P["compute_x_cap"]])
    return own.reshape(m * n, len(PAIR_OWN_COLUMNS)) if out is None else own


def _as_slice(cols: list[int]) -> slice | np.ndarray:
    """A slice when the columns are consecutive (cheaper to assign), else an index array."""
    if cols == list(range(cols[0], cols[0] + len(cols))):
        return slice(cols[0], cols[0] + len(cols))
    return np.array(cols)


# Core columns computed per observation, in this order; each has a mask column.
_CORE_MEASURED = ("temp", "temp_slope", "neighbour_temp", "sink_distance", "llc_latency_rel",
                  "freq", "cap", "utilisation", "power_proxy")
_CORE_VAL = _as_slice([_C[n] for n in _CORE_MEASURED])
_CORE_MASK = _as_slice([_C[f"{n}_missing"] for n in _CORE_MEASURED])
_CORE_DEF = np.array([_CORE_DEFAULTS[n] for n in _CORE_MEASURED])
# Thread ratios: (column, numerator counter, denominator counter or None = epoch in ns,
# scale, upper bound of the normalised value).
_EPOCH = None
_THREAD_RATIOS = (
    ("ipc", "instructions", "cycles", 1.0 / fsch.IPC_SCALE, _MAX_IPC / fsch.IPC_SCALE),
    ("mpki", "llc_misses", "instructions", 1000.0 / fsch.MPKI_SCALE, _MAX_PKI / fsch.MPKI_SCALE),
    ("mem_bound", "stalled_cycles_backend", "cycles", 1.0, 1.0),
    ("utilisation", "run_ns", _EPOCH, 1.0, 1.0),
    ("wait_share", "wait_ns", _EPOCH, 1.0, 1.0),
    ("page_fault_rate", "page_faults", _EPOCH, 1e9 / fsch.PAGE_FAULT_SCALE_PER_S, np.inf),
    ("migration_rate", "cpu_migrations", _EPOCH, 1e9 / fsch.MIGRATION_SCALE_PER_S, np.inf),
    ("apki", "llc_references", "instructions", 1000.0, _MAX_PKI),  # kernel rule only
)
_RATIO_NUM = np.array([_COUNTERS.index(r[1]) for r in _THREAD_RATIOS])
_RATIO_DEN = np.array([_COUNTERS.index(r[2]) if r[2] else 0 for r in _THREAD_RATIOS])
_RATIO_PER_EPOCH = np.array([r[2] is None for r in _THREAD_RATIOS])
_RATIO_SCALE = np.array([r[3] for r in _THREAD_RATIOS])
_RATIO_UPPER = np.array([r[4] for r in _THREAD_RATIOS])
_N_OUT = len(_THREAD_RATIOS) - 1  # the last ratio is not a column
_THREAD_VAL = _as_slice([_T[r[0]] for r in _THREAD_RATIOS[:_N_OUT]])
_THREAD_MASK = _as_slice([_T[f"{r[0]}_missing"] for r in _THREAD_RATIOS[:_N_OUT]])
_THREAD_DEF = np.array([_THREAD_DEFAULTS[r[0]] for r in _THREAD_RATIOS[:_N_OUT]])
_KERNEL_COLS = slice(_KERNEL_COL0, _KERNEL_COL0 + len(fsch.KERNEL_CLASSES))
_KERNEL_VALUES = np.array([int(k) for k in fsch.KERNEL_CLASSES])
assert all(_T[f"kernel_{k.key}"] == _KERNEL_COL0 + i for i, k in enumerate(fsch.KERNEL_CLASSES))


def feature_limits_c(obs: Observation, cpus: tuple[int, ...], limit_c: float | None = None) -> np.ndarray:
    """Each CPU's thermal limit in °C, in ``cpus`` order, by the shield's rule
    (:func:`ailfmd.platform.limits.cpu_limits_c`): the maximum its sensor reports, lowered
    to ``limit_c`` (the configured limit) where given; ``limit_c``, else
    ``DEFAULT_LIMIT_C``, for a CPU whose sensor reports no maximum (or that has none)."""
    configured = math.inf if limit_c is None else float(limit_c)
    pairs = cpu_limits_c(obs, configured, math.inf)
    out = np.array([pairs[c][0] if c in pairs else configured for c in cpus], dtype=float)
    out[np.isinf(out)] = fsch.DEFAULT_LIMIT_C
    return out


class FeatureExtractor:
    """Features of one machine. ``noc`` (a chip's ``NocSpec``) sets the simulated hop costs;
    ``limit_c`` is the configured thermal limit (:func:`feature_limits_c`; None: the
    sensors' own maxima, else ``DEFAULT_LIMIT_C``)."""

    def __init__(self, topology: Topology, noc: object | None = None, limit_c: float | None = None) -> None:
        self.topology = topology
        self.limit_c = limit_c
        self.cpus: tuple[int, ...] = topology.online_cpus
        self.n_cpus = n = len(self.cpus)
        self.index: dict[int, int] = {c: i for i, c in enumerate(self.cpus)}
        positions = [topology.cpus[c].position for c in self.cpus]
        self.has_positions = n > 0 and all(p is not None for p in positions)
        self.sink_distance = np.zeros(n)
        self.llc_latency_rel = np.zeros(n)
        if self.has_positions:
            pos = np.array(positions, dtype=np.int64)
            neighbours = _mesh_neighbours(pos)
            distance = _hop_distance(pos)
            layers = int(pos[:, 0].max()) + 1
            if layers > 1:
                self.sink_distance = pos[:, 0] / (layers - 1.0)
            self.llc_latency_rel = _relative_latency(pos, noc)
        else:
            neighbours, distance = _domain_neighbours(topology, self.cpus)
        self.neighbours = neighbours.astype(float)
        self.migration_distance = distance.astype(np.float32)
        # One extra row (index -1) holding the default for threads whose last CPU is unknown.
        self.distance_padded = np.vstack([
            self.migration_distance,
            np.full((1, n), _PAIR_DEFAULTS["migration_distance"], dtype=np.float32)])
        self._vals_template = np.zeros((n, len(_CORE_MEASURED)))
        self._vals_template[:, 3] = self.sink_distance
        self._vals_template[:, 4] = self.llc_latency_rel
        self._have_template = np.zeros((n, len(_CORE_MEASURED)), dtype=bool)
        self._have_template[:, 3:5] = self.has_positions
        self._last: tuple[Observation, np.ndarray] | None = None
        self._aff_rows: dict[frozenset[int], np.ndarray] = {}
        self._pin_rows: dict[frozenset[int], int] = {}
        self._getters: dict[tuple[str, ...], tuple[np.ndarray, Callable]] = {}
        # (sensors' (sensor, max) pairs, each CPU's temperature source) -> limits, and the
        # limits' offset (limit - TEMP_SCALE_C) that the temperature columns subtract.
        self._limits: tuple[list, list, np.ndarray, np.ndarray] | None = None
        fallback = np.full(n, fsch.DEFAULT_LIMIT_C if limit_c is None else float(limit_c))
        self._no_maxima = (fallback, fallback - fsch.TEMP_SCALE_C)  # no sensor reports one

    # ------------------------------------------------------------------ extraction

    def extract(self, obs: Observation, prev: Observation | None = None,
                epoch_s: float | None = None) -> FeatureSet:
        """Features of ``obs``; ``prev`` gives slopes and (without ``epoch_s``) the epoch.

        Counters in ``obs`` are deltas since ``prev``; ``epoch_s`` overrides the epoch
        length taken from the two observations' times.
        """
        dt_s = obs.time_s - prev.time_s if prev is not None else None
        if epoch_s is None and dt_s is not None and dt_s > 0:
            epoch_s = dt_s
        cpu_raw = self._cpu_raw(obs)
        limit_c, temp_zero_c = self._limits_c(obs)
        prev_temps = None
        if prev is not None:
            last = self._last
            prev_temps = last[1] if last is not None and last[0] is prev else self._cpu_raw(prev)[:, 0]
        self._last = (obs, cpu_raw[:, 0])

        threads = obs.threads
        tids = tuple(sorted(threads))
        # One pass over the samples, transposed (attrgetter builds each row in C).
        counters, last_cpus, refs, affinities = (
            zip(*map(_SAMPLE_PARTS, map(threads.__getitem__, tids))) if tids else ((), (), (), ()))
        raw = self._counters(counters)
        last_idx = np.fromiter(map(self.index.get, last_cpus, repeat(-1)), dtype=np.intp, count=len(tids))

        thread, kernel = self._thread_features(raw, epoch_s)
        core = self._core_features(cpu_raw, temp_zero_c, prev_temps, dt_s, thread, last_idx, epoch_s)
        return FeatureSet(
            cpus=self.cpus, tids=tids, refs=refs,
            core_features=core, thread_features=thread, kernel_class=kernel, epoch_s=epoch_s,
            last_cpu_index=last_idx, _affinities=affinities, _extractor=self, cap_khz=cpu_raw[:, 2],
            limit_c=limit_c)

    def _cpu_raw(self, obs: Observation) -> np.ndarray:
        """[n, 4]: temp_c, freq_khz, cap_khz, hw_max_khz; NaN where unknown."""
        get = obs.cpus.get
        flat = [v for s in map(get, self.cpus)
                for v in ((s.temp.temp_c, s.freq_khz, s.cap_khz, s.hw_max_khz) if s is not None else _NO_CPU)]
        return np.array(flat, dtype=float).reshape(self.n_cpus, 4)

    def _limits_c(self, obs: Observation) -> tuple[np.ndarray, np.ndarray]:
        """(each CPU's limit, limit - TEMP_SCALE_C), kept until a sensor's maximum or a
        CPU's temperature source changes (sensors' maxima are read once at discovery, and
        platforms keep their sensor records, so the comparison is by identity)."""
        readings = obs.sensors
        if list(map(_MAX_C, readings)).count(None) == len(readings):
            return self._no_maxima
        sensors = list(map(_SENSOR_LIMIT, readings))
        get = obs.cpus.get
        sources = [s.temp.source if s is not None else None for s in map(get, self.cpus)]
        cached = self._limits
        if cached is None or cached[0] != sensors or cached[1] != sources:
            limits = feature_limits_c(obs, self.cpus, self.limit_c)
            cached = self._limits = (sensors, sources, limits, limits - fsch.TEMP_SCALE_C)
        return cached[2], cached[3]

    def _counters(self, dicts: tuple[Mapping[str, float], ...]) -> np.ndarray:
        """[m, len(_COUNTERS)] counter deltas, NaN where a thread's sample lacks one."""
        m = len(dicts)
        raw = np.full((m, len(_COUNTERS)), np.nan)
        if not m:
            return raw
        # Usually every sample carries the same counters: read them with one itemgetter,
        # keyed on the fullest sample. A sample lacking one of them takes the slow path.
        ref = max(dicts, key=len)
        names = tuple(k for k in _COUNTERS if k in ref)
        if not names:
            return raw
        cached = self._getters.get(names)
        if cached is None:
            cols = np.array([_COUNTERS.index(k) for k in names])
            getter = itemgetter(*names) if len(names) > 1 else (lambda d, k=names[0]: (d[k],))
            cached = self._getters[names] = (cols, getter)
        cols, getter = cached
        try:
            got = np.fromiter(chain.from_iterable(map(getter, dicts)), dtype=float, count=m * len(names))
            raw[:, cols] = got.reshape(m, len(names))
        except (KeyError, TypeError):  # a sample lacks a counter (or holds None)
            raw[:] = np.array([[d.get(k, np.nan) for k in _COUNTERS] for d in dicts], dtype=float)
        return raw

    def _core_features(self, cpu_raw: np.ndarray, temp_zero_c: np.ndarray, prev_temps: np.ndarray | None,
                       dt_s: float | None, thread: np.ndarray, last_idx: np.ndarray,
                       epoch_s: float | None) -> np.ndarray:
        n = self.n_cpus
        # Columns follow _CORE_MEASURED; the topology's columns come from the templates.
        vals = self._vals_template.copy()
        have = self._have_template.copy()
        temp, freq_khz, cap_khz, hw_max = cpu_raw.T
        with np.errstate(invalid="ignore", divide="ignore"):
            t_norm = vals[:, 0]
            np.multiply(temp - temp_zero_c, 1.0 / fsch.TEMP_SCALE_C, out=t_norm)
            # Boolean results are assigned, never written through out=: numpy 2.4's
            # isfinite writes wrong values into a strided boolean out array.
            have_t = np.isfinite(t_norm)
            have[:, 0] = have_t
            if prev_temps is not None and dt_s is not None and dt_s > 0:
                np.multiply(temp - prev_temps, 1.0 / (dt_s * fsch.SLOPE_SCALE_C_PER_S), out=vals[:, 1])
                have[:, 1] = np.isfinite(vals[:, 1])
            # Mean over the neighbours that report a temperature.
            t_known = np.where(have_t, t_norm, 0.0)
            count = self.neighbours @ have_t.astype(float)
            np.divide(self.neighbours @ t_known, count, out=vals[:, 2])
            have[:, 2] = count > 0.0
            np.divide(cpu_raw[:, 1:3], hw_max[:, None], out=vals[:, 5:7])
            have[:, 5:7] = np.isfinite(vals[:, 5:7]) & (hw_max > 0)[:, None]
        # Per-CPU sums over the managed threads last seen there: count, run share, run unknown.
        on = last_idx >= 0
        idx = last_idx[on]
        on_thread = thread[on]
        threads_here = np.bincount(idx, minlength=n)
        np.minimum(np.bincount(idx, on_thread[:, _T["utilisation"]], n), 1.0, out=vals[:, 7])
        if epoch_s is not None:
            have[:, 7] = np.bincount(idx, on_thread[:, _T["utilisation_missing"]], n) == 0.0
        x = np.where(have[:, 5], vals[:, 5], 0.0)
        v = fsch.V_FLOOR + (1.0 - fsch.V_FLOOR) * x
        np.multiply(x * v * v, vals[:, 7], out=vals[:, 8])
        have[:, 8] = have[:, 5] & have[:, 7]

        out = np.empty((n, len(CORE_COLUMNS)), dtype=np.float32)
        out[:, _CORE_VAL] = np.where(have, vals, _CORE_DEF)
        out[:, _CORE_MASK] = ~have
        out[:, _C["threads_here"]] = threads_here * (1.0 / fsch.THREADS_SCALE)
        return out

    def _thread_features(self, raw: np.ndarray, epoch_s: float | None) -> tuple[np.ndarray, np.ndarray]:
        m = raw.shape[0]
        num = raw[:, _RATIO_NUM]
        den = raw[:, _RATIO_DEN]
        den[:, _RATIO_PER_EPOCH] = epoch_s * 1e9 if epoch_s is not None and epoch_s > 0 else np.nan
        # x / 0 is undefined (missing) unless x == 0 too: nothing happened, a measured 0.
        ratio = np.where(num == 0.0, 0.0, np.nan)
        with np.errstate(invalid="ignore"):  # older numpy warns on NaN comparisons too
            np.divide(num, den, out=ratio, where=den != 0.0)
            ratio *= _RATIO_SCALE
            np.minimum(ratio, _RATIO_UPPER, out=ratio)
            ipc = ratio[:, 0] * fsch.IPC_SCALE
            mpki = ratio[:, 1] * fsch.MPKI_SCALE
            kernel = _kernel_class(ipc, mpki, _APKI_EDGES.searchsorted(ratio[:, _N_OUT], "right"), ratio[:, 3])
        have = ~np.isnan(ratio)
        out = np.zeros((m, len(THREAD_COLUMNS)), dtype=np.float32)
        out[:, _THREAD_VAL] = np.where(have[:, :_N_OUT], ratio[:, :_N_OUT], _THREAD_DEF)
        out[:, _THREAD_MASK] = ~have[:, :_N_OUT]
        out[:, _KERNEL_COLS] = kernel[:, None] == _KERNEL_VALUES
        out[:, _T["kernel_class_missing"]] = kernel < 0
        return out, kernel

    def pinned_rows(self, affinities: tuple[frozenset[int], ...]) -> np.ndarray:
        """intp per affinity: the row of its only CPU, -1 for several CPUs or an offline
        one; cached per distinct CPU set (a set hashes once, then lookups are cheap)."""
        cache = self._pin_rows
        try:
            return np.fromiter(map(cache.__getitem__, affinities), dtype=np.intp, count=len(affinities))
        except KeyError:
            if len(cache) > 1024:
                cache.clear()
            for aff in affinities:
                if aff not in cache:
                    cache[aff] = self.index.get(next(iter(aff)), -1) if len(aff) == 1 else -1
            return np.fromiter(map(cache.__getitem__, affinities), dtype=np.intp, count=len(affinities))

    def affinity_matrix(self, affinities: tuple[frozenset[int], ...]) -> np.ndarray:
        """bool ``[len(affinities), n_cpus]``; rows cached per distinct CPU set."""
        cache = self._aff_rows
        if len(cache) > 1024:
            cache.clear()
        rows = []
        for aff in affinities:
            row = cache.get(aff)
            if row is None:
                row = cache[aff] = np.zeros(self.n_cpus, dtype=bool)
                row[[self.index[c] for c in aff if c in self.index]] = True
            rows.append(row)
        return np.array(rows, dtype=bool).reshape(len(affinities), self.n_cpus)


# --------------------------------------------------------------------------- topology


def _mesh_neighbours(pos: np.ndarray) -> np.ndarray:
    """Same-layer mesh neighbours (one hop) and the tiles directly above and below."""
    layer, row, col = pos[:, 0], pos[:, 1], pos[:, 2]
    dl = np.abs(layer[:, None] - layer[None, :])
    dh = np.abs(row[:, None] - row[None, :]) + np.abs(col[:, None] - col[None, :])
    return ((dl == 0) & (dh == 1)) | ((dl == 1) & (dh == 0))


def _hop_distance(pos: np.ndarray) -> np.ndarray:
    """Mesh + TSV hops between tiles, divided by the largest (0 for a 1-tile chip)."""
    d = np.abs(pos[:, None, :] - pos[None, :, :]).sum(axis=2).astype(float)
    top = d.max()
    return d / top if top > 0 else d


def _relative_latency(pos: np.ndarray, noc: object | None) -> np.ndarray:
    layers, rows, cols = (int(v) + 1 for v in pos.max(axis=0))
    lat = mean_llc_latency_cycles(
        layers, rows, cols,
        getattr(noc, "hop_horizontal_cycles", DEFAULT_HOP_H_CYCLES),
        getattr(noc, "hop_vertical_cycles", DEFAULT_HOP_V_CYCLES),
        getattr(noc, "llc_bank_access_cycles", DEFAULT_BANK_CYCLES))
    mine = lat[pos[:, 0] * rows * cols + pos[:, 1] * cols + pos[:, 2]]
    return mine / mine.min() - 1.0


def _domain_neighbours(topology: Topology, cpus: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Neighbours (SMT siblings, CPUs sharing an L2 or L3) and migration distances by level."""
    n = len(cpus)
    index = {c: i for i, c in enumerate(cpus)}
    dist = np.full((n, n), DIST_FAR)

    def share(members: tuple[int, ...], d: float) -> None:
        ix = [index[c] for c in members if c in index]
        if ix:
            block = np.ix_(ix, ix)
            dist[block] = np.minimum(dist[block], d)

    for dom in topology.caches:
        if dom.level >= 3:
            share(dom.cpus, DIST_L3)
        elif dom.level == 2:
            share(dom.cpus, DIST_L2)
    for c in cpus:
        share(topology.cpus[c].thread_siblings, DIST_SMT)
    np.fill_diagonal(dist, DIST_SAME)
    neighbours = dist < DIST_FAR
    np.fill_diagonal(neighbours, False)
    return neighbours, dist


def extract_features(obs: Observation, topology: Topology, prev: Observation | None = None,
                     noc: object | None = None, epoch_s: float | None = None,
                     limit_c: float | None = None) -> FeatureSet:
    """One-shot :meth:`FeatureExtractor.extract` (builds the extractor: slow, for tools)."""
    return FeatureExtractor(topology, noc, limit_c).extract(obs, prev, epoch_s)


__all__ = ["FEATURE_SCHEMA", "FeatureExtractor", "FeatureSet", "build_pair_matrix", "build_pair_own",
           "extract_features", "feature_limits_c", "infer_kernel_class"]
