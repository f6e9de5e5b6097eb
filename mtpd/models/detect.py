"""Training losses and detections of a detector on prepared batches, through its family's adapter.

torchvision's ``forward`` resizes and normalises through ``model.transform``; mtpd's views are
already prepared, so each adapter (``mtpd.models.adapters``) drives the same pieces (backbone,
head, anchor generator, ``compute_loss``, ``postprocess_detections``) directly. The detection
losses are torchvision's own. The dense outputs used by distillation come from the same
``dense`` teachers use.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from mtpd.models.adapters import DetectorOutput, adapter_for
from mtpd.models.levels import unwrap

__all__ = ["DetectorOutput", "DetectorStep", "detector_forward"]


def detector_forward(
    model: nn.Module,
    images: Tensor,
    image_sizes: list[tuple[int, int]],
    targets: list[dict] | None = None,
    names: Sequence[str] = ("fpn", "cls", "box"),
    detect: bool | None = None,
) -> DetectorOutput:
    """One forward of a detector on a prepared batch.

    ``targets`` (training): per image ``{"boxes": [n,4] xyxy view pixels, "labels": [n]}``
    with labels as the model's class indices. ``detect`` defaults to ``not model.training``.
    Returns the detection losses, the dense outputs named in ``names``, and detections.
    """
    model = unwrap(model)
    detect = (not model.training) if detect is None else detect
    return adapter_for(model).forward(images, image_sizes, targets, names, detect)


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
