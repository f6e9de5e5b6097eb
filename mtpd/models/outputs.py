"""Dense outputs of a detector on a prepared batch: the one definition of ``fpn.p3``, ``cls.p3``, …
shared by teachers (cached) and students (online). Each family's adapter (``mtpd.models.adapters``)
says what they are; these functions are the public face of that.

The model's own forward resizes, normalises and pads; mtpd has already done all three in
``mtpd.data.prepare_view``, so the backbone runs on the prepared tensor directly and the head
convs run per level, without torchvision's flattening to [B, H·W·A, K]. ``flatten_level`` gives
that flattening when a loss needs torchvision's anchor order; ``model_anchors`` gives the anchors in it.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from mtpd.models.adapters import adapter_for
from mtpd.models.levels import (
    backbone_features,
    feature_levels,
    flatten_level,
    level_grid_sizes,
    unflatten_level,
    unwrap,
)
from mtpd.output_spec import OutputSpec

__all__ = [
    "DenseOutputs",
    "backbone_features",
    "dense_outputs",
    "feature_levels",
    "flatten_level",
    "level_grid_sizes",
    "model_anchors",
    "output_specs",
    "unflatten_level",
]


def output_specs(model: nn.Module) -> dict[str, OutputSpec]:
    """Every dense output this detector can produce, by store name.

    The family's adapter says what they are (``DetectorAdapter.output_specs``; e.g. RetinaNet: fpn, cls (A·K
    logits), box (A·4 deltas)); docs/reference/registries.md lists the families. RoI-head outputs depend on
    proposals and are not dense outputs.
    """
    return adapter_for(unwrap(model)).output_specs()


def dense_outputs(
    model: nn.Module, images: Tensor, names: Sequence[str], sizes: Sequence[tuple[int, int]] | None = None
) -> dict[str, Tensor]:
    """``{name}.p{level}`` -> [B, C, h, w] for each requested output name.

    ``images``: [B, 3, H, W] from ``prepare_view`` (normalised, padded to /32); the model's
    transform is bypassed. ``sizes``: each view's valid (h, w) before padding, for models that
    must not attend to padding. Runs in the model's current mode and keeps gradients, so
    students call it while training; teachers wrap it in ``torch.no_grad``. Only what is
    asked is computed: ``["fpn"]`` skips the head entirely.

    Under DistributedDataParallel wrap ``DenseOutputs(model, names)`` in DDP instead of
    passing the DDP model here: reaching into ``.module`` would skip gradient sync.
    """
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise TypeError(
            f"dense_outputs got a {type(model).__name__}: calling through .module would bypass it "
            "(no gradient sync); wrap DenseOutputs(model, names) in it and call that"
        )
    return adapter_for(model).dense(images, names, sizes)


class DenseOutputs(nn.Module):
    """``dense_outputs`` as a module, so DDP / DataParallel can wrap it:
    ``DDP(DenseOutputs(student, ["fpn", "cls", "box"]))(images)``."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.names = list(names)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return dense_outputs(self.model, images, self.names)


def model_anchors(
    model: nn.Module, image_size: tuple[int, int], grid_sizes: Sequence[tuple[int, int]] | None = None
) -> Tensor:
    """All anchors of ``model`` for a padded image of ``image_size`` (H, W), as one
    [Σ_l H_l·W_l·A, 4] xyxy tensor in the order of ``flatten_level`` over levels.

    Uses the model's own anchor generator (RetinaNet/FCOS ``anchor_generator``, R-CNN
    ``rpn.anchor_generator``), which takes each level's stride as image size // grid size,
    exactly as in the model's forward. ``grid_sizes`` defaults to ``level_grid_sizes``.
    """
    return adapter_for(unwrap(model)).anchors(image_size, grid_sizes)
