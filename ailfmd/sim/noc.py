"""S-NUCA last-level-cache latency on a 3D mesh network-on-chip.

Every tile holds a core and one LLC bank. Under S-NUCA, cache-line addresses are
interleaved over all banks uniformly, so a core's average LLC hit latency is the bank
access time plus the mean network latency to *every* bank, its own included.

Packets follow dimension-ordered XY-Z routing (first along the row, then the column,
then through the TSV stack). Any minimal dimension-ordered route has the Manhattan
length, so the order only matters for contention, which this zero-load model ignores.
A horizontal mesh hop (router + link, ~6 cycles in HotSniper's ``kingscross-nuca``
configuration) costs more than a vertical TSV hop, whose wire is only tens of µm.

Core numbering follows the chip convention: ``core = layer*rows*cols + row*cols + col``
and layer 0 is the die nearest the heat sink.
"""

from __future__ import annotations

import numpy as np


def tile_position(core: int, rows: int, cols: int) -> tuple[int, int, int]:
    """(layer, row, col) of a core index under the chip numbering convention."""
    per_layer = rows * cols
    layer, rest = divmod(core, per_layer)
    row, col = divmod(rest, cols)
    return layer, row, col


def hop_distance(src: int, dst: int, rows: int, cols: int) -> tuple[int, int]:
    """(horizontal, vertical) hop counts of the XY-Z route between two tiles."""
    ls, rs, cs = tile_position(src, rows, cols)
    ld, rd, cd = tile_position(dst, rows, cols)
    return abs(rs - rd) + abs(cs - cd), abs(ls - ld)


def hop_matrices(layers: int, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Horizontal and vertical hop counts between every pair of tiles.

    Returns two ``(n, n)`` integer arrays with ``n = layers*rows*cols``; entry
    ``[i, j]`` is the hop count from core ``i`` to the bank on tile ``j``.
    """
    _check_shape(layers, rows, cols)
    n = layers * rows * cols
    idx = np.arange(n)
    layer = idx // (rows * cols)
    row = (idx // cols) % rows
    col = idx % cols
    horizontal = np.abs(row[:, None] - row[None, :]) + np.abs(col[:, None] - col[None, :])
    vertical = np.abs(layer[:, None] - layer[None, :])
    return horizontal, vertical


def mean_llc_latency_cycles(
    layers: int,
    rows: int,
    cols: int,
    hop_horizontal_cycles: float,
    hop_vertical_cycles: float,
    bank_access_cycles: float,
) -> np.ndarray:
    """Mean S-NUCA LLC hit latency of each core, in the clock the hop costs are given in.

    ``latency[i] = bank_access + mean_j(h[i,j]*hop_h + v[i,j]*hop_v)`` over all banks
    ``j``. Central tiles of middle layers have the smallest mean distance and come out
    lowest; corner tiles of the outermost layers come out highest.
    """
    for name, value in (
        ("hop_horizontal_cycles", hop_horizontal_cycles),
        ("hop_vertical_cycles", hop_vertical_cycles),
        ("bank_access_cycles", bank_access_cycles),
    ):
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")
    horizontal, vertical = hop_matrices(layers, rows, cols)
    network = horizontal.mean(axis=1) * hop_horizontal_cycles
    network = network + vertical.mean(axis=1) * hop_vertical_cycles
    return bank_access_cycles + network


def _check_shape(layers: int, rows: int, cols: int) -> None:
    for name, value in (("layers", layers), ("rows", rows), ("cols", cols)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
