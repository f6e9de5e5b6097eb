"""The student as it leaves: one prepared view in, its detections after NMS out, nothing else.

``DeployableDetector`` wraps a torchvision RetinaNet, FCOS, Faster R-CNN or Mask R-CNN
and runs exactly the pieces mtpd's evaluation runs (``detector_forward``): backbone,
head, anchors, torchvision's own post-processing with its score threshold, NMS and
detection cap. No loss adapter or generator exists in it: those live in the losses,
never in the student. Mask R-CNN leaves with its boxes only (its mask head is not run).

Input: ``image`` [1, 3, H, W] float32, a view from ``mtpd.data.prepare_view`` (resized,
normalised, zero-padded), and ``image_size`` [2] int64, the view's (h, w) before
padding, which boxes are clipped to. Output: ``boxes`` [N, 4] xyxy in view pixels,
``scores`` [N], ``labels`` [N] int64 as dataset class indices 0..K-1 (the R-CNNs'
background slot is already taken off).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList

from mtpd.errors import MtpdError
from mtpd.models import arch_family, feature_levels, unwrap
from mtpd.models.detect import detector_forward
from mtpd.models.outputs import _features

INPUT_NAMES = ("image", "image_size")
OUTPUT_NAMES = ("boxes", "scores", "labels")


class ExportError(MtpdError, RuntimeError):
    """A model, option or file that cannot be exported or run; the message names it and what to do."""


@dataclass(frozen=True)
class DetectorInfo:
    """What a consumer of the export needs to know about the model inside."""

    name: str  # registered arch, or the module's class for a user's own model
    family: str  # retinanet | fcos | fasterrcnn | maskrcnn
    num_classes: int  # dataset classes K (labels are 0..K-1)
    label_offset: int  # 1 for the R-CNNs (class 0 is background), else 0
    postprocess: dict  # torchvision's score threshold, NMS IoU, detections per image, candidates


def describe(model: nn.Module, name: str | None = None, where: str | os.PathLike | None = None) -> DetectorInfo:
    """``model``'s family, classes and post-processing; ExportError naming it (and ``where`` it came from)
    when it is not a detector mtpd can export."""
    model = unwrap(model)
    label = error_label(name or model_name(model), where)
    try:
        family = arch_family(model)
    except ValueError:
        raise ExportError(
            f"cannot export {label}: it is not a torchvision RetinaNet, FCOS, FasterRCNN or MaskRCNN, the detectors "
            "mtpd exports; build the student from a registered arch or a factory that returns one of them"
        ) from None
    try:
        feature_levels(model)  # probes the backbone once; a backbone mtpd cannot drive fails here
    except Exception as e:  # noqa: BLE001 - whatever the user's backbone raises, the fix is in the backbone
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ExportError(
            f"cannot export {label}: its backbone fails on a 256x32 probe ({type(e).__name__}: {first}); its "
            "backbone must take [B, 3, H, W] and return feature maps at distinct power-of-two strides"
        ) from None
    if family in ("retinanet", "fcos"):
        k, offset = int(model.head.classification_head.num_classes), 0
        post = {
            "score_thresh": float(model.score_thresh),
            "nms_thresh": float(model.nms_thresh),
            "detections_per_img": int(model.detections_per_img),
            "topk_candidates": int(model.topk_candidates),
        }
    else:
        rh = model.roi_heads
        k, offset = int(rh.box_predictor.cls_score.out_features) - 1, 1
        post = {
            "score_thresh": float(rh.score_thresh),
            "nms_thresh": float(rh.nms_thresh),
            "detections_per_img": int(rh.detections_per_img),
            "rpn_post_nms_top_n": int(model.rpn._post_nms_top_n["testing"]),
        }
    return DetectorInfo(name or model_name(model), family, k, offset, post)


def model_name(model: nn.Module) -> str:
    """The registered arch a model was built as, else its class."""
    spec = getattr(model, "mtpd_arch_spec", None)
    return spec["arch"] if spec else f"{type(model).__module__}.{type(model).__qualname__}"


def error_label(name: str, where: str | os.PathLike | None) -> str:
    return f"{name} (from {where})" if where is not None else name


class DeployableDetector(nn.Module):
    """``(image, image_size) -> (boxes, scores, labels)`` for one prepared view; see the module docstring."""

    def __init__(self, model: nn.Module, name: str | None = None, where: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.model = unwrap(model)
        self.info = describe(self.model, name, where)
        self.label = error_label(self.info.name, where)  # for messages: the model and the file it came from

    def forward(self, image: Tensor, image_size: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # Under tracing the valid size stays a tensor, so the exported graph clips to the size it is fed.
        sizes = [(image_size[0], image_size[1])]
        if self.info.family in ("retinanet", "fcos"):
            det = detector_forward(self.model, image, sizes, None, names=(), detect=True).detections[0]
            return det["boxes"], det["scores"], det["labels"] - self.info.label_offset
        boxes, scores, labels = rcnn_boxes(self.model, image, sizes)
        return boxes, scores, labels - self.info.label_offset


def rcnn_boxes(model: nn.Module, images: Tensor, image_sizes: list) -> tuple[Tensor, Tensor, Tensor]:
    """The box path of a Faster/Mask R-CNN's ``roi_heads`` in eval mode (mask head skipped), for one image:
    the same calls, in the same order, as ``RoIHeads.forward`` makes for boxes."""
    feats = _features(model, images)
    proposals, _ = model.rpn(ImageList(images, image_sizes), feats, None)
    rh = model.roi_heads
    box_features = rh.box_head(rh.box_roi_pool(feats, proposals, image_sizes))
    class_logits, box_regression = rh.box_predictor(box_features)
    boxes, scores, labels = rh.postprocess_detections(class_logits, box_regression, proposals, image_sizes)
    return boxes[0], scores[0], labels[0]


@torch.no_grad()
def reference_detections(model: nn.Module, image: Tensor, size: tuple[int, int]) -> dict[str, Tensor]:
    """PyTorch's detections for one view, through ``detector_forward`` as ``mtpd-eval`` computes them,
    labels as dataset class indices: what an export is compared with."""
    model = unwrap(model).eval()
    det = detector_forward(model, image[None] if image.ndim == 3 else image, [size], None, names=(), detect=True)
    out = det.detections[0]
    offset = 1 if arch_family(model) in ("fasterrcnn", "maskrcnn") else 0
    return {"boxes": out["boxes"], "scores": out["scores"], "labels": out["labels"] - offset}
