"""Zarr I/O for stores: create, open, write whole shards, read single samples.

Rules from zarr-python's issue tracker that shape this module: every array is
created by the driver before any worker writes (workers only open them); a
shard is written whole by one writer, never partially (partial-shard writes
are read-modify-write and lose data when two writers meet); samples are read
one index at a time (``arr[i]``), never by fancy indexing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from mtpd.cache.schema import StoreError, StoreHeader, decode_values, flat_length, shard_checksum

CODEC = {"name": "blosc", "cname": "zstd", "clevel": 3, "shuffle": "bitshuffle"}


def output_codec(cname: str = CODEC["cname"]) -> BloscCodec:
    """The Blosc codec of output arrays (``cname``: another Blosc compressor, for what-if benchmarks)."""
    return BloscCodec(cname=cname, clevel=CODEC["clevel"], shuffle=CODEC["shuffle"])


def is_url(location: str) -> bool:
    return "://" in str(location)


def open_root(location: str | os.PathLike, mode: str, storage_options: dict | None = None) -> zarr.Group:
    """Open the store's root group: a local path or an fsspec URL (s3://, gs://, file://, ...)."""
    loc = str(location)
    if mode == "r" and not is_url(loc) and not os.path.exists(os.path.join(loc, "zarr.json")):
        raise StoreError(f"{loc}: no store here (no zarr.json); build one with `mtpd-cache build --out {loc} ...`")
    try:
        if is_url(loc):
            opts = dict(storage_options or {})
            if loc.startswith(("file://", "local://")):
                opts.setdefault("auto_mkdir", True)  # fsspec's local filesystem does not create folders itself
            return zarr.open_group(loc, mode=mode, storage_options=opts)
        return zarr.open_group(zarr.storage.LocalStore(loc, read_only=mode == "r"), mode=mode)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        raise StoreError(f"{loc}: no store here; build one with `mtpd-cache build --out {loc} ...`") from None


def read_header(root: zarr.Group, where: str) -> StoreHeader:
    return StoreHeader.from_attrs(dict(root.attrs), where)


def create_store(
    location: str,
    header: StoreHeader,
    image_ids: np.ndarray,
    orig_sizes: np.ndarray,
    file_names: list[str],
    view_sizes: np.ndarray,
    grids: np.ndarray,
    storage_options: dict | None = None,
    codec: BloscCodec | None = None,
    chunk_checksum: bool = True,
) -> zarr.Group:
    """Create every array of a new store (driver only) and write the index (outputs compressed by ``codec``,
    default ``output_codec()``)."""
    root = open_root(location, "w", storage_options)
    n, v = header.num_images, header.num_views
    spi = header.samples_per_shard
    idx = root.create_group("index")
    idx.create_array("image_ids", data=np.asarray(image_ids, dtype=np.int64), chunks=(max(n, 1),))
    idx.create_array("orig_size", data=np.asarray(orig_sizes, dtype=np.int32), chunks=(max(n, 1), 2))
    names = [f.encode("utf-8") for f in file_names]
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in names])]).astype(np.int64)
    blob = np.frombuffer(b"".join(names), dtype=np.uint8) if names else np.zeros(0, np.uint8)
    idx.create_array("file_names_utf8", data=blob.copy(), chunks=(max(len(blob), 1),))
    idx.create_array("file_name_offsets", data=offsets, chunks=(len(offsets),))
    idx.create_array("view_size", data=np.asarray(view_sizes, dtype=np.int32), chunks=(max(n * v, 1), 2))
    idx.create_array("grid", data=np.asarray(grids, dtype=np.int32), chunks=(max(n * v, 1),) + grids.shape[1:])
    # One chunk per shard row: the driver marks a shard done with one small, whole-object write.
    idx.create_array("shards", shape=(header.num_shards, 3), dtype="uint64", chunks=(1, 3), fill_value=0)
    # 1 for images a --skip-bad build could not read; one chunk per shard, written by the shard's writer.
    idx.create_array("bad_images", shape=(n,), dtype="uint8", chunks=(header.images_per_shard,), fill_value=0)
    outs = root.create_group("outputs")
    for name, o in header.outputs.items():
        lmax, c = int(o["l_max"]), int(o["channels"])
        outs.create_array(
            name,
            shape=(n * v, lmax, c),
            dtype=o["dtype"],
            chunks=(1, lmax, c),
            shards=(spi, lmax, c),
            # crc32c after compression: every sample read checks its bytes (a bit flip on disk is an error).
            compressors=[codec or output_codec()] + ([Crc32cCodec()] if chunk_checksum else []),
            fill_value=0,
        )
    # Attributes last: a store without them is recognisably unfinished and gets recreated.
    root.attrs.update(header.to_attrs())
    return root


@dataclass
class ShardStatus:
    done: np.ndarray  # [S] bool
    nbytes: np.ndarray  # [S] int64
    checksum: np.ndarray  # [S] uint64


def shard_status(root: zarr.Group) -> ShardStatus:
    arr = root["index/shards"]
    try:
        rows = np.asarray(arr[:])
    except Exception:  # noqa: BLE001 - a row torn by a kill mid-write: read row by row below
        rows = np.zeros(arr.shape, np.uint64)
        for s in range(arr.shape[0]):
            try:
                rows[s] = arr[s]
            except Exception:  # noqa: BLE001 - unreadable means not done: the shard is rewritten
                rows[s] = 0
    return ShardStatus(rows[:, 0] == 1, rows[:, 1].astype(np.int64), rows[:, 2])


def mark_done(root: zarr.Group, shard: int, nbytes: int, checksum: int) -> None:
    root["index/shards"][shard] = np.array([1, nbytes, checksum], dtype=np.uint64)


def _sync(coro: Any) -> Any:
    from zarr.core.sync import sync  # zarr's own loop: stores may be bound to it

    return sync(coro)


def stored_bytes(arr: zarr.Array, shard: int) -> int:
    """Bytes of one shard object of an array, as stored (0 when absent)."""
    key = f"{arr.path}/" + arr.metadata.encode_chunk_key((shard,) + (0,) * (arr.ndim - 1))
    size = _sync(arr.store_path.store.getsize(key)) if _sync(arr.store_path.store.exists(key)) else 0
    return int(size)


def write_shard(root: zarr.Group, header: StoreHeader, shard: int, blocks: dict[str, np.ndarray]) -> tuple[int, int]:
    """Write one whole shard of every output; returns (stored bytes, checksum)."""
    s0, s1 = header.shard_samples(shard)
    nbytes = 0
    for name, block in blocks.items():
        arr = root[f"outputs/{name}"]
        if block.shape[0] != s1 - s0:
            raise ValueError(f"shard {shard} of {name}: {block.shape[0]} samples, expected {s1 - s0}")
        arr[s0:s1] = block
        nbytes += stored_bytes(arr, shard)
    return nbytes, shard_checksum(blocks)


def read_shard_blocks(root: zarr.Group, header: StoreHeader, shard: int) -> dict[str, np.ndarray]:
    s0, s1 = header.shard_samples(shard)
    return {name: np.asarray(root[f"outputs/{name}"][s0:s1]) for name in header.outputs}


def level_views(row: np.ndarray, grid: np.ndarray, levels: list[int], out_levels: list[int]) -> list[np.ndarray]:
    """[L, C] flat row -> per-level [h, w, C] views into it (no copy) for ``out_levels``."""
    pos = {lvl: i for i, lvl in enumerate(levels)}
    maps, start = [], 0
    for lvl in out_levels:
        h, w = (int(x) for x in grid[pos[lvl]])
        maps.append(row[start : start + h * w].reshape(h, w, -1))
        start += h * w
    return maps


def unflatten(row: np.ndarray, grid: np.ndarray, levels: list[int], out_levels: list[int]) -> list[np.ndarray]:
    """[L_max, C] flat row -> per-level [C, h, w] arrays for ``out_levels``."""
    return [np.ascontiguousarray(m.transpose(2, 0, 1)) for m in level_views(row, grid, levels, out_levels)]


class StoreReader:
    """Read-only access to one store: header, index and per-sample outputs."""

    def __init__(self, location: str | os.PathLike, storage_options: dict | None = None) -> None:
        self.location = str(location)
        self.root = open_root(self.location, "r", storage_options)
        self.header = read_header(self.root, self.location)
        idx = self.root["index"]
        self.image_ids = np.asarray(idx["image_ids"][:])
        self.orig_size = np.asarray(idx["orig_size"][:])
        self.view_size = np.asarray(idx["view_size"][:])
        self.grid = np.asarray(idx["grid"][:])
        self._arrays = {name: self.root[f"outputs/{name}"] for name in self.header.outputs}
        self._pos = {int(i): k for k, i in enumerate(self.image_ids)}

    def file_names(self) -> list[str]:
        blob = bytes(np.asarray(self.root["index/file_names_utf8"][:]))
        off = np.asarray(self.root["index/file_name_offsets"][:])
        return [blob[off[i] : off[i + 1]].decode("utf-8") for i in range(len(off) - 1)]

    def status(self) -> ShardStatus:
        return shard_status(self.root)

    def bad_images(self) -> np.ndarray:
        """[N] bool: images a ``--skip-bad`` build could not read (all False for stores without the record)."""
        if "bad_images" not in self.root["index"]:
            return np.zeros(len(self.image_ids), dtype=bool)
        return np.asarray(self.root["index/bad_images"][:]) == 1

    def shard_problem(self, shard: int, status: ShardStatus) -> str | None:
        """What is wrong with a done shard on disk, or None.

        Cheap where the store allows it: every sample of a store with per-chunk crc32c is
        checked as it is read, so here only the shard's size is compared with what was written
        (a deleted or truncated shard file); older stores get their full checksum compared.
        """
        arrays = [self._arrays[n] for n in self.header.outputs]
        found = sum(stored_bytes(a, shard) for a in arrays)
        if found != int(status.nbytes[shard]):
            return f"its files hold {found} bytes where {int(status.nbytes[shard])} were written (deleted or truncated)"
        if all(o.get("chunk_checksum") == "crc32c" for o in self.header.outputs.values()):
            return None
        try:
            blocks = read_shard_blocks(self.root, self.header, shard)
        except Exception as e:  # noqa: BLE001 - an undecodable shard is the problem being reported
            return f"it cannot be decoded ({type(e).__name__}: {e})"
        if shard_checksum(blocks) != int(status.checksum[shard]):
            return "its values no longer match the checksum recorded when it was written"
        return None

    def sample_index(self, image_id: int, view: str) -> int:
        views = self.header.views["views"]
        if view not in views:
            raise StoreError(
                f"{self.location}: has views {views}, not {view!r}; rebuild with --views {','.join(views + [view])}"
            )
        if image_id not in self._pos:
            raise StoreError(f"{self.location}: image id {image_id} is not in this store's dataset")
        return self._pos[image_id] * len(views) + views.index(view)

    def read_rows(self, sample: int, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Stored, undecoded values of one sample: name -> [valid cells, C] in the stored dtype.

        The fast path for training: rows keep the store's cell-major layout, so
        ``level_views`` cuts them into per-level [h, w, C] maps without copying.
        """
        out = {}
        grid = self.grid[sample]
        for name in names or list(self.header.outputs):
            meta = self.header.outputs[name]
            length = flat_length(grid[[self.header.levels.index(lvl) for lvl in meta["levels"]]])
            out[name] = np.asarray(self._arrays[name][sample])[
                :length
            ]  # one chunk per sample: arr[i], never fancy indexing
        return out

    def read(self, sample: int, names: list[str] | None = None, as_logits: bool = True) -> dict[str, list[np.ndarray]]:
        """Decoded float32 outputs of one sample: name -> per-level [C, h, w] (levels ascending)."""
        out = {}
        grid = self.grid[sample]
        for name, row in self.read_rows(sample, names).items():
            meta = self.header.outputs[name]
            row = decode_values(row, meta["encoding"], as_logits=as_logits)
            out[name] = unflatten(row, grid, self.header.levels, meta["levels"])
        return out
