"""Product quantisation of features: each cell's channels cut into sub-vectors, each sub-vector stored as the
index (one byte) of its nearest codeword in a per-store, per-level codebook fitted at calibration.

A scalar code spends its bits on every value alone; a vector code places its 256 codewords where a level's
cells actually lie, so correlated channels and heavy tails cost less than the grid of a uniform quantiser
(Jégou et al., "Product quantization for nearest neighbor search", 2011). ``bits`` per value on average gives
``ceil(C · bits / 8)`` sub-quantisers of ``C / M`` channels each (M must divide C). With ``rotate`` the cells
are first turned onto the level's principal axes (the transform code's basis) and the components dealt to the
sub-vectors in turn, so every sub-vector holds a like share of the variance and few correlations cross
sub-vectors. The codebooks are k-means centroids from ``faiss``, fitted at calibration; encoding is a
nearest-codeword search (faiss's on a CPU, torch's on a GPU) and decoding a gather and one matrix product in
torch, on whatever device the codes lie. Rows cost exactly M bytes; there are no side parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from mtpd.cache.codes import Encoding, EncodingError
from mtpd.cache.lowbit import principal_axes

CODEWORDS = 256  # one byte per sub-vector
KMEANS_ITERS = 25
KMEANS_SEED = 1234  # fixed: a rebuild on the same machine fits the same codebooks
SEARCH_ROWS = 4096  # rows per nearest-codeword search (bounds the [rows, M, 256] distance block)


def _faiss():
    try:
        import faiss
    except ImportError:
        raise EncodingError(
            "product quantisation fits its codebooks with faiss: pip install faiss-cpu (or mtpd[codes])"
        ) from None
    return faiss


def subvectors(channels: int, bits: float) -> int:
    """Sub-vectors (bytes per row) of ``channels`` values at ``bits`` each on average; 1e-9 absorbs float error in
    ``bits`` given as a ratio (0.8 = 8 / 10 classes: one byte per anchor, not two)."""
    return max(1, math.ceil(channels * bits / 8 - 1e-9))


def _faiss_codes(z: Tensor, book: Tensor) -> Tensor | None:
    """Nearest codewords of CPU sub-vectors [n, M, d] by faiss (its fused search is ~60x faster on a CPU than the
    distance tensor torch must build; the same nearest codeword), or None without faiss."""
    try:
        import faiss
    except ImportError:
        return None
    m, k, d = book.shape
    pq = faiss.ProductQuantizer(m * d, m, 8)
    faiss.copy_array_to_vector(np.ascontiguousarray(book.numpy(), dtype=np.float32).ravel(), pq.centroids)
    return torch.from_numpy(pq.compute_codes(np.ascontiguousarray(z.reshape(z.shape[0], -1).numpy())))


@dataclass(frozen=True)
class ProductQuantizer(Encoding):
    """PQ at ``bits`` per value on average (see the module docstring): per level a mean [C], a rotation [C, C]
    (identity without ``rotate``; its columns already in sub-vector order) and codebooks [M, 256, C/M]."""

    kind: ClassVar[str] = "pq"
    code_dtype: ClassVar[str] = "uint8"
    zero_is_zero: ClassVar[bool] = False
    needs_fit: ClassVar[bool] = True
    bits: float = 2.0
    rotate: bool = True
    state: dict = field(default_factory=dict, compare=False, repr=False)  # mean, rotation, codebook [L, ...]

    def __post_init__(self) -> None:
        if not 0.01 <= self.bits <= 8:  # 0.1: one byte per anchor of 80 classes
            raise EncodingError(f"pq bits (average per value) must be in [0.01, 8], got {self.bits}")

    def params(self) -> dict:
        return {"bits": self.bits, "rotate": self.rotate}

    def bound(self) -> str:
        return (
            "per sub-vector, the error is the distance to its nearest codeword (the codebook fitted per store and "
            "level at calibration); no bound in the values' units"
        )

    def code_channels(self, channels: int) -> int:
        m = subvectors(channels, self.bits)
        if channels % m:
            fits = [b for b in (0.25, 0.5, 1, 2, 4, 8) if channels % subvectors(channels, b) == 0]
            raise EncodingError(
                f"pq bits={self.bits} cuts {channels} channels into {m} sub-vectors, which does not divide them; "
                f"choose bits from {fits}"
            )
        return m

    def fit(self, rows: list[Tensor]) -> dict[str, np.ndarray]:
        """Per level: mean, rotation, and k-means codebooks of each sub-vector (faiss, fixed seed). A level with
        fewer calibration cells than codewords keeps every cell as a codeword and repeats the last."""
        faiss = _faiss()
        c = rows[0].shape[1]
        m = self.code_channels(c)
        means, rots, books = [], [], []
        for j, x in enumerate(rows):
            x = x.float().cpu()
            if x.shape[0] == 0:
                raise EncodingError(f"pq: level {j} has no calibration cells to fit a codebook on")
            if self.rotate and x.shape[0] > 1:
                mean, _, basis = principal_axes(x)
                mean, basis = mean.float(), basis.float()
                order = torch.arange(c).view(c // m, m).T.reshape(-1)  # component i -> sub-vector i mod M
                rot = basis[:, order]
            else:
                mean, rot = x.mean(dim=0), torch.eye(c)
            z = ((x - mean) @ rot).view(-1, m, c // m)
            book = np.zeros((m, CODEWORDS, c // m), dtype=np.float32)
            k = min(CODEWORDS, z.shape[0])
            for j in range(m):
                sub = np.ascontiguousarray(z[:, j].numpy(), dtype=np.float32)
                if z.shape[0] <= CODEWORDS:
                    cent = sub
                else:  # min_points_per_centroid=1: small calibration samples are expected, not worth a warning
                    km = faiss.Kmeans(
                        c // m, k, niter=KMEANS_ITERS, seed=KMEANS_SEED, verbose=False, min_points_per_centroid=1
                    )
                    km.train(sub)
                    cent = km.centroids
                book[j, :k] = cent
                book[j, k:] = cent[-1]
            means.append(mean.numpy())
            rots.append(rot.numpy())
            books.append(book)
        return {"mean": np.stack(means), "rotation": np.stack(rots), "codebook": np.stack(books)}

    def with_state(self, state: dict[str, np.ndarray]) -> "ProductQuantizer":
        return replace(self, state={k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()})

    def _on(self, name: str, level: int, device: torch.device) -> Tensor:
        if not self.state:
            raise EncodingError("a pq encoding used before its codebooks were fitted or read from the store")
        t = self.state[name][level]
        return t if t.device == device else t.to(device)

    def subvectors(self, x: Tensor, level: int) -> Tensor:
        """Rows [n, C] -> rotated sub-vectors [n, M, C/M] (float32)."""
        rot = self._on("rotation", level, x.device)
        m = self._on("codebook", level, x.device).shape[0]
        return ((x.float() - self._on("mean", level, x.device)) @ rot).view(x.shape[0], m, -1)

    def _distances(self, z: Tensor, level: int) -> Tensor:
        """Squared distances [n, M, 256] of sub-vectors [n, M, d] to their codebooks."""
        book = self._on("codebook", level, z.device)  # [M, K, d]
        return (z.pow(2).sum(-1, keepdim=True) - 2 * torch.einsum("nmd,mkd->nmk", z, book)) + book.pow(2).sum(-1)

    def encode(self, x: Tensor, level: int) -> tuple[Tensor, None]:
        z = self.subvectors(x, level)
        if z.device.type == "cpu":
            codes = _faiss_codes(z, self._on("codebook", level, z.device))
            if codes is not None:
                return codes, None
        out = torch.empty(z.shape[:2], dtype=torch.uint8, device=z.device)
        for i in range(0, z.shape[0], SEARCH_ROWS):
            out[i : i + SEARCH_ROWS] = self._distances(z[i : i + SEARCH_ROWS], level).argmin(-1).to(torch.uint8)
        return out, None

    def decode(self, codes: Tensor, side: Tensor | None, level: int) -> Tensor:
        book = self._on("codebook", level, codes.device)  # [M, K, d]
        m, k, d = book.shape
        # One gather from the flat [M*K, d] table and one fused product: on a CPU thread about 1.5x faster than
        # indexing [M, K, d] by (sub-vector, code) pairs and adding the mean after the product.
        idx = codes.reshape(-1, m).long() + torch.arange(0, m * k, k, device=codes.device)
        z = book.reshape(m * k, d).index_select(0, idx.reshape(-1)).view(idx.shape[0], m * d)
        rot = self._on("rotation", level, codes.device)
        y = torch.addmm(self._on("mean", level, codes.device), z, rot.T)
        return y.reshape(*codes.shape[:-1], rot.shape[0])

    def within_bound(self, x: Tensor, y: Tensor, level: int) -> bool:
        """Every sub-vector of ``y`` is a nearest codeword of ``x``'s: its squared distance to ``x`` is the least
        over the codebook, in float64, to a tolerance per sub-vector for the float32 rounding of the decode and of
        projecting ``y`` back, so one sub-vector decoded to its second-nearest codeword fails.

        That rounding moves each projected sub-vector by up to ``kappa`` ~ sqrt(C) float32 ulps of the whole
        row's norm (measured: 1.7 ulps at C = 256), not of the sub-vector's: a low-energy principal component's
        sub-vector of a large row (RetinaNet-R50's, with its offset) moves by more than its own scale. Its squared
        distance then moves by at most 2 kappa |codeword - x| + kappa^2."""
        z, zy = self.subvectors(x, level).double(), self.subvectors(y, level).double()
        book = self._on("codebook", level, z.device).double()
        mean = self._on("mean", level, z.device).double()
        err = (zy - z).pow(2).sum(-1)  # [n, M]
        ulp = 2.0**-23 * math.sqrt(x.shape[-1])
        kappa = ulp * (y.double().pow(2).sum(-1) + x.double().pow(2).sum(-1) + mean.pow(2).sum()).sqrt()  # [n]
        for i in range(0, z.shape[0], SEARCH_ROWS):
            zi, ki = z[i : i + SEARCH_ROWS], kappa[i : i + SEARCH_ROWS, None]
            d2 = zi.pow(2).sum(-1, keepdim=True) - 2 * torch.einsum("nmd,mkd->nmk", zi, book) + book.pow(2).sum(-1)
            nearest = d2.clamp(min=0).amin(-1)
            tol = 1e-5 * (zi.pow(2).sum(-1) + zy[i : i + SEARCH_ROWS].pow(2).sum(-1)) + 1e-9
            tol = tol + 2 * ki * nearest.sqrt() + ki.square()
            if not bool(torch.all(err[i : i + SEARCH_ROWS] <= nearest + tol)):
                return False
        return True
