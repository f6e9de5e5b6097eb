"""Masked Generative Distillation (Yang et al., "Masked Generative Distillation", ECCV 2022).

MTPD (Cao et al., ICML 2023) uses it as the per-stage loss on FPN levels::

    L = Σ_l Σ_{c,h,w} (G_l(A_l(S_l) ⊙ M_l) − T_l)² / B        (sum over valid cells only)

- M_l [B,1,H,W]: random spatial mask, each location dropped (0) with
  probability ``lambda_mask``, kept (1) otherwise; redrawn every step.
- A_l: 1x1 "align" conv from student to teacher channels when they differ
  (as MGD's code does), identity otherwise.
- G_l: conv3x3 → ReLU → conv3x3 on teacher channels, one per level.

Presets: RetinaNet α=2e-5, λ=0.65 (the defaults here); Mask R-CNN α=5e-7,
λ=0.45. α (the trainer's weight) was set for 256-channel FPNs at COCO sizes;
the summed loss scales with channels × locations, so rescale it for small
models or images.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mtpd.trainer.losses.base import DistillBatch, DistillLoss, adapter


class MGDLoss(DistillLoss):
    name = "mgd"
    needs = ("fpn",)
    default_weight = 2e-5

    def __init__(
        self,
        *,
        levels: tuple[int, ...],
        student_channels: int,
        teacher_channels: int,
        lambda_mask: float = 0.65,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= lambda_mask < 1.0:
            raise ValueError(f"mgd: lambda_mask is a drop probability in [0, 1), got {lambda_mask}")
        self.levels = tuple(levels)
        self.lambda_mask = float(lambda_mask)
        # An explicit torch.Generator makes the masks reproducible (tests, debugging).
        self.generator = generator
        ct = teacher_channels
        self.align = nn.ModuleDict({f"p{lvl}": adapter(student_channels, ct) for lvl in self.levels})
        self.generation = nn.ModuleDict(
            {
                f"p{lvl}": nn.Sequential(
                    nn.Conv2d(ct, ct, kernel_size=3, padding=1),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(ct, ct, kernel_size=3, padding=1),
                )
                for lvl in self.levels
            }
        )

    def random_mask(self, like: Tensor) -> Tensor:
        """[B,1,H,W] in {0,1}: 0 (dropped) with probability lambda_mask."""
        b, _, h, w = like.shape
        device = self.generator.device if self.generator is not None else like.device
        u = torch.rand((b, 1, h, w), generator=self.generator, device=device)
        return (u >= self.lambda_mask).to(device=like.device, dtype=like.dtype)

    def forward(self, batch: DistillBatch) -> Tensor:
        total: Tensor | None = None
        for lvl in self.levels:
            s, t = batch.pair("fpn", lvl)
            s = self.align[f"p{lvl}"](s)
            # Padding cells of S stay as generator input: they are the student's
            # real outputs on the padded image, and the 3x3 convs read them at
            # the border. Only the loss is restricted to valid cells.
            new = self.generation[f"p{lvl}"](s * self.random_mask(s))
            valid = batch.masks[lvl].to(new.dtype)
            term = ((new - t) ** 2 * valid).sum() / s.shape[0]
            total = term if total is None else total + term
        assert total is not None, "mgd: no levels"
        return total
