"""The encodings of float values and class scores (float16 with optional BitRound, uint8 log-probabilities,
sparse top-k scores) and the ``Encoding`` interface every encoding follows: see ``mtpd.cache.encoding``."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from mtpd.errors import MtpdError

FP16_MAX = 65504.0
# log(p) of the smallest probability the uint8 code keeps; code 0 means p <= 1e-4.
LOGPROB_MIN = math.log(1e-4)


class EncodingError(MtpdError, ValueError):
    """Encoding attributes this mtpd cannot read; the message says what to do."""


@dataclass(frozen=True)
class Encoding(ABC):
    """The interface of every encoding; defaults: codes as wide as the values, no side parameters, no state."""

    kind: ClassVar[str] = ""
    code_dtype: ClassVar[str] = "float16"
    zero_is_zero: ClassVar[bool] = True
    needs_fit: ClassVar[bool] = False

    def params(self) -> dict:
        return {}

    def to_attrs(self) -> dict:
        return {"kind": self.kind, **self.params()}

    def describe(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in self.params().items())
        return f"{self.kind}({args})" if args else self.kind

    def code_channels(self, channels: int) -> int:
        return channels

    def side_shape(self, channels: int) -> tuple[int, ...] | None:
        return None

    @abstractmethod
    def bound(self) -> str:
        """The stated error bound, in words (tests check each encoding against its own)."""

    @abstractmethod
    def within_bound(self, x: Tensor, y: Tensor, level: int) -> bool:
        """Whether ``y`` (decoded, [n, C]) is within the stated bound of the original rows ``x`` [n, C]."""

    @abstractmethod
    def encode(self, x: Tensor, level: int) -> tuple[Tensor, Tensor | None]:
        """Rows [n, C] of one level -> (codes [n, code_channels], side parameters or None)."""

    @abstractmethod
    def decode(self, codes: Tensor, side: Tensor | None, level: int) -> Tensor:
        """Codes [B, ..., code_channels] and side [B, ...] -> values [B, ..., C] float32."""

    # Per-store state (PCA bases): none by default.
    def fit(self, rows: list[Tensor]) -> dict[str, np.ndarray]:
        return {}

    def with_state(self, state: dict[str, np.ndarray]) -> "Encoding":
        return self


def _half(x: Tensor) -> Tensor:
    return x.float().clamp(-FP16_MAX, FP16_MAX).half()


def bitround(h: Tensor, keepbits: int) -> Tensor:
    """Round float16 values to ``keepbits`` of fp16's 10 mantissa bits (round half to even).

    Zeroed low bits make the bit-shuffled stream far more compressible; the relative error
    per value is at most 2**-(keepbits+1). Rounding may carry into the exponent: that is the
    correctly rounded value.
    """
    if not 0 < keepbits < 10:
        raise EncodingError(f"keepbits must be in 1..9 for fp16, got {keepbits}")
    u = h.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    drop = 10 - keepbits
    lsb = (u >> drop) & 1
    rounded = (u + ((1 << (drop - 1)) - 1) + lsb) & ~((1 << drop) - 1) & 0xFFFF
    return rounded.to(torch.int16).view(torch.float16)


@dataclass(frozen=True)
class Fp16(Encoding):
    """float16, optionally BitRound-ed to ``keepbits`` mantissa bits; decoding is a cast."""

    kind: ClassVar[str] = "fp16"
    keepbits: int | None = None

    def params(self) -> dict:
        return {} if self.keepbits is None else {"keepbits": self.keepbits}

    def bound(self) -> str:
        return f"relative error <= {self.rel_bound():.3g} per value (fp16's normal range)"

    def rel_bound(self) -> float:
        """The fp16 cast's half ulp, then BitRound's half step (each relative to its input)."""
        cast = 2.0**-11
        return cast if self.keepbits is None else (1 + cast) * (1 + 2.0 ** -(self.keepbits + 1)) - 1

    def within_bound(self, x: Tensor, y: Tensor, level: int) -> bool:
        # Below fp16's normal range (6.1e-5) precision is absolute: half a subnormal step (2^-24),
        # which BitRound widens by the dropped bits.
        floor = 2.0**-25 + (0.0 if self.keepbits is None else 2.0 ** (-24 + 10 - self.keepbits - 1))
        x = x.double().clamp(-FP16_MAX, FP16_MAX)
        return bool(torch.all((y.double() - x).abs() <= self.rel_bound() * x.abs() * (1 + 1e-6) + floor))

    def encode(self, x: Tensor, level: int) -> tuple[Tensor, None]:
        h = _half(x)
        return (h if self.keepbits is None else bitround(h, self.keepbits)), None

    def decode(self, codes: Tensor, side: Tensor | None, level: int) -> Tensor:
        return codes.float()


@dataclass(frozen=True)
class LogProbU8(Encoding):
    """Class logits as uint8 codes of log(sigmoid(x)) over [log 1e-4, 0]; decodes to logits.

    A code's value depends on the code alone, so decoding is one lookup in a 256-entry table.
    """

    kind: ClassVar[str] = "logprob-u8"
    code_dtype: ClassVar[str] = "uint8"
    zero_is_zero: ClassVar[bool] = False

    def bound(self) -> str:
        return f"relative error <= {self.prob_bound():.4f} per probability above 1e-4"

    @staticmethod
    def prob_bound() -> float:
        return math.expm1(-LOGPROB_MIN / 255.0 / 2.0)

    def within_bound(self, x: Tensor, y: Tensor, level: int) -> bool:
        p, p_hat = torch.sigmoid(x.double()), torch.sigmoid(y.double())
        floor = math.exp(LOGPROB_MIN)
        above = p > floor * 1.05  # at the floor: anything at or below it
        ok_above = ((p_hat - p).abs() / p)[above] <= self.prob_bound() * 1.001 + 1e-6
        return bool(torch.all(ok_above) and torch.all(p_hat[~above] <= floor * 1.06))

    def encode(self, x: Tensor, level: int) -> tuple[Tensor, None]:
        logp = torch.nn.functional.logsigmoid(x.float())
        q = torch.round((logp - LOGPROB_MIN) / -LOGPROB_MIN * 255.0)
        return q.clamp(0, 255).to(torch.uint8), None

    def decode(self, codes: Tensor, side: Tensor | None, level: int) -> Tensor:
        return _logprob_table(codes.device)[codes.long()]


_TABLES: dict[torch.device, Tensor] = {}


def logprob_logits(q: np.ndarray) -> np.ndarray:
    """Logits of uint8 log-probability codes (float32, in numpy: the table's one definition)."""
    logp = LOGPROB_MIN * (1.0 - q.astype(np.float32) / 255.0)
    # Code 255 is p = 1; cap at the same distance from 1 as the floor is from 0.
    p = np.minimum(np.exp(logp), 1.0 - math.exp(LOGPROB_MIN))
    return (logp - np.log1p(-p)).astype(np.float32)


def _logprob_table(device: torch.device) -> Tensor:
    if device not in _TABLES:
        _TABLES[device] = torch.from_numpy(logprob_logits(np.arange(256, dtype=np.uint8))).to(device)
    return _TABLES[device]


@dataclass(frozen=True)
class TopK(Encoding):
    """Sparse class scores: in each of a cell's ``groups`` (its anchors), the ``k`` largest of the group's
    logits as (class, LogProbU8 code) pairs; every other score decodes to the code's floor (p = 1e-4).
    The soft-label form that caches of trained classifiers keep, per anchor: for a trained detector
    most scores sit below the floor, and an anchor's few classes above it are the ones kept."""

    kind: ClassVar[str] = "topk"
    code_dtype: ClassVar[str] = "uint16"  # class indices of any class count
    zero_is_zero: ClassVar[bool] = False
    k: int = 2
    channels: int = 0
    groups: int = 1

    def __post_init__(self) -> None:
        if self.groups < 1 or self.channels % self.groups or not 1 <= self.k <= self.channels // self.groups:
            raise EncodingError(f"topk needs 1 <= k <= channels / groups, got {self.params()}")

    def params(self) -> dict:
        return {"k": self.k, "channels": self.channels, "groups": self.groups}

    def bound(self) -> str:
        return (
            f"the {self.k} largest scores of each of a cell's {self.groups} anchor(s) as logprob-u8 (relative error "
            f"<= {LogProbU8.prob_bound():.4f} per probability above 1e-4); the others decode to p = 1e-4"
        )

    def code_channels(self, channels: int) -> int:
        return 2 * self.k * self.groups

    def _grouped(self, x: Tensor) -> Tensor:
        return x.reshape(*x.shape[:-1], self.groups, self.channels // self.groups)

    def within_bound(self, x: Tensor, y: Tensor, level: int) -> bool:
        gx = self._grouped(x)
        top = torch.zeros_like(gx, dtype=torch.bool).scatter_(-1, gx.topk(self.k, dim=-1).indices, True)
        top = top.reshape(x.shape)
        floor = float(_logprob_table(y.device)[0])
        kept = LogProbU8().within_bound(x[top], y[top], level)
        return kept and bool(torch.all(y[~top] == floor))

    def encode(self, x: Tensor, level: int) -> tuple[Tensor, None]:
        values, idx = self._grouped(x.float()).topk(self.k, dim=-1)
        codes, _ = LogProbU8().encode(values, level)
        pairs = torch.cat([idx, codes.long()], dim=-1)  # [..., groups, 2k]
        return pairs.reshape(*x.shape[:-1], -1).to(torch.int32).to(torch.uint16), None

    def decode(self, codes: Tensor, side: Tensor | None, level: int) -> Tensor:
        table = _logprob_table(codes.device)
        pairs = codes.reshape(*codes.shape[:-1], self.groups, 2 * self.k).long()
        shape = (*codes.shape[:-1], self.groups, self.channels // self.groups)
        out = table[0].expand(shape).clone().scatter_(-1, pairs[..., : self.k], table[pairs[..., self.k :]])
        return out.reshape(*codes.shape[:-1], self.channels)
