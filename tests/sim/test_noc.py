"""S-NUCA mean LLC latency on a 3D mesh: geometry, symmetry and a hand-computed case."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ailfmd.sim.noc import hop_distance, hop_matrices, mean_llc_latency_cycles, tile_position

HOP_H, HOP_V, BANK = 6.0, 3.0, 8.0


def core(layer: int, row: int, col: int, rows: int = 4, cols: int = 4) -> int:
    return layer * rows * cols + row * cols + col


def test_hand_computed_2x2x2():
    # From any tile of a 2x2x2 cube, the 8 banks are at horizontal distances
    # 0,1,1,2 on each layer (mean 1) and vertical distance 0 for 4, 1 for 4 (mean 0.5).
    lat = mean_llc_latency_cycles(2, 2, 2, 6.0, 2.0, 10.0)
    assert lat.shape == (8,)
    np.testing.assert_allclose(lat, 10.0 + 1.0 * 6.0 + 0.5 * 2.0)


def test_hand_computed_centre_of_3x3x3():
    # Centre tile: horizontal distances on a 3x3 layer sum to 12 (mean 12/9), and
    # layers are at distances 1, 0, 1 (mean 2/3).
    lat = mean_llc_latency_cycles(3, 3, 3, 6.0, 3.0, 8.0)
    centre = core(1, 1, 1, 3, 3)
    assert lat[centre] == pytest.approx(8.0 + 12 / 9 * 6.0 + 2 / 3 * 3.0)


def test_centre_of_middle_layers_lowest_and_outer_corners_highest():
    lat = mean_llc_latency_cycles(4, 4, 4, HOP_H, HOP_V, BANK)
    centres = [core(l, r, c) for l in (1, 2) for r in (1, 2) for c in (1, 2)]
    corners = [core(l, r, c) for l in (0, 3) for r in (0, 3) for c in (0, 3)]
    np.testing.assert_allclose(lat[centres], lat.min())
    np.testing.assert_allclose(lat[corners], lat.max())
    assert lat.min() < lat.max()


def test_symmetric_cores_are_equal():
    layers, rows, cols = 4, 4, 4
    lat = mean_llc_latency_cycles(layers, rows, cols, HOP_H, HOP_V, BANK)
    for l, r, c in itertools.product(range(layers), range(rows), range(cols)):
        images = {
            core(layers - 1 - l, r, c), core(l, rows - 1 - r, c),
            core(l, r, cols - 1 - c), core(l, c, r),  # mirror and transpose (square)
        }
        np.testing.assert_allclose(lat[list(images)], lat[core(l, r, c)])


def test_2d_chip_centre_beats_corner():
    lat = mean_llc_latency_cycles(1, 8, 8, HOP_H, HOP_V, BANK)
    assert lat[core(0, 3, 3, 8, 8)] == lat.min()
    assert lat[core(0, 0, 0, 8, 8)] == lat.max()
    # Corner of an 8x8 mesh: mean |dx| = mean |dy| = 3.5 hops.
    assert lat[0] == pytest.approx(BANK + 7.0 * HOP_H)


def test_vertical_hops_cheaper_means_stacking_shortens_latency():
    flat = mean_llc_latency_cycles(1, 8, 8, HOP_H, HOP_V, BANK)
    stacked = mean_llc_latency_cycles(4, 4, 4, HOP_H, HOP_V, BANK)
    assert stacked.mean() < flat.mean()


def test_hop_distance_agrees_with_matrices_and_positions():
    layers, rows, cols = 3, 2, 4
    h, v = hop_matrices(layers, rows, cols)
    n = layers * rows * cols
    for a, b in itertools.product(range(n), repeat=2):
        assert hop_distance(a, b, rows, cols) == (h[a, b], v[a, b])
    assert tile_position(core(2, 1, 3, rows, cols), rows, cols) == (2, 1, 3)
    assert hop_distance(0, n - 1, rows, cols) == ((rows - 1) + (cols - 1), layers - 1)


@pytest.mark.parametrize("bad", [dict(layers=0), dict(rows=-1), dict(hop_vertical_cycles=-1.0)])
def test_bad_geometry_is_refused(bad):
    args = dict(layers=2, rows=2, cols=2, hop_horizontal_cycles=6.0,
                hop_vertical_cycles=2.0, bank_access_cycles=8.0)
    args.update(bad)
    with pytest.raises(ValueError):
        mean_llc_latency_cycles(**args)
