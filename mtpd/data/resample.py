"""Resampling: a stored view's maps warped onto an augmented view of the same image.

A store of the plain views (``orig``, ``hflip``) can serve a fresh augmented view (``mtpd.data.augment``: a
scale, a crop back to the view size, a flip) approximately: each cell of the augmented view's level takes the
stored map's value at the point its centre came from, bilinearly interpolated, from the stored view with the
same flip (so flips stay exact). Cells whose source point has no four valid stored cells around it (outside the
stored view, or beside its edge) are left out of every loss: their mask is 0.

It is an approximation: a neck's cell sees far beyond its own location, so the teacher's map of a rescaled or
shifted image is not its map of the original rescaled or shifted. Only maps whose channels do not depend on
where anchors sit are served (``RESAMPLABLE`` kinds: features); class logits and box deltas belong to anchors of
a fixed size in pixels, which a rescaled map would assign to objects of another size.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mtpd.data.views import ViewMeta, ViewSpec, boxes_from_view, boxes_to_view, view_meta

RESAMPLABLE = ("feature",)  # output kinds a warped map still means the same thing for


def source_view(meta: ViewMeta) -> str:
    """The stored view an augmented view is resampled from: the one with the same flip."""
    return "hflip" if meta.flip else "orig"


def plain_views(spec: ViewSpec) -> ViewSpec:
    """``spec``'s size, padding and normalisation with the plain views (orig, hflip) and no augmentation: the
    views a store that resampling reads holds."""
    return ViewSpec(
        short=spec.short, long=spec.long, views=("orig", "hflip"), pad=spec.pad, mean=spec.mean, std=spec.std
    )


def source_meta(spec: ViewSpec, meta: ViewMeta) -> ViewMeta:
    """The geometry of the stored view that serves ``meta`` (``spec``: the plan's or the store's views)."""
    return view_meta(plain_views(spec), meta.orig_size, source_view(meta))


def source_points(meta: ViewMeta, source: ViewMeta, stride: int, hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Where the centres of an ``hw`` grid of cells (``stride`` pixels) of view ``meta`` lie in view ``source``
    (both views of one image), in its pixels: (y [h], x [w]). Through the image's own pixels, by the geometry
    boxes use (``boxes_from_view``, ``boxes_to_view``); each axis maps on its own (scale, offset, flip)."""
    h, w = hw
    ys = (np.arange(h, dtype=np.float64) + 0.5) * stride
    xs = (np.arange(w, dtype=np.float64) + 0.5) * stride
    n = max(h, w)
    pts = np.zeros((n, 4))  # degenerate boxes (x, y, x, y): row i holds the i-th column's x and row's y
    pts[:w, [0, 2]] = xs[:, None]
    pts[:h, [1, 3]] = ys[:, None]
    src = boxes_to_view(boxes_from_view(pts, meta), source)
    return torch.from_numpy(src[:h, 1].copy()), torch.from_numpy(src[:w, 0].copy())


def sampling_grid(
    meta: ViewMeta, source: ViewMeta, level: int, hw: tuple[int, int], source_hw: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """(grid [h, w, 2] for ``F.grid_sample`` with ``align_corners=False`` over a stored map of ``source_hw``
    cells, valid [h, w] bool: the source point has four valid stored cells around it)."""
    stride = 2**level
    yc, xc = source_points(meta, source, stride, hw)
    gh, gw = -(-source.size[0] // stride), -(-source.size[1] // stride)  # the stored view's valid cells
    uy, ux = yc / stride - 0.5, xc / stride - 0.5  # continuous cell indices
    ok_y = (uy >= -1e-6) & (uy <= gh - 1 + 1e-6)
    ok_x = (ux >= -1e-6) & (ux <= gw - 1 + 1e-6)
    gy = (2 * yc / (stride * source_hw[0]) - 1).float()
    gx = (2 * xc / (stride * source_hw[1]) - 1).float()
    grid = torch.stack(torch.broadcast_tensors(gx[None, :], gy[:, None]), dim=-1)
    return grid, ok_y[:, None] & ok_x[None, :]


def warp(
    maps: dict[str, Tensor], metas: list[ViewMeta], sources: list[ViewMeta], masks: dict[int, Tensor]
) -> tuple[dict[str, Tensor], dict[int, Tensor]]:
    """``maps`` (``{name}.p{level}`` -> [B, C, Hs, Ws], the stored views on their grid) warped onto the
    augmented views' grid of ``masks`` (level -> [B, 1, h, w], their valid cells): the warped maps (zero where
    not valid) and the masks with the cells resampling cannot serve cleared."""
    levels = sorted({int(k.rsplit(".p", 1)[1]) for k in maps})
    grids: dict[int, Tensor] = {}
    out_masks = dict(masks)
    for lvl in levels:
        m = masks[lvl]
        hw = (int(m.shape[-2]), int(m.shape[-1]))
        src_hw = next(tuple(t.shape[-2:]) for k, t in maps.items() if k.endswith(f".p{lvl}"))
        per = [sampling_grid(meta, src, lvl, hw, src_hw) for meta, src in zip(metas, sources)]
        grids[lvl] = torch.stack([g for g, _ in per]).to(m.device)
        valid = torch.stack([v for _, v in per])[:, None].to(m.device, m.dtype)
        out_masks[lvl] = m * valid
    out = {}
    for key, t in maps.items():
        lvl = int(key.rsplit(".p", 1)[1])
        grid = grids[lvl].to(t.dtype)
        out[key] = F.grid_sample(t, grid, mode="bilinear", padding_mode="zeros", align_corners=False) * out_masks[lvl]
    return out, out_masks
