"""Low-bit encodings of features: per-channel affine integer codes and a low-rank channel projection
(PCA) with integer coefficients; see ``mtpd.cache.encoding`` for the interface."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from mtpd.cache.codes import Encoding, EncodingError


def pack(q: Tensor, bits: int) -> Tensor:
    """[..., C] integer codes < 2**bits -> [..., ceil(C*bits/8)] uint8, low bits first."""
    if bits == 8:
        return q.to(torch.uint8)
    per = 8 // bits
    c = q.shape[-1]
    pad = (-c) % per
    if pad:
        q = torch.nn.functional.pad(q, (0, pad))
    q = q.to(torch.uint8).reshape(*q.shape[:-1], -1, per)
    out = q[..., 0].clone()
    for j in range(1, per):
        out |= q[..., j] << (bits * j)
    return out


def unpack(p: Tensor, bits: int, channels: int) -> Tensor:
    """``pack``'s inverse: [..., packed] uint8 -> [..., channels] uint8 codes."""
    if bits == 8:
        return p
    per, mask = 8 // bits, (1 << bits) - 1
    parts = [(p >> (bits * j)) & mask for j in range(per)]
    return torch.stack(parts, dim=-1).reshape(*p.shape[:-1], -1)[..., :channels]


def _affine_codes(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Per-channel min/max codes of x [n, C]: (codes [n, C] uint8, side [2, C] = (min, step))."""
    levels = (1 << bits) - 1
    lo = x.amin(dim=0) if x.shape[0] else x.new_zeros(x.shape[1])
    hi = x.amax(dim=0) if x.shape[0] else x.new_zeros(x.shape[1])
    step = (hi - lo) / levels
    safe = torch.where(step > 0, step, torch.ones_like(step))
    q = torch.round((x - lo) / safe).clamp(0, levels)
    return q.to(torch.uint8), torch.stack([lo, step])


def _affine_values(q: Tensor, side: Tensor) -> Tensor:
    """codes [B, ..., C] and side [B, 2, C] -> values [B, ..., C]."""
    shape = (side.shape[0],) + (1,) * (q.dim() - 2) + (side.shape[-1],)
    return side[:, 0].reshape(shape) + q.float() * side[:, 1].reshape(shape)


@dataclass(frozen=True)
class Affine(Encoding):
    """Per-channel affine integer codes: each sample, level and channel gets its own (min, step),
    stored beside the codes as float32; ``bits`` 8, 4 or 2 (4 and 2 packed 2 and 4 per byte)."""

    kind: ClassVar[str] = "affine"
    code_dtype: ClassVar[str] = "uint8"
    zero_is_zero: ClassVar[bool] = False
    bits: int = 8

    def __post_init__(self) -> None:
        if self.bits not in (2, 4, 8):
            raise EncodingError(f"affine bits must be 2, 4 or 8, got {self.bits}")

    def params(self) -> dict:
        return {"bits": self.bits}

    def bound(self) -> str:
        return f"absolute error <= step/2 per value, step = channel range / {2**self.bits - 1} (per sample and level)"

    def code_channels(self, channels: int) -> int:
        return math.ceil(channels * self.bits / 8)

    def side_shape(self, channels: int) -> tuple[int, ...]:
        return (2, channels)

    def within_bound(self, x: Tensor, y: Tensor, level: int) -> bool:
        x, y = x.double(), y.double()
        step = (x.amax(0) - x.amin(0)) / (2**self.bits - 1)
        return bool(torch.all((y - x).abs() <= step / 2 * (1 + 1e-4) + 1e-5 * x.abs().amax(0) + 1e-7))

    def encode(self, x: Tensor, level: int) -> tuple[Tensor, Tensor]:
        q, side = _affine_codes(x.float(), self.bits)
        return pack(q, self.bits), side

    def decode(self, codes: Tensor, side: Tensor | None, level: int) -> Tensor:
        assert side is not None
        return _affine_values(unpack(codes, self.bits, side.shape[-1]), side)


def principal_axes(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Rows [n, C] -> (mean [C], variances [C] descending, orthonormal basis [C, C] with the matching columns,
    each column's largest entry positive: the same basis on every rebuild), float64 on the CPU. The per-store
    bases of ``pca``, ``transform`` and ``pq`` all come from here."""
    x = x.double().cpu()
    mean = x.mean(dim=0)
    xc = x - mean
    vals, vecs = torch.linalg.eigh(xc.T @ xc / max(1, x.shape[0] - 1))
    vals, vecs = vals.flip(0).clamp(min=0), vecs.flip(-1)
    sign = torch.sign(vecs.gather(0, vecs.abs().argmax(dim=0, keepdim=True)))
    return mean, vals, vecs * torch.where(sign == 0, 1.0, sign)


@dataclass(frozen=True)
class PCA(Encoding):
    """A low-rank channel projection: per level, a store-wide orthonormal basis [C, rank] and mean
    [C] fitted on a calibration sample; each cell keeps ``rank`` coefficients as per-sample affine
    integer codes (``bits``). Decoding is one matrix product on the training device.

    ``rank`` may be given as a divisor of the channel count (``rank_divisor``) in presets; the
    store records the concrete rank.
    """

    kind: ClassVar[str] = "pca"
    code_dtype: ClassVar[str] = "uint8"
    zero_is_zero: ClassVar[bool] = False
    needs_fit: ClassVar[bool] = True
    rank: int = 64
    bits: int = 8
    state: dict = field(default_factory=dict, compare=False, repr=False)  # "mean" [L, C], "basis" [L, C, rank]

    def __post_init__(self) -> None:
        if self.bits not in (2, 4, 8) or self.rank < 1:
            raise EncodingError(f"pca needs bits 2, 4 or 8 and rank >= 1, got bits={self.bits}, rank={self.rank}")

    def params(self) -> dict:
        return {"rank": self.rank, "bits": self.bits}

    def bound(self) -> str:
        return (
            "per cell, squared L2 error <= squared distance to the basis' span + sum over components of "
            "(step/2)^2 (the basis is orthonormal)"
        )

    def code_channels(self, channels: int) -> int:
        return math.ceil(self.rank * self.bits / 8)

    def side_shape(self, channels: int) -> tuple[int, ...]:
        return (2, self.rank)

    def fit(self, rows: list[Tensor]) -> dict[str, np.ndarray]:
        """Mean and top-``rank`` eigenvectors of each level's channel covariance (float64, signs fixed
        so that each vector's largest entry is positive: the same basis on every rebuild)."""
        means, bases = [], []
        for x in rows:
            if x.shape[1] < self.rank:
                raise EncodingError(f"pca rank {self.rank} exceeds the output's {x.shape[1]} channels")
            mean, _, basis = principal_axes(x)
            bases.append(basis[:, : self.rank].float().numpy())
            means.append(mean.float().numpy())
        return {"mean": np.stack(means), "basis": np.stack(bases)}

    def with_state(self, state: dict[str, np.ndarray]) -> "PCA":
        return replace(self, state={k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()})

    def _on(self, name: str, level: int, device: torch.device) -> Tensor:
        if not self.state:
            raise EncodingError("a PCA encoding used before its basis was fitted or read from the store")
        t = self.state[name][level]
        return t if t.device == device else t.to(device)

    def project(self, x: Tensor, level: int) -> Tensor:
        """Coefficients [n, rank] of rows x [n, C] (float32)."""
        return (x.float() - self._on("mean", level, x.device)) @ self._on("basis", level, x.device)

    def within_bound(self, x: Tensor, y: Tensor, level: int) -> bool:
        basis = self._on("basis", level, x.device).double()
        xc = x.double() - self._on("mean", level, x.device).double()
        coef = xc @ basis
        residual = (xc - coef @ basis.T).pow(2).sum(1)
        step = (coef.amax(0) - coef.amin(0)) / (2**self.bits - 1)
        err = (y.double() - x.double()).pow(2).sum(1)
        return bool(torch.all(err <= (residual + (step / 2).pow(2).sum()) * (1 + 1e-3) + 1e-6 * xc.pow(2).sum(1).max()))

    def encode(self, x: Tensor, level: int) -> tuple[Tensor, Tensor]:
        q, side = _affine_codes(self.project(x, level), self.bits)
        return pack(q, self.bits), side

    def decode(self, codes: Tensor, side: Tensor | None, level: int) -> Tensor:
        assert side is not None
        coef = _affine_values(unpack(codes, self.bits, self.rank), side)
        basis = self._on("basis", level, codes.device)
        return coef @ basis.T + self._on("mean", level, codes.device)
