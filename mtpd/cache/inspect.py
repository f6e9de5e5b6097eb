"""`mtpd-cache info` and `mtpd-cache verify`: what a store holds, and whether it is whole."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from mtpd.cache.rows import flat_length, output_grid
from mtpd.cache.schema import StoreHeader, shard_checksum
from mtpd.cache.store import StoreReader, is_url, read_shard_blocks


def _bytes_on_disk(location: str, prefix: str = "") -> int:
    if is_url(location):
        import fsspec

        fs, path = fsspec.core.url_to_fs(location)
        return int(fs.du(f"{path.rstrip('/')}/{prefix}".rstrip("/")))
    total = 0
    for dirpath, _, files in os.walk(os.path.join(location, prefix)):
        total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    return total


def _raw_fp32_bytes(header: StoreHeader, grids: np.ndarray, samples: np.ndarray, name: str) -> int:
    """What output ``name``'s stored valid cells would take as float32: the baseline of its compression ratio."""
    o = header.outputs[name]
    cells = sum(flat_length(output_grid(grids[s], header.levels, o.levels)) for s in samples)
    return cells * o.channels * 4


def _output_rows(location: str, h: StoreHeader, grids: np.ndarray, samples: np.ndarray) -> dict:
    """Per output: what it is, its encoding and bound, its stored bytes (codes, side parameters and
    per-store state) and raw fp32 bytes over the written samples."""
    rows = {}
    for name, o in h.outputs.items():
        stored = sum(_bytes_on_disk(location, f"{part}/{name}") for part in ("outputs", "side", "calib"))
        raw = _raw_fp32_bytes(h, grids, samples, name)
        rows[name] = {
            "kind": o.kind,
            "levels": list(o.levels),
            "strides": list(o.spec.strides),
            "channels": o.channels,
            "dtype": o.code_dtype.name,
            "encoding": o.encoding.describe(),
            "bound": o.encoding.bound(),
            "l_max": o.l_max,
            "stored_bytes": stored,
            "raw_fp32_bytes": raw,
            "fraction_of_fp32": (stored / raw) if raw else None,
        }
    return rows


def store_info(location: str, storage_options: dict | None = None) -> dict:
    r = StoreReader(location, storage_options)
    h = r.header
    status = r.status()
    done_samples = np.concatenate(
        [np.arange(*h.shard_samples(s)) for s in np.flatnonzero(status.done)] or [np.zeros(0, int)]
    )
    images_done = int(sum(len(h.shard_images(s)) for s in np.flatnonzero(status.done)))
    outputs = _output_rows(location, h, r.grid, done_samples)
    out_bytes = sum(o["stored_bytes"] for o in outputs.values())
    raw = sum(o["raw_fp32_bytes"] for o in outputs.values())
    return {
        "store": location,
        "format": h.format_version,
        "teacher": h.teacher,
        "dataset": h.dataset,
        "views": h.views,
        "precision": h.precision,
        "outputs": outputs,
        "calibration": dict(r.root.attrs).get("calibration"),
        "images_done": images_done,
        "images_total": h.num_images,
        "shards_done": int(status.done.sum()),
        "shards_total": h.num_shards,
        "bytes_on_disk": _bytes_on_disk(location),
        "output_bytes": out_bytes,
        "raw_fp32_bytes": raw,
        "compression_ratio": (raw / out_bytes) if out_bytes else None,
        "bad_images": [name for name, bad in zip(r.file_names(), r.bad_images()) if bad],
    }


def format_info(info: dict) -> str:
    t = info["teacher"]
    v = info["views"]
    lines = [
        f"store        {info['store']} (format {info['format']}, precision {info['precision']})",
        f"teacher      {t['name']}  weights={t['weights']}"
        + (f"  sha256={t['weights_sha256'][:12]}" if t.get("weights_sha256") else ""),
        f"dataset      {info['dataset']['ann_file']}: {info['dataset']['num_images']} images, "
        f"{info['dataset']['num_classes']} classes, manifest {info['dataset']['manifest_sha256'][:12]}",
        f"views        {','.join(v['views'])}  short={v['short']} long={v['long']} pad={v['pad']}",
        "outputs",
    ]
    for name, o in info["outputs"].items():
        lv = ",".join(f"P{x}" for x in o["levels"])
        frac = o["fraction_of_fp32"]
        lines.append(
            f"  {name:<8} {o['kind']:<10} {lv:<16} C={o['channels']:<5} {o['encoding']:<24} L_max={o['l_max']:<7} "
            f"{o['stored_bytes'] / 2**20:.2f} MiB" + (f" (1/{1 / frac:.1f} of fp32)" if frac else "")
        )
    ratio = info["compression_ratio"]
    lines += [
        f"progress     {info['images_done']}/{info['images_total']} images "
        f"({info['shards_done']}/{info['shards_total']} shards)",
        f"size         {info['bytes_on_disk'] / 2**20:.2f} MiB on disk; outputs {info['output_bytes'] / 2**20:.2f} MiB"
        + (f", {ratio:.1f}x smaller than raw fp32" if ratio else ""),
    ]
    bad = info["bad_images"]
    if bad:
        shown = ", ".join(bad[:10]) + (f", ... {len(bad) - 10} more" if len(bad) > 10 else "")
        lines.append(f"skipped      {len(bad)} unreadable image(s) (--skip-bad; training leaves them out): {shown}")
    return "\n".join(lines)


@dataclass
class VerifyResult:
    shards_total: int
    missing: list[int] = field(default_factory=list)  # never marked done
    corrupt: list[tuple[int, str]] = field(default_factory=list)  # marked done but data does not match

    @property
    def ok(self) -> bool:
        return not self.missing and not self.corrupt


def verify_store(location: str, storage_options: dict | None = None, progress: bool = False) -> VerifyResult:
    """Re-read every done shard and compare its checksum with the one recorded at write time."""
    from tqdm import tqdm

    r = StoreReader(location, storage_options)
    status = r.status()
    res = VerifyResult(r.header.num_shards)
    for s in tqdm(range(r.header.num_shards), desc="verify", unit="shard", disable=not progress):
        if not status.done[s]:
            res.missing.append(s)
            continue
        try:
            blocks = read_shard_blocks(r.root, r.header, s)
        except Exception as e:  # noqa: BLE001 - an undecodable shard is what verify reports
            res.corrupt.append((s, f"unreadable: {type(e).__name__}: {e}"))
            continue
        if shard_checksum(blocks) != int(status.checksum[s]):
            res.corrupt.append((s, "checksum mismatch (data changed or shard file deleted after writing)"))
    return res
