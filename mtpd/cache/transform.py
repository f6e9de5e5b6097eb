"""Transform coding of features: every principal component kept, bits given to each by its variance.

``PCA`` keeps the top ``rank`` components at one width and drops the rest; from-scratch features are nearly
full-rank (62 of 64 components hold 99 % of the strong demo teacher's energy), so what PCA drops is much of
the signal. ``Transform`` is the rate-distortion answer for a fixed budget: rotate each cell onto the level's
principal axes (a store-wide orthonormal basis fitted on the calibration sample, as PCA's is), then give the
components widths of 8, 4, 2 or 0 bits by reverse water-filling on their variances (the widths that minimise
the expected squared error of Gaussian-optimal uniform quantisers within ``bits`` per value on average), and
code each coefficient with a mid-rise quantiser whose step is that width's Gaussian-optimal step times the
component's standard deviation, widened at calibration where the features' heavier tails err less so. The
scales are store-wide, so there are no side parameters: a row costs exactly
``ceil(C · bits / 8)`` bytes. Decoding is a table lookup and one matrix product on the training device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from mtpd.cache.codes import Encoding, EncodingError
from mtpd.cache.lowbit import pack, principal_axes, unpack

WIDTHS = (8, 4, 2)  # bits a component may get (packed 1, 2 and 4 per byte), besides 0
# Step (in standard deviations) and mean squared error (in variances) of the optimal uniform quantiser of a
# unit Gaussian with 2**b levels (Max, "Quantizing for minimum distortion", 1960, for 2 and 4 bits; 8 bits by
# the high-rate approximation). The widths' allocation uses them; the steps are then fitted to the data.
STEP = {2: 0.9957, 4: 0.3352, 8: 0.0308}
MSE = {0: 1.0, 2: 0.1188, 4: 0.01154, 8: 0.0000846}


LOADING = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0)  # step multiples tried at calibration (heavy tails want wider steps)


def codes(z: Tensor, step: Tensor, width: int) -> Tensor:
    """Mid-rise uniform quantiser with 2**width levels: coefficients [n, k] -> codes 0 .. 2**width - 1 (float)."""
    half = 2 ** (width - 1)
    safe = torch.where(step > 0, step, torch.ones_like(step))
    return (torch.floor(z / safe) + half).clamp(0, 2 * half - 1)


def values(q: Tensor, step: Tensor, width: int) -> Tensor:
    """``codes``' reconstructions: the middle of each code's interval."""
    return (q - 2 ** (width - 1) + 0.5) * step


def _steps(z: Tensor, widths: tuple[int, int, int]) -> np.ndarray:
    """Per component [C]: the step, among ``LOADING`` multiples of the Gaussian-optimal one, with the least squared
    error on the calibration coefficients ``z`` [n, C] (0 for components given no bits)."""
    std = z.pow(2).mean(0).sqrt()
    out, start = torch.zeros(z.shape[1], dtype=torch.float64), 0
    for width, count in zip(WIDTHS, widths):
        if count:
            zs, base = z[:, start : start + count], std[start : start + count] * STEP[width]
            errs = torch.stack(
                [(values(codes(zs, base * m, width), base * m, width) - zs).pow(2).sum(0) for m in LOADING]
            )
            out[start : start + count] = base * torch.tensor(LOADING, dtype=torch.float64)[errs.argmin(0)]
        start += count
    return out.float().numpy()


def allocate(variances: np.ndarray, budget: int) -> tuple[int, int, int]:
    """(n8, n4, n2): the components (by descending variance) coded at 8, 4 and 2 bits in ``budget`` bytes per
    row that minimise the expected squared error; widths never increase down the spectrum, n4 is even and n2
    a multiple of 4 so that every byte holds components of one width."""
    lam = np.sort(np.asarray(variances, dtype=np.float64))[::-1]
    c = len(lam)
    total = np.concatenate([[0.0], np.cumsum(lam)])  # total[k] = variance of the top k components
    best, pick = math.inf, (0, 0, 0)
    for n8 in range(min(budget, c) + 1):
        for n4 in range(0, min(2 * (budget - n8), c - n8) + 1, 2):
            n2 = min(4 * (budget - n8 - n4 // 2), c - n8 - n4)
            n2 -= n2 % 4
            a, b, d = n8, n8 + n4, n8 + n4 + n2
            err = MSE[8] * total[a] + MSE[4] * (total[b] - total[a]) + MSE[2] * (total[d] - total[b])
            err += total[c] - total[d]
            if err < best - 1e-12 * total[c]:
                best, pick = err, (n8, n4, n2)
    return pick


@dataclass(frozen=True)
class Transform(Encoding):
    """Transform coding at ``bits`` per value on average (see the module docstring): per level, a mean [C], an
    orthonormal basis [C, C] (columns by descending variance) and each component's quantiser step, fitted at
    calibration; the widths (how many components at 8, 4 and 2 bits) are shared by the levels, chosen on their
    pooled spectrum."""

    kind: ClassVar[str] = "transform"
    code_dtype: ClassVar[str] = "uint8"
    zero_is_zero: ClassVar[bool] = False
    needs_fit: ClassVar[bool] = True
    bits: float = 2.0
    state: dict = field(default_factory=dict, compare=False, repr=False)  # mean, basis, step [L, ...]; widths [3]

    def __post_init__(self) -> None:
        if not 0.25 <= self.bits <= 8:
            raise EncodingError(f"transform bits (average per value) must be in [0.25, 8], got {self.bits}")

    def params(self) -> dict:
        return {"bits": self.bits}

    def bound(self) -> str:
        return (
            "per principal component, |error| <= step/2 inside the quantiser's range (a store-wide step per "
            "component, fitted at calibration), the excess beyond it outside; components given 0 bits: their whole "
            "value"
        )

    def code_channels(self, channels: int) -> int:
        return max(1, math.ceil(channels * self.bits / 8))

    def fit(self, rows: list[Tensor]) -> dict[str, np.ndarray]:
        """Per level: mean and eigenvectors of the channel covariance by descending eigenvalue (float64, each
        vector's largest entry positive: the same basis on every rebuild); the widths, from the levels' spectra
        pooled by their cell counts; then each coded component's step: the Gaussian-optimal step for its width
        and std, widened where the calibration rows' own tails make a wider one err less (``LOADING``)."""
        means, bases, coefs, pooled, cells = [], [], [], 0.0, 0
        for x in rows:
            mean, vals, vecs = principal_axes(x)
            xc = x.double().cpu() - mean
            bases.append(vecs.float().numpy())
            means.append(mean.float().numpy())
            coefs.append(xc @ vecs)
            pooled = pooled + vals.numpy() * x.shape[0]
            cells += x.shape[0]
        widths = allocate(np.asarray(pooled) / max(1, cells), self.code_channels(rows[0].shape[1]))
        steps = np.stack([_steps(z, widths) for z in coefs])
        return {"mean": np.stack(means), "basis": np.stack(bases), "step": steps, "widths": np.array(widths)}

    def with_state(self, state: dict[str, np.ndarray]) -> "Transform":
        return replace(self, state={k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()})

    def _on(self, name: str, level: int | None, device: torch.device) -> Tensor:
        if not self.state:
            raise EncodingError("a transform encoding used before its basis was fitted or read from the store")
        t = self.state[name] if level is None else self.state[name][level]
        return t if t.device == device else t.to(device)

    def _layout(self, level: int, device: torch.device) -> list[tuple[int, int, int, Tensor]]:
        """(width, first component, count, steps [count]) of each coded group, in the row's byte order."""
        n = [int(v) for v in self.state["widths"]]
        step, out, start = self._on("step", level, device), [], 0
        for width, count in zip(WIDTHS, n):
            if count:
                out.append((width, start, count, step[start : start + count]))
            start += count
        return out

    def coefficients(self, x: Tensor, level: int) -> Tensor:
        """Rows [n, C] on the level's principal axes (float32)."""
        return (x.float() - self._on("mean", level, x.device)) @ self._on("basis", level, x.device)

    def encode(self, x: Tensor, level: int) -> tuple[Tensor, None]:
        z = self.coefficients(x, level)
        parts = []
        for width, start, count, step in self._layout(level, z.device):
            parts.append(pack(codes(z[:, start : start + count], step, width).to(torch.uint8), width))
        row = torch.cat(parts, dim=1) if parts else z.new_zeros(z.shape[0], 0, dtype=torch.uint8)
        width = self.code_channels(x.shape[1])
        if row.shape[1] < width:  # the allocation may leave bytes unused: zero codes, never read
            row = torch.nn.functional.pad(row, (0, width - row.shape[1]))
        return row, None

    def decode(self, codes: Tensor, side: Tensor | None, level: int) -> Tensor:
        basis = self._on("basis", level, codes.device)
        z = torch.zeros(*codes.shape[:-1], basis.shape[0], device=codes.device)
        byte = 0
        for width, start, count, step in self._layout(level, codes.device):
            nbytes = count * width // 8
            q = unpack(codes[..., byte : byte + nbytes], width, count).float()
            z[..., start : start + count] = values(q, step, width)
            byte += nbytes
        return z @ basis.T + self._on("mean", level, codes.device)

    def within_bound(self, x: Tensor, y: Tensor, level: int) -> bool:
        z = self.coefficients(x, level).double()
        zy = self.coefficients(y, level).double()
        allowed = z.abs().clone()  # components given 0 bits decode to 0
        for width, start, count, step in self._layout(level, x.device):
            s = step.double()
            edge = (2 ** (width - 1) - 0.5) * s  # the outermost reconstruction value
            a = z[:, start : start + count].abs()
            allowed[:, start : start + count] = torch.maximum(s / 2, a - edge)
        tol = 1e-4 * z.abs().amax().clamp(min=1e-6) + 1e-5
        return bool(torch.all((zy - z).abs() <= allowed * (1 + 1e-4) + tol))
