"""A store's read path for training, kept beside its writer as one format's two halves: one sample's codes
(``StoreFeed.read_sample``), a batch of them on the student's batch grid (``collate_codes`` -> ``CodedBatch``),
and float32 maps decoded where the batch lies (``CodedBatch.decode``).

Decoding happens where it is cheapest: on the training device. DataLoader workers hand over the stored codes
(fp16, uint8, packed integer codes, projection coefficients) in the store's cell-major layout; ``collate_codes``
places them on the batch grid in one copy per level into a tensor in channels-last memory (the store's layout,
so the copy reads and writes contiguous rows), allocated in shared memory inside workers so that handing the
batch to the training process copies nothing. ``CodedBatch.decode`` turns codes into float32 maps, zeroes padded
cells of encodings whose zero code is not zero, and mirrors the channels of samples served by mirroring the
'orig' view (their columns were reversed on the codes; every encoding codes each cell on its own, so that is
exact), by each output's mirror rule. Keys are built from the store's header (output name, level), never
parsed back out of strings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from mtpd.cache.rows import split_levels
from mtpd.cache.schema import StoredOutput, StoreError
from mtpd.cache.store import StoreReader
from mtpd.data import grid_size as data_grid_size
from mtpd.output_spec import OutputSpec


@dataclass
class Coded:
    """One output of one view as stored: per-level [Cc, h, w] code maps (views into the stored row),
    the side parameters [levels, ...] (or None), and whether the maps mirror the 'orig' view."""

    maps: list[Tensor]
    side: Tensor | None
    mirrored: bool = False


class StoreFeed:
    """One store, opened once per process, serving the codes of some of its outputs sample by sample.

    A feed crosses to DataLoader workers without its open Zarr handles (they do not pickle): each worker
    reopens the store once, on its first read. Shards are checked on disk the first time any worker reads
    one (``StoreReader.shard_problem``); the record of checked shards is shared by the workers."""

    def __init__(self, store: StoreReader | str | os.PathLike, names: list[str] | None = None) -> None:
        self._reader: StoreReader | None = store if isinstance(store, StoreReader) else StoreReader(store)
        self.location, self.storage_options = self._reader.location, self._reader.storage_options
        self.header = self._reader.header
        self.names = list(names) if names is not None else list(self.header.outputs)
        unknown = [n for n in self.names if n not in self.header.outputs]
        if unknown:
            raise StoreError(f"{self.location}: no output {unknown[0]!r}; it stores {', '.join(self.header.outputs)}")
        self.status = self._reader.status()
        self._checked = torch.zeros(self.header.num_shards, dtype=torch.uint8).share_memory_()

    @property
    def outputs(self) -> dict[str, StoredOutput]:
        """The served outputs' metadata (levels, encoding, spec), as the header stores them."""
        return {n: self.header.outputs[n] for n in self.names}

    @property
    def reader(self) -> StoreReader:
        if self._reader is None:
            self._reader = StoreReader(self.location, self.storage_options)
        return self._reader

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_reader"] = None
        return state

    def mirrors(self, view: str) -> bool:
        """Whether ``view`` is served by mirroring the 'orig' view (a store built without 'hflip')."""
        return view == "hflip" and "hflip" not in self.header.view_names

    def read_sample(self, image_id: int, view: str) -> dict[str, Coded]:
        """The stored codes of one view of one image: name -> ``Coded`` (a store without 'hflip' serves it by
        reversing the columns of its 'orig' codes; ``CodedBatch.decode`` mirrors their channels)."""
        r = self.reader
        mirrored = self.mirrors(view)
        sample = r.sample_index(image_id, "orig" if mirrored else view)
        shard = sample // self.header.samples_per_shard
        if not self._checked[shard]:
            problem = r.shard_problem(shard, self.status)
            if problem:
                self._damaged(shard, sample, image_id, view, problem)
            self._checked[shard] = 1
        try:
            rows = r.read_codes(sample, self.names)
        except Exception as e:  # noqa: BLE001 - a chunk failing its crc32c, or any undecodable bytes
            self._damaged(shard, sample, image_id, view, f"{type(e).__name__}: {e}")
        out = {}
        for n, (codes, side) in rows.items():
            maps = split_levels(codes, r.output_grid(sample, n))
            if mirrored:
                maps = [np.ascontiguousarray(m[:, ::-1]) for m in maps]
            out[n] = Coded(
                [torch.from_numpy(m).permute(2, 0, 1) for m in maps],
                None if side is None else torch.from_numpy(side),
                mirrored,
            )
        return out

    def _damaged(self, shard: int, sample: int, image_id: int, view: str, problem: str) -> None:
        raise StoreError(
            f"{self.location}: shard {shard} is damaged ({problem}), found reading sample {sample} (image "
            f"{image_id}, view {view}); rewrite the damaged shards with the build's own command plus --repair "
            f"(`mtpd-cache build ... --out {self.location} --repair`); `mtpd-cache verify {self.location}` lists them"
        )


@dataclass
class CodedBatch:
    """One store's codes of a batch on its grid: ``{name}.p{level}`` -> [B, Cc, h, w] (channels-last memory,
    zero codes on padding), side parameters per output name [B, levels, ...], and which samples are mirrored."""

    codes: dict[str, Tensor]
    sides: dict[str, Tensor] = field(default_factory=dict)
    mirrored: Tensor | None = None  # [B] bool

    def map(self, fn: Callable[[Tensor], Tensor]) -> "CodedBatch":
        return CodedBatch(
            {k: fn(v) for k, v in self.codes.items()},
            {k: fn(v) for k, v in self.sides.items()},
            None if self.mirrored is None else fn(self.mirrored),
        )

    def decode(self, outputs: dict[str, StoredOutput], masks: dict[int, Tensor]) -> dict[str, Tensor]:
        """float32 maps [B, C, h, w] by ``{name}.p{level}``, on the codes' device. ``outputs``: the store's
        ``header.outputs``; ``masks``: level -> [B, 1, h, w] valid cells of the batch grid."""
        maps: dict[str, Tensor] = {}
        mirror = self.mirrored is not None and bool(self.mirrored.any())
        for name, o in outputs.items():
            for j, lvl in enumerate(o.levels):
                key = f"{name}.p{lvl}"
                if key not in self.codes:
                    continue
                side = self.sides[name][:, j] if name in self.sides else None
                dec = o.encoding.decode(self.codes[key].permute(0, 2, 3, 1), side, j)  # [B, h, w, C]
                if not o.encoding.zero_is_zero:
                    dec = torch.where(masks[lvl].permute(0, 2, 3, 1) > 0, dec, 0.0)
                if mirror:
                    dec = mirror_channels(dec, self.mirrored, o.spec)
                maps[key] = dec.permute(0, 3, 1, 2)
        return maps


def mirror_channels(dec: Tensor, rows: Tensor, spec: OutputSpec) -> Tensor:
    """``dec`` [B, h, w, C] with the channels of the samples in ``rows`` (bool [B]) mirrored by ``spec``'s rule;
    ``dec`` itself when the rule keeps channels as they are."""
    perm, sign = spec.mirror_channels()
    if perm == list(range(len(perm))) and all(s == 1.0 for s in sign):
        return dec
    p = torch.as_tensor(perm, device=dec.device)
    s = torch.as_tensor(sign, device=dec.device, dtype=dec.dtype)
    dec[rows] = dec[rows][..., p] * s  # decoding made ``dec``: writing into it is safe
    return dec


def empty(shape: tuple[int, ...], channels_last: bool = False, dtype: torch.dtype = torch.float32) -> Tensor:
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


def place(dst: Tensor, i: int, src: Tensor) -> None:
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
) -> dict[int, Tensor]:
    """level -> [B, 1, h, w] float, 1 on each view's valid (unpadded) cells of the batch grid ``padded``."""
    masks = {}
    for lvl in levels:
        m = torch.zeros(len(sizes), 1, *grid_size(padded, lvl), device=device)
        for i, hw in enumerate(sizes):
            vh, vw = grid_size(hw, lvl)
            m[i, :, :vh, :vw] = 1
        masks[lvl] = m
    return masks


def collate_codes(
    samples: list[dict[str, Coded]], outputs: dict[str, StoredOutput], padded: tuple[int, int]
) -> CodedBatch:
    """One store's codes of a batch's samples on a grid of ``padded`` (H, W) pixels. ``outputs``: the store's
    ``header.outputs`` (each output's levels)."""
    codes: dict[str, Tensor] = {}
    sides: dict[str, Tensor] = {}
    for name, first in samples[0].items():
        for j, lvl in enumerate(outputs[name].levels):
            code = first.maps[j]
            t = empty((len(samples), code.shape[0], *grid_size(padded, lvl)), True, code.dtype)
            for i, s in enumerate(samples):
                place(t, i, s[name].maps[j])
            codes[f"{name}.p{lvl}"] = t
        if first.side is not None:
            sides[name] = torch.stack([s[name].side for s in samples])
    mirrored = torch.tensor([any(c.mirrored for c in s.values()) for s in samples])
    return CodedBatch(codes, sides, mirrored)


def code_levels(samples: list[dict[str, Coded]], outputs: dict[str, StoredOutput]) -> set[int]:
    """The levels the samples' codes cover."""
    return {lvl for name in samples[0] for lvl in outputs[name].levels} if samples else set()
