"""PKD: Pearson-correlation feature distillation (Cao et al., "PKD: General Distillation Framework
for Object Detectors via Pearson Correlation Coefficient", NeurIPS 2022).

    n(X)_{b,c} = (X_{b,c} − μ_{b,c}) / sqrt(σ²_{b,c} + ε)      over the valid cells of image b
    L = Σ_l mean_{valid b,c,h,w} (n(A_l(S_l)) − n(T_l))² / 2

μ, σ² are the mean and population variance of channel c of image b over its
valid cells, so MSE/2 of the normalised maps is 1 − Pearson r per channel.
A_l: 1x1 adapter when channels differ, identity otherwise.

Choices: statistics per image (mmrazor's PKDLoss pools each channel over the
whole batch), so an image's loss does not depend on what it is batched with or
on the batch's padding; population variance, ε = 1e-6. Default weight 1; the
PKD paper uses 6 for RetinaNet.
"""

from __future__ import annotations

from torch import Tensor, nn

from mtpd.trainer.losses.base import DistillBatch, DistillLoss, adapter, masked_mean


def normalize_per_channel(x: Tensor, mask: Tensor, eps: float = 1e-6) -> Tensor:
    """Zero mean / unit variance per (image, channel) over valid cells; 0 on padding."""
    m = mask.to(x.dtype)
    n = m.sum(dim=(2, 3), keepdim=True).clamp_min(1.0)
    mean = (x * m).sum(dim=(2, 3), keepdim=True) / n
    var = (((x - mean) * m) ** 2).sum(dim=(2, 3), keepdim=True) / n
    return (x - mean) / (var + eps).sqrt() * m


class PKDLoss(DistillLoss):
    name = "pkd"
    needs = ("fpn",)
    default_weight = 1.0

    def __init__(
        self, *, levels: tuple[int, ...], student_channels: int, teacher_channels: int, eps: float = 1e-6
    ) -> None:
        super().__init__()
        self.levels = tuple(levels)
        self.eps = float(eps)
        self.adapters = nn.ModuleDict({f"p{lvl}": adapter(student_channels, teacher_channels) for lvl in self.levels})

    def forward(self, batch: DistillBatch) -> Tensor:
        total: Tensor | None = None
        for lvl in self.levels:
            s, t = batch.pair("fpn", lvl)
            mask = batch.masks[lvl]
            ns = normalize_per_channel(self.adapters[f"p{lvl}"](s), mask, self.eps)
            nt = normalize_per_channel(t, mask, self.eps)
            term = masked_mean((ns - nt) ** 2, mask) / 2
            total = term if total is None else total + term
        assert total is not None, "pkd: no levels"
        return total
