"""Teachers from torchvision detectors: every ``mtpd.models`` architecture is a teacher name.

Weights (``--weights``):
- a local checkpoint: a raw state dict, or a dict with ``model``/``state_dict`` and
  optionally ``arch``, ``num_classes``, ``arch_options`` (``mtpd.models.arch_checkpoint``
  writes these); without metadata the class count is read off the head's weights;
- ``default``: torchvision's published COCO weights for the architecture, read from the
  local torch cache (``torch.hub.get_dir()/checkpoints``) — never downloaded;
- ``none``: random init (smoke tests); ``num_classes`` is then required.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from mtpd.checkpoint import load_state_dict, sha256_file
from mtpd.models import (
    arch_family,
    arch_info,
    build_arch,
    dense_outputs,
    infer_num_classes,
    list_archs,
    output_specs,
    unwrap,
)
from mtpd.models.parts import hub_checkpoint_path, load_checked, name_hash_problem, set_frozen_bn_eps
from mtpd.output_spec import OutputSpec
from mtpd.teachers.base import INIT_SEED, TeacherError, TeacherIdentity, check_outputs


class TorchvisionTeacher:
    """A torchvision detector in eval mode, mapping prepared views to dense outputs
    (``mtpd.models.dense_outputs``, the same definition students use)."""

    def __init__(self, model: nn.Module, identity: TeacherIdentity, device: str | torch.device = "cpu") -> None:
        self.model = unwrap(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.identity = identity
        self._specs = output_specs(self.model)
        self.device = torch.device(device)
        self.model.to(self.device)

    def output_specs(self) -> dict[str, OutputSpec]:
        return dict(self._specs)

    def to(self, device: str | torch.device) -> "TorchvisionTeacher":
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    @torch.no_grad()
    def __call__(
        self, images: Tensor, outputs: Sequence[str], sizes: Sequence[tuple[int, int]] | None = None
    ) -> dict[str, Tensor]:
        # no_grad rather than inference_mode: online distillation uses these tensors as
        # loss targets, and inference tensors cannot be saved for backward.
        check_outputs(self, outputs, self.identity.name)
        if self.model.training:
            self.model.eval()
        param = next(self.model.parameters())
        return dense_outputs(self.model, images.to(param.device, param.dtype, non_blocking=True), outputs, sizes)

    def __repr__(self) -> str:
        i = self.identity
        return f"TorchvisionTeacher({i.name!r}, weights={i.weights!r}, device={str(self.device)!r})"


def read_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(state_dict, metadata) of a local checkpoint; CheckpointError naming the file otherwise."""
    return load_state_dict(path, mmap=True)


def load_weights(model: nn.Module, state_dict: dict[str, Tensor], source: str, arch: str) -> None:
    """Load into ``model`` or raise one TeacherError line naming the file, the arch and the misfit."""
    problem = load_checked(model, state_dict)
    if problem:
        raise TeacherError(
            f"weights {source} do not fit {arch} ({arch_family(model)}, "
            f"{output_specs(model)['fpn'].channels}-ch FPN): {problem}; pass the architecture the checkpoint was "
            "trained as"
        )


def _resolve_default(name: str) -> tuple[Path, Any]:
    info = arch_info(name)
    enum = info.coco_weights
    if enum is None:
        with_coco = ", ".join(n for n in list_archs() if arch_info(n).coco_weights is not None)
        raise TeacherError(
            f"torchvision publishes no COCO weights for {name}; pass a local checkpoint path "
            f"(archs with published weights: {with_coco})"
        )
    path = hub_checkpoint_path(enum.url)
    if not path.is_file():
        raise TeacherError(
            f"weights 'default' for {name} need {path}; download {enum.url} on a machine with network "
            f"access and place the file at that path (torch.hub.get_dir() is {torch.hub.get_dir()})"
        )
    return path, enum


def _check_hash(path: Path, digest: str) -> None:
    problem = name_hash_problem(path, digest)
    if problem:
        raise TeacherError(f"{problem}; download it again")


def build_torchvision_teacher(
    name: str, weights: str = "none", num_classes: int | None = None, device: str = "cpu"
) -> TorchvisionTeacher:
    """Build the registered architecture ``name`` as a teacher (see the module docstring for ``weights``)."""
    options: dict[str, Any] = {}
    state_dict: dict[str, Tensor] | None = None
    weights_file, digest, eps = "", "", None
    if weights == "none":
        if num_classes is None:
            raise TeacherError(
                f"teacher {name} with --weights none needs --num-classes (random init has no class count)"
            )
    elif weights == "default":
        path, enum = _resolve_default(name)
        coco_classes = len(enum.meta["categories"])
        if num_classes not in (None, coco_classes):
            raise TeacherError(
                f"{name} COCO weights have {coco_classes} classes, not {num_classes}; drop --num-classes"
            )
        num_classes, weights_file, eps = coco_classes, str(path), arch_info(name).coco_bn_eps
        # Built as torchvision builds it for these weights: FrozenBatchNorm2d (eps set below).
        options = {"norm": "frozen_bn"}
        state_dict, _ = read_checkpoint(path)
        digest = sha256_file(path)
        _check_hash(path, digest)
    else:
        path = Path(weights).expanduser()
        state_dict, meta = read_checkpoint(path)
        weights_file, digest = str(path.resolve()), sha256_file(path)
        if meta.get("arch") not in (None, name):
            raise TeacherError(
                f"checkpoint {path} was saved from arch {meta['arch']!r}; use it as teacher {meta['arch']!r}, not "
                f"{name!r}"
            )
        options = {k: v for k, v in dict(meta.get("arch_options") or {}).items() if k != "backbone_weights"}
        found = meta.get("num_classes") or infer_num_classes(state_dict)
        if found is None and num_classes is None:
            raise TeacherError(
                f"cannot tell the class count of {path} (no 'num_classes' and no known class head); pass --num-classes"
            )
        if found is not None and num_classes is not None and int(found) != num_classes:
            raise TeacherError(
                f"checkpoint {path} has {found} classes but --num-classes is {num_classes}; drop --num-classes"
            )
        num_classes = int(found) if found is not None else num_classes
    try:
        with torch.random.fork_rng(devices=[]):  # the seeded init leaves the caller's random stream untouched
            torch.manual_seed(INIT_SEED)
            model = build_arch(name, int(num_classes), **options)
    except ValueError as e:
        raise TeacherError(f"cannot build teacher {name}: {e}") from e
    if state_dict is not None:
        load_weights(model, state_dict, weights_file, name)
    if eps is not None:
        set_frozen_bn_eps(model, eps)
    config = json.dumps({"arch": name, "num_classes": int(num_classes), "options": options}, sort_keys=True)
    extra = {"family": arch_family(model), **({"init_seed": INIT_SEED} if state_dict is None else {})}
    recorded = weights_file if weights not in ("none", "default") else weights  # a file: by its resolved path
    identity = TeacherIdentity(name=name, config=config, weights=recorded, weights_sha256=digest, extra=extra)
    return TorchvisionTeacher(model, identity, device)


def torchvision_teachers() -> dict[str, Callable[..., TorchvisionTeacher]]:
    """Every registered architecture as a teacher factory, for the teacher registry."""
    return {name: partial(build_torchvision_teacher, name) for name in list_archs()}
