"""Rank Mimicking (Li et al., "Knowledge Distillation for Object Detection via Rank Mimicking
and Prediction-guided Feature Imitation", AAAI 2022, arXiv 2112.04840).

The student learns how the teacher *ranks* the candidate anchors of each
object, not their absolute scores::

    P_m   = { anchors i on valid cells assigned to box m }            (see "assignment")
    s_i   = σ(logit of m's class at anchor i)                          (teacher: s^T, student: s^S)
    L_RM  = mean_{m : |P_m| ≥ 1} KL( softmax_{i∈P_m}(s^T_i / T) ‖ softmax_{i∈P_m}(s^S_i / T) )

and 0 (still attached to the graph) when no box has a candidate. Term by term:

- assignment: mmdet's ``MaxIoUAssigner`` as RetinaNet trains with it (positive at IoU ≥
  ``iou_threshold`` = 0.5, each anchor to the box it overlaps most) on ``batch.anchors``; the same
  for teacher and student, since it depends on geometry only (the paper assigns with the teacher's
  positives; with shared anchors they are the same set). ``low_quality=True`` (the default, mmdet's
  ``min_pos_iou=0`` rule, as the public reimplementation configures it) also gives every box the
  anchors of its highest IoU, so a small box with no anchor at 0.5 still has candidates;
  ``low_quality=False`` is the plain threshold (a box without such an anchor is skipped).
- score: the sigmoid probability of the box's class, as the paper ranks "candidate boxes" by
  their scores (the public reimplementation does too). ``temperature`` T = 1 by default.
- KL direction: KL(teacher ‖ student), summed over a box's candidates, mean over the boxes of the
  batch (the reimplementation: mean over each image's boxes, then over images; ours weighs every
  box alike).
- not copied: the reimplementation sorts teacher and student scores independently before the
  softmax, which discards which anchor ranks where.

Size: σ(·) lies in (0, 1), so at T = 1 a box's softmax is close to uniform and its KL is small
(~0.01), whatever the student has learnt; lower T sharpens both distributions. Default weight 4
(the paper's and the reimplementation's).
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


def assign(boxes: Tensor, anchors: Tensor, valid: Tensor, threshold: float, low_quality: bool) -> Tensor:
    """Per anchor: the index of its box, or -1 (mmdet's MaxIoUAssigner with ``min_pos_iou=0`` when
    ``low_quality``: boxes in order, each then takes every valid anchor at its own highest IoU)."""
    ious = box_iou(boxes.to(anchors), anchors)  # [M, N]
    ious = torch.where(valid[None], ious, torch.full_like(ious, -1.0))  # padded cells never match
    best, owner = ious.max(dim=0)
    owner = torch.where(best >= threshold, owner, torch.full_like(owner, -1))
    if low_quality:
        top = ious.max(dim=1).values  # [M]
        for m in range(boxes.shape[0]):
            if top[m] > 0:  # mmdet: >= min_pos_iou (0); an IoU of 0 is no overlap at all
                owner[ious[m] == top[m]] = m
    return owner


class RankMimickingLoss(DistillLoss):
    name = "rm"
    needs = ("cls",)
    needs_anchors = True
    needs_labels = True
    default_weight = 4.0

    def __init__(
        self,
        *,
        levels: tuple[int, ...],
        iou_threshold: float = 0.5,
        low_quality: bool = True,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if not temperature >= 0.02:  # exp(σ / T) of a score near 1 overflows fp32 below T ≈ 0.011
            raise ValueError(f"rm: temperature must be at least 0.02, got {temperature}")
        self.levels = tuple(levels)
        self.iou_threshold = float(iou_threshold)
        self.low_quality = bool(low_quality)
        self.temperature = float(temperature)

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
            owner = assign(boxes, anchors, valid[b], self.iou_threshold, self.low_quality)
            idx = (owner >= 0).nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            per_box.append(self._kl(s_all[b], t_all[b], idx, owner[idx], labels.to(idx.device), boxes.shape[0]))
        if not per_box:
            return s_all.sum() * 0.0  # keeps the graph (and DDP's used-parameter check) intact
        return torch.cat(per_box).mean()

    def _kl(self, s: Tensor, t: Tensor, idx: Tensor, g: Tensor, labels: Tensor, n: int) -> Tensor:
        """KL(teacher ‖ student) of each box's softmax over its candidates (``g``: their boxes), for the boxes
        that have any."""
        cls = labels[g]
        ss, ts = s[idx, cls].sigmoid() / self.temperature, t[idx, cls].sigmoid() / self.temperature
        has = torch.zeros(n, dtype=torch.bool, device=idx.device)
        has[g] = True
        # Softmax within each box's group via index_add: scores are at most 1/T, so exp() cannot overflow
        # for T ≥ 0.02; boxes with no candidate get a dummy sum of 1.
        pad = (~has).to(ss.dtype)
        lse_s = (torch.zeros(n, dtype=ss.dtype, device=ss.device).index_add(0, g, ss.exp()) + pad).log()
        lse_t = (torch.zeros(n, dtype=ts.dtype, device=ts.device).index_add(0, g, ts.exp()) + pad).log()
        logp_s, logp_t = ss - lse_s[g], ts - lse_t[g]
        kl = torch.zeros(n, dtype=ss.dtype, device=ss.device).index_add(0, g, logp_t.exp() * (logp_t - logp_s))
        return kl[has]
