"""Flat registry of distillation losses, filled at import (no import side effects needed elsewhere).

    loss = build_loss("mgd", levels=(3, 4, 5, 6, 7), student_channels=128, teacher_channels=256,
                      num_anchors=9, num_classes=80, lambda_mask=0.65)
    total = det_loss + weight * loss(batch)          # weight: the plan's, else loss_defaults(name)["weight"]

``build_loss`` passes each loss only the shared context it declares
(levels, channels, anchors, classes) plus its own hyper-parameters, and
rejects anything else by name.
"""

from __future__ import annotations

import inspect
from typing import Any

from mtpd.errors import unknown_keys
from mtpd.trainer.losses.base import DistillBatch, DistillLoss
from mtpd.trainer.losses.cwd import CWDLoss
from mtpd.trainer.losses.kd import KDLoss
from mtpd.trainer.losses.mgd import MGDLoss
from mtpd.trainer.losses.mse import MSELoss
from mtpd.trainer.losses.pfi import PFILoss
from mtpd.trainer.losses.pkd import PKDLoss
from mtpd.trainer.losses.rm import RankMimickingLoss

LOSSES: dict[str, type[DistillLoss]] = {
    cls.name: cls for cls in (MGDLoss, MSELoss, PKDLoss, CWDLoss, KDLoss, RankMimickingLoss, PFILoss)
}

# What the trainer knows about every stage; a loss takes the subset its constructor names.
_CONTEXT = ("levels", "student_channels", "teacher_channels", "num_anchors", "num_classes")


def _lookup(name: str) -> type[DistillLoss]:
    if name not in LOSSES:
        raise ValueError(f"unknown distillation loss {name!r}; registered: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


def _params(cls: type[DistillLoss]) -> dict[str, inspect.Parameter]:
    """The loss's own hyper-parameters: constructor keywords that are not shared context."""
    sig = inspect.signature(cls.__init__)
    return {p.name: p for p in sig.parameters.values() if p.name != "self" and p.name not in _CONTEXT}


def check_params(name: str, params: dict[str, Any]) -> None:
    """ValueError when ``name`` is not a registered loss or ``params`` names a parameter it does not take:
    what a plan can be checked for before any store or student exists."""
    cls = _lookup(name)
    accepted = _params(cls)
    unknown = unknown_keys(params, accepted)
    if unknown:
        hint = " ('weight' belongs to the stage, not the loss)" if "weight" in unknown else ""
        raise ValueError(
            f"loss {name!r} got unknown parameter(s) {', '.join(unknown)}; accepted: "
            f"{', '.join(sorted(accepted)) or '(none)'}{hint}"
        )


def build_loss(
    name: str,
    *,
    levels: tuple[int, ...],
    student_channels: int,
    teacher_channels: int,
    num_anchors: int,
    num_classes: int,
    **params: Any,
) -> DistillLoss:
    """Build loss ``name`` for one stage; unknown names and parameters raise ValueError."""
    check_params(name, params)
    cls = _lookup(name)
    context = dict(
        levels=tuple(levels),
        student_channels=student_channels,
        teacher_channels=teacher_channels,
        num_anchors=num_anchors,
        num_classes=num_classes,
    )
    wanted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in context.items() if k in wanted}, **params)


def loss_defaults(name: str) -> dict[str, Any]:
    """``{"weight": default_weight, **hyper-parameters}`` for plan files and the resolved config.

    Only plain config values (numbers, strings, booleans) are listed; runtime
    objects such as mgd's ``generator`` are constructor-only. Pop ``weight``
    before passing the rest to ``build_loss``.
    """
    cls = _lookup(name)
    out: dict[str, Any] = {"weight": cls.default_weight}
    for p in _params(cls).values():
        if isinstance(p.default, (bool, int, float, str)):
            out[p.name] = p.default
    return out


__all__ = ["LOSSES", "DistillBatch", "DistillLoss", "build_loss", "check_params", "loss_defaults"]
