"""The student as it leaves: one prepared view in, its detections after NMS out, nothing else.

``DeployableDetector`` wraps a torchvision detector of any family with an adapter
(``mtpd.models.adapters.ADAPTERS``) and runs exactly the pieces mtpd's evaluation runs (``detector_forward``): backbone,
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

from mtpd.errors import MtpdError
from mtpd.models import adapter_for, feature_levels, unwrap
from mtpd.models.adapters import UnknownDetector, supported
from mtpd.models.detect import detector_forward

INPUT_NAMES = ("image", "image_size")
OUTPUT_NAMES = ("boxes", "scores", "labels")


class ExportError(MtpdError, RuntimeError):
    """A model, option or file that cannot be exported or run; the message names it and what to do."""


@dataclass(frozen=True)
class DetectorInfo:
    """What a consumer of the export needs to know about the model inside."""

    name: str  # registered arch, or the module's class for a user's own model
    family: str  # an adapter's family (mtpd.models.adapters.FAMILIES)
    num_classes: int  # dataset classes K (labels are 0..K-1)
    label_offset: int  # 1 for the R-CNNs (class 0 is background), else 0
    postprocess: dict  # torchvision's score threshold, NMS IoU, detections per image, candidates


def describe(model: nn.Module, name: str | None = None, where: str | os.PathLike | None = None) -> DetectorInfo:
    """``model``'s family, classes and post-processing; ExportError naming it (and ``where`` it came from)
    when it is not a detector mtpd can export."""
    model = unwrap(model)
    label = error_label(name or model_name(model), where)
    try:
        adapter = adapter_for(model)
    except UnknownDetector:
        raise ExportError(
            f"cannot export {label}: it is not a torchvision {supported()}, the detectors mtpd exports; build the "
            "student from a registered arch or a factory that returns one of them"
        ) from None
    try:
        feature_levels(model)  # probes the backbone once; a backbone mtpd cannot drive fails here
    except Exception as e:  # noqa: BLE001 - whatever the user's backbone raises, the fix is in the backbone
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ExportError(
            f"cannot export {label}: its backbone fails on a 256x32 probe ({type(e).__name__}: {first}); its "
            "backbone must take [B, 3, H, W] and return feature maps at distinct power-of-two strides"
        ) from None
    offset = adapter.label_offset
    k = int(adapter.num_classes() or 0) - offset
    return DetectorInfo(name or model_name(model), adapter.family, k, offset, adapter.postprocess())


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
        boxes, scores, labels = adapter_for(self.model).deploy(image, [(image_size[0], image_size[1])])
        return boxes, scores, labels - self.info.label_offset


@torch.no_grad()
def reference_detections(model: nn.Module, image: Tensor, size: tuple[int, int]) -> dict[str, Tensor]:
    """PyTorch's detections for one view, through ``detector_forward`` as ``mtpd-eval`` computes them,
    labels as dataset class indices: what an export is compared with."""
    model = unwrap(model).eval()
    det = detector_forward(model, image[None] if image.ndim == 3 else image, [size], None, names=(), detect=True)
    out = det.detections[0]
    offset = adapter_for(model).label_offset
    return {"boxes": out["boxes"], "scores": out["scores"], "labels": out["labels"] - offset}
