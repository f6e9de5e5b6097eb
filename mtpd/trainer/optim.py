"""A stage's optimiser and learning-rate schedule, from its plan section."""

from __future__ import annotations

import torch
from torch import nn

from mtpd.trainer.plan import StageConfig


def make_optimizer(stage: StageConfig, params: list[nn.Parameter], batch_size: int) -> torch.optim.Optimizer:
    o = stage.optimizer
    lr = o.lr * batch_size / o.base_batch  # linear scaling rule, as mmdet's auto_scale_lr
    if o.type == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay)


def make_schedule(
    opt: torch.optim.Optimizer, stage: StageConfig, iters_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then steps at fractions of the stage (mmdet's 1x: epochs 8 and 11 of 12)."""
    sc = stage.schedule
    milestones = [int(round(f * stage.epochs)) * iters_per_epoch for f in sc.steps]

    def factor(it: int) -> float:
        f = sc.gamma ** sum(it >= m for m in milestones)
        if it < sc.warmup_iters:
            f *= sc.warmup_ratio + (1 - sc.warmup_ratio) * it / sc.warmup_iters
        return f

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)
