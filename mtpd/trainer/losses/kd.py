"""Soft-label KD on dense class logits (Hinton et al., "Distilling the Knowledge in a Neural
Network", 2015), adapted to sigmoid detectors.

Detector class outputs (RetinaNet, FCOS) are independent per-class sigmoids,
not a softmax over classes, so each anchor × class is a Bernoulli and the
softened teacher probability p = σ(t/τ) is matched by q = σ(s/τ)::

    L = τ² · mean_{valid b, anchors a, classes k} KL(Bern(p) ‖ Bern(q))
      = τ² · mean [ BCE(q, p) − BCE(p, p) ]

Choice: the binary KL, i.e. binary cross-entropy with the teacher's soft target
minus the teacher's own entropy. It has exactly the gradient of the plain BCE
form (the entropy term is constant) but is 0 when student and teacher agree,
which makes its value readable in logs. The mean runs over all valid
anchors × classes of all levels together (each anchor weighs the same, as in a
dense detection loss); τ² keeps gradient scale independent of τ. Default τ=2,
weight 1.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from mtpd.trainer.losses.base import DistillBatch, DistillLoss


class KDLoss(DistillLoss):
    name = "kd"
    needs = ("cls",)
    default_weight = 1.0

    def __init__(self, *, levels: tuple[int, ...], tau: float = 2.0) -> None:
        super().__init__()
        if tau <= 0:
            raise ValueError(f"kd: tau must be positive, got {tau}")
        self.levels = tuple(levels)
        self.tau = float(tau)

    def forward(self, batch: DistillBatch) -> Tensor:
        total: Tensor | None = None
        count: Tensor | None = None
        for lvl in self.levels:
            s, t = batch.pair("cls", lvl)
            s, t = s / self.tau, t / self.tau
            p = t.sigmoid()
            kl = F.binary_cross_entropy_with_logits(s, p, reduction="none") - F.binary_cross_entropy_with_logits(
                t, p, reduction="none"
            )
            m = batch.masks[lvl].to(kl.dtype)
            term = (kl * m).sum()
            n = m.sum() * kl.shape[1]  # valid cells × (A·K)
            total = term if total is None else total + term
            count = n if count is None else count + n
        assert total is not None and count is not None, "kd: no levels"
        return total / count.clamp_min(1.0) * self.tau**2
