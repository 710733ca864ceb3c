"""The learned policy's input schema: feature names, units, normalisation, availability.

One place says what every column of the policy's input means, so the trainer, the ONNX
metadata and the runtime cannot disagree. The schema is versioned (``FEATURE_SCHEMA``);
any change of a name, an order, a unit or a normalisation constant needs a new version,
and a policy trained on another version is refused by the runtime.

Every column is a normalised, dimensionless float32. A quantity a platform cannot
measure (no temperature sensor in a VM, no PMU, the first observation without a slope)
is never reported as an invented number: its column holds the documented ``default``
and the companion mask column (``<mask>``, 1.0 = missing) says so. Several columns may
share one mask (the one-hot kernel class). Value columns come first, masks last.
Details and the reasons for each constant: ``docs/features.md``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from ailfmd.sim.kernels import Kernel

FEATURE_SCHEMA = "ailfmd.features/2"

# --------------------------------------------------------------------------- constants

# Temperatures are measured from each CPU's thermal limit: (t - (limit - TEMP_SCALE_C)) /
# TEMP_SCALE_C, so 1 = at the limit and 0 = TEMP_SCALE_C below it. The limit is the one
# the safety shield protects (the sensor's own maximum, or the configured limit where
# lower); the simulated chips' is their DTM threshold, 80 °C, which puts 0 at their 45 °C
# ambient (HotSniper's). A policy trained there then reads a machine whose limit is 95 °C
# by its headroom, not as 15 °C too hot (schema 1 used a fixed 45 / 80 °C scale).
TEMP_SCALE_C = 35.0
# The limit assumed for a CPU when neither its sensor nor the configuration gives one.
DEFAULT_LIMIT_C = 80.0
# Slopes: °C/s divided by this. Thin 3D dies move tens of °C/s under a load step.
SLOPE_SCALE_C_PER_S = 10.0
# Per-thread rates.
IPC_SCALE = 4.0  # a 4-wide core retires at most ~4 instructions per cycle
MPKI_SCALE = 50.0  # decode GEMV streams ~50 LLC misses per kilo-instruction
# Event rates per second of the epoch, divided by these.
PAGE_FAULT_SCALE_PER_S = 1000.0
MIGRATION_SCALE_PER_S = 100.0  # ten moves per 100 ms epoch
# Managed threads on one CPU, divided by this.
THREADS_SCALE = 4.0
# Voltage proxy for the power estimate: V(f)/V(f_max) = V_FLOOR + (1 - V_FLOOR) * f/f_max,
# HotSniper's V = 0.6 + 0.8 * f / 4 GHz expressed relative to its 1.4 V at 4 GHz.
V_FLOOR = 0.6 / 1.4

# Kernel-class rule (see ``features.infer_kernel_class``), from ailfmd.sim.kernels:
SPIN_IPC_BELOW = 0.1  # PAUSE loops: CPI ~35
SPIN_MPKI_BELOW = 1.0
DECODE_MPKI_AT_LEAST = 35.0  # decode GEMV ~50 MPKI vs attention ~20
ATTENTION_MPKI_AT_LEAST = 5.0  # attention ~20 MPKI vs norm ~1 and GEMM ~0.5
GEMM_IPC_AT_LEAST = 1.8  # blocked GEMM ~2.3 IPC; norm (base CPI 0.6) stays below 1.67
ATTENTION_APKI_AT_LEAST = 15.0  # LLC-resident KV cache: ~20-40 LLC refs/kinst vs norm ~8
IDLE_UTILISATION_BELOW = 0.01  # a thread that ran less than 1 % of the epoch


@dataclass(frozen=True)
class FeatureSpec:
    """One value column: what it measures and how it is normalised."""

    name: str
    unit: str  # unit of the raw quantity before normalisation
    normalisation: str  # the formula from raw quantity to the column's value
    description: str
    mask: str | None = None  # name of the mask column flagging it missing, None = always measured
    default: float = 0.0  # value written while missing


def _temp(name: str, what: str, mask: str) -> FeatureSpec:
    return FeatureSpec(name, "degC", f"(t - (limit - {TEMP_SCALE_C})) / {TEMP_SCALE_C}, limit = the "
                       f"CPU's thermal limit (default {DEFAULT_LIMIT_C})", what, mask, 0.0)


CORE_FEATURES: tuple[FeatureSpec, ...] = (
    _temp("temp", "CPU temperature (its own sensor, or the package/zone sensor standing for it)",
          "temp_missing"),
    FeatureSpec("temp_slope", "degC/s", f"dT/dt / {SLOPE_SCALE_C_PER_S}",
                "temperature change since the previous observation per second", "temp_slope_missing"),
    _temp("neighbour_temp", "mean of the normalised temperatures (each from its own CPU's limit) of "
          "the CPU's neighbours that report one (sim: mesh and vertical neighbours; Linux: SMT "
          "siblings and CPUs sharing L2/L3)",
          "neighbour_temp_missing"),
    FeatureSpec("sink_distance", "layers", "layer / (n_layers - 1); 0 on a single-layer chip",
                "distance from the heat sink (0 = bonded to the spreader); real machines do "
                "not report a die stack, so it is 0 and flagged missing there",
                "sink_distance_missing"),
    FeatureSpec("llc_latency_rel", "cycles", "latency / min(latency over the chip) - 1",
                "mean S-NUCA LLC hit latency from the CPU's mesh position, relative to the "
                "fastest CPU; unknown on real machines (0, flagged missing)",
                "llc_latency_rel_missing"),
    FeatureSpec("freq", "kHz", "cur / hw_max", "current frequency", "freq_missing", 1.0),
    FeatureSpec("cap", "kHz", "cap / hw_max", "frequency cap (scaling_max_freq)", "cap_missing", 1.0),
    FeatureSpec("utilisation", "1", "sum(run_ns of managed threads last on the CPU) / epoch, <= 1",
                "share of the epoch the managed threads ran on this CPU", "utilisation_missing"),
    FeatureSpec("power_proxy", "1", "x * (V_FLOOR + (1 - V_FLOOR) * x)**2 * utilisation, x = freq",
                "dynamic power relative to a fully busy core at hw max (f V^2 u)",
                "power_proxy_missing"),
    FeatureSpec("threads_here", "threads", f"count / {THREADS_SCALE}",
                "managed threads whose last CPU is this one"),
)

KERNEL_CLASSES: tuple[Kernel, ...] = tuple(Kernel)

THREAD_FEATURES: tuple[FeatureSpec, ...] = (
    FeatureSpec("ipc", "instructions/cycle", f"ipc / {IPC_SCALE}",
                "instructions per cycle (instructions / cycles)", "ipc_missing"),
    FeatureSpec("mpki", "misses/kinst", f"mpki / {MPKI_SCALE}",
                "LLC misses per kilo-instruction", "mpki_missing"),
    FeatureSpec("mem_bound", "1", "stalled_cycles_backend / cycles, <= 1",
                "share of cycles stalled in the back end (memory-boundness)", "mem_bound_missing"),
    FeatureSpec("utilisation", "1", "run_ns / epoch, <= 1", "share of the epoch the thread ran",
                "utilisation_missing"),
    FeatureSpec("wait_share", "1", "wait_ns / epoch, <= 1",
                "share of the epoch the thread waited runnable on a run queue", "wait_share_missing"),
    FeatureSpec("page_fault_rate", "faults/s", f"page_faults / epoch / {PAGE_FAULT_SCALE_PER_S}",
                "page faults per second (first touch of weights, KV growth)", "page_fault_rate_missing"),
    FeatureSpec("migration_rate", "migrations/s", f"cpu_migrations / epoch / {MIGRATION_SCALE_PER_S}",
                "moves between CPUs per second", "migration_rate_missing"),
) + tuple(
    FeatureSpec(f"kernel_{k.key}", "1", "one-hot", f"inferred kernel class is {k.key}",
                "kernel_class_missing")
    for k in KERNEL_CLASSES
)

PAIR_OWN_FEATURES: tuple[FeatureSpec, ...] = (
    FeatureSpec("on_core", "1", "1 if the CPU is the thread's last CPU", "staying put costs nothing"),
    FeatureSpec("allowed", "1", "1 if the CPU is in the thread's current affinity",
                "the placement the application or the last action allowed"),
    FeatureSpec("migration_distance", "1",
                "sim: mesh+TSV hops / max hops; Linux: 0 same CPU, 0.25 SMT sibling, "
                "0.5 shared L2, 0.75 shared L3, 1 otherwise",
                "how far a move from the thread's last CPU goes (cache warm-up cost)",
                "migration_distance_missing", 1.0),
    FeatureSpec("mem_x_latency", "1", "thread.mem_bound * core.llc_latency_rel",
                "memory-bound threads care about cache distance"),
    FeatureSpec("compute_x_cap", "1", "(1 - thread.mem_bound) * core.cap",
                "compute-bound threads care about frequency"),
)


def mask_names(specs: tuple[FeatureSpec, ...]) -> tuple[str, ...]:
    """The mask columns of ``specs`` in first-use order."""
    out: list[str] = []
    for s in specs:
        if s.mask is not None and s.mask not in out:
            out.append(s.mask)
    return tuple(out)


def column_names(specs: tuple[FeatureSpec, ...]) -> tuple[str, ...]:
    """Value columns then mask columns."""
    return tuple(s.name for s in specs) + mask_names(specs)


CORE_COLUMNS = column_names(CORE_FEATURES)
THREAD_COLUMNS = column_names(THREAD_FEATURES)
PAIR_OWN_COLUMNS = column_names(PAIR_OWN_FEATURES)
# A pair row is [thread columns, core columns, pair columns].
PAIR_COLUMNS = (tuple(f"thread.{n}" for n in THREAD_COLUMNS) + tuple(f"core.{n}" for n in CORE_COLUMNS)
                + tuple(f"pair.{n}" for n in PAIR_OWN_COLUMNS))


def describe_schema() -> dict[str, Any]:
    """The whole schema as plain data (for ONNX metadata and docs)."""

    def block(specs: tuple[FeatureSpec, ...]) -> dict[str, Any]:
        return {"columns": list(column_names(specs)), "features": [asdict(s) for s in specs],
                "masks": list(mask_names(specs))}

    return {
        "schema": FEATURE_SCHEMA,
        "dtype": "float32",
        "mask_convention": "mask column 1.0 = value missing, value column holds the feature's default",
        "core": {**block(CORE_FEATURES), "row_order": "cpu id ascending"},
        "thread": {**block(THREAD_FEATURES), "row_order": "tid ascending"},
        "pair": {**block(PAIR_OWN_FEATURES), "all_columns": list(PAIR_COLUMNS),
                 "row_order": "thread-major: row = thread_index * n_cpus + cpu_index"},
        "kernel_classes": [k.key for k in KERNEL_CLASSES],
        "constants": {
            "TEMP_SCALE_C": TEMP_SCALE_C, "DEFAULT_LIMIT_C": DEFAULT_LIMIT_C,
            "SLOPE_SCALE_C_PER_S": SLOPE_SCALE_C_PER_S, "IPC_SCALE": IPC_SCALE,
            "MPKI_SCALE": MPKI_SCALE, "THREADS_SCALE": THREADS_SCALE,
            "PAGE_FAULT_SCALE_PER_S": PAGE_FAULT_SCALE_PER_S,
            "MIGRATION_SCALE_PER_S": MIGRATION_SCALE_PER_S, "V_FLOOR": V_FLOOR,
            "SPIN_IPC_BELOW": SPIN_IPC_BELOW, "SPIN_MPKI_BELOW": SPIN_MPKI_BELOW,
            "DECODE_MPKI_AT_LEAST": DECODE_MPKI_AT_LEAST,
            "ATTENTION_MPKI_AT_LEAST": ATTENTION_MPKI_AT_LEAST,
            "GEMM_IPC_AT_LEAST": GEMM_IPC_AT_LEAST,
            "ATTENTION_APKI_AT_LEAST": ATTENTION_APKI_AT_LEAST,
            "IDLE_UTILISATION_BELOW": IDLE_UTILISATION_BELOW,
        },
    }


def schema_json() -> str:
    """:func:`describe_schema` as compact, key-sorted JSON (stable bytes for metadata)."""
    return json.dumps(describe_schema(), sort_keys=True, separators=(",", ":"))
