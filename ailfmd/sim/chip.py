"""Chip descriptions: frozen records loaded from TOML data files, strictly validated.

A chip is ``layers`` dies of ``rows`` x ``cols`` tiles; each tile holds one core, its
private caches and one S-NUCA LLC bank. Conventions (also in ``docs/chips.md``):

- core index = ``layer * rows * cols + row * cols + col``;
- layer 0 is the die nearest the heat sink (bonded to the heat spreader through the
  thermal interface material); higher layers are farther from the sink and run hotter.

Every bad value raises :class:`ailfmd.errors.ConfigError` naming the file, the dotted
key (``thermal.layers[2].die_thickness_m``) and the value.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ailfmd.errors import ConfigError
from ailfmd.tomlcheck import Style, Table

CHIPS_DIR = Path(__file__).parent / "chips"
DEFAULT_CHIP = "3d-64"
MAX_CORES = 1024  # the thermal model's matrices are dense: O(nodes^2) memory, O(nodes^3) setup

# Chip files: every key required, lists non-empty and checked item by item; "true" is
# never a number, NaN is refused by name and an infinity fails the range check.
_STYLE = Style(int_range="between", num_range="implausible", number_reason="must be a number",
               nonfinite_reason="must be a number, not NaN", allow_inf=True, float_first=True,
               non_empty_strings=True, itemwise_lists=True)


@dataclass(frozen=True)
class Floorplan:
    """Tile grid. Tiles are ``tile_width_m`` along a row (x) and ``tile_height_m`` (y)."""

    layers: int
    rows: int
    cols: int
    tile_width_m: float
    tile_height_m: float

    @property
    def tiles_per_layer(self) -> int:
        return self.rows * self.cols

    @property
    def die_width_m(self) -> float:
        return self.cols * self.tile_width_m

    @property
    def die_height_m(self) -> float:
        return self.rows * self.tile_height_m

    @property
    def tile_area_m2(self) -> float:
        return self.tile_width_m * self.tile_height_m


@dataclass(frozen=True)
class NocSpec:
    """Mesh latencies in core cycles (a hop includes router and link)."""

    hop_horizontal_cycles: float
    hop_vertical_cycles: float
    llc_bank_access_cycles: float


@dataclass(frozen=True)
class MemorySpec:
    """Off-chip DRAM and the per-tile LLC bank. Bandwidth in GB/s (1e9 bytes/s)."""

    dram_latency_ns: float
    dram_bandwidth_gbps: float
    llc_bank_size_kib: int


@dataclass(frozen=True)
class VfTable:
    """Per-core DVFS operating points, frequencies strictly increasing."""

    frequencies_mhz: tuple[int, ...]
    voltages_v: tuple[float, ...]

    @property
    def min_mhz(self) -> int:
        return self.frequencies_mhz[0]

    @property
    def max_mhz(self) -> int:
        return self.frequencies_mhz[-1]

    @property
    def nominal_voltage_v(self) -> float:
        """Voltage of the highest operating point (the leakage reference voltage)."""
        return self.voltages_v[-1]

    def voltage_v(self, freq_mhz: float) -> float:
        """Supply voltage at ``freq_mhz``: exact at table points, linear in between."""
        if not self.min_mhz <= freq_mhz <= self.max_mhz:
            raise ValueError(
                f"{freq_mhz} MHz is outside the V/f table ({self.min_mhz}-{self.max_mhz} MHz)"
            )
        return float(np.interp(freq_mhz, self.frequencies_mhz, self.voltages_v))


@dataclass(frozen=True)
class PowerSpec:
    """Per-tile power parameters; see :mod:`ailfmd.sim.power` for the formulas."""

    ceff_nf: float
    idle_w: float
    leakage_w_at_ref: float
    leakage_ref_c: float
    leakage_temp_coeff_per_c: float
    leakage_voltage_exponent: float
    uncore_w_per_tile: float


@dataclass(frozen=True)
class DieLayer:
    """One die and the interface (TIM or bonding layer) below it, toward the sink."""

    die_thickness_m: float
    die_conductivity_w_per_mk: float
    die_heat_capacity_j_per_m3k: float
    interface_thickness_m: float
    interface_conductivity_w_per_mk: float
    interface_heat_capacity_j_per_m3k: float


@dataclass(frozen=True)
class PackagePlate:
    """A square copper plate: the heat spreader or the heat sink base."""

    side_m: float
    thickness_m: float
    conductivity_w_per_mk: float
    heat_capacity_j_per_m3k: float


@dataclass(frozen=True)
class ThermalSpec:
    ambient_c: float
    layers: tuple[DieLayer, ...]  # index = die layer, 0 nearest the sink
    spreader: PackagePlate
    sink: PackagePlate
    convection_resistance_k_per_w: float
    convection_capacitance_j_per_k: float


@dataclass(frozen=True)
class DtmSpec:
    """Hardware DTM: throttle at ``threshold_c`` until below threshold - hysteresis."""

    threshold_c: float
    hysteresis_c: float
    critical_c: float


@dataclass(frozen=True)
class MigrationSpec:
    warmup_us: float  # cache warm-up penalty paid by a thread after it moves


@dataclass(frozen=True)
class Chip:
    """A simulated chip.

    Core index = ``layer * rows * cols + row * cols + col``; layer 0 is nearest the heat
    sink (bonded to the spreader), so higher layers are farther away and hotter.
    """

    name: str
    description: str
    source: str  # the file it was loaded from
    floorplan: Floorplan
    noc: NocSpec
    memory: MemorySpec
    vf: VfTable
    power: PowerSpec
    thermal: ThermalSpec
    dtm: DtmSpec
    migration: MigrationSpec

    @property
    def n_cores(self) -> int:
        fp = self.floorplan
        return fp.layers * fp.rows * fp.cols

    def position(self, core: int) -> tuple[int, int, int]:
        """``(layer, row, col)`` of ``core``."""
        if not 0 <= core < self.n_cores:
            raise ValueError(f"core {core} out of range 0..{self.n_cores - 1}")
        layer, rest = divmod(core, self.floorplan.tiles_per_layer)
        row, col = divmod(rest, self.floorplan.cols)
        return layer, row, col

    def core_at(self, layer: int, row: int, col: int) -> int:
        """Inverse of :meth:`position`."""
        fp = self.floorplan
        if not (0 <= layer < fp.layers and 0 <= row < fp.rows and 0 <= col < fp.cols):
            raise ValueError(f"({layer}, {row}, {col}) is outside the {fp.layers}x{fp.rows}x{fp.cols} chip")
        return layer * fp.tiles_per_layer + row * fp.cols + col


def shipped_chips() -> tuple[str, ...]:
    """Names of the chips shipped in ``ailfmd/sim/chips``."""
    return tuple(sorted(p.stem for p in CHIPS_DIR.glob("*.toml")))


MAX_BASE_DEPTH = 4  # chips built on chips built on chips ...: enough, and no cycles


def load_chip(name_or_path: str) -> Chip:
    """Load a shipped chip by name (``3d-64``) or any chip file by path.

    A chip file may name another with ``base = "3d-64"`` (a shipped name, or a path
    relative to the file): it is that chip with the tables and keys it sets replaced
    (docs/chips.md), e.g. the same silicon with another DTM threshold.
    """
    doc, source = _read_chip(name_or_path, None, 0)
    return _parse(Table(doc, source, style=_STYLE))


def _chip_path(name_or_path: str, relative_to: Path | None) -> Path:
    shipped = CHIPS_DIR / f"{name_or_path}.toml"
    if "/" not in name_or_path and shipped.is_file():
        return shipped
    path = Path(name_or_path)
    return relative_to / path if relative_to is not None and not path.is_absolute() else path


def _read_chip(name_or_path: str, relative_to: Path | None, depth: int) -> tuple[dict, str]:
    """The chip document of ``name_or_path`` with its ``base`` merged in, and its source."""
    path = _chip_path(name_or_path, relative_to)
    source = str(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(
            source, "chip", name_or_path,
            f"no such chip file ({e.strerror}); shipped chips: {', '.join(shipped_chips())}",
        ) from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(source, "(document)", None, f"not valid TOML: {e}") from None
    base = doc.pop("base", None)
    if base is None:
        return doc, source
    if not isinstance(base, str) or not base:
        raise ConfigError(source, "base", base, "must be the name or path of another chip file")
    if depth >= MAX_BASE_DEPTH:
        raise ConfigError(source, "base", base, f"chips may build on at most {MAX_BASE_DEPTH} others "
                                                f"(a cycle of bases?)")
    parent, _ = _read_chip(base, path.parent, depth + 1)
    return _merged(parent, doc), source


def _merged(base: dict, over: dict) -> dict:
    """``base`` with ``over``'s keys replacing its own; tables are merged key by key."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


def _parse(top: Table) -> Chip:
    name = top.string("name")
    description = top.string("description")

    t = top.table("floorplan")
    floorplan = Floorplan(
        layers=t.integer("layers", 1, 16),
        rows=t.integer("rows", 1, 64),
        cols=t.integer("cols", 1, 64),
        tile_width_m=t.number("tile_width_m", 1e-4, 0.05),
        tile_height_m=t.number("tile_height_m", 1e-4, 0.05),
    )
    n_cores = floorplan.layers * floorplan.tiles_per_layer
    if n_cores > MAX_CORES:
        t.fail("layers", floorplan.layers,
               f"{n_cores} cores in all; the dense thermal model supports up to {MAX_CORES}")
    t.finish()

    t = top.table("noc")
    noc = NocSpec(
        hop_horizontal_cycles=t.number("hop_horizontal_cycles", 0.0, 1e3, lo_open=True),
        hop_vertical_cycles=t.number("hop_vertical_cycles", 0.0, 1e3, lo_open=True),
        llc_bank_access_cycles=t.number("llc_bank_access_cycles", 0.0, 1e4, lo_open=True),
    )
    t.finish()

    t = top.table("memory")
    memory = MemorySpec(
        dram_latency_ns=t.number("dram_latency_ns", 0.0, 1e4, lo_open=True),
        dram_bandwidth_gbps=t.number("dram_bandwidth_gbps", 0.0, 1e5, lo_open=True),
        llc_bank_size_kib=t.integer("llc_bank_size_kib", 1, 1 << 20),
    )
    t.finish()

    vf = _parse_vf(top.table("vf"))

    t = top.table("power")
    power = PowerSpec(
        ceff_nf=t.number("ceff_nf", 0.0, 100.0, lo_open=True),
        idle_w=t.number("idle_w", 0.0, 100.0),
        leakage_w_at_ref=t.number("leakage_w_at_ref", 0.0, 100.0),
        leakage_ref_c=t.number("leakage_ref_c", -50.0, 150.0),
        leakage_temp_coeff_per_c=t.number("leakage_temp_coeff_per_c", 0.0, 0.2),
        leakage_voltage_exponent=t.number("leakage_voltage_exponent", 0.0, 5.0),
        uncore_w_per_tile=t.number("uncore_w_per_tile", 0.0, 100.0),
    )
    t.finish()

    thermal = _parse_thermal(top.table("thermal"), floorplan)

    t = top.table("dtm")
    threshold_c = t.number("threshold_c", -50.0, 200.0)
    if threshold_c <= thermal.ambient_c:
        t.fail("threshold_c", threshold_c, f"must be above thermal.ambient_c ({thermal.ambient_c})")
    hysteresis_c = t.number("hysteresis_c", 0.0, 50.0, lo_open=True)
    if threshold_c - hysteresis_c <= thermal.ambient_c:
        t.fail("hysteresis_c", hysteresis_c, "threshold_c - hysteresis_c must stay above ambient")
    critical_c = t.number("critical_c", -50.0, 250.0)
    if critical_c <= threshold_c:
        t.fail("critical_c", critical_c, f"must be above dtm.threshold_c ({threshold_c})")
    dtm = DtmSpec(threshold_c, hysteresis_c, critical_c)
    t.finish()

    t = top.table("migration")
    migration = MigrationSpec(warmup_us=t.number("warmup_us", 0.0, 1e6))
    t.finish()
    top.finish()
    return Chip(name, description, top.source, floorplan, noc, memory, vf, power,
                thermal, dtm, migration)


def _parse_vf(t: Table) -> VfTable:
    freqs = t.integer_list("frequencies_mhz", 100, 10_000)
    volts = t.number_list("voltages_v", 0.3, 2.0)
    if len(volts) != len(freqs):
        t.fail("voltages_v", list(volts), f"needs one voltage per frequency ({len(freqs)})")
    for i in range(1, len(freqs)):
        if freqs[i] <= freqs[i - 1]:
            t.fail(f"frequencies_mhz[{i}]", freqs[i], f"must be > the previous entry ({freqs[i - 1]})")
        if volts[i] < volts[i - 1]:
            t.fail(f"voltages_v[{i}]", volts[i],
                   f"must be >= the previous entry ({volts[i - 1]}): voltage rises with frequency")
    t.finish()
    return VfTable(tuple(freqs), tuple(volts))


def _parse_plate(t: Table, max_thickness_m: float) -> PackagePlate:
    return PackagePlate(
        side_m=t.number("side_m", 0.0, 1.0, lo_open=True),
        thickness_m=t.number("thickness_m", 0.0, max_thickness_m, lo_open=True),
        conductivity_w_per_mk=t.number("conductivity_w_per_mk", 0.0, 5000.0, lo_open=True),
        heat_capacity_j_per_m3k=t.number("heat_capacity_j_per_m3k", 0.0, 1e8, lo_open=True),
    )


def _parse_thermal(t: Table, fp: Floorplan) -> ThermalSpec:
    ambient_c = t.number("ambient_c", -50.0, 100.0)
    layer_tables = t.table_list("layers")
    if len(layer_tables) != fp.layers:
        t.fail("layers", f"{len(layer_tables)} entries",
               f"needs one entry per die layer (floorplan.layers = {fp.layers})")
    layers = []
    for lt in layer_tables:
        layers.append(DieLayer(
            die_thickness_m=lt.number("die_thickness_m", 0.0, 0.01, lo_open=True),
            die_conductivity_w_per_mk=lt.number("die_conductivity_w_per_mk", 0.0, 5000.0, lo_open=True),
            die_heat_capacity_j_per_m3k=lt.number("die_heat_capacity_j_per_m3k", 0.0, 1e8, lo_open=True),
            interface_thickness_m=lt.number("interface_thickness_m", 0.0, 0.01, lo_open=True),
            interface_conductivity_w_per_mk=lt.number(
                "interface_conductivity_w_per_mk", 0.0, 5000.0, lo_open=True),
            interface_heat_capacity_j_per_m3k=lt.number(
                "interface_heat_capacity_j_per_m3k", 0.0, 1e8, lo_open=True),
        ))
        lt.finish()

    st = t.table("spreader")
    spreader = _parse_plate(st, 0.05)
    die_extent_m = max(fp.die_width_m, fp.die_height_m)
    if spreader.side_m <= die_extent_m:
        st.fail("side_m", spreader.side_m,
                f"must be larger than the die ({fp.die_width_m:g} x {fp.die_height_m:g} m)")
    st.finish()

    kt = t.table("sink")
    sink = _parse_plate(kt, 0.5)
    if sink.side_m <= spreader.side_m:
        kt.fail("side_m", sink.side_m, f"must be larger than the spreader ({spreader.side_m:g} m)")
    r_conv = kt.number("convection_resistance_k_per_w", 0.0, 100.0, lo_open=True)
    c_conv = kt.number("convection_capacitance_j_per_k", 0.0, 1e5)
    kt.finish()
    t.finish()
    return ThermalSpec(ambient_c, tuple(layers), spreader, sink, r_conv, c_conv)
