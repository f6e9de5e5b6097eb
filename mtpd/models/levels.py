"""Feature levels of a backbone, and the flattening between per-level maps and torchvision's anchor order.

A leaf of ``mtpd.models``: the family adapters and the public helpers in ``outputs`` both build on it.
"""

from __future__ import annotations

import math
import weakref
from collections import OrderedDict
from typing import Sequence

import torch
from torch import Tensor, nn

# Probe input: tall and thin, so it is cheap yet long enough that every level up to
# stride 256 has a distinct size along H (sizes round up: ceil(H / stride)).
PROBE_HW = (256, 32)
_LEVELS: "weakref.WeakKeyDictionary[nn.Module, dict[str, int]]" = weakref.WeakKeyDictionary()


def unwrap(model: nn.Module) -> nn.Module:
    """The detector inside DistributedDataParallel / DataParallel wrappers."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def backbone_features(model: nn.Module, images: Tensor) -> "OrderedDict[str, Tensor]":
    """The backbone's (FPN's) maps by key, as torchvision's detectors receive them."""
    out = model.backbone(images)
    return OrderedDict([("0", out)]) if isinstance(out, Tensor) else out


def feature_levels(model: nn.Module) -> dict[str, int]:
    """Backbone output key -> P-level (log2 of its stride), in the backbone's order.

    Found once per backbone by a forward on a small probe, in eval mode and without
    gradients, so keys ('0', '1', 'pool', 'p6' …) never need interpreting by name.
    """
    model = unwrap(model)
    backbone = model.backbone
    if backbone in _LEVELS:
        return _LEVELS[backbone]
    param = next(backbone.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    # Eval mode so BatchNorm statistics do not move; restore each module's own flag after.
    modes = [(m, m.training) for m in backbone.modules()]
    backbone.eval()
    try:
        with torch.no_grad():
            feats = backbone_features(model, torch.zeros(1, 3, *PROBE_HW, device=device, dtype=dtype))
    finally:
        for m, mode in modes:
            m.training = mode
    levels: dict[str, int] = {}
    for key, f in feats.items():
        stride = PROBE_HW[0] // f.shape[-2]
        lvl = int(round(math.log2(stride))) if stride > 0 else -1
        if 2**lvl != stride:
            raise ValueError(
                f"backbone output {key!r} has stride {stride} on a {PROBE_HW[0]}-px probe: not a power of two"
            )
        twin = next((k for k, v in levels.items() if v == lvl), None)
        if twin is not None:
            raise ValueError(
                f"backbone outputs {twin!r} and {key!r} both have stride {stride}, so both would be level P{lvl}"
            )
        levels[key] = lvl
    _LEVELS[backbone] = levels
    return levels


def flatten_level(t: Tensor, num_anchors: int, num_values: int) -> Tensor:
    """[B, A·K, H, W] -> [B, H·W·A, K] in torchvision's order (location-major, then anchor)."""
    b, c, h, w = t.shape
    if c != num_anchors * num_values:
        raise ValueError(f"flatten_level: {c} channels is not A·K = {num_anchors}·{num_values}")
    return t.view(b, num_anchors, num_values, h, w).permute(0, 3, 4, 1, 2).reshape(b, h * w * num_anchors, num_values)


def unflatten_level(t: Tensor, num_anchors: int, height: int, width: int) -> Tensor:
    """Inverse of ``flatten_level``: [B, H·W·A, K] -> [B, A·K, H, W]."""
    b, n, k = t.shape
    if n != height * width * num_anchors:
        raise ValueError(f"unflatten_level: {n} rows is not H·W·A = {height}·{width}·{num_anchors}")
    return t.reshape(b, height, width, num_anchors, k).permute(0, 3, 4, 1, 2).reshape(b, num_anchors * k, height, width)


def level_grid_sizes(image_size: tuple[int, int], levels: Sequence[int]) -> list[tuple[int, int]]:
    """Feature map sizes of a padded image: ceil(H / 2^l) — every torchvision backbone here
    halves with stride-2 convs/pools padded so that sizes round up."""
    h, w = image_size
    return [(-(-h // 2**lvl), -(-w // 2**lvl)) for lvl in levels]
