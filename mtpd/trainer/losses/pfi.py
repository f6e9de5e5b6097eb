"""Prediction-guided Feature Imitation (Li et al., "Knowledge Distillation for Object Detection
via Rank Mimicking and Prediction-guided Feature Imitation", AAAI 2022, arXiv 2112.04840).

Feature imitation is weighted, cell by cell, by how far the student's predictions are from the
teacher's, so it concentrates where the gap in features actually changes the detections::

    P_dif,l = mean_{k ∈ A·K} (P^S_l − P^T_l)²            [B,1,H,W], class predictions
    F_dif,l = mean_{c} (A_l(F^S_l) − F^T_l)²              [B,1,H,W], FPN features
    L_PFI   = mean_l R(P_dif,l ⊙ F_dif,l)

Term by term, with the option that selects each:

- ``pred``: P is the class *logits* (``logits``, the default: the public reimplementation's and
  docs/design.md's reading) or the sigmoid *probabilities* (``probs``). On logits a fresh head at the
  prior (≈ −4.6) against a confident teacher's background (≈ −9 and below) makes P_dif large almost
  everywhere, so the weight mostly encodes that background gap; on probabilities both backgrounds
  are ≈ 0 and the weight is the gap where either model sees an object.
- ``detach_pred``: False (the default; both public reimplementations keep P_dif's gradient, so PFI
  also pulls the student's class logits towards the teacher's, weighted by F_dif); True makes PFI a
  feature loss only, leaving the class head to the detection loss.
- ``reduction`` R: ``norm`` (the default, the reimplementation's final form): per image the L2 norm
  of the product over its valid cells, divided by B·h·w (the batch size times the level's cells),
  then the mean over images; ``mean``: the mean of the product over every valid cell of the batch.
  ``norm`` is far smaller than ``mean`` for the same maps (a square root, and 1/(B·h·w) against
  1/(valid cells)), so a weight means different things under each.
- A_l: a 1x1 adapter when feature channels differ, identity otherwise (the paper's students share
  the teacher's 256 channels).

Default weight 1.5 (the paper's and the reimplementation's).
"""

from __future__ import annotations

from torch import Tensor, nn

from mtpd.trainer.losses.base import DistillBatch, DistillLoss, adapter, masked_mean

PREDS = ("logits", "probs")
REDUCTIONS = ("norm", "mean")


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
        detach_pred: bool = False,
        pred: str = "logits",
        reduction: str = "norm",
    ) -> None:
        super().__init__()
        if pred not in PREDS:
            raise ValueError(f"pfi: pred {pred!r} is not one of {', '.join(PREDS)}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"pfi: reduction {reduction!r} is not one of {', '.join(REDUCTIONS)}")
        self.levels = tuple(levels)
        self.detach_pred = bool(detach_pred)
        self.pred, self.reduction = pred, reduction
        self.adapters = nn.ModuleDict({f"p{lvl}": adapter(student_channels, teacher_channels) for lvl in self.levels})

    def forward(self, batch: DistillBatch) -> Tensor:
        total: Tensor | None = None
        for lvl in self.levels:
            ps, pt = batch.pair("cls", lvl)
            fs, ft = batch.pair("fpn", lvl)
            if self.pred == "probs":
                ps, pt = ps.sigmoid(), pt.sigmoid()
            p_dif = ((ps - pt) ** 2).mean(dim=1, keepdim=True)
            if self.detach_pred:
                p_dif = p_dif.detach()
            f_dif = ((self.adapters[f"p{lvl}"](fs) - ft) ** 2).mean(dim=1, keepdim=True)
            term = self._reduce(p_dif * f_dif, batch.masks[lvl])
            total = term if total is None else total + term
        assert total is not None, "pfi: no levels"
        return total / len(self.levels)

    def _reduce(self, x: Tensor, mask: Tensor) -> Tensor:
        if self.reduction == "mean":
            return masked_mean(x, mask)
        b, _, h, w = x.shape
        m = mask.to(x.dtype)
        # The norm's square root has an infinite slope at 0: a tiny floor keeps an all-zero image finite.
        norms = ((x * m) ** 2).flatten(1).sum(1).clamp_min(1e-24).sqrt()
        return (norms / (b * h * w)).mean()
