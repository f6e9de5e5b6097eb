"""Augmented views: random scale, crop and flip, drawn from a seed so every run, worker and resume agrees.

A policy (``AugmentPolicy``) says how views vary; an ``Aug`` is one draw of it: a scale factor on the view's
size, where a view larger than the unjittered one is cropped back to that size (the offset as fractions of the
room there is), and a flip. Two sources of draws:

- a **bank**: views ``aug0`` .. ``aug{K-1}`` of each image, drawn from (policy seed, image id, k). A store holds
  them, so the teacher's targets for the view a student trains on are exact; each epoch a student picks one;
- **fresh** views, drawn from (plan seed, epoch, sample): a new view every epoch, for students whose teacher
  runs live (the consistent reference) or who have none.

The geometry lives in ``mtpd.data.views`` (``aug_meta``): one path for pixels, boxes and masks.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np

from mtpd.errors import MtpdError

BANK_VIEW = re.compile(r"^aug(\d+)$")
FRESH_VIEW = "aug"


class AugmentError(MtpdError, ValueError):
    """A policy that cannot be used; the message names the field."""


@dataclass(frozen=True)
class Aug:
    """One augmented view's draw: ``scale`` times the view size, crop offset fractions ``fy``, ``fx`` in [0, 1)
    (where the scaled view is larger than the unjittered one), and a horizontal flip."""

    scale: float = 1.0
    fy: float = 0.0
    fx: float = 0.0
    flip: bool = False


@dataclass(frozen=True)
class AugmentPolicy:
    """How augmented views vary: ``scale`` (lo, hi) uniform factor on the view size (mmdet's RandomResize ratio
    range; 1, 1: none), ``crop``: a larger view is cropped back to the view size at a random offset (else at the
    top left), ``flip``: probability of a horizontal flip, ``bank``: views per image a store holds (0: a fresh
    view every epoch, so the teacher must run live), ``seed``: the bank's draws (part of a store's identity)."""

    scale: tuple[float, float] = (1.0, 1.0)
    crop: bool = True
    flip: float = 0.5
    bank: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        lo, hi = (float(x) for x in self.scale)
        if not 0.05 <= lo <= hi <= 8.0:
            raise AugmentError(f"augment.scale: [low, high] with 0.05 <= low <= high <= 8, got {list(self.scale)}")
        if not 0.0 <= self.flip <= 1.0:
            raise AugmentError(f"augment.flip: a probability 0..1, got {self.flip}")
        if not 0 <= self.bank <= 1024:
            raise AugmentError(
                f"augment.bank: views per image 0..1024 (0: fresh views, teachers live); got {self.bank}"
            )
        object.__setattr__(self, "scale", (lo, hi))

    def to_dict(self) -> dict:
        return {**asdict(self), "scale": list(self.scale)}

    @classmethod
    def from_dict(cls, d: dict) -> "AugmentPolicy":
        return cls(**{k: tuple(v) if k == "scale" else v for k, v in d.items()})

    @classmethod
    def parse(cls, text: str) -> "AugmentPolicy":
        """``scale=0.5:1.5,bank=8,flip=0.5,crop=1,seed=0`` (any subset) -> a policy; for the command line."""
        fields: dict = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, _, value = part.partition("=")
            try:
                if key == "scale":
                    lo, _, hi = value.partition(":")
                    fields["scale"] = (float(lo), float(hi or lo))
                elif key in ("bank", "seed"):
                    fields[key] = int(value)
                elif key == "flip":
                    fields[key] = float(value)
                elif key == "crop":
                    fields[key] = value.lower() in ("1", "true", "yes")
                else:
                    raise AugmentError(f"--augment: unknown field {key!r}; use scale, crop, flip, bank, seed")
            except ValueError as e:
                if isinstance(e, AugmentError):
                    raise
                raise AugmentError(f"--augment: {part!r} is not a number (e.g. scale=0.5:1.5,bank=8)") from None
        return cls(**fields)

    def bank_views(self) -> tuple[str, ...]:
        return tuple(f"aug{k}" for k in range(self.bank))

    def draw(self, key: list[int]) -> Aug:
        """The view of ``key`` (integers: a bank's seed, image id and k, or a plan's seed, epoch and sample)."""
        rng = np.random.default_rng([int(k) for k in key])
        lo, hi = self.scale
        scale = float(rng.uniform(lo, hi)) if hi > lo else lo
        fy, fx = (float(v) for v in rng.random(2)) if self.crop else (0.0, 0.0)
        return Aug(scale, fy, fx, bool(rng.random() < self.flip))

    def bank_draw(self, image_id: int, view: str) -> Aug:
        m = BANK_VIEW.match(view)
        if m is None or int(m.group(1)) >= self.bank:
            raise AugmentError(f"view {view!r} is not one of this policy's bank (aug0..aug{self.bank - 1})")
        return self.draw([self.seed, int(image_id), int(m.group(1))])
