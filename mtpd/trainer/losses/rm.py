"""Rank Mimicking (Li et al., "Knowledge Distillation for Object Detection via Rank Mimicking
and Prediction-guided Feature Imitation", AAAI 2022).

The student learns how the teacher *ranks* the candidate anchors of each
object, not their absolute scores::

    P_m   = { anchors i : IoU(i, m) ≥ 0.5, m = argmax_g IoU(i, g), i on a valid cell }
    s_i   = σ(logit of m's class at anchor i)                 (teacher: s^T, student: s^S)
    L_RM  = mean_{m : |P_m| ≥ 1} KL( softmax_{i∈P_m}(s^T_i) ‖ softmax_{i∈P_m}(s^S_i) )

and 0 (still attached to the graph) when no box has a positive anchor.

Choices: positives come from a plain max-IoU assignment on ``batch.anchors``
(the same for teacher and student, since it depends on geometry only); no
low-quality matches (mmdet's ``min_pos_iou`` rule would add each box's best
anchor below the threshold), so a box with no anchor at IoU ≥ 0.5 is skipped.
The softmax is over sigmoid *scores*, as in the paper. Default weight 4.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_iou

from mtpd.trainer.losses.base import DistillBatch, DistillLoss


def flatten_levels(batch: DistillBatch, side: dict[str, Tensor], levels: tuple[int, ...]) -> Tensor:
    """cls maps [B,A*K,H,W] per level -> [B, Σ H*W*A, K] in torchvision's anchor order."""
    maps = [side[f"cls.p{lvl}"] for lvl in levels]
    # (B, A*K, H, W) -> (B, H, W, A*K) -> (B, H*W*A, K): channel a*K + k is anchor a, class k.
    return torch.cat([m.permute(0, 2, 3, 1).reshape(m.shape[0], -1, batch.num_classes) for m in maps], dim=1)


def flatten_masks(batch: DistillBatch, levels: tuple[int, ...]) -> Tensor:
    """masks [B,1,H,W] per level -> [B, Σ H*W*A] bool, each cell repeated for its A anchors."""
    a = batch.num_anchors
    out = []
    for lvl in levels:
        m = batch.masks[lvl].permute(0, 2, 3, 1)  # [B,H,W,1]
        out.append(m.expand(-1, -1, -1, a).reshape(m.shape[0], -1))
    return torch.cat(out, dim=1) > 0.5


class RankMimickingLoss(DistillLoss):
    name = "rm"
    needs = ("cls",)
    needs_anchors = True
    default_weight = 4.0

    def __init__(self, *, levels: tuple[int, ...], iou_threshold: float = 0.5) -> None:
        super().__init__()
        self.levels = tuple(levels)
        self.iou_threshold = float(iou_threshold)

    def forward(self, batch: DistillBatch) -> Tensor:
        for lvl in self.levels:
            batch.pair("cls", lvl)  # clear error if a level is missing
        s_all = flatten_levels(batch, batch.student, self.levels)
        t_all = flatten_levels(batch, batch.teacher, self.levels)
        valid = flatten_masks(batch, self.levels)
        anchors = batch.anchors
        if anchors is None or anchors.shape[0] != s_all.shape[1]:
            got = None if anchors is None else tuple(anchors.shape)
            raise ValueError(
                f"rm: needs batch.anchors of shape [{s_all.shape[1]}, 4] for levels {self.levels} "
                f"with {batch.num_anchors} anchors per cell, got {got}"
            )
        per_box: list[Tensor] = []
        for b, (boxes, labels) in enumerate(zip(batch.gt_boxes, batch.gt_labels)):
            if boxes.numel() == 0:
                continue
            best, owner = box_iou(boxes.to(anchors), anchors).max(dim=0)  # per anchor: best gt
            idx = ((best >= self.iou_threshold) & valid[b]).nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            g = owner[idx]  # which gt each positive anchor belongs to
            cls = labels.to(idx.device)[g]
            ss, ts = s_all[b, idx, cls].sigmoid(), t_all[b, idx, cls].sigmoid()
            n = boxes.shape[0]
            has = torch.zeros(n, dtype=torch.bool, device=idx.device)
            has[g] = True
            # Softmax within each gt's group via index_add: scores lie in (0,1),
            # so exp() cannot overflow; boxes with no anchor get a dummy sum of 1.
            pad = (~has).to(ss.dtype)
            lse_s = (torch.zeros(n, dtype=ss.dtype, device=ss.device).index_add(0, g, ss.exp()) + pad).log()
            lse_t = (torch.zeros(n, dtype=ts.dtype, device=ts.device).index_add(0, g, ts.exp()) + pad).log()
            logp_s, logp_t = ss - lse_s[g], ts - lse_t[g]
            kl = torch.zeros(n, dtype=ss.dtype, device=ss.device).index_add(0, g, logp_t.exp() * (logp_t - logp_s))
            per_box.append(kl[has])
        if not per_box:
            return s_all.sum() * 0.0  # keeps the graph (and DDP's used-parameter check) intact
        return torch.cat(per_box).mean()
