"""Epoch-seeded sampling that can start mid-epoch (resume) and split across ranks (DDP)."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    """A permutation fixed by (seed, epoch); rank r takes every world-th index.

    ``set_epoch(e, start)`` skips the first ``start`` indices of this rank's
    share, so a resumed stage sees exactly the batches it had not seen.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True) -> None:
        self.n, self.seed, self.rank, self.world, self.shuffle = n, seed, rank, world, shuffle
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        # Pad so every rank gets the same count, as DistributedSampler does.
        per_rank = -(-self.n // self.world)
        order += order[: per_rank * self.world - self.n]
        return order[self.rank :: self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start :])

    def __len__(self) -> int:
        return -(-self.n // self.world) - self.start


class MixSampler(Sampler[int]):
    """Batches of ``n_lab`` labelled and ``n_pool`` pool samples, for a ``MixedDataset`` (labelled indices first).

    With labelled images an epoch is one pass over them in a (seed, epoch) permutation, ``per_lab`` a batch; each
    batch adds ``per_pool`` images of the pool, taken in order from a stream of (seed, cycle) permutations of it
    that runs on across epochs, so every pool image comes once before any comes twice. With no labelled share an
    epoch is one pass over the pool. Every batch is full (the last wraps round). Batch b of an epoch goes to rank
    b % world (ranks pad to the same count); ``set_epoch(e, start)`` skips ``start`` indices of this rank's share,
    as ``EpochSampler`` does.
    """

    def __init__(
        self, n_lab: int, n_pool: int, per_lab: int, per_pool: int, seed: int, rank: int = 0, world: int = 1
    ) -> None:
        if per_lab and not n_lab or per_pool and not n_pool:
            raise ValueError(f"a share of an empty set: {per_lab} of {n_lab} labelled, {per_pool} of {n_pool} pool")
        self.n_lab, self.n_pool, self.per_lab, self.per_pool = n_lab, n_pool, per_lab, per_pool
        self.seed, self.rank, self.world = seed, rank, world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def iters(self) -> int:
        """Batches per epoch over all ranks."""
        return -(-self.n_lab // self.per_lab) if self.per_lab else -(-self.n_pool // self.per_pool)

    def _perm(self, n: int, key: int) -> list[int]:
        g = torch.Generator()
        g.manual_seed(key)
        return torch.randperm(n, generator=g).tolist()

    def _pool(self, first: int, count: int) -> list[int]:
        """Positions ``first .. first+count-1`` of the pool's stream, as MixedDataset indices."""
        out, cycles = [], {}
        for q in range(first, first + count):
            c = q // self.n_pool
            if c not in cycles:
                cycles[c] = self._perm(self.n_pool, (self.seed + 1) * 100003 + c)
            out.append(self.n_lab + cycles[c][q % self.n_pool])
        return out

    def _batches(self) -> list[list[int]]:
        """This epoch's batches, all full: the last wraps round to the epoch's first indices (as ranks pad), so a
        DataLoader grouping this rank's indices by the batch size cuts exactly these batches."""
        iters = self.iters()
        if not self.per_lab:  # the pool alone: one pass over it per epoch
            order = [self.n_lab + i for i in self._perm(self.n_pool, (self.seed + 1) * 100003 + self.epoch)]
            order *= -(-iters * self.per_pool // len(order))
            return [order[b * self.per_pool : (b + 1) * self.per_pool] for b in range(iters)]
        lab = self._perm(self.n_lab, self.seed * 100003 + self.epoch)
        lab *= -(-iters * self.per_lab // len(lab))
        first = self.epoch * iters * self.per_pool
        return [
            lab[b * self.per_lab : (b + 1) * self.per_lab] + self._pool(first + b * self.per_pool, self.per_pool)
            for b in range(iters)
        ]

    def _indices(self) -> list[int]:
        batches = self._batches()
        per_rank = -(-len(batches) // self.world)
        batches += batches[: per_rank * self.world - len(batches)]
        return [i for b in batches[self.rank :: self.world] for i in b]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start :])

    def __len__(self) -> int:
        return len(self._indices()) - self.start
