"""Chip files: shipped chips load and follow the conventions; bad files name file, key, value."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ailfmd.errors import ConfigError
from ailfmd.sim.chip import CHIPS_DIR, load_chip, shipped_chips


def test_shipped_chips_are_the_documented_three():
    assert {"3d-64", "2d-64", "tiny"} <= set(shipped_chips())


@pytest.mark.parametrize("name", shipped_chips())
def test_every_shipped_chip_loads(name):
    chip = load_chip(name)
    assert chip.name == name
    assert chip.n_cores == len({chip.position(c) for c in range(chip.n_cores)})
    assert len(chip.thermal.layers) == chip.floorplan.layers
    assert chip.thermal.ambient_c < chip.dtm.threshold_c < chip.dtm.critical_c


def test_default_chip_is_four_layers_of_four_by_four():
    chip = load_chip("3d-64")
    fp = chip.floorplan
    assert (fp.layers, fp.rows, fp.cols, chip.n_cores) == (4, 4, 4, 64)
    assert chip.thermal.ambient_c == 45.0
    assert chip.dtm.threshold_c == 80.0
    assert all(layer.die_thickness_m == pytest.approx(50e-6) for layer in chip.thermal.layers)
    # 0.25 m K/W interface resistivity (CoMeT) is a conductivity of 4 W/m K.
    assert all(layer.interface_conductivity_w_per_mk == 4.0 for layer in chip.thermal.layers)


def test_2d_chip_follows_hotsniper_reference():
    chip = load_chip("2d-64")
    assert (chip.floorplan.layers, chip.floorplan.rows, chip.floorplan.cols) == (1, 8, 8)
    layer = chip.thermal.layers[0]
    assert layer.die_thickness_m == pytest.approx(150e-6)
    assert layer.interface_thickness_m == pytest.approx(20e-6)
    assert chip.thermal.convection_resistance_k_per_w == 0.1
    assert chip.vf.frequencies_mhz == tuple(range(1000, 4001, 100))


def test_core_index_convention():
    chip = load_chip("3d-64")
    assert chip.position(0) == (0, 0, 0)
    assert chip.position(1) == (0, 0, 1)
    assert chip.position(4) == (0, 1, 0)
    assert chip.position(16) == (1, 0, 0)
    assert chip.position(63) == (3, 3, 3)
    for core in range(chip.n_cores):
        assert chip.core_at(*chip.position(core)) == core
    with pytest.raises(ValueError):
        chip.position(64)


@pytest.mark.parametrize("name", ["3d-64", "2d-64", "tiny"])
def test_vf_table_follows_hotsniper_voltage_law(name):
    vf = load_chip(name).vf
    assert (vf.min_mhz, vf.max_mhz) == (1000, 4000)
    for f, v in zip(vf.frequencies_mhz, vf.voltages_v):
        assert v == pytest.approx(0.6 + 0.8 * f / 4000)
        assert vf.voltage_v(f) == pytest.approx(v)
    mid = (vf.frequencies_mhz[0] + vf.frequencies_mhz[1]) / 2
    assert vf.voltage_v(mid) == pytest.approx((vf.voltages_v[0] + vf.voltages_v[1]) / 2)
    with pytest.raises(ValueError):
        vf.voltage_v(4100)


def test_load_by_path_equals_load_by_name():
    assert load_chip(str(CHIPS_DIR / "tiny.toml")) == load_chip("tiny")


# ---------------------------------------------------------------------- bad files


def _write_variant(tmp_path: Path, edit) -> Path:
    """Write a copy of 3d-64.toml changed by ``edit(text) -> text``."""
    text = (CHIPS_DIR / "3d-64.toml").read_text()
    changed = edit(text)
    assert changed != text, "the edit did not apply"
    path = tmp_path / "bad.toml"
    path.write_text(changed)
    return path


def _replace_nth(text: str, old: str, new: str, n: int) -> str:
    starts = [m.start() for m in re.finditer(re.escape(old), text)]
    at = starts[n]
    return text[:at] + new + text[at + len(old):]


def _expect_error(path: Path, key: str, value_repr: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_chip(str(path))
    err = info.value
    message = str(err)
    assert str(path) in message
    assert f"{key} = {value_repr}" in message
    assert err.key == key
    return err


def test_missing_key(tmp_path):
    path = _write_variant(tmp_path, lambda t: t.replace("dram_latency_ns = 80", ""))
    err = _expect_error(path, "memory.dram_latency_ns", "None")
    assert "missing" in err.reason


def test_unknown_key(tmp_path):
    path = _write_variant(tmp_path, lambda t: t.replace("[dtm]\n", "[dtm]\nthreshhold_c = 85\n"))
    err = _expect_error(path, "dtm.threshhold_c", "85")
    assert "unknown key" in err.reason


def test_negative_thickness_names_the_layer(tmp_path):
    path = _write_variant(
        tmp_path, lambda t: _replace_nth(t, "die_thickness_m = 50e-6", "die_thickness_m = -5e-5", 2))
    err = _expect_error(path, "thermal.layers[2].die_thickness_m", "-5e-05")
    assert err.reason == "must be > 0"


def test_non_monotonic_vf_table(tmp_path):
    path = _write_variant(tmp_path, lambda t: t.replace("1.20, 1.24", "1.20, 1.10"))
    err = _expect_error(path, "vf.voltages_v[11]", "1.1")
    assert "previous" in err.reason


def test_frequencies_must_increase(tmp_path):
    path = _write_variant(tmp_path, lambda t: t.replace("[1000, 1200, 1400", "[1000, 1400, 1200"))
    _expect_error(path, "vf.frequencies_mhz[2]", "1200")


def test_wrong_type(tmp_path):
    path = _write_variant(tmp_path, lambda t: t.replace("rows = 4", 'rows = "4"'))
    err = _expect_error(path, "floorplan.rows", "'4'")
    assert "integer" in err.reason


def test_bool_is_not_a_number(tmp_path):
    path = _write_variant(tmp_path, lambda t: t.replace("ceff_nf = 1.15", "ceff_nf = true"))
    _expect_error(path, "power.ceff_nf", "True")


def test_layer_count_must_match_floorplan(tmp_path):
    path = _write_variant(tmp_path, lambda t: t.replace("layers = 4", "layers = 3"))
    err = _expect_error(path, "thermal.layers", "'4 entries'")
    assert "floorplan.layers = 3" in err.reason


def test_spreader_must_cover_the_die(tmp_path):
    path = _write_variant(tmp_path, lambda t: t.replace("side_m = 37.24e-3", "side_m = 10e-3"))
    _expect_error(path, "thermal.spreader.side_m", "0.01")


def test_dtm_threshold_must_be_above_ambient(tmp_path):
    path = _write_variant(tmp_path, lambda t: t.replace("threshold_c = 80.0", "threshold_c = 40.0"))
    _expect_error(path, "dtm.threshold_c", "40.0")


def test_absurd_value_is_rejected(tmp_path):
    path = _write_variant(tmp_path, lambda t: t.replace("tile_width_m = 4.31e-3", "tile_width_m = 4.31"))
    err = _expect_error(path, "floorplan.tile_width_m", "4.31")
    assert "implausible" in err.reason


def test_not_toml(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("name = \n")
    with pytest.raises(ConfigError) as info:
        load_chip(str(path))
    assert str(path) in str(info.value) and "not valid TOML" in str(info.value)


def test_unknown_chip_name_lists_shipped_chips():
    with pytest.raises(ConfigError) as info:
        load_chip("no-such-chip")
    assert "no-such-chip" in str(info.value)
    assert "3d-64" in str(info.value)


def test_a_chip_built_on_another_replaces_only_what_it_sets():
    import dataclasses

    base, hot = load_chip("3d-64"), load_chip("3d-64-dtm90")
    assert (hot.dtm.threshold_c, hot.dtm.critical_c, hot.dtm.hysteresis_c) == (90.0, 105.0, base.dtm.hysteresis_c)
    same = {f.name for f in dataclasses.fields(base)} - {"name", "description", "source", "dtm"}
    assert all(getattr(base, n) == getattr(hot, n) for n in same)


def test_a_base_is_found_beside_the_file_and_bad_bases_are_named(tmp_path: Path):
    (tmp_path / "mine.toml").write_text('name = "mine"\ndescription = "x"\nbase = "3d-64"\n'
                                        '[thermal]\nambient_c = 40.0\n')
    (tmp_path / "derived.toml").write_text('name = "derived"\nbase = "mine.toml"\n[dtm]\nthreshold_c = 75.0\n')
    chip = load_chip(str(tmp_path / "derived.toml"))
    assert (chip.name, chip.description, chip.thermal.ambient_c, chip.dtm.threshold_c) == ("derived", "x", 40.0, 75.0)
    # A cycle, a missing base and a base that is not a string: each names file, key and value.
    (tmp_path / "a.toml").write_text('base = "b.toml"\n')
    (tmp_path / "b.toml").write_text('base = "a.toml"\n')
    with pytest.raises(ConfigError, match=r"base.*b.toml.*a cycle"):
        load_chip(str(tmp_path / "a.toml"))
    (tmp_path / "lost.toml").write_text('base = "nowhere"\n')
    with pytest.raises(ConfigError, match="nowhere.*no such chip file"):
        load_chip(str(tmp_path / "lost.toml"))
    (tmp_path / "num.toml").write_text("base = 3\n")
    with pytest.raises(ConfigError, match=r"num.toml.*base.*3.*name or path"):
        load_chip(str(tmp_path / "num.toml"))
