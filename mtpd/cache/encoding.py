"""How stored values are coded: one small class per encoding, with its parameters, its stated error
bound, ``encode`` and ``decode``.

Both directions are torch functions that run wherever their input lies: the builder encodes on the
teacher's device before the device-to-host copy (a GPU build's host only compresses small integer
arrays), and the trainer decodes on its own device (DataLoader workers hand over the codes).

Shapes. ``encode`` takes one level of one sample as cell-major rows ``x`` [n, C] (float32) and
returns ``(codes [n, code_channels], side)``: ``side`` is the per-sample, per-level parameters
(``side_shape``, float32) stored beside the codes, or None. ``decode`` takes codes [B, ..., code
channels] and side [B, *side_shape] and returns [B, ..., C] float32. ``level`` indexes the output's
levels: encodings with per-store state (a PCA basis) keep one per level, fitted by ``fit`` on a
calibration sample before any shard is written and stored in the store (``state``/``with_state``).

A zero code is what the padding of a stored row and of a batch holds; ``zero_is_zero`` says
whether it decodes to 0 (otherwise the trainer zeroes padded cells after decoding).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from mtpd.cache.codes import (
    FP16_MAX,
    LOGPROB_MIN,
    Encoding,
    EncodingError,
    Fp16,
    LogProbU8,
    TopK,
    bitround,
    logprob_logits,
)
from mtpd.cache.lowbit import PCA, Affine, pack, unpack
from mtpd.cache.pq import ProductQuantizer
from mtpd.cache.transform import Transform

__all__ = [
    "ENCODINGS",
    "FP16_MAX",
    "LOGPROB_MIN",
    "PCA",
    "Affine",
    "Encoding",
    "EncodingError",
    "Fp16",
    "LogProbU8",
    "ProductQuantizer",
    "TopK",
    "Transform",
    "bitround",
    "encoding_from_attrs",
    "encoding_from_v1",
    "logprob_logits",
    "pack",
    "unpack",
]

ENCODINGS: dict[str, type[Encoding]] = {
    cls.kind: cls for cls in (Fp16, LogProbU8, Affine, PCA, TopK, Transform, ProductQuantizer)
}


def encoding_from_attrs(d: dict) -> Encoding:
    """The Encoding of a format-2 output's ``encoding`` attribute."""
    if not isinstance(d, dict) or d.get("kind") not in ENCODINGS:
        kind = d.get("kind") if isinstance(d, dict) else d
        raise EncodingError(
            f"unknown encoding {kind!r} (this mtpd knows {', '.join(ENCODINGS)}); the store needs a newer mtpd"
        )
    cls = ENCODINGS[d["kind"]]
    params = {k: v for k, v in d.items() if k != "kind"}
    types = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    try:
        unknown = sorted(set(params) - fields)
        if unknown:
            raise TypeError(f"unknown parameter(s) {', '.join(unknown)}")
        return cls(**{k: _typed(k, v, types[k]) for k, v in params.items()})
    except (TypeError, ValueError) as e:
        raise EncodingError(f"encoding {d!r}: {e}") from None


def _typed(name: str, value: Any, hint: Any) -> Any:
    """``value`` as the field's type says (JSON keeps ints, floats, booleans and strings apart; a value of
    another type is an error, not a silent cast): int, float, bool, str, or None where the field allows it."""
    args = typing.get_args(hint) or (hint,)
    if value is None and type(None) in args:
        return None
    for t in (bool, int, float, str):  # bool before int: True is an int to isinstance
        if t in args:
            if t is float and isinstance(value, int) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, t) and not (t is int and isinstance(value, bool)):
                return value
    raise TypeError(f"{name}={value!r} is not {' or '.join(getattr(a, '__name__', str(a)) for a in args)}")


def encoding_from_v1(name: str) -> Encoding:
    """Format-1 stores named their encoding in a string: read them as the same codes."""
    if name == "fp16":
        return Fp16()
    if name == "logprob-uint8":
        return LogProbU8()
    if name.startswith("fp16-bitround") and name[len("fp16-bitround") :].isdigit():
        return Fp16(int(name[len("fp16-bitround") :]))
    raise EncodingError(f"unknown format-1 encoding {name!r}; rebuild the store with `mtpd-cache build`")
