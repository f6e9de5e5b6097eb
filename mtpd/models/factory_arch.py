"""Detectors from the user's own ``package.module:factory``: bring your own backbone and neck.

The factory returns a torchvision detector of a family with an adapter (``mtpd.models.adapters.ADAPTERS``;
``supported()`` names them) built however the user likes. It is called as ``factory(num_classes=N,
**options)`` when it takes ``num_classes`` (else ``factory(**options)``), where N counts classes as
torchvision's constructors do: the dataset's K, plus 1 where the family's ``label_offset`` reserves class 0
for the background.
Either way the model's class count is checked against N. What comes back is checked once
(family, ``backbone.out_channels``, one power-of-two stride per level) so that a problem is
one line naming the factory and the fix, not a traceback from the middle of a training step.

The model remembers how it was built (``mtpd_arch_spec``, as ``build_arch`` models do), so
its checkpoint holds ``arch: package.module:factory`` and the options, and ``build_model``
rebuilds it anywhere the factory is importable.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from mtpd.factory import FactoryError, accepts, first_line, import_factory, is_factory_spec
from mtpd.models.adapters import ADAPTERS, adapter_class, adapter_for, find_adapter, supported
from mtpd.models.levels import feature_levels
from mtpd.models.registry import build_arch, jsonable_options


def build_model(arch: str, num_classes: int | None, **options: Any) -> nn.Module:
    """A registered architecture (``build_arch``) or a ``package.module:factory`` (``build_factory_arch``);
    ``num_classes`` as torchvision's constructor counts them (R-CNNs include the background)."""
    if is_factory_spec(arch):
        return build_factory_arch(arch, num_classes, **options)
    if num_classes is None:
        raise ValueError(f"arch {arch!r}: the class count is unknown; pass it (--num-classes)")
    return build_arch(arch, num_classes, **options)


def build_factory_arch(spec: str, num_classes: int | None = None, **options: Any) -> nn.Module:
    """``factory(num_classes=num_classes, **options)`` (``num_classes`` left out when the factory has no such
    parameter, or when it is None), checked; FactoryError naming ``spec`` otherwise. See the module docstring."""
    factory = import_factory(spec)
    takes = accepts(factory, "num_classes")
    model, family = _call(spec, factory, num_classes if takes else None, options)
    _check_classes(spec, model, family, num_classes, takes)
    return _remember(model, spec, options, num_classes)


def build_factory_student(spec: str, classes: int, **options: Any) -> nn.Module:
    """The factory's detector for ``classes`` dataset classes: ``num_classes`` is ``classes`` for RetinaNet and
    FCOS, ``classes + 1`` for the R-CNNs. Which one the factory builds is known only from what it returns, so
    an R-CNN factory taking ``num_classes`` is called twice (first with ``classes``, then with ``classes + 1``)."""
    factory = import_factory(spec)
    takes = accepts(factory, "num_classes")
    model, family = _call(spec, factory, classes if takes else None, options)
    want = classes + adapter_class(family).label_offset
    if takes and want != classes:
        model, family = _call(spec, factory, want, options)
    _check_classes(spec, model, family, want, takes)
    return _remember(model, spec, options, want)


def model_num_classes(model: nn.Module) -> int | None:
    """Classes as torchvision counts them (R-CNNs include the background); None when the head hides it."""
    return adapter_for(model).num_classes()


def infer_num_classes(state_dict: dict[str, Tensor]) -> int | None:
    """Class count (as ``model_num_classes``) from a detector state dict's class head, as its family's adapter
    reads it (``DetectorAdapter.classes_in_state``); None when no family knows the dict."""
    for adapter in ADAPTERS:
        found = adapter.classes_in_state(state_dict)
        if found is not None:
            return found
    return None


def _call(spec: str, factory: Any, num_classes: int | None, options: dict[str, Any]) -> tuple[nn.Module, str]:
    """(model, family): the factory called and its result checked, FactoryError otherwise."""
    kwargs = ({"num_classes": num_classes} if num_classes is not None else {}) | dict(options)
    call = f"{spec.partition(':')[2]}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
    try:
        model = factory(**kwargs)
    except Exception as e:  # noqa: BLE001 - whatever the user's factory raises, the fix is in the factory
        if "out_channels" in str(e):
            raise FactoryError(_no_out_channels(spec, f"{call} raised {first_line(e)}")) from None
        raise FactoryError(
            f"student {spec!r}: {call} raised {first_line(e)}; fix the factory or the options it is given"
        ) from None
    return model, _check_structure(spec, model)


def _no_out_channels(spec: str, what: str) -> str:
    return (
        f"student {spec!r}: the backbone has no out_channels ({what}); set backbone.out_channels to the channels of "
        "its feature maps, the same at every level (torchvision's detectors read it)"
    )


def _check_structure(spec: str, model: Any) -> str:
    """The model's family, after checking what mtpd reads of it: the family, out_channels, one stride per level."""
    adapter = find_adapter(model)
    if adapter is None:
        kind = f"{type(model).__module__}.{type(model).__qualname__}"
        raise FactoryError(
            f"student {spec!r} returned a {kind}: mtpd students are torchvision {supported()} models; return one "
            "of them built on your backbone and neck"
        )
    family = adapter.family
    backbone = getattr(model, "backbone", None)
    if not isinstance(getattr(backbone, "out_channels", None), int):
        raise FactoryError(_no_out_channels(spec, f"{type(backbone).__name__}.out_channels is not an int"))
    try:
        feature_levels(model)  # probes the backbone once (cached): the levels output_specs reports
    except ValueError as e:
        if "both have stride" not in str(e):
            raise FactoryError(f"student {spec!r}: {e}; the backbone's maps must have power-of-two strides") from None
        raise FactoryError(
            f"student {spec!r}: {e}; build the backbone so each level has its own stride: pass returned_layers "
            "to torchvision's mobilenet_backbone (with fpn=True its default returns two stride-32 maps) or "
            "resnet_fpn_backbone"
        ) from None
    except Exception as e:  # noqa: BLE001 - whatever the user's backbone raises, the fix is in the backbone
        raise FactoryError(
            f"student {spec!r}: its backbone fails on a 256x32 probe ({first_line(e)}); it must take [B, 3, H, W] "
            "and return a dict of feature maps"
        ) from None
    return family


def _check_classes(spec: str, model: nn.Module, family: str, want: int | None, takes: bool) -> None:
    found = model_num_classes(model)
    if want is None or found is None or found == want:
        return
    cls = adapter_class(family)
    name = cls.display
    counted = f" ({cls.display} counts the background)" if cls.label_offset else ""
    if takes:
        raise FactoryError(
            f"student {spec!r} was given num_classes={want} but returned a {name} with {found} classes{counted}; "
            "build the detector with the num_classes the factory is given"
        )
    raise FactoryError(
        f"student {spec!r} takes no num_classes and returned a {name} with {found} classes, but {want} are "
        f"needed{counted}; add a num_classes parameter to the factory and build the detector with it"
    )


def _remember(model: nn.Module, spec: str, options: dict[str, Any], num_classes: int | None) -> nn.Module:
    # As build_arch does: a plain attribute, so arch_checkpoint records the factory and its options.
    found = model_num_classes(model)
    model.mtpd_arch_spec = {
        "arch": spec,
        "num_classes": found if found is not None else num_classes,
        "arch_options": jsonable_options(options),
    }
    return model
