"""What the architecture registry holds about one architecture (the arch modules and the registry both
import it, and nothing here imports them; the families are the adapters')."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from mtpd.models.adapters import FAMILIES

# factory(num_classes, **options) -> torchvision detection model
ArchFactory = Callable[..., nn.Module]


@dataclass(frozen=True)
class ArchInfo:
    """One registered architecture.

    ``coco_weights``: the torchvision weights enum member with published COCO
    weights for exactly this architecture at its default options (None when
    torchvision publishes none). ``coco_bn_eps``: the FrozenBatchNorm eps those
    weights were trained with, where it differs from the default (torchvision's
    legacy v1 weights use 0.0).
    """

    name: str
    family: str
    factory: ArchFactory
    coco_weights: Any = None
    coco_bn_eps: float | None = None
    description: str = ""

    def default_options(self) -> dict[str, Any]:
        """Options ``build_arch`` accepts for this name, with their defaults."""
        sig = inspect.signature(self.factory)
        return {
            k: p.default
            for k, p in sig.parameters.items()
            if k != "num_classes" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        }


def arch_table(add: Callable[[ArchInfo], Any]) -> Callable[..., Callable[[ArchFactory], ArchFactory]]:
    """The one ``register_arch`` decorator, bound to where its entries go: each arch module binds it to its own
    list (``arch_table(ARCHS.append)``, which the registry imports explicitly), the registry to its table (the
    user's own architectures)."""

    def register_arch(
        name: str, *, family: str, coco_weights: Any = None, coco_bn_eps: float | None = None, description: str = ""
    ) -> Callable[[ArchFactory], ArchFactory]:
        """Decorator: register ``factory(num_classes, *, **options) -> nn.Module`` under ``name``."""
        if family not in FAMILIES:
            raise ValueError(f"arch {name!r}: family {family!r} is not one of {', '.join(FAMILIES)}")

        def deco(fn: ArchFactory) -> ArchFactory:
            add(ArchInfo(name, family, fn, coco_weights, coco_bn_eps, description or (fn.__doc__ or "").strip()))
            return fn

        return deco

    return register_arch
