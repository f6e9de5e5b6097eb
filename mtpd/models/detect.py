"""Training losses and detections of torchvision detectors on prepared batches.

torchvision's ``forward`` resizes and normalises through ``model.transform``;
mtpd's views are already prepared, so this module drives the same pieces
(backbone, head, anchor generator, ``compute_loss``, ``postprocess_detections``)
directly. The detection losses are torchvision's own. The dense outputs used by
distillation come from ``dense_outputs``, the same function teachers use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList

from mtpd.models.outputs import _features, dense_outputs, feature_levels, flatten_level, output_specs
from mtpd.models.registry import arch_family, unwrap


@dataclass
class DetectorOutput:
    losses: dict[str, Tensor]  # torchvision's detection losses (training only)
    outputs: dict[str, Tensor]  # "fpn.p3", "cls.p3", ... on the padded batch grid
    detections: list[dict[str, Tensor]] | None  # per image boxes (view pixels), scores, labels (eval only)


def _dense_family_forward(
    model: nn.Module,
    images: Tensor,
    image_sizes: list[tuple[int, int]],
    targets: list[dict] | None,
    names: Sequence[str],
    detect: bool,
) -> DetectorOutput:
    family = arch_family(model)
    want = ["fpn", "cls", "box"] + (["ctr"] if family == "fcos" else [])
    outs = dense_outputs(model, images, want)
    levels = sorted(feature_levels(model).values())
    specs = output_specs(model)
    a, k = specs["cls"].num_anchors, specs["cls"].num_classes
    feats = [outs[f"fpn.p{lvl}"] for lvl in levels]
    head = {
        "cls_logits": torch.cat([flatten_level(outs[f"cls.p{lvl}"], a, k) for lvl in levels], 1),
        "bbox_regression": torch.cat([flatten_level(outs[f"box.p{lvl}"], a, 4) for lvl in levels], 1),
    }
    if family == "fcos":
        head["bbox_ctrness"] = torch.cat([flatten_level(outs[f"ctr.p{lvl}"], a, 1) for lvl in levels], 1)
    image_list = ImageList(images, image_sizes)
    anchors = model.anchor_generator(image_list, feats)
    losses: dict[str, Tensor] = {}
    if targets is not None:
        if family == "fcos":
            per_level = [f.shape[-2] * f.shape[-1] for f in feats]
            losses = model.compute_loss(targets, head, anchors, per_level)
        else:
            losses = model.compute_loss(targets, head, anchors)
    detections = None
    if detect:
        counts = [f.shape[-2] * f.shape[-1] * a for f in feats]
        split_head = {key: list(v.split(counts, 1)) for key, v in head.items()}
        split_anchors = [list(x.split(counts)) for x in anchors]
        with torch.no_grad():
            detections = model.postprocess_detections(split_head, split_anchors, image_sizes)
    return DetectorOutput(losses, {n: v for n, v in outs.items() if n.split(".")[0] in names}, detections)


def _rcnn_forward(
    model: nn.Module,
    images: Tensor,
    image_sizes: list[tuple[int, int]],
    targets: list[dict] | None,
    names: Sequence[str],
    detect: bool,
) -> DetectorOutput:
    feats = _features(model, images)
    levels = feature_levels(model)
    image_list = ImageList(images, image_sizes)
    proposals, rpn_losses = model.rpn(image_list, feats, targets)
    detections, roi_losses = model.roi_heads(feats, proposals, image_sizes, targets)
    outputs = {f"fpn.p{levels[key]}": f for key, f in feats.items()} if "fpn" in names else {}
    rpn_names = [n for n in names if n.startswith("rpn_")]
    if rpn_names:  # a second RPN head pass is cheap next to the RoI heads
        outputs.update(dense_outputs(model, images, rpn_names))
    return DetectorOutput({**rpn_losses, **roi_losses}, outputs, detections if detect else None)


def detector_forward(
    model: nn.Module,
    images: Tensor,
    image_sizes: list[tuple[int, int]],
    targets: list[dict] | None = None,
    names: Sequence[str] = ("fpn", "cls", "box"),
    detect: bool | None = None,
) -> DetectorOutput:
    """One forward of a torchvision detector on a prepared batch.

    ``targets`` (training): per image ``{"boxes": [n,4] xyxy view pixels, "labels": [n]}``
    with labels as the model's class indices. ``detect`` defaults to ``not model.training``.
    Returns the detection losses, the dense outputs named in ``names``, and detections.
    """
    model = unwrap(model)
    detect = (not model.training) if detect is None else detect
    if arch_family(model) in ("retinanet", "fcos"):
        return _dense_family_forward(model, images, image_sizes, targets, names, detect)
    return _rcnn_forward(model, images, image_sizes, targets, names, detect)


class DetectorStep(nn.Module):
    """``detector_forward`` as a module, so DistributedDataParallel wraps the whole training
    forward (its gradient hooks only sync what ran through the wrapper's ``forward``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, images: Tensor, image_sizes: list[tuple[int, int]], targets: list[dict] | None, names: Sequence[str]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        out = detector_forward(self.model, images, image_sizes, targets, names=names, detect=False)
        return out.losses, out.outputs
