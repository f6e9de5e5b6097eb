"""One adapter per detector family, in one explicit list (``ADAPTERS``): a new family is one module and
one line here. ``adapter_for(model)`` finds a model's adapter by its class (the most derived match, so
Mask R-CNN is not taken for the Faster R-CNN it subclasses); ``adapter_class(family)`` by family name.
"""

from __future__ import annotations

from torch import nn

from mtpd.models.adapters.base import DetectorAdapter, DetectorOutput
from mtpd.models.adapters.onestage import FCOSAdapter, RetinaNetAdapter
from mtpd.models.adapters.rcnn import FasterRCNNAdapter, MaskRCNNAdapter
from mtpd.models.adapters.ssd import SSDAdapter
from mtpd.models.levels import unwrap

ADAPTERS: list[type[DetectorAdapter]] = [RetinaNetAdapter, FCOSAdapter, FasterRCNNAdapter, MaskRCNNAdapter, SSDAdapter]
FAMILIES: tuple[str, ...] = tuple(a.family for a in ADAPTERS)
_BY_FAMILY = {a.family: a for a in ADAPTERS}
_BY_TYPE = {a.model_type: a for a in ADAPTERS}


class UnknownDetector(ValueError):
    """A model no adapter handles; the message lists what is supported."""


def supported() -> str:
    """The model classes adapters exist for, for messages: 'RetinaNet, FCOS, FasterRCNN or MaskRCNN'."""
    names = [a.display for a in ADAPTERS]
    return ", ".join(names[:-1]) + " or " + names[-1]


def adapter_class(family: str) -> type[DetectorAdapter]:
    if family not in _BY_FAMILY:
        raise ValueError(f"unknown detector family {family!r}; known: {', '.join(FAMILIES)}")
    return _BY_FAMILY[family]


def find_adapter(model: object) -> type[DetectorAdapter] | None:
    """The adapter class for ``model`` (DDP wrappers unwrapped), or None."""
    if not isinstance(model, nn.Module):
        return None
    for cls in type(unwrap(model)).__mro__:
        if cls in _BY_TYPE:
            return _BY_TYPE[cls]
    return None


def adapter_for(model: nn.Module) -> DetectorAdapter:
    """``model``'s adapter; UnknownDetector naming the model and the supported classes otherwise."""
    cls = find_adapter(model)
    if cls is None:
        raise UnknownDetector(
            f"{type(model).__name__} is not a torchvision {supported()}; build the detector as one of them, or wrap "
            "another detector (a teacher only) in an object following the mtpd Teacher protocol"
        )
    return cls(model)


def mirror_rule(family: str, output: str) -> str:
    """The mirror rule a family's adapter declares for ``output`` ("" for the kind's default): how a store
    written before headers carried rules is read."""
    cls = _BY_FAMILY.get(family)
    return cls.mirrors.get(output, "") if cls is not None else ""


__all__ = [
    "ADAPTERS",
    "FAMILIES",
    "DetectorAdapter",
    "DetectorOutput",
    "UnknownDetector",
    "adapter_class",
    "adapter_for",
    "find_adapter",
    "mirror_rule",
    "supported",
]
