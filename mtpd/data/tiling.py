"""Cutting large images into overlapping tiles, and boxes into the tiles that show enough of them.

Detectors trained at a fixed short side (800 px) lose small objects of a 6000 px aerial or
microscope image to the resize; tiles keep their pixels. Tiles step by ``tile - overlap`` and the
last tile of a row or column is aligned to the border, so every pixel is covered and no tile is
padded. A box goes to a tile when at least ``min_visible`` of its area lies inside, clipped.
"""

from __future__ import annotations

from dataclasses import dataclass

from mtpd.errors import MtpdError


class TilingError(MtpdError, ValueError):
    """Tile options that cannot cut an image."""


@dataclass(frozen=True)
class TileSpec:
    size: int  # tile side in pixels
    overlap: int = 0  # pixels shared by neighbouring tiles
    min_visible: float = 0.5  # fraction of a box's area a tile must show to keep it

    def __post_init__(self) -> None:
        if self.size < 1:
            raise TilingError(f"--tile must be >= 1 pixel, got {self.size}")
        if not 0 <= self.overlap < self.size:
            raise TilingError(f"--overlap must be >= 0 and smaller than --tile {self.size}, got {self.overlap}")
        if not 0 < self.min_visible <= 1:
            raise TilingError(f"--min-visible must be in (0, 1], got {self.min_visible}")


def starts(length: int, size: int, overlap: int) -> list[int]:
    """Tile origins along one side: stride ``size - overlap``, the last one flush with the border."""
    if length <= size:
        return [0]
    return list(range(0, length - size, size - overlap)) + [length - size]


def tiles(width: int, height: int, spec: TileSpec) -> list[tuple[int, int, int, int]]:
    """(x0, y0, x1, y1) of each tile, row by row; a side shorter than the tile gets one tile of its length."""
    xs, ys = starts(width, spec.size, spec.overlap), starts(height, spec.size, spec.overlap)
    return [(x, y, min(x + spec.size, width), min(y + spec.size, height)) for y in ys for x in xs]


def clip_to_tile(
    xyxy: tuple[float, float, float, float], tile: tuple[int, int, int, int], min_visible: float
) -> tuple[float, float, float, float] | None:
    """The box in tile coordinates, clipped, or None when less than ``min_visible`` of its area is inside."""
    x0, y0, x1, y1 = xyxy
    tx0, ty0, tx1, ty1 = tile
    ix0, iy0, ix1, iy1 = max(x0, tx0), max(y0, ty0), min(x1, tx1), min(y1, ty1)
    if ix1 <= ix0 or iy1 <= iy0:
        return None
    visible = (ix1 - ix0) * (iy1 - iy0) / ((x1 - x0) * (y1 - y0))
    if visible < min_visible - 1e-9:  # a box cut exactly at the threshold stays
        return None
    return (ix0 - tx0, iy0 - ty0, ix1 - tx0, iy1 - ty0)
