"""Students: build from a plan, save/load their checkpoints, inherit a teacher's neck and head.

Weight inheritance (MTPD, stage 1) copies parameters out of the teacher's
checkpoint file at stage start; no teacher module is ever built here.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mtpd import checkpoint
from mtpd.checkpoint import CheckpointError, split_state_dict
from mtpd.factory import FactoryError, is_factory_spec
from mtpd.models import (
    ADAPTERS,
    adapter_class,
    adapter_for,
    arch_checkpoint,
    arch_info,
    build_arch,
    build_factory_student,
    build_model,
    infer_num_classes,
)
from mtpd.models.parts import load_checked
from mtpd.trainer.plan import PlanError, StudentConfig


def label_offset(arch_or_model: str | nn.Module) -> int:
    """1 where the family reserves class 0 for the background (torchvision's R-CNNs), else 0: its adapter says."""
    if isinstance(arch_or_model, str):
        return adapter_class(arch_info(arch_or_model).family).label_offset
    return adapter_for(arch_or_model).label_offset


def build_student(cfg: StudentConfig, num_classes: int) -> nn.Module:
    """The student named by the plan, with its ImageNet backbone init (or none).

    ``arch: package.module:factory`` builds the user's own detector (``mtpd.models.build_factory_student``):
    ``factory(num_classes=N, **options)``, N counted as torchvision's constructor counts (R-CNNs add the
    background); ``init`` does not apply (the factory loads its own backbone weights, through an option).
    """
    options = dict(cfg.options)
    if is_factory_spec(cfg.arch):
        if cfg.init and cfg.init != "none":
            raise PlanError(
                f"student.init: {cfg.arch!r} is a factory, which loads its own backbone weights; drop init and pass "
                "the file in student.options to a parameter of the factory"
            )
        return build_factory_student(cfg.arch, num_classes, **options)
    if cfg.init and cfg.init != "none":
        options["backbone_weights"] = cfg.init
    try:
        return build_arch(cfg.arch, num_classes + label_offset(cfg.arch), **options)
    except ValueError as e:
        raise PlanError(f"student: {e}") from None


def save_student(model: nn.Module, path: str | Path, **extra) -> None:
    """A checkpoint that both ``mtpd-eval`` and teacher loading (``--weights PATH``) accept."""
    ckpt = arch_checkpoint(model, **extra)
    checkpoint.save(ckpt, path)


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint mtpd-train wrote (final.pt or last.pt), read safely."""
    ckpt = checkpoint.load(path)
    if not isinstance(ckpt, dict):
        raise CheckpointError(
            f"{path}: expected a checkpoint dict, got {type(ckpt).__name__}; save students with mtpd-train"
        )
    return ckpt


def load_student(
    path: str | Path,
    device: str | torch.device = "cpu",
    arch: str | None = None,
    num_classes: int | None = None,
    options: dict | None = None,
) -> nn.Module:
    """Rebuild a student from its checkpoint alone (arch, classes and options travel with it; a factory's
    ``package.module:factory`` is imported again), or a plain state dict (``torch.save(model.state_dict())``,
    maybe inside ``{"model": ...}`` / ``{"state_dict": ...}``) given its ``arch``: a registered name or a
    factory. ``num_classes`` counts as torchvision's constructor does (default: read off the class head);
    ``options`` default to the checkpoint's when it was saved from the same arch."""
    state, meta = split_state_dict(checkpoint.load(path), path)
    saved = meta.get("arch")
    arch = arch or saved
    if arch is None:
        raise CheckpointError(
            f"{path}: a plain state dict, which does not say what it was saved from; pass its architecture: "
            "mtpd-eval --arch NAME_OR_PACKAGE.MODULE:FACTORY [--num-classes K] [--options JSON]"
        )
    if num_classes is None:
        num_classes = (meta.get("num_classes") if saved == arch else None) or infer_num_classes(state)
    if options is None:
        options = dict(meta.get("arch_options") or {}) if saved == arch else {}
    try:
        model = build_model(arch, None if num_classes is None else int(num_classes), **options)
    except FactoryError:
        raise
    except ValueError as e:
        raise CheckpointError(f"{path}: cannot build {arch}: {e}") from None
    problem = load_checked(model, state)
    if problem:
        raise CheckpointError(
            f"{path} does not fit {arch}: {problem}; pass the architecture, --num-classes and --options it was "
            "saved from"
        )
    return model.to(device)


def _teacher_state(path: str) -> dict[str, torch.Tensor]:
    """The teacher checkpoint's state dict under torchvision's names: another framework's keys imported by the
    family adapter that knows them (``DetectorAdapter.import_state``)."""
    ckpt = load_checkpoint(path)
    state = ckpt.get("model") or ckpt.get("state_dict") or ckpt
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: no state dict inside (expected keys 'model' or 'state_dict')")
    for adapter in ADAPTERS:
        imported = adapter.import_state(state)
        if imported is not None:
            return imported
    return dict(state)


def inherit_from_teacher(student: nn.Module, weights: str, parts: list[str]) -> list[str]:
    """Copy the teacher checkpoint's neck/head parameters into the student where names and shapes match.

    Returns the copied names. A part that copies nothing is an error: it means the
    architectures do not correspond (e.g. different FPN widths) and inheritance is not possible.
    """
    prefixes = adapter_for(student).parts  # where the student's family keeps its neck and head
    unknown = [p for p in parts if p not in prefixes]
    if unknown:
        raise PlanError(f"inherit.parts: unknown part(s) {unknown}; use {' and/or '.join(prefixes)}")
    src = _teacher_state(weights)
    dst = student.state_dict()
    copied: list[str] = []
    for part in parts:
        keys = [k for k in dst if k.startswith(prefixes[part])]
        if not keys:  # a factory student whose neck lives elsewhere: copying nothing is no inheritance
            raise CheckpointError(
                f"{weights}: cannot inherit the {part}: the student has no parameters under "
                f"{' or '.join(prefixes[part])}; name its {part} so in the factory, or drop {part} from "
                "inherit.parts"
            )
        fit = [k for k in keys if k in src and src[k].shape == dst[k].shape]
        if keys and not fit:
            sample = next((k for k in keys if k in src), None)
            why = (
                f"{sample}: teacher {tuple(src[sample].shape)} vs student {tuple(dst[sample].shape)}"
                if sample
                else "no matching parameter names"
            )
            raise CheckpointError(
                f"{weights}: cannot inherit the {part}: {why}; inherit only from a teacher whose {part} has the "
                "student's widths"
            )
        for k in fit:
            dst[k] = src[k].to(dst[k].dtype)
        copied += fit
    student.load_state_dict(dst)
    return copied
