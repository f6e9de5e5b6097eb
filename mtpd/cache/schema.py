"""The store format: layout, attributes and the presets of value encodings (no Ray).

A store is a Zarr v3 group::

    zarr.json                 root attributes (see ``StoreHeader``)
    index/image_ids           [N] int64
    index/orig_size           [N, 2] int32        (h, w) of each source image
    index/file_names_utf8     [bytes] uint8       file names, UTF-8, concatenated
    index/file_name_offsets   [N + 1] int64       name i = bytes[offsets[i]:offsets[i+1]]
    index/view_size           [N*V, 2] int32      (h, w) of each resized, unpadded view
    index/grid                [N*V, n_levels, 2]  valid cells per level (h, w)
    index/shards              [S, 3] uint64       per shard: done flag, stored bytes, checksum
    index/bad_images          [N] uint8           1 for images a --skip-bad build could not read
    outputs/<name>            [N*V, L_max, Cc]    codes; sample = image_index * V + view_index
    side/<name>               [N*V, levels, ...]  float32 per-sample parameters of the codes (some encodings)
    calib/<name>/<key>        [levels, ...]       per-store state of the encoding (a PCA basis), fitted
                                                  on a calibration sample before any shard is written

Sample rows hold the valid cells of every level, level after level, each
row-major (h, w) (``mtpd.cache.rows``); the rest of the row up to ``L_max`` is
zero and compresses away. One sample is one chunk; ``images_per_shard * V``
samples are one shard, written whole by exactly one writer. Each output's
``encoding`` attribute names an ``mtpd.cache.encoding`` class and its
parameters; ``Cc`` is that encoding's code width (``C`` for fp16 codes).

Format 1 (still read): encodings named by strings (``fp16``, ``fp16-bitround5``,
``logprob-uint8``), no side or calibration arrays.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from mtpd.cache.custom import parse_overrides
from mtpd.cache.encoding import (
    PCA,
    Affine,
    Encoding,
    EncodingError,
    Fp16,
    LogProbU8,
    ProductQuantizer,
    TopK,
    encoding_from_attrs,
    encoding_from_v1,
)
from mtpd.data.views import ViewSpec
from mtpd.errors import MtpdError
from mtpd.models.adapters import mirror_rule
from mtpd.output_spec import OutputSpec

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)  # format 1: the same layout, encodings named by strings, no side arrays
# Output arrays: Blosc-zstd over bit-shuffled codes; one chunk per sample, one shard per shard of images.
CODEC = {"name": "blosc", "cname": "zstd", "clevel": 3, "shuffle": "bitshuffle"}


class StoreError(MtpdError, ValueError):
    """A store that cannot be opened, resumed or read as asked; the message says what to do."""


# The whole output spec -> its encoding: a rule can read channels, anchors and classes (a per-anchor top-k).
Rule = Callable[[OutputSpec], Encoding]


def _fixed(enc: Encoding) -> Rule:
    return lambda spec: enc


@dataclass(frozen=True)
class Precision:
    """A named preset: the encoding of each kind of output (features, class logits, the rest)."""

    name: str
    features: Rule
    logits: Rule
    other: Rule  # box deltas, objectness
    summary: str = ""

    def encoding_for(self, spec: OutputSpec) -> Encoding:
        rule = {"feature": self.features, "logits": self.logits}.get(spec.kind, self.other)
        return rule(spec)


PRECISIONS: dict[str, Precision] = {
    "lossless": Precision("lossless", _fixed(Fp16()), _fixed(Fp16()), _fixed(Fp16()), "fp16 everywhere"),
    "high": Precision("high", _fixed(Fp16(7)), _fixed(Fp16(7)), _fixed(Fp16(7)), "fp16 rounded to 7 mantissa bits"),
    "compact": Precision(
        "compact", _fixed(Fp16(5)), _fixed(LogProbU8()), _fixed(Fp16(5)), "fp16 to 5 bits; class scores uint8"
    ),
    "small": Precision(
        "small", _fixed(Affine(4)), _fixed(LogProbU8()), _fixed(Fp16(5)), "features: 4-bit per-channel codes"
    ),
    # Class scores: top-8 per cell is 1/26-1/28 of fp32 on the demo's trained teachers against 1/5.7-1/7.7
    # for logprob-u8, but drops scores up to p ~ 0.4 (sigmoid scores: an anchor can be sure of several
    # classes); `small` keeps the code whose error is bounded everywhere.
    "tiny": Precision(
        "tiny",
        lambda s: PCA(rank=max(1, s.channels // 2), bits=4),
        lambda s: TopK(k=min(8, s.channels), channels=s.channels),
        _fixed(Affine(8)),
        "features: PCA to half the channels, 4-bit coefficients; class scores: top 8 per cell",
    ),
    # From the dev split of bench/studies/store_codes.yaml (bench/RESULTS.md "Store codes below small ... dev split"):
    # features by product quantisation on the principal axes at 2 bits per value (one byte per 4 channels,
    # 1/16 of fp32 before the per-store codebooks); class scores as one byte per anchor, the nearest of 256
    # codewords for that anchor's logits (bits 8/K for K classes), about 1/6 of logprob-u8's bytes.
    # Both codebooks are k-means fits: building needs faiss (mtpd[codes]); reading does not.
    "micro": Precision(
        "micro",
        _fixed(ProductQuantizer(2.0, rotate=True)),
        lambda s: ProductQuantizer(8 * max(1, s.num_anchors) / s.channels, rotate=False),
        _fixed(Affine(8)),
        "features: product quantisation, 2 bits per value; class scores: one byte per anchor",
    ),
}


def split_precisions(text: str) -> list[str]:
    """``small,tiny,micro`` -> its precisions. A part is a new precision when what precedes its first ``+`` is a
    preset's name; otherwise (``rotate=true``) it is a parameter of the one before, whose commas it shares."""
    out: list[str] = []
    for part in text.split(","):
        if part.partition("+")[0] in PRECISIONS or not out:
            out.append(part)
        else:
            out[-1] += "," + part
    return out


def get_precision(name: str) -> Precision:
    """A preset by name, or one with encodings replaced: ``small+features=transform:bits=2`` (``mtpd.cache.custom``)."""
    base, plus, overrides = name.partition("+")
    if base not in PRECISIONS:
        raise StoreError(f"unknown precision {base!r}: choose from {', '.join(PRECISIONS)} (then +ROLE=KIND:...)")
    if not plus:
        return PRECISIONS[base]
    try:
        rules = parse_overrides(overrides)
        probes = {  # a bad parameter fails here, not mid-build: each rule on an output of its role
            "features": OutputSpec("fpn", "feature", (3,), 64),
            "logits": OutputSpec("cls", "logits", (3,), 90, 9, 10),
            "other": OutputSpec("box", "deltas", (3,), 36, 9, 0),
        }
        for role, rule in rules.items():
            rule(probes[role])
    except EncodingError as e:
        raise StoreError(f"precision {name!r}: {e}") from None
    return dataclasses.replace(PRECISIONS[base], name=name, summary=f"{base} with {overrides}", **rules)


@dataclass(frozen=True)
class StoredOutput:
    """One output as the store holds it: what it is (``spec``), how it is coded and laid out."""

    spec: OutputSpec
    encoding: Encoding
    l_max: int  # longest row: valid cells of all the output's levels of one sample
    chunk_checksum: str | None = "crc32c"  # each stored sample carries its crc32c, checked on every read
    codec: dict = field(default_factory=lambda: dict(CODEC))

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def levels(self) -> tuple[int, ...]:
        return self.spec.levels

    @property
    def channels(self) -> int:
        return self.spec.channels

    @property
    def code_channels(self) -> int:
        return self.encoding.code_channels(self.spec.channels)

    @property
    def code_dtype(self) -> np.dtype:
        return np.dtype(self.encoding.code_dtype)

    @property
    def side_shape(self) -> tuple[int, ...] | None:
        """Per sample: [levels, *encoding side shape] float32 beside the codes, or None."""
        s = self.encoding.side_shape(self.spec.channels)
        return None if s is None else (len(self.spec.levels),) + s

    def to_attrs(self) -> dict:
        return {
            **self.spec.to_dict(),
            "encoding": self.encoding.to_attrs(),
            "dtype": self.code_dtype.name,
            "code_channels": self.code_channels,
            "l_max": self.l_max,
            "codec": dict(self.codec),
            "chunk_checksum": self.chunk_checksum,
        }

    @classmethod
    def from_attrs(cls, d: dict, version: int) -> "StoredOutput":
        spec = OutputSpec.from_dict(d)
        enc = encoding_from_v1(str(d["encoding"])) if version == 1 else encoding_from_attrs(d["encoding"])
        out = cls(spec, enc, int(d["l_max"]), d.get("chunk_checksum"), dict(d.get("codec") or CODEC))
        if not spec.levels or spec.channels < 1 or out.l_max < 1:
            raise ValueError(f"output {spec.name}: levels, channels or l_max out of range")
        if np.dtype(str(d["dtype"])) != out.code_dtype:
            raise ValueError(f"output {spec.name}: dtype {d['dtype']} does not match its encoding")
        return out

    def identity(self) -> dict:
        return {"channels": self.channels, "levels": list(self.levels), "encoding": self.encoding.to_attrs()}


# --- header --------------------------------------------------------------------------


def _with_mirror(d: dict, teacher: dict) -> dict:
    """An output's attributes with its mirror rule: as recorded, or, in a store written before headers
    recorded one, the rule its teacher family's adapter declares (FCOS boxes swap l and r; without this,
    they would fall back to the deltas' dx negation)."""
    if "mirror" not in d:
        family = str((teacher.get("extra") or {}).get("family", ""))
        d["mirror"] = mirror_rule(family, str(d.get("name", "")))
        if not family and d.get("kind") == "deltas":
            # mmdet, factory and other teachers recorded no family: their box code (deltas, FCOS/GFL
            # distances?) is unknown, so such a store serves flips only from a stored hflip view.
            d["mirror"] = "none"
    return d


@dataclass
class StoreHeader:
    """Root attributes: everything that identifies a store and how to read it."""

    teacher: dict
    views: dict
    dataset: dict  # manifest_sha256, num_images, num_classes, ann_file
    precision: str
    images_per_shard: int
    outputs: dict[str, StoredOutput]
    levels: list[int]  # union of the outputs' levels; index/grid follows this order
    format_version: int = FORMAT_VERSION
    created_by: str = field(default="mtpd")

    @property
    def num_views(self) -> int:
        return len(self.views["views"])

    @property
    def view_names(self) -> tuple[str, ...]:
        return tuple(self.views["views"])

    @property
    def view_spec(self) -> ViewSpec:
        """The view recipe (resize, normalisation, padding) the teacher saw."""
        return ViewSpec.from_dict(self.views)

    @property
    def manifest_sha256(self) -> str:
        return str(self.dataset["manifest_sha256"])

    @property
    def ann_file(self) -> str:
        return str(self.dataset["ann_file"])

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
            "outputs": {name: o.to_attrs() for name, o in self.outputs.items()},
        }

    @classmethod
    def from_attrs(cls, attrs: dict, where: str) -> "StoreHeader":
        version = attrs.get("mtpd_format")
        if version is None:
            raise StoreError(
                f"{where}: not an mtpd store (no 'mtpd_format' attribute); build one with `mtpd-cache build`"
            )
        if version not in READABLE_FORMATS:
            raise StoreError(
                f"{where}: store format {version} but this mtpd reads formats "
                f"{', '.join(map(str, READABLE_FORMATS))}; rebuild the store with `mtpd-cache build` or upgrade mtpd"
            )
        try:
            header = cls(
                teacher=dict(attrs["teacher"]),
                views=dict(attrs["views"]),
                dataset=dict(attrs["dataset"]),
                precision=str(attrs["precision"]),
                images_per_shard=int(attrs["images_per_shard"]),
                outputs={
                    str(k): StoredOutput.from_attrs(_with_mirror(dict(v), attrs["teacher"]), int(version))
                    for k, v in attrs["outputs"].items()
                },
                levels=[int(x) for x in attrs["levels"]],
                format_version=int(version),
                created_by=str(attrs.get("created_by", "mtpd")),
            )
            header.validate()
        except EncodingError as e:
            raise StoreError(f"{where}: {e}") from None
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
        if not isinstance(self.views["views"], list):
            raise ValueError(f"views {self.views['views']!r} is not a list of views")
        ViewSpec.from_dict(self.views)  # a known name each (orig, hflip, the augment policy's bank views), no repeat
        for key in ("short", "long", "pad"):
            if int(self.views[key]) < 1:
                raise ValueError(f"views.{key} must be positive")
        for name, o in self.outputs.items():
            if o.name != name or not set(o.levels) <= set(self.levels):
                raise ValueError(f"output {name}: name or levels do not match the store's")

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
            "outputs": {k: v.identity() for k, v in self.outputs.items()},
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


def shard_checksum(blocks: dict[str, np.ndarray]) -> int:
    """64-bit blake2b over a shard's stored blocks, outputs in name order."""
    h = hashlib.blake2b(digest_size=8)
    for name in sorted(blocks):
        h.update(name.encode())
        h.update(np.ascontiguousarray(blocks[name]).tobytes())
    return int.from_bytes(h.digest(), "little")
