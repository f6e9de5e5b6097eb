"""Cached-target dataset: images, ground truth and teacher outputs joined by image id and view.

No teacher runs here: teacher outputs are read from stores, one sample per
index (``arr[i]``), and placed on the student's padded batch grid by ``collate``.

Decoding happens where it is cheapest: on the training device. Workers hand
over the stored codes (fp16, uint8, packed integer codes, projection
coefficients) in the store's cell-major layout, and ``collate`` places them on
the batch grid in one copy per level into a batch tensor in channels-last memory
(the store's layout, so the copy reads and writes contiguous rows), allocated in
shared memory inside DataLoader workers so that handing the batch to the
training process copies nothing. ``decode_teacher`` (run by the trainer after the
batch is on its device) turns codes into float32 maps, zeros padded cells and
negates the box dx of samples served by mirroring an 'orig' view.
"""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mtpd.cache.rows import split_levels
from mtpd.cache.schema import StoredOutput, StoreError
from mtpd.cache.store import StoreReader
from mtpd.data import CocoDataset, ViewMeta, ViewSpec, boxes_to_view, masks_to_view, prepare_view
from mtpd.data import grid_size as data_grid_size


@dataclass
class Coded:
    """One output of one view as stored: per-level [Cc, h, w] code maps (views into the stored row),
    the side parameters [levels, ...] (or None), and whether the maps mirror the 'orig' view."""

    maps: list[torch.Tensor]
    side: torch.Tensor | None
    mirrored: bool = False


@dataclass
class Sample:
    image: torch.Tensor  # [3, Hp, Wp] prepared view
    meta: ViewMeta
    image_id: int
    boxes: torch.Tensor  # [n, 4] xyxy in view pixels
    labels: torch.Tensor  # [n]
    teacher: list[dict[str, "Coded"]]  # per store: name -> stored codes of this view (see ``Coded``)
    masks: torch.Tensor | None = None  # [n, Hp, Wp] uint8 instance masks on the padded view (Mask R-CNN), else None


@dataclass
class Batch:
    images: torch.Tensor  # [B, 3, H, W]
    image_sizes: list[tuple[int, int]]  # valid (unpadded) size of each view
    metas: list[ViewMeta]
    image_ids: list[int]
    boxes: list[torch.Tensor]
    labels: list[torch.Tensor]
    # per store: "fpn.p3" -> [B, Cc, h_l, w_l] codes on the batch grid (zero codes on padding), in
    # channels-last memory (strides of [B, h, w, Cc]); ``decode_teacher`` makes float32 maps of them.
    teacher: list[dict[str, torch.Tensor]]
    masks: dict[int, torch.Tensor]  # level -> [B, 1, h_l, w_l], 1 on valid cells
    instance_masks: list[torch.Tensor] | None = None  # per image [n, H, W] (Mask R-CNN)
    teacher_side: list[dict[str, torch.Tensor]] | None = None  # per store: name -> [B, levels, ...] side parameters
    mirrored: list[torch.Tensor] | None = None  # per store: [B] bool, served by mirroring the 'orig' view

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
            [{k: mv(v) for k, v in t.items()} for t in self.teacher],
            {k: mv(v) for k, v in self.masks.items()},
            None if self.instance_masks is None else [mv(m) for m in self.instance_masks],
            None if self.teacher_side is None else [{k: mv(v) for k, v in t.items()} for t in self.teacher_side],
            None if self.mirrored is None else [mv(m) for m in self.mirrored],
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
    sv = h.view_spec
    for key in ("short", "long", "pad", "mean", "std"):
        if getattr(sv, key) != getattr(spec, key):
            raise StoreError(
                f"{loc}: view {key} is {getattr(sv, key)} in the store but {getattr(spec, key)} in the plan; "
                f"set data.{key} to match, or rebuild the store with the plan's views"
            )
    # A store without the 'hflip' view serves flipped samples by mirroring its 'orig' maps (``mirror``):
    # an approximation whose error the builder measured (``flip_error``) and the stage reports.


class DistillDataset(Dataset):
    """Map-style dataset over a COCO set, with teacher outputs from zero or more stores."""

    def __init__(
        self,
        dataset: CocoDataset,
        spec: ViewSpec,
        stores: list[str] | None = None,
        flip: bool = False,
        seed: int = 0,
        outputs: list[list[str]] | None = None,
        with_masks: bool = False,
    ) -> None:
        self.dataset = dataset
        self.with_masks = with_masks
        self.spec = spec
        self.store_paths = list(stores or [])
        self.flip = flip
        self.seed = seed
        self.epoch = 0
        readers = [StoreReader(p) for p in self.store_paths]
        for r in readers:
            check_store(r, dataset, spec)
            if not r.status().done.all():
                raise StoreError(
                    f"{r.location}: {int((~r.status().done).sum())} shard(s) not written yet; rerun its `mtpd-cache "
                    "build` to finish it"
                )
        self.outputs = outputs or [list(r.header.outputs) for r in readers]
        self._readers: list[StoreReader] | None = readers
        self._status = [r.status() for r in readers]
        # Shards found intact, shared by the loader's workers for the whole stage: each is checked once.
        self._checked = [torch.zeros(r.header.num_shards, dtype=torch.uint8).share_memory_() for r in readers]
        # Images a --skip-bad build could not read are left out, the same way in every store and epoch.
        bad = {int(i) for r in readers for i in r.image_ids[r.bad_images()]}
        self.index = [i for i, rec in enumerate(dataset.images) if rec.image_id not in bad]
        self.skipped = [rec.file_name for rec in dataset.images if rec.image_id in bad]

    def __getstate__(self) -> dict:
        # Open Zarr handles do not cross process boundaries: workers reopen lazily.
        state = dict(self.__dict__)
        state["_readers"] = None
        return state

    def readers(self) -> list[StoreReader]:
        if self._readers is None:
            self._readers = [StoreReader(p) for p in self.store_paths]
        return self._readers

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def view_of(self, idx: int) -> str:
        """Flip choice from (seed, epoch, index): the same on every worker and after a resume."""
        if not self.flip:
            return "orig"
        return "hflip" if np.random.default_rng([self.seed, self.epoch, idx]).random() < 0.5 else "orig"

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, idx: int) -> Sample:
        idx = self.index[idx]  # the dataset's own index (they differ only when images were skipped)
        view = self.view_of(idx)
        img, meta = prepare_view(self.dataset.load_image(idx), self.spec, view)
        ann = self.dataset.annotations(idx)
        image_id = self.dataset.images[idx].image_id
        boxes = torch.as_tensor(boxes_to_view(ann.boxes, meta), dtype=torch.float32)
        masks = masks_to_view(self.dataset.instance_masks(idx), meta) if self.with_masks else None
        return Sample(
            img, meta, image_id, boxes, torch.as_tensor(ann.labels), self.teacher_targets(image_id, view), masks
        )

    def teacher_targets(self, image_id: int, view: str) -> list[dict[str, Coded]]:
        """Per store: name -> the stored codes of one view. A store without 'hflip' serves it by mirroring
        the 'orig' codes (every encoding codes each cell on its own, so reversing columns is exact; box dx
        is negated after decoding)."""
        teacher = []
        for k, (r, names) in enumerate(zip(self.readers(), self.outputs)):
            mirrored = view == "hflip" and "hflip" not in r.header.view_names
            sample = r.sample_index(image_id, "orig" if mirrored else view)
            self._check_shard(k, r, sample, image_id, view)
            try:
                rows = r.read_codes(sample, names)
            except Exception as e:  # noqa: BLE001 - a chunk failing its crc32c, or any undecodable bytes
                self._damaged(
                    r, sample // r.header.samples_per_shard, sample, image_id, view, f"{type(e).__name__}: {e}"
                )
            coded = {}
            for n, (codes, side) in rows.items():
                maps = split_levels(codes, r.output_grid(sample, n))
                if mirrored:
                    maps = [np.ascontiguousarray(m[:, ::-1]) for m in maps]
                coded[n] = Coded(
                    [torch.from_numpy(m).permute(2, 0, 1) for m in maps],
                    None if side is None else torch.from_numpy(side),
                    mirrored,
                )
            teacher.append(coded)
        return teacher

    def _check_shard(self, k: int, r: StoreReader, sample: int, image_id: int, view: str) -> None:
        """The first read of a shard (in any worker) checks it on disk: see ``StoreReader.shard_problem``."""
        shard = sample // r.header.samples_per_shard
        if self._checked[k][shard]:
            return
        problem = r.shard_problem(shard, self._status[k])
        if problem:
            self._damaged(r, shard, sample, image_id, view, problem)
        self._checked[k][shard] = 1

    @staticmethod
    def _damaged(r: StoreReader, shard: int, sample: int, image_id: int, view: str, problem: str) -> None:
        raise StoreError(
            f"{r.location}: shard {shard} is damaged ({problem}), found reading sample {sample} (image {image_id}, "
            f"view {view}); rewrite the damaged shards with the build's own command plus --repair "
            f"(`mtpd-cache build ... --out {r.location} --repair`); `mtpd-cache verify {r.location}` lists them"
        )


def _empty(shape: tuple[int, ...], channels_last: bool = False, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uninitialised tensor; in a DataLoader worker, in shared memory, as default_collate allocates.

    ``channels_last``: a [B, C, H, W] tensor laid out as [B, H, W, C].
    """
    mem = (shape[0],) + shape[2:] + (shape[1],) if channels_last else shape
    if torch.utils.data.get_worker_info() is not None:
        # Sending a tensor from a worker moves its storage to shared memory (a copy); start there instead.
        itemsize = torch.empty(0, dtype=dtype).element_size()
        storage = torch.UntypedStorage._new_shared(int(np.prod(mem)) * itemsize)
        t = torch.empty(0, dtype=dtype).set_(storage, 0, mem)
    else:
        t = torch.empty(mem, dtype=dtype)
    return t.permute(0, 3, 1, 2) if channels_last else t


def _place(dst: torch.Tensor, i: int, src: torch.Tensor) -> None:
    """dst[i] = src at the top left, zeros in the padding: every element written once.

    With ``dst`` channels-last and ``src`` a [C, h, w] view of [h, w, C] rows, the copy moves
    contiguous rows of C values.
    """
    h, w = src.shape[-2:]
    dst[i, :, :h, :w] = src
    dst[i, :, h:, :] = 0
    dst[i, :, :h, w:] = 0


def grid_size(hw: tuple[int, int], level: int) -> tuple[int, int]:
    """Cells of level ``level`` (stride 2**level) over ``hw`` pixels: a partial cell counts."""
    return data_grid_size(hw, 2**level)


def valid_masks(
    padded: tuple[int, int], sizes: list[tuple[int, int]], levels: list[int], device: torch.device | str | None = None
) -> dict[int, torch.Tensor]:
    """level -> [B, 1, h, w] float, 1 on each view's valid (unpadded) cells of the batch grid ``padded``."""
    masks = {}
    for lvl in levels:
        m = torch.zeros(len(sizes), 1, *grid_size(padded, lvl), device=device)
        for i, hw in enumerate(sizes):
            vh, vw = grid_size(hw, lvl)
            m[i, :, :vh, :vw] = 1
        masks[lvl] = m
    return masks


def collate_teacher(
    samples: list[Sample], stores_meta: list[dict[str, StoredOutput]], padded: tuple[int, int]
) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]], list[torch.Tensor], dict[int, torch.Tensor]]:
    """Teacher codes of ``samples`` on a batch grid of ``padded`` (H, W) pixels: (codes per store, side
    parameters per store, mirrored flags per store, valid-cell masks)."""
    teacher: list[dict[str, torch.Tensor]] = []
    sides: list[dict[str, torch.Tensor]] = []
    mirrored: list[torch.Tensor] = []
    levels: set[int] = set()
    for k in range(len(samples[0].teacher)):
        out: dict[str, torch.Tensor] = {}
        side: dict[str, torch.Tensor] = {}
        for name, first in samples[0].teacher[k].items():
            for j, lvl in enumerate(stores_meta[k][name].levels):
                levels.add(lvl)
                code = first.maps[j]
                t = _empty((len(samples), code.shape[0], *grid_size(padded, lvl)), True, code.dtype)
                for i, s in enumerate(samples):
                    _place(t, i, s.teacher[k][name].maps[j])
                out[f"{name}.p{lvl}"] = t
            if first.side is not None:
                side[name] = torch.stack([s.teacher[k][name].side for s in samples])
        teacher.append(out)
        sides.append(side)
        mirrored.append(torch.tensor([any(c.mirrored for c in s.teacher[k].values()) for s in samples]))
    return teacher, sides, mirrored, valid_masks(padded, [s.meta.size for s in samples], sorted(levels))


def collate(samples: list[Sample], stores_meta: list[dict]) -> Batch:
    """Pad views to the batch's size and place teacher maps on the batch grid (zeros + mask outside).

    ``stores_meta``: each store's ``header.outputs``. Teacher maps stay coded (see the module docstring).
    """
    hp = max(s.image.shape[1] for s in samples)
    wp = max(s.image.shape[2] for s in samples)
    images = _empty((len(samples), 3, hp, wp))
    for i, s in enumerate(samples):
        _place(images, i, s.image)
    teacher, sides, mirrored, masks = collate_teacher(samples, stores_meta, (hp, wp))
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
        teacher,
        masks,
        instance,
        sides,
        mirrored,
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
    ds: DistillDataset,
    batch_size: int,
    shuffle: bool,
    workers: int,
    seed: int,
    sampler: torch.utils.data.Sampler | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """DataLoader with spawn/forkserver workers: forking after zarr's event loop started misbehaves.
    ``pin_memory``: batches in page-locked memory (for a CUDA device: asynchronous copies)."""
    metas = [r.header.outputs for r in ds.readers()]
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
        collate_fn=Collate(metas),
        multiprocessing_context=ctx,
        worker_init_fn=worker_init if workers else None,
        persistent_workers=False,
        generator=g,
        drop_last=False,
        pin_memory=pin_memory,
    )


class Collate:
    """Picklable collate carrying each store's output metadata (levels per output)."""

    def __init__(self, metas: list[dict]) -> None:
        self.metas = metas

    def __call__(self, samples: list[Sample]) -> Batch:
        return collate(samples, self.metas)
