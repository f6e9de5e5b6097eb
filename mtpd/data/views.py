"""Deterministic views: the one path by which pixels reach a teacher or a student.

A view is the image resized keeping its aspect ratio (short side ``short``,
long side at most ``long``, as mmdet's 1x ``Resize(keep_ratio=True)``),
optionally flipped horizontally, normalised, and padded on the bottom/right to
a multiple of ``pad``. Each view is padded on its own, never to a batch's
size, so a teacher's outputs on it do not depend on what it was batched with.

An augmented view (``mtpd.data.augment``) is resized by a further factor, and
cropped back to the unjittered view's size where it grew beyond it; its draw
comes from a bank (``aug0`` .., by image id) or is given (``aug``: fresh).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from mtpd.data.augment import BANK_VIEW, FRESH_VIEW, Aug, AugmentPolicy
from mtpd.errors import MtpdError

VIEW_NAMES = ("orig", "hflip")  # and a policy's augmented views: aug0 .. aug{bank-1} (stored), aug (fresh)
# ImageNet statistics on 0-255 RGB, as torchvision and mmdet's RetinaNet configs use.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
MAX_SIDE = 8192


class ViewSpecError(MtpdError, ValueError):
    """A view size or name that cannot be used."""


@dataclass(frozen=True)
class ViewSpec:
    """How every image becomes the tensors a model sees; part of a store's identity."""

    short: int = 800
    long: int = 1333
    views: tuple[str, ...] = ("orig",)
    pad: int = 32
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    augment: dict | None = None  # an AugmentPolicy's fields, for augmented views (aug0 ..)

    def __post_init__(self) -> None:
        if not (8 <= self.short <= MAX_SIDE):
            raise ViewSpecError(
                f"view short side {self.short} is out of range: use 8..{MAX_SIDE} (mmdet's 1x uses 800)"
            )
        if not (self.short <= self.long <= MAX_SIDE):
            raise ViewSpecError(
                f"view long side {self.long} is out of range: use {self.short}..{MAX_SIDE} (at least the short side; "
                "mmdet's 1x uses 1333)"
            )
        if self.pad <= 0 or self.pad & (self.pad - 1):
            raise ViewSpecError(
                f"view padding {self.pad} must be a power of two (32 fits strides up to P5; P6/P7 use ceil)"
            )
        if not self.views or len(set(self.views)) != len(self.views):
            raise ViewSpecError(
                f"views {list(self.views)} must be a non-empty list without repeats, from {list(VIEW_NAMES)}"
            )
        policy = self.policy()
        for v in self.views:
            if v in VIEW_NAMES:
                continue
            m = BANK_VIEW.match(v)
            if policy is None or not ((m and int(m.group(1)) < policy.bank) or v == FRESH_VIEW):
                bank = f", aug0..aug{policy.bank - 1}" if policy is not None and policy.bank else ""
                raise ViewSpecError(f"unknown view {v!r}: choose from {', '.join(VIEW_NAMES)}{bank}")
        object.__setattr__(self, "views", tuple(self.views))
        object.__setattr__(self, "mean", tuple(float(x) for x in self.mean))
        object.__setattr__(self, "std", tuple(float(x) for x in self.std))

    def policy(self) -> AugmentPolicy | None:
        return None if self.augment is None else AugmentPolicy.from_dict(self.augment)

    def to_dict(self) -> dict:
        """JSON-able fields; ``augment`` only when set, so that stores made before it keep their identity."""
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        if d["augment"] is None:
            del d["augment"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ViewSpec":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the resized, unpadded view of an image of this size."""
        scale = min(self.short / min(height, width), self.long / max(height, width))
        # int(x + 0.5) rounds as mmcv's rescale_size does.
        return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))

    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        h, w = self.resized_size(height, width)
        return math.ceil(h / self.pad) * self.pad, math.ceil(w / self.pad) * self.pad


@dataclass(frozen=True)
class ViewMeta:
    """Geometry of one view; enough to map boxes into it and back."""

    orig_size: tuple[int, int]  # (h, w) of the source image
    size: tuple[int, int]  # (h, w) after resize, before padding: the valid region
    padded: tuple[int, int]  # (h, w) after padding
    flip: bool
    view: str = field(default="orig")
    # augmented views: the size the image is resized to before the crop to ``size`` at ``offset`` (dy, dx)
    resized: tuple[int, int] | None = None
    offset: tuple[int, int] = (0, 0)

    @property
    def scale(self) -> tuple[float, float]:
        """(sx, sy): per-axis factors, as mmdet keeps them, so rounding of the size is exact."""
        h, w = self.resized or self.size
        return w / self.orig_size[1], h / self.orig_size[0]


def grid_size(size: tuple[int, int], stride: int) -> tuple[int, int]:
    """Cells of a level with this stride that cover the valid (unpadded) region."""
    return math.ceil(size[0] / stride), math.ceil(size[1] / stride)


def view_meta(
    spec: ViewSpec, orig_size: tuple[int, int], view: str, image_id: int | None = None, aug: Aug | None = None
) -> ViewMeta:
    """The geometry of ``view`` of an image of ``orig_size``. A bank view (``aug3``) is drawn from the spec's
    policy and ``image_id``; a fresh one (``aug``) is the draw ``aug``."""
    if view not in VIEW_NAMES:
        policy = spec.policy()
        if view == FRESH_VIEW and aug is not None:
            return aug_meta(spec, orig_size, aug, view)
        if policy is None or not BANK_VIEW.match(view) or image_id is None:
            raise ViewSpecError(
                f"view {view!r}: an augmented view needs the spec's augment policy and the image id (a bank view "
                "aug0 ..) or a draw (a fresh view aug)"
            )
        return aug_meta(spec, orig_size, policy.bank_draw(image_id, view), view)
    h, w = orig_size
    return ViewMeta(
        orig_size=(h, w), size=spec.resized_size(h, w), padded=spec.padded_size(h, w), flip=view == "hflip", view=view
    )


def aug_meta(spec: ViewSpec, orig_size: tuple[int, int], aug: Aug, view: str) -> ViewMeta:
    """An augmented view: the unjittered view's size times ``aug.scale``, then cropped back to at most the
    unjittered size at ``aug``'s offset (a smaller view keeps the top left; the rest is padding)."""
    h0, w0 = spec.resized_size(*orig_size)
    rh, rw = max(1, int(h0 * aug.scale + 0.5)), max(1, int(w0 * aug.scale + 0.5))
    ch, cw = min(rh, h0), min(rw, w0)
    dy, dx = min(int(aug.fy * (rh - ch + 1)), rh - ch), min(int(aug.fx * (rw - cw + 1)), rw - cw)
    padded = (math.ceil(ch / spec.pad) * spec.pad, math.ceil(cw / spec.pad) * spec.pad)
    return ViewMeta(tuple(orig_size), (ch, cw), padded, aug.flip, view, resized=(rh, rw), offset=(dy, dx))


def prepare_view(
    image: np.ndarray | torch.Tensor,
    spec: ViewSpec,
    view: str = "orig",
    image_id: int | None = None,
    aug: Aug | None = None,
) -> tuple[torch.Tensor, ViewMeta]:
    """uint8 RGB image [H, W, 3] -> normalised, padded float32 tensor [3, Hp, Wp] and its geometry.

    The only function that turns pixels into model input, for teachers and students alike. Augmented views
    need ``image_id`` (a bank's ``aug3``) or ``aug`` (a fresh ``aug``): ``view_meta``.
    """
    img = (
        torch.from_numpy(np.array(image, copy=True)) if isinstance(image, np.ndarray) else image
    )  # own the pixels: callers may pass read-only arrays
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {tuple(img.shape)}")
    meta = view_meta(spec, (int(img.shape[0]), int(img.shape[1])), view, image_id, aug)
    x = img.permute(2, 0, 1).to(torch.float32).unsqueeze(0)
    resized = meta.resized or meta.size
    if resized != meta.orig_size:
        # Bilinear without antialias matches mmcv/cv2 and torchvision's detection transform.
        x = F.interpolate(x, size=resized, mode="bilinear", align_corners=False)
    x = x[0]
    if meta.resized is not None:
        (dy, dx), (h, w) = meta.offset, meta.size
        x = x[:, dy : dy + h, dx : dx + w]
    if meta.flip:
        x = x.flip(-1)
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(3, 1, 1)
    x = (x - mean) / std
    ph, pw = meta.padded[0] - meta.size[0], meta.padded[1] - meta.size[1]
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), value=0.0)
    return x.contiguous(), meta


def boxes_to_view(boxes: np.ndarray, meta: ViewMeta) -> np.ndarray:
    """xyxy boxes in source-image pixels -> xyxy boxes in view pixels."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    sx, sy = meta.scale
    b[:, [0, 2]] *= sx
    b[:, [1, 3]] *= sy
    if meta.resized is not None:
        b[:, [0, 2]] -= meta.offset[1]
        b[:, [1, 3]] -= meta.offset[0]
    if meta.flip:
        w = meta.size[1]
        b[:, [0, 2]] = w - b[:, [2, 0]]
    return b


def crop_boxes(boxes: np.ndarray, meta: ViewMeta) -> tuple[np.ndarray, np.ndarray]:
    """View-pixel boxes of an augmented view cut to it, as torchvision's detection references cut boxes at a
    crop: a box whose centre lies inside the view is kept and clipped to it, any other is dropped. Returns the
    kept boxes and the keep mask (over the input's rows)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    h, w = meta.size
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    keep = (cx > 0) & (cx < w) & (cy > 0) & (cy < h)
    kept = b[keep].copy()
    kept[:, [0, 2]] = kept[:, [0, 2]].clip(0, w)
    kept[:, [1, 3]] = kept[:, [1, 3]].clip(0, h)
    return kept, keep


def boxes_from_view(boxes: np.ndarray, meta: ViewMeta) -> np.ndarray:
    """Inverse of :func:`boxes_to_view`: view pixels -> source-image pixels."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    if meta.flip:
        w = meta.size[1]
        b[:, [0, 2]] = w - b[:, [2, 0]]
    if meta.resized is not None:
        b[:, [0, 2]] += meta.offset[1]
        b[:, [1, 3]] += meta.offset[0]
    sx, sy = meta.scale
    b[:, [0, 2]] /= sx
    b[:, [1, 3]] /= sy
    return b


def masks_to_view(masks: np.ndarray, meta: ViewMeta) -> torch.Tensor:
    """[n, H, W] source-image masks -> [n, Hp, Wp] uint8 masks on the padded view (nearest resize)."""
    m = torch.as_tensor(np.asarray(masks, dtype=np.uint8)).unsqueeze(1).float()
    resized = meta.resized or meta.size
    if m.shape[0] and resized != meta.orig_size:
        m = F.interpolate(m, size=resized, mode="nearest")
    elif not m.shape[0]:
        m = torch.zeros(0, 1, *resized)
    if meta.resized is not None:
        (dy, dx), (h, w) = meta.offset, meta.size
        m = m[:, :, dy : dy + h, dx : dx + w]
    if meta.flip:
        m = m.flip(-1)
    ph, pw = meta.padded[0] - meta.size[0], meta.padded[1] - meta.size[1]
    m = F.pad(m, (0, pw, 0, ph))
    return m[:, 0].to(torch.uint8)
