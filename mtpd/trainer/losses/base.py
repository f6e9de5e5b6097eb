"""What every distillation loss sees (``DistillBatch``) and is (``DistillLoss``), plus masked helpers.

The trainer builds one ``DistillBatch`` per step from the student's outputs on
the padded batch and the cached teacher outputs placed on the same grid. A loss
reads ``{name}.p{level}`` tensors for the output names in its ``needs`` and
must ignore padding: ``masks[level]`` is 1 on each image's valid cells.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn


@dataclass
class DistillBatch:
    """Student and teacher outputs of one training step, on one padded grid.

    ``student`` / ``teacher``: ``"fpn.p3"`` [B,C,H,W] features, ``"cls.p3"``
    [B,A*K,H,W] class logits, ``"box.p3"`` [B,A*4,H,W]; teacher maps are zero
    outside each image's valid region. ``masks``: level -> [B,1,H,W] float, 1 on
    valid cells. ``gt_boxes`` / ``gt_labels``: per image, xyxy in the view's
    pixels and int64 labels in 0..K-1. ``anchors``: [sum_l H_l*W_l*A, 4] xyxy for
    the padded grid, torchvision's flatten order (levels ascending, then
    (h, w, a) row-major); None when no loss needs it.
    """

    student: dict[str, Tensor]
    teacher: dict[str, Tensor]
    masks: dict[int, Tensor]
    gt_boxes: list[Tensor]
    gt_labels: list[Tensor]
    anchors: Tensor | None
    num_anchors: int
    num_classes: int
    levels: tuple[int, ...]

    def pair(self, name: str, level: int) -> tuple[Tensor, Tensor]:
        """(student, teacher) maps of output ``name`` at ``level``, with a clear error when one is missing."""
        key = f"{name}.p{level}"
        for side, outputs in (("student", self.student), ("teacher", self.teacher)):
            if key not in outputs:
                raise KeyError(
                    f"{side} outputs lack {key!r} (have {sorted(outputs)}); check the loss's levels and that the "
                    f"store holds output {name!r}"
                )
        return self.student[key], self.teacher[key]


class DistillLoss(nn.Module):
    """Base of all distillation losses.

    ``forward(batch)`` returns an unweighted scalar; the trainer multiplies it
    by the stage's weight (``default_weight`` when the plan gives none).
    Trainable parts (adapters, generators) are submodules: they train with the
    student and are dropped with the loss after the stage.
    """

    name: ClassVar[str] = ""
    needs: tuple[str, ...] = ()  # teacher output names read; an instance may narrow it (cwd's target)
    needs_anchors: ClassVar[bool] = False  # reads batch.anchors (the engine builds them only then)
    needs_labels: ClassVar[bool] = False  # reads batch.gt_boxes (refused on the unlabelled pool alone)
    default_weight: ClassVar[float] = 1.0

    def forward(self, batch: DistillBatch) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def adapter(student_channels: int, teacher_channels: int) -> nn.Module:
    """1x1 conv from student to teacher channels (FitNet's regressor), identity when they already match."""
    if student_channels == teacher_channels:
        return nn.Identity()
    return nn.Conv2d(student_channels, teacher_channels, kernel_size=1)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` [B,C,H,W] over the cells where ``mask`` [B,1,H,W] is 1, all channels counted."""
    m = mask.to(x.dtype)
    # clamp: a batch whose level has no valid cell gives 0, not NaN.
    return (x * m).sum() / (m.sum() * x.shape[1]).clamp_min(1.0)


def masked_log_softmax(x: Tensor, mask: Tensor) -> Tensor:
    """log-softmax of ``x`` [B,C,N] over N restricted to ``mask`` [B,1,N] == 1; 0 at masked-out entries.

    Masked entries get probability 0; their log is replaced by 0 (not -inf) so
    that ``p * (log p - log q)`` is 0 there. The fill is the dtype's most
    negative finite value rather than -inf: exp() still underflows to 0, yet a
    row with no valid entry stays finite and backward never sees NaN.
    """
    valid = mask.bool().expand_as(x)
    logp = torch.log_softmax(x.masked_fill(~valid, torch.finfo(x.dtype).min), dim=-1)
    return torch.where(valid, logp, torch.zeros_like(logp))
