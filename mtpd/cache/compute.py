"""Turn a teacher and a dataset into a store's header and shard blocks (no Ray here).

The same functions run inside each Ray worker, in single-process builds and in
benchmarks, so every path writes byte-identical shards.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from mtpd.cache.rows import flat_length, flatten, output_grid
from mtpd.cache.schema import Precision, StoredOutput, StoreError, StoreHeader
from mtpd.cache.store import empty_blocks, open_root, read_header, write_shard
from mtpd.data import CocoDataset, DatasetError, ViewSpec, grid_size, prepare_view, view_meta
from mtpd.output_spec import OutputSpec
from mtpd.teachers.base import Teacher, run_teacher
from mtpd.teachers.registry import TeacherSpec


@dataclass
class Layout:
    """Everything the driver computes before creating a store."""

    header: StoreHeader
    view_sizes: np.ndarray  # [N*V, 2]
    grids: np.ndarray  # [N*V, n_levels, 2]


def plan_layout(
    dataset: CocoDataset,
    spec: ViewSpec,
    specs: dict[str, OutputSpec],
    outputs: list[str],
    precision: Precision,
    images_per_shard: int,
    teacher_identity: dict,
) -> Layout:
    """Grid sizes of every view from the JSON's image sizes (no image is decoded)."""
    levels = sorted({lvl for o in outputs for lvl in specs[o].levels})
    n, v = len(dataset), len(spec.views)
    view_sizes = np.zeros((n * v, 2), np.int32)
    grids = np.zeros((n * v, len(levels), 2), np.int32)
    for i, rec in enumerate(dataset.images):
        for j, view in enumerate(spec.views):
            meta = view_meta(spec, (rec.height, rec.width), view, rec.image_id)  # a bank view is drawn by image id
            view_sizes[i * v + j] = meta.size
            grids[i * v + j] = [grid_size(meta.size, 2**lvl) for lvl in levels]
    out_meta = {}
    for name in outputs:
        s = specs[name]
        l_max = max((flat_length(output_grid(g, levels, s.levels)) for g in grids), default=1)
        out_meta[name] = StoredOutput(s, precision.encoding_for(s), max(1, l_max))
    header = StoreHeader(
        teacher=teacher_identity,
        views=spec.to_dict(),
        dataset={
            "manifest_sha256": dataset.manifest_hash(),
            "content_sha256": dataset.content_probe(),
            "num_images": n,
            "num_classes": dataset.num_classes,
            "ann_file": dataset.ann_file.name,
        },
        precision=precision.name,
        images_per_shard=images_per_shard,
        outputs=out_meta,
        levels=levels,
    )
    return Layout(header, view_sizes, grids)


# One shard's teacher outputs: (sample index, "fpn.p3" -> [C, H, W] float32), or already encoded (GPU builds).
RawShard = list[tuple[int, dict[str, torch.Tensor]]]
Encoded = dict[str, tuple[torch.Tensor, torch.Tensor | None]]  # name -> (codes [cells, Cc], side [levels, ...])


def encode_sample(header: StoreHeader, grid: np.ndarray, res: dict[str, torch.Tensor]) -> Encoded:
    """One sample's maps (``{"fpn.p3": [C, H, W]}``, padded view) -> each output's codes and side parameters,
    with torch ops on the maps' device (the teacher's, before the copy to the host)."""
    out: Encoded = {}
    for name, o in header.outputs.items():
        rows = flatten([res[f"{name}.p{lvl}"] for lvl in o.levels], output_grid(grid, header.levels, o.levels))
        coded = [o.encoding.encode(r.float(), j) for j, r in enumerate(rows)]
        codes = torch.cat([c for c, _ in coded])
        side = None if o.side_shape is None else torch.stack([sd for _, sd in coded])
        out[name] = (codes, side)
    return out


def _to_host(coded: Encoded) -> Encoded:
    """Queue the copies of a sample's codes to the host (pinned-free, non-blocking: ``infer`` waits once)."""
    mv = lambda t: None if t is None else t.to("cpu", non_blocking=True)  # noqa: E731
    return {name: (mv(codes), mv(side)) for name, (codes, side) in coded.items()}


class ShardComputer:
    """Runs a teacher over one shard's views and returns the encoded blocks.

    Views are batched only with views of the same padded size, so a batch never
    adds padding: outputs do not depend on batch composition.

    Three steps a caller may run apart, so that only the teacher's compute sits
    on the critical path: ``load`` (decode images on threads), ``infer`` (the
    teacher forward, and on a GPU the encoding and the copy of the codes to the
    host: the one step that needs the teacher's device) and ``encode`` (on the
    CPU: flatten and quantise with torch ops on ``encode_threads`` threads; then
    fill the shard's blocks). ``__call__`` runs all three.
    """

    def __init__(
        self,
        teacher: Teacher,
        dataset: CocoDataset,
        header: StoreHeader,
        grids: np.ndarray,
        batch_size: int,
        device: str = "cpu",
        io_threads: int = 4,
        encode_threads: int = 2,
        skip_bad: bool = False,
        view_sizes: np.ndarray | None = None,
    ) -> None:
        self.teacher = teacher
        self.view_sizes = view_sizes  # [N*V, 2]: each view's valid size, for teachers that mask padding
        self.skip_bad = skip_bad
        self.bad: dict[int, list[int]] = {}  # shard -> images that could not be read (skip_bad)
        self.dataset = dataset
        self.header = header
        self.grids = grids
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.spec = ViewSpec.from_dict(header.views)
        self.names = list(header.outputs)
        # On a GPU each sample is encoded there, right after the forward; a writer of several stores (each with
        # its own codes) turns this off and encodes per store from the same maps.
        self.encode_on_device = True
        self._pool = ThreadPoolExecutor(io_threads, thread_name_prefix="mtpd-load")
        self._encode_pool = ThreadPoolExecutor(max(1, encode_threads), thread_name_prefix="mtpd-encode")

    def load(self, shard: int) -> list[tuple[int, torch.Tensor]]:
        """(sample index, prepared view) for every view of the shard; decoding runs on threads."""
        images = list(self.header.shard_images(shard))
        arrays = list(self._pool.map(self._load_image, images))
        self.bad[shard] = [i for i, img in zip(images, arrays) if img is None]
        v = self.header.num_views
        views = []
        for i, img in zip(images, arrays):
            if img is None:  # skipped: its samples stay zero and the store marks the image bad
                continue
            for j, name in enumerate(self.spec.views):
                image_id = self.dataset.images[i].image_id
                views.append((i * v + j, prepare_view(img, self.spec, name, image_id)[0]))
        return views

    def _load_image(self, i: int):
        try:
            return self.dataset.load_image(i)
        except DatasetError:
            if not self.skip_bad:
                raise
            return None

    @torch.inference_mode()
    def infer(self, shard: int, views: list[tuple[int, torch.Tensor]]) -> RawShard | list[tuple[int, Encoded]]:
        """Teacher outputs of every view. On a GPU they are encoded there, and only codes are copied to
        the host; on the CPU they are returned as float32 for ``encode`` to code on the encode threads,
        outside the teacher's turn."""
        by_shape: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
        for sample, x in views:
            by_shape.setdefault(tuple(x.shape[1:]), []).append((sample, x))
        on_device = self.device.type == "cuda" and self.encode_on_device
        raw: list = []
        for group in by_shape.values():
            for b in range(0, len(group), self.batch_size):
                batch = group[b : b + self.batch_size]
                x = torch.stack([t for _, t in batch]).to(self.device, non_blocking=True)
                sizes = None if self.view_sizes is None else [tuple(self.view_sizes[s]) for s, _ in batch]
                res = run_teacher(self.teacher, x, self.names, sizes)
                for k, (sample, _) in enumerate(batch):
                    one = {key: val[k] for key, val in res.items()}
                    if on_device:
                        one = _to_host(encode_sample(self.header, self.grids[sample], one))
                    elif self.device.type == "cuda":  # several stores encode on the host: keep no maps on the GPU
                        one = {key: val.to("cpu", non_blocking=True) for key, val in one.items()}
                    raw.append((sample, one))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the non_blocking copies of every code array have landed
        return raw

    @torch.inference_mode()
    def encode(
        self, shard: int, raw: RawShard | list[tuple[int, Encoded]], header: StoreHeader | None = None
    ) -> dict[str, np.ndarray]:
        """Code every sample (unless ``infer`` did) into the shard's blocks of ``header``'s store (default: this
        computer's), one slot per sample, on threads."""
        header = header or self.header
        s0, _ = header.shard_samples(shard)
        blocks = empty_blocks(header, shard)
        # Each task writes its own slot of each block: no two threads touch the same memory.
        list(self._encode_pool.map(lambda item: self._fill(header, blocks, item[0] - s0, item[0], item[1]), raw))
        return blocks

    def forward(self, shard: int, views: list[tuple[int, torch.Tensor]]) -> dict[str, np.ndarray]:
        return self.encode(shard, self.infer(shard, views))

    def _fill(self, header: StoreHeader, blocks: dict[str, np.ndarray], slot: int, sample: int, res: dict) -> None:
        first = next(iter(res.values()))
        coded = res if isinstance(first, tuple) else encode_sample(header, self.grids[sample], res)
        for name, (codes, side) in coded.items():
            blocks[name][slot, : codes.shape[0]] = codes.cpu().numpy()
            if side is not None:
                blocks[f"{name}.side"][slot] = side.cpu().numpy()

    def __call__(self, shard: int) -> dict[str, np.ndarray]:
        return self.forward(shard, self.load(shard))

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self._encode_pool.shutdown(wait=False)


class ShardWriter:
    """What one Ray actor runs: a teacher loaded once, shards computed and written.

    ``SHARDS_IN_FLIGHT`` calls run at once (Ray's ``max_concurrency``): one holds
    the teacher (forward and device-to-host copy) while the others load images,
    encode and compress, and write, so only the teacher's compute is on the
    critical path. Encoding and Blosc release the GIL for large arrays, so
    these threads use the cores the teacher leaves idle (all of them on a GPU node).

    ``store`` may be several stores of the same teacher, dataset and views (e.g. one per precision): each
    shard's teacher forward then runs once, for the union of their outputs, and every store encodes its own
    codes from the same maps (``run_many``).
    """

    def __init__(
        self,
        teacher: TeacherSpec,
        ann: str,
        images: str,
        store: str | list[str],
        batch_size: int,
        threads: int,
        storage_options: dict | None = None,
        skip_bad: bool = False,
    ) -> None:
        import torch
        import zarr

        torch.set_num_threads(max(1, threads))
        # Blosc and zarr's own pools would otherwise oversubscribe the worker's cores.
        zarr.config.set({"async.concurrency": 4, "threading.max_workers": max(1, threads)})
        stores = [store] if isinstance(store, str) else list(store)
        self.roots = [open_root(s, "r+", storage_options) for s in stores]
        self.headers = [read_header(r, s) for r, s in zip(self.roots, stores)]
        self.root, self.header = self.roots[0], self.headers[0]
        self.dataset = CocoDataset(ann, images)
        grids = np.asarray(self.root["index/grid"][:])
        view_sizes = np.asarray(self.root["index/view_size"][:])
        for s, r in zip(stores[1:], self.roots[1:]):
            if not np.array_equal(np.asarray(r["index/grid"][:]), grids):
                raise StoreError(f"{s} is laid out on other levels or views than {stores[0]}: build it on its own")
        self.computer = ShardComputer(
            teacher.build(),
            self.dataset,
            self.header,
            grids,
            batch_size,
            teacher.device,
            encode_threads=max(1, threads),
            skip_bad=skip_bad,
            view_sizes=view_sizes,
        )
        if len(stores) > 1:
            self.computer.names = sorted({n for h in self.headers for n in h.outputs})
            self.computer.encode_on_device = False
        self._teacher_lock = threading.Lock()
        # Where the time goes, for in-process builds and benchmarks: the teacher's wall seconds, and each store's
        # encode + write seconds of this process's CPU time (all its threads).
        self.teacher_seconds = 0.0
        self.encode_cpu_seconds = [0.0] * len(stores)
        self.on_raw: Callable[[int, list], None] | None = None  # sees each shard's maps (in-process builds only)

    def run(self, shard: int) -> tuple[int, int, int]:
        """Write ``shard`` of the (first) store: (shard, stored bytes, checksum)."""
        _, nbytes, checksum = self.run_many(shard, [0])[0]
        return shard, nbytes, checksum

    def run_many(self, shard: int, which: list[int]) -> list[tuple[int, int, int]]:
        """Write ``shard`` of the stores ``which`` (indices) from one teacher forward: (store, bytes, checksum)
        each."""
        views = self.computer.load(shard)
        with self._teacher_lock:
            t0 = time.perf_counter()
            raw = self.computer.infer(shard, views)
            self.teacher_seconds += time.perf_counter() - t0
        if self.on_raw is not None:
            self.on_raw(shard, raw)
        # Outside the lock: the next shard's forward starts while this one is encoded and written.
        bad = self.computer.bad.pop(shard, [])
        out = []
        for k in which:
            c0 = time.process_time()
            blocks = self.computer.encode(shard, raw, self.headers[k])
            nbytes, checksum = write_shard(self.roots[k], self.headers[k], shard, blocks)
            del blocks
            if "bad_images" in self.roots[k]["index"]:
                # The shard's own chunk of the record, written whole by this writer before the shard is marked done.
                images = self.headers[k].shard_images(shard)
                flags = np.isin(np.arange(images.start, images.stop), bad).astype(np.uint8)
                self.roots[k]["index/bad_images"][images.start : images.stop] = flags
            self.encode_cpu_seconds[k] += time.process_time() - c0
            out.append((k, nbytes, checksum))
        return out
