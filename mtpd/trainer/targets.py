"""Cached-target dataset: images, ground truth and teacher outputs joined by image id and view.

No teacher runs here: each store's codes are read sample by sample and placed on the batch grid by the
store's own read path (``mtpd.cache.read``: ``StoreFeed.read_sample``, ``collate_codes``), and decoded by the
trainer once the batch is on its device (``CodedBatch.decode``, through ``mtpd.trainer.sources.StoreTargets``).
This module adds the images, boxes and masks around them.
"""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mtpd.cache.read import Coded, CodedBatch, StoreFeed, code_levels, collate_codes, empty, place, valid_masks
from mtpd.cache.schema import StoredOutput, StoreError
from mtpd.cache.store import StoreReader
from mtpd.data import CocoDataset, ViewMeta, ViewSpec, boxes_to_view, masks_to_view, prepare_view
from mtpd.data.augment import FRESH_VIEW, AugmentPolicy
from mtpd.data.resample import plain_views, source_meta
from mtpd.data.views import crop_boxes

__all__ = [
    "Batch",
    "Collate",
    "DistillDataset",
    "MixedDataset",
    "Sample",
    "check_store",
    "collate",
    "make_loader",
    "worker_init",
]


@dataclass
class Sample:
    image: torch.Tensor  # [3, Hp, Wp] prepared view
    meta: ViewMeta
    image_id: int
    boxes: torch.Tensor  # [n, 4] xyxy in view pixels
    labels: torch.Tensor  # [n]
    teacher: list[dict[str, Coded]]  # per store: name -> stored codes of this view (``mtpd.cache.read.Coded``)
    masks: torch.Tensor | None = None  # [n, Hp, Wp] uint8 instance masks on the padded view (Mask R-CNN), else None
    pool: bool = False  # from the unlabelled pool: no boxes, and ``teacher`` holds the pool's stores' codes
    source: ViewMeta | None = None  # resampled: the stored view ``teacher`` holds, which ``meta`` is warped from


@dataclass
class Batch:
    images: torch.Tensor  # [B, 3, H, W]
    image_sizes: list[tuple[int, int]]  # valid (unpadded) size of each view
    metas: list[ViewMeta]
    image_ids: list[int]
    boxes: list[torch.Tensor]
    labels: list[torch.Tensor]
    teacher: list[CodedBatch]  # per store: its codes on the batch grid; ``StoreTargets`` decodes them
    masks: dict[int, torch.Tensor]  # level -> [B, 1, h_l, w_l], 1 on valid cells
    instance_masks: list[torch.Tensor] | None = None  # per image [n, H, W] (Mask R-CNN)
    # A batch mixing the labelled set and the pool holds its labelled images first: ``n_labelled`` of them, whose
    # codes are ``teacher``; the pool's images follow, their codes (of the pool's stores) in ``pool_teacher``.
    n_labelled: int = -1  # -1: every image (a batch of the labelled set alone)
    pool_teacher: list[CodedBatch] = field(default_factory=list)
    # Resampled views (``data.augment.resample``): the stored view of each image its codes are of, and the valid
    # cells of the codes' grid (which holds those views); ``StoreTargets`` warps the decoded maps onto ``metas``.
    sources: list[ViewMeta] | None = None
    source_masks: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def labelled(self) -> int:
        """How many of the batch's images (the first ones) have labels."""
        return len(self.image_ids) if self.n_labelled < 0 else self.n_labelled

    def to(self, device: torch.device | str) -> "Batch":
        return self.map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> "Batch":
        """The DataLoader's ``pin_memory=True`` calls this: page-locked copies, so ``to(cuda, non_blocking)``
        overlaps the copy with the GPU's work."""
        return self.map(lambda t: t.pin_memory())

    def map(self, mv) -> "Batch":
        """Every tensor of the batch through ``mv``."""
        return Batch(
            mv(self.images),
            self.image_sizes,
            self.metas,
            self.image_ids,
            [mv(b) for b in self.boxes],
            [mv(lb) for lb in self.labels],
            [t.map(mv) for t in self.teacher],
            {k: mv(v) for k, v in self.masks.items()},
            None if self.instance_masks is None else [mv(m) for m in self.instance_masks],
            self.n_labelled,
            [t.map(mv) for t in self.pool_teacher],
            self.sources,
            {k: mv(v) for k, v in self.source_masks.items()},
        )


def check_store(reader: StoreReader, dataset: CocoDataset, spec: ViewSpec) -> None:
    """Refuse a store whose dataset or views differ from the student's data, saying what differs."""
    h, loc = reader.header, reader.location
    if h.manifest_sha256 != dataset.manifest_hash():
        raise StoreError(
            f"{loc} was built on another dataset ({h.ann_file}, {h.num_images} images, manifest "
            f"{h.manifest_sha256[:12]}) than {dataset.ann_file} ({len(dataset)} images, manifest "
            f"{dataset.manifest_hash()[:12]}); build a store for this dataset with `mtpd-cache build --ann "
            f"{dataset.ann_file}`"
        )
    content = h.dataset.get("content_sha256")
    if content and content != dataset.content_probe():
        raise StoreError(
            f"{loc} was built on other images than {dataset.image_dir} holds, though {dataset.ann_file} lists the "
            f"same files (another folder with the same file names, or images changed since); build a store for "
            f"these images with `mtpd-cache build --ann {dataset.ann_file} --images {dataset.image_dir}`"
        )
    sv = h.view_spec
    if sv.augment != spec.augment:
        raise StoreError(
            f"{loc}: its augmented views were drawn with {sv.augment} but the plan's data.augment is "
            f"{spec.augment}; set data.augment to the store's, or build the plan's bank with `mtpd-cache build "
            "--augment ...`"
        )
    for key in ("short", "long", "pad", "mean", "std"):
        if getattr(sv, key) != getattr(spec, key):
            raise StoreError(
                f"{loc}: view {key} is {getattr(sv, key)} in the store but {getattr(spec, key)} in the plan; "
                f"set data.{key} to match, or rebuild the store with the plan's views"
            )
    # A store without the 'hflip' view serves flipped samples by mirroring its 'orig' maps (``mirror``):
    # an approximation whose error the builder measured (``flip_error``) and the stage reports.


class DistillDataset(Dataset):
    """Map-style dataset over a COCO set, with teacher outputs from zero or more stores.

    ``stores``: paths, or readers already open (the stage opens each store once and hands its readers here);
    ``outputs[k]``: the output names read from store ``k`` (default: all of them). With ``spec.augment`` every
    sample is an augmented view: one of the bank's (``aug0`` ..; stores hold them), or with bank 0 a fresh draw
    of (seed, epoch, index) (``aug``; no store holds those: teachers run live, or with ``resample`` the stores
    hold the plain views, and each sample carries the codes of the one with its flip, to be warped onto it)."""

    def __init__(
        self,
        dataset: CocoDataset,
        spec: ViewSpec,
        stores: list[str | StoreReader] | None = None,
        flip: bool = False,
        seed: int = 0,
        outputs: list[list[str]] | None = None,
        with_masks: bool = False,
        resample: bool = False,
    ) -> None:
        self.dataset = dataset
        self.resample = resample and spec.augment is not None
        # the views the stores hold: resampled fresh views come from the plain ones
        stored = plain_views(spec) if self.resample else spec
        self.with_masks = with_masks
        self.spec = spec
        self.policy: AugmentPolicy | None = spec.policy()
        self.flip = flip
        self.seed = seed
        self.epoch = 0
        readers = [s if isinstance(s, StoreReader) else StoreReader(s) for s in stores or []]
        self.feeds = [StoreFeed(r, None if outputs is None else outputs[k]) for k, r in enumerate(readers)]
        for r, feed in zip(readers, self.feeds):
            check_store(r, dataset, stored)
            if not feed.status.done.all():  # the feed read the shard record once; the workers keep it
                raise StoreError(
                    f"{r.location}: {int((~feed.status.done).sum())} shard(s) not written yet; rerun its "
                    "`mtpd-cache build` to finish it"
                )
        # Images a --skip-bad build could not read are left out, the same way in every store and epoch.
        bad = {int(i) for r in readers for i in r.image_ids[r.bad_images()]}
        self.index = [i for i, rec in enumerate(dataset.images) if rec.image_id not in bad]
        self.skipped = [rec.file_name for rec in dataset.images if rec.image_id in bad]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def view_of(self, idx: int) -> str:
        """Flip choice (or a bank view) from (seed, epoch, index): the same on every worker and after a resume."""
        if self.policy is not None:
            if not self.policy.bank:
                return FRESH_VIEW
            return f"aug{int(np.random.default_rng([self.seed, self.epoch, idx, 1]).integers(self.policy.bank))}"
        if not self.flip:
            return "orig"
        return "hflip" if np.random.default_rng([self.seed, self.epoch, idx]).random() < 0.5 else "orig"

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, idx: int) -> Sample:
        idx = self.index[idx]  # the dataset's own index (they differ only when images were skipped)
        view = self.view_of(idx)
        image_id = self.dataset.images[idx].image_id
        fresh = self.policy.draw([self.seed, self.epoch, idx, 2]) if view == FRESH_VIEW else None  # type: ignore[union-attr]
        img, meta = prepare_view(self.dataset.load_image(idx), self.spec, view, image_id, fresh)
        ann = self.dataset.annotations(idx)
        boxes, labels = boxes_to_view(ann.boxes, meta), ann.labels
        masks = masks_to_view(self.dataset.instance_masks(idx), meta) if self.with_masks else None
        if meta.resized is not None:  # an augmented view: boxes cut by its crop, as torchvision's references
            boxes, keep = crop_boxes(boxes, meta)
            labels = labels[keep]
            masks = None if masks is None else masks[torch.from_numpy(keep)]
        boxes = torch.as_tensor(boxes, dtype=torch.float32)
        source = source_meta(self.spec, meta) if self.resample else None
        teacher = self.teacher_targets(image_id, view if source is None else source.view)
        return Sample(img, meta, image_id, boxes, torch.as_tensor(labels), teacher, masks, source=source)

    def teacher_targets(self, image_id: int, view: str) -> list[dict[str, Coded]]:
        """Per store: name -> the stored codes of one view (``StoreFeed.read_sample``)."""
        return [f.read_sample(image_id, view) for f in self.feeds]


class MixedDataset(Dataset):
    """The labelled set's samples (indices ``0 .. n_labelled-1``) followed by the pool's (``n_labelled ..``), for
    a stage drawing from both (``MixSampler`` puts both in each batch); either may be None (a stage of one)."""

    def __init__(self, labelled: DistillDataset | None, pool: DistillDataset | None) -> None:
        self.labelled, self.pool = labelled, pool
        self.n_labelled = 0 if labelled is None else len(labelled)
        self.n_pool = 0 if pool is None else len(pool)
        self.feeds = [] if labelled is None else labelled.feeds
        self.pool_feeds = [] if pool is None else pool.feeds
        self.skipped = [*(labelled.skipped if labelled else []), *(pool.skipped if pool else [])]

    def set_epoch(self, epoch: int) -> None:
        for ds in (self.labelled, self.pool):
            if ds is not None:
                ds.set_epoch(epoch)

    def __len__(self) -> int:
        return self.n_labelled + self.n_pool

    def __getitem__(self, idx: int) -> Sample:
        if idx < self.n_labelled:
            return self.labelled[idx]  # type: ignore[index]
        sample = self.pool[idx - self.n_labelled]  # type: ignore[index]
        sample.pool = True
        return sample


def collate(
    samples: list[Sample], stores_meta: list[dict[str, StoredOutput]], pool_meta: list[dict[str, StoredOutput]] = ()
) -> Batch:
    """Pad views to the batch's size and place teacher codes on the batch grid (zeros + mask outside).

    ``stores_meta``: each store's ``header.outputs``; ``pool_meta``: those of the pool's stores, when samples
    come from the pool (they go after the labelled ones). Teacher maps stay coded (``mtpd.cache.read``).
    """
    samples = [s for s in samples if not s.pool] + [s for s in samples if s.pool]
    n_labelled = sum(not s.pool for s in samples)
    hp = max(s.image.shape[1] for s in samples)
    wp = max(s.image.shape[2] for s in samples)
    images = empty((len(samples), 3, hp, wp))
    for i, s in enumerate(samples):
        place(images, i, s.image)
    sources = [s.source for s in samples] if samples[0].source is not None else None
    # resampled codes are of the stored views, which may be larger than the augmented ones: their own grid
    code_hw = (
        (hp, wp)
        if sources is None
        else (max(hp, *(m.padded[0] for m in sources)), max(wp, *(m.padded[1] for m in sources)))
    )  # type: ignore[union-attr]
    levels: set[int] = set()
    parts = []
    for part, metas in ((samples[:n_labelled], stores_meta), (samples[n_labelled:], pool_meta)):
        coded_part = []
        for k, outputs in enumerate(metas if part else ()):
            coded = [s.teacher[k] for s in part]
            coded_part.append(collate_codes(coded, outputs, code_hw))
            levels |= code_levels(coded, outputs)
        parts.append(coded_part)
    instance = None
    if samples[0].masks is not None:
        instance = [
            torch.nn.functional.pad(s.masks, (0, wp - s.masks.shape[2], 0, hp - s.masks.shape[1])) for s in samples
        ]
    return Batch(
        images,
        [s.meta.size for s in samples],
        [s.meta for s in samples],
        [s.image_id for s in samples],
        [s.boxes for s in samples],
        [s.labels for s in samples],
        parts[0],
        valid_masks((hp, wp), [s.meta.size for s in samples], sorted(levels)),
        instance,
        -1 if n_labelled == len(samples) else n_labelled,
        parts[1],
        sources,
        {} if sources is None else valid_masks(code_hw, [m.size for m in sources], sorted(levels)),
    )


def worker_init(_: int) -> None:
    import numcodecs.blosc
    import zarr

    # Each DataLoader worker reads one sample at a time on one core: a small async pool is
    # plenty, and Blosc's own threads would only fight the other workers for cores.
    zarr.config.set({"async.concurrency": 4, "threading.max_workers": 1})
    numcodecs.blosc.set_nthreads(1)
    torch.set_num_threads(1)


def make_loader(
    ds: DistillDataset | MixedDataset,
    batch_size: int,
    shuffle: bool,
    workers: int,
    seed: int,
    sampler: torch.utils.data.Sampler | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """DataLoader with spawn/forkserver workers: forking after zarr's event loop started misbehaves.
    ``pin_memory``: batches in page-locked memory (for a CUDA device: asynchronous copies)."""
    metas = [f.header.outputs for f in ds.feeds]
    pool_metas = [f.header.outputs for f in ds.pool_feeds] if isinstance(ds, MixedDataset) else []
    ctx = None
    if workers > 0:
        method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        ctx = multiprocessing.get_context(method)
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=workers,
        collate_fn=Collate(metas, pool_metas),
        multiprocessing_context=ctx,
        worker_init_fn=worker_init if workers else None,
        persistent_workers=False,
        generator=g,
        drop_last=False,
        pin_memory=pin_memory,
    )


class Collate:
    """Picklable collate carrying each store's output metadata (levels per output)."""

    def __init__(self, metas: list[dict], pool_metas: list[dict] | None = None) -> None:
        self.metas, self.pool_metas = metas, pool_metas or []

    def __call__(self, samples: list[Sample]) -> Batch:
        return collate(samples, self.metas, self.pool_metas)
