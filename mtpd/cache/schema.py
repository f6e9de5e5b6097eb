"""The store format: layout, attributes and value encodings (numpy only; no torch, no Ray).

A store is a Zarr v3 group::

    zarr.json                 root attributes (see ``StoreHeader``)
    index/image_ids           [N] int64
    index/orig_size           [N, 2] int32        (h, w) of each source image
    index/file_names_utf8     [bytes] uint8       file names, UTF-8, concatenated
    index/file_name_offsets   [N + 1] int64       name i = bytes[offsets[i]:offsets[i+1]]
    index/view_size           [N*V, 2] int32      (h, w) of each resized, unpadded view
    index/grid                [N*V, n_levels, 2]  valid cells per level (h, w)
    index/shards              [S, 3] uint64       per shard: done flag, stored bytes, checksum
    outputs/<name>            [N*V, L_max, C]     sample = image_index * V + view_index

Sample rows hold the valid cells of every level, level after level, each
row-major (h, w); the rest of the row up to ``L_max`` is zero and compresses
away. One sample is one chunk; ``images_per_shard * V`` samples are one shard,
written whole by exactly one writer.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np

from mtpd.errors import MtpdError

FORMAT_VERSION = 1
# log(p) of the smallest probability the uint8 encoding keeps; code 0 means p <= 1e-4.
LOGPROB_MIN = math.log(1e-4)
FP16_MAX = 65504.0


class StoreError(MtpdError, ValueError):
    """A store that cannot be opened, resumed or read as asked; the message says what to do."""


@dataclass(frozen=True)
class Precision:
    """How values are quantised before the lossless Blosc-zstd codec."""

    name: str
    keepbits: int | None  # BitRound: mantissa bits kept of fp16's 10; None keeps all
    class_scores: str  # "fp16" logits, or "logprob-uint8" log-scaled probabilities

    def encoding(self, kind: str) -> str:
        if kind == "logits" and self.class_scores == "logprob-uint8":
            return "logprob-uint8"
        return "fp16" if self.keepbits is None else f"fp16-bitround{self.keepbits}"

    def dtype(self, kind: str) -> str:
        return "uint8" if self.encoding(kind) == "logprob-uint8" else "float16"

    def keepbits_for(self, kind: str) -> int | None:
        return None if self.encoding(kind) == "logprob-uint8" else self.keepbits


PRECISIONS: dict[str, Precision] = {
    "lossless": Precision("lossless", None, "fp16"),
    "high": Precision("high", 7, "fp16"),
    "compact": Precision("compact", 5, "logprob-uint8"),
}


def get_precision(name: str) -> Precision:
    if name not in PRECISIONS:
        raise StoreError(f"unknown precision {name!r}: choose from {', '.join(PRECISIONS)}")
    return PRECISIONS[name]


# --- value encodings ---------------------------------------------------------------


def bitround_fp16(x: np.ndarray, keepbits: int) -> np.ndarray:
    """Round fp16 values to ``keepbits`` mantissa bits (round half to even).

    Zeroed low bits make the bit-shuffled stream far more compressible; the
    relative error per value is at most 2**-(keepbits+1).
    """
    if not 0 < keepbits < 10:
        raise ValueError(f"keepbits must be in 1..9 for fp16, got {keepbits}")
    u = np.ascontiguousarray(x, dtype=np.float16).view(np.uint16).astype(np.uint32)
    drop = 10 - keepbits
    half_minus_one = (1 << (drop - 1)) - 1
    lsb = (u >> drop) & 1
    rounded = (u + half_minus_one + lsb) & ~np.uint32((1 << drop) - 1)
    # Rounding can carry into the exponent; that is the correctly rounded value.
    return rounded.astype(np.uint16).view(np.float16)


def encode_values(x: np.ndarray, encoding: str) -> np.ndarray:
    """float32 values -> stored dtype."""
    if encoding == "logprob-uint8":
        x = np.asarray(x, dtype=np.float32)
        logp = -np.logaddexp(0.0, -x)  # log(sigmoid(x)), stable for large |x|
        q = np.rint((logp - LOGPROB_MIN) / -LOGPROB_MIN * 255.0)
        return np.clip(q, 0, 255).astype(np.uint8)
    h = np.clip(np.asarray(x, dtype=np.float32), -FP16_MAX, FP16_MAX).astype(np.float16)
    if encoding == "fp16":
        return h
    if encoding.startswith("fp16-bitround"):
        return bitround_fp16(h, int(encoding[len("fp16-bitround") :]))
    raise StoreError(f"unknown value encoding {encoding!r} in store attributes; this store needs a newer mtpd")


def decode_values(q: np.ndarray, encoding: str, as_logits: bool = True) -> np.ndarray:
    """Stored values -> float32. ``logprob-uint8`` decodes to logits (or probabilities)."""
    if encoding == "logprob-uint8":
        logp = LOGPROB_MIN * (1.0 - q.astype(np.float32) / 255.0)
        p = np.exp(logp)
        if not as_logits:
            return p
        # Code 255 is p = 1; cap at the same distance from 1 as the floor is from 0.
        p = np.minimum(p, 1.0 - math.exp(LOGPROB_MIN))
        return (logp - np.log1p(-p)).astype(np.float32)
    return q.astype(np.float32)


def probability_error_bound(encoding: str) -> float:
    """Largest relative error of a decoded probability above the floor."""
    if encoding == "logprob-uint8":
        return math.expm1(-LOGPROB_MIN / 255.0 / 2.0)
    return 0.0


# --- header --------------------------------------------------------------------------


@dataclass
class StoreHeader:
    """Root attributes: everything that identifies a store and how to read it."""

    teacher: dict
    views: dict
    dataset: dict  # manifest_sha256, num_images, num_classes, ann_file
    precision: str
    images_per_shard: int
    outputs: dict[str, dict]  # name -> OutputSpec dict + dtype, encoding, keepbits, l_max, codec
    levels: list[int]  # union of the outputs' levels; index/grid follows this order
    format_version: int = FORMAT_VERSION
    created_by: str = field(default="mtpd")

    @property
    def num_views(self) -> int:
        return len(self.views["views"])

    @property
    def num_images(self) -> int:
        return int(self.dataset["num_images"])

    @property
    def num_samples(self) -> int:
        return self.num_images * self.num_views

    @property
    def samples_per_shard(self) -> int:
        return self.images_per_shard * self.num_views

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_samples / self.samples_per_shard)

    def shard_samples(self, shard: int) -> tuple[int, int]:
        s0 = shard * self.samples_per_shard
        return s0, min(s0 + self.samples_per_shard, self.num_samples)

    def shard_images(self, shard: int) -> range:
        return range(shard * self.images_per_shard, min((shard + 1) * self.images_per_shard, self.num_images))

    def to_attrs(self) -> dict:
        return {
            "mtpd_format": self.format_version,
            "created_by": self.created_by,
            "teacher": self.teacher,
            "views": self.views,
            "dataset": self.dataset,
            "precision": self.precision,
            "images_per_shard": self.images_per_shard,
            "levels": list(self.levels),
            "outputs": self.outputs,
        }

    @classmethod
    def from_attrs(cls, attrs: dict, where: str) -> "StoreHeader":
        version = attrs.get("mtpd_format")
        if version is None:
            raise StoreError(
                f"{where}: not an mtpd store (no 'mtpd_format' attribute); build one with `mtpd-cache build`"
            )
        if version != FORMAT_VERSION:
            raise StoreError(
                f"{where}: store format {version} but this mtpd reads format {FORMAT_VERSION}; rebuild the store or "
                "upgrade mtpd"
            )
        try:
            header = cls(
                teacher=dict(attrs["teacher"]),
                views=dict(attrs["views"]),
                dataset=dict(attrs["dataset"]),
                precision=str(attrs["precision"]),
                images_per_shard=int(attrs["images_per_shard"]),
                outputs={str(k): dict(v) for k, v in attrs["outputs"].items()},
                levels=[int(x) for x in attrs["levels"]],
                format_version=int(version),
                created_by=str(attrs.get("created_by", "mtpd")),
            )
            header.validate()
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            what = f"missing {e}" if isinstance(e, KeyError) else " ".join(str(e).split())
            raise StoreError(
                f"{where}: damaged store attributes (zarr.json: {what}); rebuild the store with `mtpd-cache build`"
            ) from None
        return header

    def validate(self) -> None:
        """Every field readers rely on, with its type (ValueError/TypeError/KeyError otherwise)."""
        if self.images_per_shard < 1 or int(self.dataset["num_images"]) < 0 or not self.outputs:
            raise ValueError("images_per_shard, num_images or outputs out of range")
        str(self.dataset["manifest_sha256"]) + str(self.dataset["ann_file"])
        views = self.views["views"]
        if not isinstance(views, list) or not views or not all(v in ("orig", "hflip") for v in views):
            raise ValueError(f"views {views!r} is not a list of orig/hflip")
        for key in ("short", "long", "pad"):
            if int(self.views[key]) < 1:
                raise ValueError(f"views.{key} must be positive")
        for name, o in self.outputs.items():
            levels = [int(x) for x in o["levels"]]
            if not levels or not set(levels) <= set(self.levels) or int(o["channels"]) < 1 or int(o["l_max"]) < 1:
                raise ValueError(f"output {name}: levels, channels or l_max out of range")
            np.dtype(str(o["dtype"]))
            str(o["encoding"])

    def identity(self) -> dict:
        """What must match for a rerun to resume into this store. A weights file is its content
        (sha256), not where it lies: the same checkpoint moved or copied resumes the store."""
        teacher = dict(self.teacher)
        if teacher.get("weights_sha256"):
            teacher.pop("weights", None)
        return {
            "teacher": teacher,
            "dataset": {k: self.dataset[k] for k in ("manifest_sha256", "num_images")},
            "views": self.views,
            "precision": self.precision,
            "images_per_shard": self.images_per_shard,
            "outputs": {k: {f: v[f] for f in ("channels", "levels", "encoding")} for k, v in self.outputs.items()},
        }


def describe_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'teacher.weights_sha256: ab12.. (store) vs cd34.. (this run)' for each differing leaf."""
    diffs: list[str] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        path = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            diffs.extend(describe_differences(a, b, path + "."))
        elif a != b:
            short = lambda v: (repr(v)[:60] + "…") if len(repr(v)) > 60 else repr(v)  # noqa: E731
            diffs.append(f"{path}: {short(a)} (store) vs {short(b)} (this run)")
    return diffs


def flat_length(grid: np.ndarray) -> int:
    """Valid cells of one sample over all levels; grid is [n_levels, 2]."""
    return int((grid[:, 0].astype(np.int64) * grid[:, 1]).sum())


def shard_checksum(blocks: dict[str, np.ndarray]) -> int:
    """64-bit blake2b over a shard's stored blocks, outputs in name order."""
    h = hashlib.blake2b(digest_size=8)
    for name in sorted(blocks):
        h.update(name.encode())
        h.update(np.ascontiguousarray(blocks[name]).tobytes())
    return int.from_bytes(h.digest(), "little")
