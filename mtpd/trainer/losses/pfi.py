"""Prediction-guided Feature Imitation (Li et al., "Knowledge Distillation for Object Detection
via Rank Mimicking and Prediction-guided Feature Imitation", AAAI 2022).

Feature imitation is weighted, cell by cell, by how far the student's
predictions are from the teacher's, so it concentrates where the gap in
features actually changes the detections::

    P_dif,l = mean_{k ∈ A·K} (P^S_l − P^T_l)²            [B,1,H,W], class logits
    F_dif,l = mean_{c} (A_l(F^S_l) − F^T_l)²              [B,1,H,W], FPN features
    L_PFI   = mean_l  mean_{valid b,h,w} (P_dif,l ⊙ F_dif,l)

A_l: 1x1 adapter when feature channels differ, identity otherwise.

Choice: P_dif is detached by default (``detach_pred=True``). The paper presents
the prediction gap as the guide (a weight) of feature imitation; detaching keeps
PFI a feature loss and leaves the class head to the detection loss and RM, and
avoids the product pulling predictions toward the teacher in proportion to the
feature gap. mmrazor's reimplementation does not detach; ``detach_pred=False``
reproduces that. Default weight 1.5.
"""

from __future__ import annotations

from torch import Tensor, nn

from mtpd.trainer.losses.base import DistillBatch, DistillLoss, adapter, masked_mean


class PFILoss(DistillLoss):
    name = "pfi"
    needs = ("fpn", "cls")
    default_weight = 1.5

    def __init__(
        self,
        *,
        levels: tuple[int, ...],
        student_channels: int,
        teacher_channels: int,
        detach_pred: bool = True,
    ) -> None:
        super().__init__()
        self.levels = tuple(levels)
        self.detach_pred = bool(detach_pred)
        self.adapters = nn.ModuleDict({f"p{lvl}": adapter(student_channels, teacher_channels) for lvl in self.levels})

    def forward(self, batch: DistillBatch) -> Tensor:
        total: Tensor | None = None
        for lvl in self.levels:
            ps, pt = batch.pair("cls", lvl)
            fs, ft = batch.pair("fpn", lvl)
            p_dif = ((ps - pt) ** 2).mean(dim=1, keepdim=True)
            if self.detach_pred:
                p_dif = p_dif.detach()
            f_dif = ((self.adapters[f"p{lvl}"](fs) - ft) ** 2).mean(dim=1, keepdim=True)
            term = masked_mean(p_dif * f_dif, batch.masks[lvl])
            total = term if total is None else total + term
        assert total is not None, "pfi: no levels"
        return total / len(self.levels)
