"""A sample's row: the valid cells of each level, level after level, each row-major (h, w).

The one definition of the stored layout, used by the builder (``flatten``), the reader and the
trainer (``split_levels``) and the benchmarks. ``grid_rows`` is [n_levels, 2]: the valid cells
(h, w) of each of the output's levels for one sample (``index/grid`` holds them per store level).
"""

from __future__ import annotations

from typing import Sequence, TypeVar

import numpy as np
import torch

T = TypeVar("T", np.ndarray, torch.Tensor)


def flat_length(grid_rows: np.ndarray) -> int:
    """Valid cells of one sample over the given levels."""
    g = np.asarray(grid_rows, dtype=np.int64).reshape(-1, 2)
    return int((g[:, 0] * g[:, 1]).sum())


def flatten(maps: Sequence[torch.Tensor], grid_rows: np.ndarray) -> list[torch.Tensor]:
    """Per-level [C, H, W] maps of a padded view -> per-level [h*w, C] rows of the valid cells
    (on the maps' device; concatenated in order they are the sample's row)."""
    return [t[:, :h, :w].permute(1, 2, 0).reshape(-1, t.shape[0]) for t, (h, w) in zip(maps, np.asarray(grid_rows))]


def split_levels(row: T, grid_rows: np.ndarray) -> list[T]:
    """A sample's row [>= cells, C] -> per-level [h, w, C] views into it (no copy)."""
    maps, start = [], 0
    for h, w in np.asarray(grid_rows).tolist():
        maps.append(row[start : start + h * w].reshape(h, w, -1))
        start += h * w
    return maps


def output_grid(grid: np.ndarray, store_levels: Sequence[int], levels: Sequence[int]) -> np.ndarray:
    """The rows of a sample's ``index/grid`` entry [store levels, 2] for an output's ``levels``."""
    pos = {lvl: i for i, lvl in enumerate(store_levels)}
    return np.asarray(grid)[[pos[lvl] for lvl in levels]]
