"""Where a step's teacher targets come from: stores (the product) or teachers run live (the baseline).

Both hand the engine the same thing: per store, ``{"fpn.p3": [B, C, h, w], ...}``
on the batch's padded grid (zeros on padding), and the valid-cell masks.
``outputs()`` says what each source can give (levels, channels, anchors, classes)
so the stage checks its losses against it before training starts.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch
from torch import Tensor

from mtpd.cache.read import StoreFeed, grid_size, valid_masks
from mtpd.cache.store import StoreReader
from mtpd.data.resample import warp
from mtpd.output_spec import OutputSpec
from mtpd.trainer.checks import check_pool_stores
from mtpd.trainer.targets import Batch


class StoreTargets:
    """Teacher codes the DataLoader already read from stores (``DistillDataset``'s feeds) and placed on the
    batch, decoded here, on the batch's device (``mtpd.cache.read.CodedBatch.decode``). ``pool_feeds``: the same
    teachers' stores of the pool, for a stage whose batches draw from it (``Batch.pool_teacher``)."""

    def __init__(
        self, feeds: Sequence[StoreFeed | StoreReader], pool_feeds: Sequence[StoreFeed | StoreReader] = ()
    ) -> None:
        self.feeds = list(feeds)  # what a stage has open: the stores' readers, or a dataset's feeds
        self.pool_feeds = list(pool_feeds)
        self.metas = [f.header.outputs for f in feeds]
        self.pool_metas = [f.header.outputs for f in pool_feeds]
        if self.feeds and self.pool_feeds:
            check_pool_stores([(f.location, f.header) for f in feeds], [(f.location, f.header) for f in pool_feeds])

    def outputs(self) -> list[dict[str, OutputSpec]]:
        return [{n: o.spec for n, o in meta.items()} for meta in (self.metas or self.pool_metas)]

    def names(self) -> list[str]:
        return [f"store {f.location}" for f in (self.feeds or self.pool_feeds)]

    def __call__(self, batch: Batch) -> tuple[list[dict[str, Tensor]], dict[int, Tensor]]:
        """Per store: ``{name}.p{level}`` -> [B, C, h, w] float32 maps (zero on padded cells, mirrored samples'
        channels mirrored by each output's rule), and the valid-cell masks. A batch with pool images decodes
        each part with its own store's header (codings may be calibrated per store) and joins them. Resampled
        views (``batch.sources``) are decoded on their stored views' grid, then warped onto the batch's."""
        n = batch.labelled
        masks = batch.source_masks if batch.sources is not None else batch.masks
        if not batch.pool_teacher:
            maps = [cb.decode(meta, masks) for cb, meta in zip(batch.teacher, self.metas)]
        else:
            pool_masks = {lvl: m[n:] for lvl, m in masks.items()}
            maps = [cb.decode(meta, pool_masks) for cb, meta in zip(batch.pool_teacher, self.pool_metas)]
            if n:
                lab_masks = {lvl: m[:n] for lvl, m in masks.items()}
                lab = [cb.decode(meta, lab_masks) for cb, meta in zip(batch.teacher, self.metas)]
                maps = [{key: torch.cat([a[key], b[key]]) for key in a} for a, b in zip(lab, maps)]
        if batch.sources is None:
            return maps, batch.masks
        out, masks = [], dict(batch.masks)
        for store_maps in maps:  # every store's maps of a level lose the same cells: one mask per level
            warped, store_masks = warp(store_maps, batch.metas, batch.sources, batch.masks)
            out.append(warped)
            masks.update({lvl: m for lvl, m in store_masks.items() if any(k.endswith(f".p{lvl}") for k in warped)})
        return out, masks


class OnlineTeacher(Protocol):
    """What the online baseline needs of a teacher (``mtpd.teachers.Teacher`` follows it)."""

    def output_specs(self) -> dict[str, OutputSpec]: ...

    def __call__(self, images: Tensor, outputs: Sequence[str]) -> dict[str, Tensor]: ...


class OnlineTargets:
    """The online baseline (teachers inside every step, as MTPD's and mmrazor's code do).

    Each teacher runs on each view padded on its own, as the store builder does, so
    results do not depend on the batch's padding; its maps then go on the batch grid
    like cached ones. ``needs[k]``: the output names teacher ``k`` must produce.
    """

    def __init__(self, teachers: list[OnlineTeacher], needs: list[list[str]] | None = None) -> None:
        self.teachers = list(teachers)
        self.needs = needs if needs is not None else [list(t.output_specs()) for t in self.teachers]

    def outputs(self) -> list[dict[str, OutputSpec]]:
        return [t.output_specs() for t in self.teachers]

    def names(self) -> list[str]:
        return [
            f"online teacher {getattr(getattr(t, 'identity', None), 'name', type(t).__name__)}" for t in self.teachers
        ]

    @torch.no_grad()
    def __call__(self, batch: Batch) -> tuple[list[dict[str, Tensor]], dict[int, Tensor]]:
        padded = tuple(batch.images.shape[-2:])
        out: list[dict[str, Tensor]] = []
        levels: set[int] = set()
        for teacher, names in zip(self.teachers, self.needs):
            maps: dict[str, Tensor] = {}
            specs = teacher.output_specs()
            for i, meta in enumerate(batch.metas):
                x = batch.images[i : i + 1, :, : meta.padded[0], : meta.padded[1]]
                res = teacher(x, names)
                for key, lvl in ((f"{n}.p{lvl}", lvl) for n in names for lvl in specs[n].levels):
                    t = res[key]
                    levels.add(lvl)
                    vh, vw = grid_size(meta.size, lvl)
                    dst = maps.setdefault(key, t.new_zeros(len(batch.metas), t.shape[1], *grid_size(padded, lvl)))
                    dst[i, :, :vh, :vw] = t[0, :, :vh, :vw]
            out.append(maps)
        return out, valid_masks(padded, batch.image_sizes, sorted(levels), batch.images.device)
