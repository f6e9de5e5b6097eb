"""Channel-wise distillation (Shu et al., "Channel-wise Knowledge Distillation for Dense
Prediction", ICCV 2021).

For each image b and channel c, turn the map into a distribution over its
valid spatial locations with temperature τ, then match the teacher's::

    φ(X)_{b,c,i} = softmax_i(X_{b,c,i} / τ)                    i over valid cells
    L = Σ_l τ² / (B·C) · Σ_{b,c} KL(φ(T_l)_{b,c} ‖ φ(A_l(S_l))_{b,c})

``target="fpn"`` (default) distills FPN features, with a 1x1 adapter when
channels differ; ``target="cls"`` distills the dense class logits (the paper's
main setting, weight 3 and τ=4 there), which have equal shapes by
construction, so no adapter. Default weight 1, τ=4.
"""

from __future__ import annotations

from torch import Tensor, nn

from mtpd.trainer.losses.base import DistillBatch, DistillLoss, adapter, masked_log_softmax


class CWDLoss(DistillLoss):
    name = "cwd"
    needs = ("fpn",)
    default_weight = 1.0

    def __init__(
        self,
        *,
        levels: tuple[int, ...],
        student_channels: int,
        teacher_channels: int,
        tau: float = 4.0,
        target: str = "fpn",
    ) -> None:
        super().__init__()
        if target not in ("fpn", "cls"):
            raise ValueError(f"cwd: target must be 'fpn' or 'cls', got {target!r}")
        if tau <= 0:
            raise ValueError(f"cwd: tau must be positive, got {tau}")
        self.levels = tuple(levels)
        self.tau = float(tau)
        self.target = target
        self.needs = (target,)  # the instance reads only the output it distills
        self.adapters = nn.ModuleDict(
            {
                f"p{lvl}": adapter(student_channels, teacher_channels) if target == "fpn" else nn.Identity()
                for lvl in self.levels
            }
        )

    def forward(self, batch: DistillBatch) -> Tensor:
        total: Tensor | None = None
        for lvl in self.levels:
            s, t = batch.pair(self.target, lvl)
            s = self.adapters[f"p{lvl}"](s)
            b, c = t.shape[:2]
            mask = batch.masks[lvl].flatten(2)  # [B,1,HW]
            logp_s = masked_log_softmax(s.flatten(2) / self.tau, mask)
            logp_t = masked_log_softmax(t.flatten(2) / self.tau, mask)
            # exp(0) = 1 at masked entries, so zero them explicitly: p_T is 0 off the valid cells.
            p_t = logp_t.exp() * mask
            term = (p_t * (logp_t - logp_s)).sum() * self.tau**2 / (b * c)
            total = term if total is None else total + term
        assert total is not None, "cwd: no levels"
        return total
