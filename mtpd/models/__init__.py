"""Detector architectures shared by teachers and students, one adapter per detector family
(``mtpd.models.adapters``: output specs with mirror rules, dense and training forwards, prediction,
export), and the one definition of their dense outputs. A leaf package: imports torch, torchvision
and the leaf modules (``mtpd.output_spec``, ``mtpd.factory``) only."""

from mtpd.models.adapters import ADAPTERS, FAMILIES, DetectorAdapter, adapter_class, adapter_for
from mtpd.models.factory_arch import (
    build_factory_arch,
    build_factory_student,
    build_model,
    infer_num_classes,
    model_num_classes,
)
from mtpd.models.outputs import (
    DenseOutputs,
    dense_outputs,
    feature_levels,
    flatten_level,
    level_grid_sizes,
    model_anchors,
    output_specs,
    unflatten_level,
)
from mtpd.models.registry import (
    ArchInfo,
    arch_checkpoint,
    arch_family,
    arch_info,
    build_arch,
    list_archs,
    register_arch,
    unwrap,
)

__all__ = [
    "ADAPTERS",
    "DenseOutputs",
    "DetectorAdapter",
    "adapter_class",
    "adapter_for",
    "FAMILIES",
    "ArchInfo",
    "arch_checkpoint",
    "arch_family",
    "arch_info",
    "build_arch",
    "build_factory_arch",
    "build_factory_student",
    "build_model",
    "dense_outputs",
    "feature_levels",
    "flatten_level",
    "infer_num_classes",
    "level_grid_sizes",
    "list_archs",
    "model_anchors",
    "model_num_classes",
    "output_specs",
    "register_arch",
    "unflatten_level",
    "unwrap",
]
