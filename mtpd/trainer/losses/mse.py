"""FitNet-style feature MSE (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015).

    L = Σ_l mean_{valid b,c,h,w} (A_l(S_l) − T_l)²

A_l: a 1x1 conv adapter (FitNet's regressor) when student and teacher
channels differ, identity otherwise. Each level is averaged over its valid
elements (valid cells × channels) and the levels are summed, so small coarse
levels weigh as much as large fine ones.
"""

from __future__ import annotations

from torch import Tensor, nn

from mtpd.trainer.losses.base import DistillBatch, DistillLoss, adapter, masked_mean


class MSELoss(DistillLoss):
    name = "mse"
    needs = ("fpn",)
    default_weight = 1.0

    def __init__(self, *, levels: tuple[int, ...], student_channels: int, teacher_channels: int) -> None:
        super().__init__()
        self.levels = tuple(levels)
        self.adapters = nn.ModuleDict({f"p{lvl}": adapter(student_channels, teacher_channels) for lvl in self.levels})

    def forward(self, batch: DistillBatch) -> Tensor:
        total: Tensor | None = None
        for lvl in self.levels:
            s, t = batch.pair("fpn", lvl)
            term = masked_mean((self.adapters[f"p{lvl}"](s) - t) ** 2, batch.masks[lvl])
            total = term if total is None else total + term
        assert total is not None, "mse: no levels"
        return total
