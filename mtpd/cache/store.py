"""Zarr I/O for stores: create, open, write whole shards, read single samples.

Rules from zarr-python's issue tracker that shape this module: every array is
created by the driver before any worker writes (workers only open them); a
shard is written whole by one writer, never partially (partial-shard writes
are read-modify-write and lose data when two writers meet); samples are read
one index at a time (``arr[i]``), never by fancy indexing.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from mtpd.cache.rows import flat_length, output_grid, split_levels
from mtpd.cache.schema import CODEC, StoredOutput, StoreError, StoreHeader, shard_checksum

# An output's arrays: its codes, and (some encodings) per-sample parameters beside them.
Codes = tuple[np.ndarray, "np.ndarray | None"]  # ([cells, Cc] codes, [levels, ...] float32 side or None)


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
    """The store's header, with each encoding's per-store state (``calib/``) attached."""
    header = StoreHeader.from_attrs(dict(root.attrs), where)
    for name, o in header.outputs.items():
        if o.encoding.needs_fit:
            try:
                group = root[f"calib/{name}"]
                state = {key: np.asarray(group[key][:]) for key in group.array_keys()}
            except (KeyError, FileNotFoundError):
                raise StoreError(
                    f"{where}: output {name} has no calibration arrays (calib/{name}); the store was damaged or "
                    "created by an interrupted build: delete it and rebuild with `mtpd-cache build`"
                ) from None
            except Exception as e:  # noqa: BLE001 - a checksum failure or undecodable bytes in the state
                raise StoreError(
                    f"{where}: the calibration of output {name} (calib/{name}) is damaged ({type(e).__name__}: {e}); "
                    "every shard depends on it: delete the store and rebuild it with `mtpd-cache build`"
                ) from None
            header.outputs[name] = dataclasses.replace(o, encoding=o.encoding.with_state(state))
    return header


def store_header(location: str | os.PathLike, storage_options: dict | None = None) -> StoreHeader:
    """A store's header alone (no index arrays read): what a plan check needs of it."""
    return read_header(open_root(location, "r", storage_options), str(location))


def block_arrays(header: StoreHeader) -> dict[str, str]:
    """Shard block key -> array path. Keys are what shard checksums hash: the output's name for its
    codes (format 1's only arrays), ``name.side`` for its side parameters."""
    out = {}
    for name, o in header.outputs.items():
        out[name] = f"outputs/{name}"
        if header.format_version >= 2 and o.side_shape is not None:
            out[f"{name}.side"] = f"side/{name}"
    return out


def empty_blocks(header: StoreHeader, shard: int) -> dict[str, np.ndarray]:
    """Zeroed blocks of one shard, one per ``block_arrays`` key."""
    s0, s1 = header.shard_samples(shard)
    blocks = {}
    for name, o in header.outputs.items():
        blocks[name] = np.zeros((s1 - s0, o.l_max, o.code_channels), o.code_dtype)
        if o.side_shape is not None:
            blocks[f"{name}.side"] = np.zeros((s1 - s0,) + o.side_shape, np.float32)
    return blocks


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
    calibration: dict[str, dict[str, np.ndarray]] | None = None,
) -> zarr.Group:
    """Create every array of a new store (driver only) and write the index (outputs compressed by ``codec``,
    default ``output_codec()``) and each encoding's fitted state (``calibration``: output -> key -> array)."""
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
    # crc32c after compression: every sample read checks its bytes (a bit flip on disk is an error).
    compressors = [codec or output_codec()] + ([Crc32cCodec()] if chunk_checksum else [])
    for name, o in header.outputs.items():
        row = (o.l_max, o.code_channels)
        root.require_group("outputs").create_array(
            name, shape=(n * v, *row), dtype=o.code_dtype, chunks=(1, *row), shards=(spi, *row),
            compressors=compressors, fill_value=0,
        )  # fmt: skip
        if o.side_shape is not None:
            root.require_group("side").create_array(
                name, shape=(n * v, *o.side_shape), dtype="float32", chunks=(1, *o.side_shape),
                shards=(spi, *o.side_shape), compressors=compressors, fill_value=0,
            )  # fmt: skip
        for key, arr in (calibration or {}).get(name, {}).items():
            # crc32c here too: a flipped bit in a basis would change every decoded value of the output.
            root.require_group("calib").require_group(name).create_array(
                key, data=np.ascontiguousarray(arr), compressors=compressors
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
    """Write one whole shard of every array (``block_arrays``); returns (stored bytes, checksum)."""
    s0, s1 = header.shard_samples(shard)
    nbytes = 0
    for key, path in block_arrays(header).items():
        arr, block = root[path], blocks[key]
        if block.shape[0] != s1 - s0:
            raise ValueError(f"shard {shard} of {key}: {block.shape[0]} samples, expected {s1 - s0}")
        arr[s0:s1] = block
        nbytes += stored_bytes(arr, shard)
    return nbytes, shard_checksum(blocks)


def read_shard_blocks(root: zarr.Group, header: StoreHeader, shard: int) -> dict[str, np.ndarray]:
    s0, s1 = header.shard_samples(shard)
    return {key: np.asarray(root[path][s0:s1]) for key, path in block_arrays(header).items()}


def decode_output(o: StoredOutput, codes: np.ndarray, side: np.ndarray | None, grid_rows: np.ndarray) -> list:
    """One sample's stored row of output ``o`` -> per-level float32 [C, h, w] numpy arrays (decoded on the CPU
    by the same ``decode`` the trainer runs on its device)."""
    maps = []
    code_maps = split_levels(torch.from_numpy(np.ascontiguousarray(codes)), grid_rows)
    for j, m in enumerate(code_maps):
        s = None if side is None else torch.from_numpy(np.ascontiguousarray(side[j]))[None]
        maps.append(o.encoding.decode(m[None], s, j)[0].permute(2, 0, 1).contiguous().numpy())
    return maps


class StoreReader:
    """Read-only access to one store: header, index and per-sample outputs (``open_store`` opens one)."""

    def __init__(self, location: str | os.PathLike, storage_options: dict | None = None) -> None:
        self.location = str(location)
        self.storage_options = storage_options  # a reader reopened elsewhere (a DataLoader worker) needs them
        self.root = open_root(self.location, "r", storage_options)
        self.header = read_header(self.root, self.location)
        idx = self.root["index"]
        self.image_ids = np.asarray(idx["image_ids"][:])
        self.orig_size = np.asarray(idx["orig_size"][:])
        self.view_size = np.asarray(idx["view_size"][:])
        self.grid = np.asarray(idx["grid"][:])
        self._arrays = {key: self.root[path] for key, path in block_arrays(self.header).items()}
        self._pos = {int(i): k for k, i in enumerate(self.image_ids)}

    @property
    def num_samples(self) -> int:
        return self.header.num_samples

    def output_grid(self, sample: int, name: str) -> np.ndarray:
        """Valid cells (h, w) of each level of output ``name`` in ``sample``: [levels, 2]."""
        return output_grid(self.grid[sample], self.header.levels, self.header.outputs[name].levels)

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
        found = sum(stored_bytes(a, shard) for a in self._arrays.values())
        if found != int(status.nbytes[shard]):
            return f"its files hold {found} bytes where {int(status.nbytes[shard])} were written (deleted or truncated)"
        if all(o.chunk_checksum == "crc32c" for o in self.header.outputs.values()):
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

    def read_codes(self, sample: int, names: list[str] | None = None) -> dict[str, Codes]:
        """Stored, undecoded values of one sample: name -> (codes [valid cells, Cc], side or None).

        The fast path for training: codes keep the store's cell-major layout, so ``split_levels``
        cuts them into per-level [h, w, Cc] maps without copying, and the trainer decodes them on
        its own device.
        """
        out = {}
        for name in list(self.header.outputs) if names is None else names:
            length = flat_length(self.output_grid(sample, name))
            # One chunk per sample: arr[i], never fancy indexing.
            codes = np.asarray(self._arrays[name][sample])[:length]
            side = self._arrays.get(f"{name}.side")
            out[name] = (codes, None if side is None else np.asarray(side[sample]))
        return out

    def read(self, sample: int, names: list[str] | None = None) -> dict[str, list[np.ndarray]]:
        """Decoded float32 outputs of one sample: name -> per-level [C, h, w] (levels ascending)."""
        return {
            name: decode_output(self.header.outputs[name], codes, side, self.output_grid(sample, name))
            for name, (codes, side) in self.read_codes(sample, names).items()
        }


def open_store(location: str | os.PathLike, storage_options: dict | None = None) -> StoreReader:
    """Open a store for reading: ``s.header``, ``s.num_samples``, ``s.read(i)`` (decoded float32 maps)."""
    return StoreReader(location, storage_options)
