"""Tiny detectors for CPU tests and the digits benchmark (64–128 px images, 8–64 px objects).

A plain conv-BN-ReLU backbone (no residuals, BatchNorm2d so it trains from
scratch), torchvision's FPN on P3–P5, and torchvision's RetinaNet or FCOS head
cut to ``head_convs`` convs. They are ordinary torchvision detectors, so every
mtpd code path (teachers, stores, students, losses) treats them like R50.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial
from math import gcd
from typing import Sequence

import torch
from torch import nn
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.fcos import FCOS, FCOSClassificationHead, FCOSHead, FCOSRegressionHead
from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead
from torchvision.models.detection.ssd import SSD, SSDHead
from torchvision.ops.misc import Conv2dNormActivation

from mtpd.models.arch_info import ArchInfo, arch_table
from mtpd.models.parts import (
    check_levels,
    extra_block,
    load_backbone_weights,
    point_anchors,
    resolve_norm,
    retinanet_anchors,
)

# This module's architectures, read by mtpd.models.registry (this module never imports the registry).
ARCHS: list[ArchInfo] = []
register_arch = arch_table(ARCHS.append)

# Stage widths as multiples of ``width``, and convs per stage; stage k has stride 2^k.
_WIDTH_MULT = (1, 2, 4, 6, 8)
_DEPTHS = (1, 1, 2, 2, 1)


class TinyConvNet(nn.Sequential):
    """stem (stride 2) and stage2..stage5 (strides 4..32); each stage starts with a stride-2 conv."""

    def __init__(self, width: int = 16, norm_layer: type[nn.Module] | partial = nn.BatchNorm2d) -> None:
        chans = [width * m for m in _WIDTH_MULT]
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        cin = 3
        for k, (c, depth) in enumerate(zip(chans, _DEPTHS), start=1):
            convs = [
                Conv2dNormActivation(cin if i == 0 else c, c, stride=2 if i == 0 else 1, norm_layer=norm_layer)
                for i in range(depth)
            ]
            layers["stem" if k == 1 else f"stage{k}"] = nn.Sequential(*convs)
            cin = c
        super().__init__(layers)
        self.stage_channels = chans


def _tiny_backbone(
    width: int, levels: tuple[int, ...], fpn_channels: int, norm: str, backbone_weights: str | None, arch: str
) -> BackboneWithFPN:
    body = TinyConvNet(width, resolve_norm(norm, backbone_weights is not None))
    if backbone_weights is not None:
        load_backbone_weights(body, backbone_weights, None, arch)
    backbone_levels = [lvl for lvl in levels if lvl <= 5]
    return_layers = {f"stage{lvl}": str(i) for i, lvl in enumerate(backbone_levels)}
    in_channels = [body.stage_channels[lvl - 1] for lvl in backbone_levels]
    return BackboneWithFPN(
        body, return_layers, in_channels, fpn_channels, extra_blocks=extra_block(levels, "p6p7", fpn_channels)
    )


def tiny_head_convs(channels: int, n: int) -> nn.Sequential:
    # Same module layout and init as torchvision's RetinaNet head convs (conv+ReLU, std 0.01).
    convs = nn.Sequential(*[Conv2dNormActivation(channels, channels, norm_layer=None) for _ in range(n)])
    for m in convs.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)
    return convs


def _retinanet_tiny(
    name: str,
    num_classes: int,
    width: int,
    fpn_channels: int,
    levels: Sequence[int],
    head_convs: int,
    anchor_base: float,
    anchor_scales: int,
    aspect_ratios: Sequence[float],
    norm: str,
    backbone_weights: str | None,
    min_size: int,
    max_size: int,
) -> RetinaNet:
    lv = check_levels(levels, 2, 7, name)
    backbone = _tiny_backbone(width, lv, fpn_channels, norm, backbone_weights, name)
    anchors = retinanet_anchors(lv, base=anchor_base, scales=anchor_scales, aspect_ratios=aspect_ratios)
    head = RetinaNetHead(fpn_channels, anchors.num_anchors_per_location()[0], num_classes)
    head.classification_head.conv = tiny_head_convs(fpn_channels, head_convs)
    head.regression_head.conv = tiny_head_convs(fpn_channels, head_convs)
    return RetinaNet(backbone, num_classes, min_size=min_size, max_size=max_size, anchor_generator=anchors, head=head)


@register_arch("retinanet_tiny", family="retinanet")
def retinanet_tiny(
    num_classes: int,
    *,
    width: int = 16,
    fpn_channels: int = 64,
    levels: Sequence[int] = (3, 4, 5),
    head_convs: int = 1,
    anchor_base: float = 1.0,
    anchor_scales: int = 3,
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    norm: str = "bn",
    backbone_weights: str | None = None,
    min_size: int = 128,
    max_size: int = 128,
) -> RetinaNet:
    """Tiny RetinaNet (~0.58M params at 10 classes): anchors of 1×, 1.26×, 1.59× the stride
    per level (8–12, 16–25, 32–50 px on P3–P5) × 3 aspect ratios = 9 per location."""
    return _retinanet_tiny(
        "retinanet_tiny",
        num_classes,
        width,
        fpn_channels,
        levels,
        head_convs,
        anchor_base,
        anchor_scales,
        aspect_ratios,
        norm,
        backbone_weights,
        min_size,
        max_size,
    )


@register_arch("retinanet_tiny_wide", family="retinanet")
def retinanet_tiny_wide(
    num_classes: int,
    *,
    width: int = 40,
    fpn_channels: int = 64,
    levels: Sequence[int] = (3, 4, 5),
    head_convs: int = 1,
    anchor_base: float = 1.0,
    anchor_scales: int = 3,
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    norm: str = "bn",
    backbone_weights: str | None = None,
    min_size: int = 128,
    max_size: int = 128,
) -> RetinaNet:
    """retinanet_tiny with a 2.5× wider backbone: a stronger teacher whose FPN output
    convs and head have the same shapes as retinanet_tiny's, so weights can be inherited
    as in MTPD (R101/X101 teachers and an R50 student share their neck and head)."""
    return _retinanet_tiny(
        "retinanet_tiny_wide",
        num_classes,
        width,
        fpn_channels,
        levels,
        head_convs,
        anchor_base,
        anchor_scales,
        aspect_ratios,
        norm,
        backbone_weights,
        min_size,
        max_size,
    )


@register_arch("fcos_tiny", family="fcos")
def fcos_tiny(
    num_classes: int,
    *,
    width: int = 16,
    fpn_channels: int = 64,
    levels: Sequence[int] = (3, 4, 5),
    head_convs: int = 1,
    anchor_base: float = 0.5,
    norm: str = "bn",
    backbone_weights: str | None = None,
    min_size: int = 128,
    max_size: int = 128,
) -> FCOS:
    """Tiny FCOS (GroupNorm head). Point sizes are half the stride (4, 8, 16 px) so FCOS's
    scale ranges (4–8× the size) send objects up to ~32 px to P3, 32–64 px to P4, larger to
    P5; torchvision's size=stride would put every object under 64 px on P3."""
    lv = check_levels(levels, 2, 7, "fcos_tiny")
    backbone = _tiny_backbone(width, lv, fpn_channels, norm, backbone_weights, "fcos_tiny")
    head = FCOSHead(fpn_channels, 1, num_classes, num_convs=head_convs)
    # GroupNorm with 32 groups needs channels divisible by 32; fall back to fewer groups.
    gn = partial(nn.GroupNorm, gcd(32, fpn_channels))
    head.classification_head = FCOSClassificationHead(fpn_channels, 1, num_classes, head_convs, norm_layer=gn)
    head.regression_head = FCOSRegressionHead(fpn_channels, 1, head_convs, norm_layer=gn)
    return FCOS(
        backbone,
        num_classes,
        min_size=min_size,
        max_size=max_size,
        anchor_generator=point_anchors(lv, anchor_base),
        head=head,
    )


@register_arch("ssd_tiny", family="ssd")
def ssd_tiny(
    num_classes: int,
    *,
    width: int = 16,
    fpn_channels: int = 64,
    levels: Sequence[int] = (3, 4, 5),
    aspect_ratios: Sequence[float] = (2.0,),
    min_ratio: float = 0.08,
    max_ratio: float = 0.5,
    norm: str = "bn",
    backbone_weights: str | None = None,
    size: int = 128,
) -> SSD:
    """Tiny SSD: retinanet_tiny's backbone and FPN (so its P3–P5 maps distil from the same stores), torchvision's
    SSD head (one 3×3 conv per level for class scores, one for boxes) and default boxes of 8–50 % of the image
    side (10–64 px at 128 px: the digits' sizes), 4 per location; ``num_classes`` counts the background."""
    lv = check_levels(levels, 2, 7, "ssd_tiny")
    backbone = _tiny_backbone(width, lv, fpn_channels, norm, backbone_weights, "ssd_tiny")
    boxes = DefaultBoxGenerator([list(aspect_ratios)] * len(lv), min_ratio=min_ratio, max_ratio=max_ratio)
    head = SSDHead([fpn_channels] * len(lv), boxes.num_anchors_per_location(), num_classes)
    return SSD(backbone, boxes, (size, size), num_classes, head=head)


def example_detector(num_classes: int = 3) -> nn.Module:
    """A ``package.module:factory`` example for the module teacher adapter:
    ``--teacher mtpd.models.tiny:example_detector`` builds a seeded retinanet_tiny."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return retinanet_tiny(num_classes)
