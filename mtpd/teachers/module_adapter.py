"""Teachers from any importable factory: ``--teacher package.module:factory``.

The factory is called as ``factory(num_classes=N)`` when it takes ``num_classes``
(else ``factory()``), and also gets ``weights=`` when it takes that (it then loads
its own weights). A student checkpoint of the same factory (``mtpd-train`` with
``student.arch: package.module:factory``) also hands it the options it was built with.
It may return:
- a torchvision RetinaNet / FCOS / Faster or Mask R-CNN: wrapped in
  ``TorchvisionTeacher``; a local checkpoint path in ``weights`` is loaded into it;
- an object following the ``Teacher`` protocol: used as is.
The teacher's identity name is the full ``package.module:factory`` string.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from mtpd.checkpoint import sha256_file
from mtpd.factory import FactoryError, import_factory
from mtpd.factory import accepts as _accepts
from mtpd.models import arch_family, infer_num_classes, unwrap
from mtpd.models.adapters import find_adapter, supported
from mtpd.teachers.base import INIT_SEED, Teacher, TeacherError, TeacherIdentity
from mtpd.teachers.torchvision_adapter import TorchvisionTeacher, load_weights, read_checkpoint


def _resolve(spec: str) -> Callable[..., Any]:
    try:
        return import_factory(spec, role="teacher")
    except FactoryError as e:
        raise TeacherError(str(e)) from None


def _read_weights(spec: str, weights: str, num_classes: int | None) -> tuple[dict | None, str, str, int | None, dict]:
    """(state dict, resolved file, sha256, class count, factory options) of ``weights`` for a factory without a
    weights parameter. A student checkpoint of this factory carries the options it was built with."""
    if weights == "none":
        return None, "", "", num_classes, {}
    if weights == "default":
        raise TeacherError(
            f"teacher {spec!r}: 'default' weights exist only for registered names; pass a checkpoint path or 'none'"
        )
    path = Path(weights).expanduser()
    state_dict, meta = read_checkpoint(path)
    found = meta.get("num_classes") or infer_num_classes(state_dict)
    if found is not None and num_classes is not None and int(found) != num_classes:
        raise TeacherError(
            f"checkpoint {path} has {found} classes but --num-classes is {num_classes}; drop --num-classes"
        )
    classes = int(found) if found is not None else num_classes
    options = dict(meta.get("arch_options") or {}) if meta.get("arch") == spec else {}
    return state_dict, str(path.resolve()), sha256_file(path), classes, options


def build_module_teacher(
    spec: str, weights: str = "none", num_classes: int | None = None, device: str = "cpu"
) -> Teacher:
    """Build the teacher named ``package.module:factory`` (see the module docstring)."""
    factory = _resolve(spec)
    takes_weights = _accepts(factory, "weights")
    state_dict, weights_file, digest, kwargs = None, "", "", {}
    if not takes_weights:  # mtpd reads the checkpoint and loads it into what the factory returns
        state_dict, weights_file, digest, num_classes, kwargs = _read_weights(spec, weights, num_classes)

    if num_classes is not None and _accepts(factory, "num_classes"):
        kwargs["num_classes"] = num_classes
    if takes_weights:
        kwargs["weights"] = weights
    try:
        # Seeded, so a factory that initialises randomly gives the same teacher on every build and worker.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(INIT_SEED)
            built = factory(**kwargs)
    except TeacherError:
        raise
    except Exception as e:
        raise TeacherError(
            f"teacher {spec!r}: factory({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) failed: "
            f"{type(e).__name__}: {e}"
        ) from e

    if isinstance(built, nn.Module) and _is_detector(built):
        model = unwrap(built)
        if state_dict is not None:
            load_weights(model, state_dict, weights_file, spec)
        config = json.dumps({"factory": spec, "kwargs": {k: v for k, v in kwargs.items()}}, sort_keys=True, default=str)
        extra = {"family": arch_family(model), **({"init_seed": INIT_SEED} if weights == "none" else {})}
        recorded = weights_file or weights  # a file by its resolved path
        identity = TeacherIdentity(name=spec, config=config, weights=recorded, weights_sha256=digest, extra=extra)
        return TorchvisionTeacher(model, identity, device)
    if isinstance(built, Teacher):
        if state_dict is not None:
            raise TeacherError(
                f"teacher {spec!r} returned a Teacher object, which loads its own weights; give the factory "
                "a 'weights' parameter or pass --weights none"
            )
        if built.identity.name != spec:
            built.identity = dataclasses.replace(built.identity, name=spec)
        return built.to(device)
    raise TeacherError(
        f"teacher {spec!r} returned a {type(built).__name__}: expected a torchvision {supported()} or an object "
        "with identity, output_specs(), to() and __call__(images, outputs)"
    )


def _is_detector(module: nn.Module) -> bool:
    return find_adapter(module) is not None
