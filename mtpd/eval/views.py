"""Plain views of a COCO set, one per image, batched with their geometry: what evaluation and export parity read.

No store and no augmentation: the ``orig`` view of each image (``prepare_view``), padded to the batch's size
with zeros, as the trainer's batches are, so evaluating a student here and in a stage gives the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from mtpd.data import CocoDataset, ViewMeta, ViewSpec, prepare_view


@dataclass
class View:
    image: torch.Tensor  # [3, Hp, Wp] prepared view
    meta: ViewMeta
    image_id: int


@dataclass
class ViewBatch:
    images: torch.Tensor  # [B, 3, H, W], zeros outside each view
    image_sizes: list[tuple[int, int]]  # valid (unpadded) size of each view
    metas: list[ViewMeta]
    image_ids: list[int]


class ViewDataset(Dataset):
    """The ``orig`` view of every image of ``dataset``, at ``spec``'s size."""

    def __init__(self, dataset: CocoDataset, spec: ViewSpec) -> None:
        self.dataset = dataset
        self.spec = ViewSpec(short=spec.short, long=spec.long, pad=spec.pad, mean=spec.mean, std=spec.std)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> View:
        image, meta = prepare_view(self.dataset.load_image(idx), self.spec, "orig")
        return View(image, meta, self.dataset.images[idx].image_id)


def collate_views(views: list[View]) -> ViewBatch:
    hp = max(v.image.shape[1] for v in views)
    wp = max(v.image.shape[2] for v in views)
    images = torch.zeros(len(views), 3, hp, wp)
    for i, v in enumerate(views):
        images[i, :, : v.image.shape[1], : v.image.shape[2]] = v.image
    return ViewBatch(images, [v.meta.size for v in views], [v.meta for v in views], [v.image_id for v in views])


def view_loader(ds: ViewDataset, batch_size: int, workers: int = 0) -> DataLoader:
    """Batches in the dataset's order; spawn/forkserver workers, as the trainer's loader."""
    import multiprocessing

    ctx = None
    if workers > 0:
        method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        ctx = multiprocessing.get_context(method)
    return DataLoader(
        ds, batch_size, shuffle=False, num_workers=workers, collate_fn=collate_views, multiprocessing_context=ctx
    )
