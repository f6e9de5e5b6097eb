"""Flat teacher registry: names to factories, filled explicitly from the torchvision adapter's table.

Four ways to name a teacher:
- a registered name (``retinanet_resnet50_fpn``, ``retinanet_tiny`` …): see ``available()``;
- ``mmdet:CONFIG``: an mmdet detector from a config file or a config name
  bundled with mmdet (``mmdet:retinanet_r50_fpn_1x_coco``);
- ``onnx:MAPPING.yaml``: an ONNX graph from any framework, its tensors named by the mapping file
  (``mtpd.teachers.onnx_adapter``), run in ONNX Runtime;
- ``package.module:factory``: any importable callable returning a torchvision
  detector or an object following the ``Teacher`` protocol.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

from mtpd import checkpoint
from mtpd.teachers.base import Teacher, TeacherError
from mtpd.teachers.torchvision_adapter import torchvision_teachers

# factory(weights=..., num_classes=..., device=..., **options) -> Teacher
TeacherFactory = Callable[..., Teacher]
# Teachers registered with register_teacher; every registered architecture is one too (read at
# lookup time, so an architecture the user registers later is a teacher as well).
_USER: dict[str, TeacherFactory] = {}


def _table() -> dict[str, TeacherFactory]:
    return {**torchvision_teachers(), **_USER}


def register_teacher(name: str) -> Callable[[TeacherFactory], TeacherFactory]:
    def deco(fn: TeacherFactory) -> TeacherFactory:
        if name in _table():
            raise ValueError(f"teacher {name!r} is registered twice")
        _USER[name] = fn
        return fn

    return deco


def available() -> list[str]:
    return sorted(_table())


@dataclass(frozen=True)
class TeacherSpec:
    """A picklable recipe for a teacher: what Ray workers receive instead of a model."""

    name: str
    weights: str = "none"
    num_classes: int | None = None
    device: str = "cpu"
    trust_checkpoint: bool = False  # --trust-checkpoint: unpickle a weights file the safe reader refuses
    amp: str = "off"  # --amp bf16|fp16: the teacher's forward under autocast (part of its identity)

    def build(self) -> Teacher:
        with checkpoint.trusted(self.trust_checkpoint):  # for this teacher's files only
            teacher = build_teacher(self.name, weights=self.weights, num_classes=self.num_classes, device=self.device)
        if self.amp == "off":
            return teacher
        from mtpd.teachers.autocast import AutocastTeacher

        return AutocastTeacher(teacher, self.amp)

    def to_dict(self) -> dict:
        return asdict(self)


def build_teacher(name: str, weights: str = "none", num_classes: int | None = None, device: str = "cpu") -> Teacher:
    """Build a teacher in eval mode on ``device``.

    ``weights``: a local checkpoint path, ``default`` (the architecture's
    published COCO weights, read from the local torch cache) or ``none``
    (random init, for smoke tests). ``num_classes`` sets the class count when
    the weights do not fix it (``none``); checkpoints carry their own.
    """
    if name.startswith("onnx:"):
        from mtpd.teachers.onnx_adapter import build_onnx_teacher

        return build_onnx_teacher(name[len("onnx:") :], weights=weights, num_classes=num_classes, device=device)
    if name.startswith("mmdet:"):
        from mtpd.teachers.mmdet_adapter import build_mmdet_teacher

        return build_mmdet_teacher(name[len("mmdet:") :], weights=weights, num_classes=num_classes, device=device)
    if ":" in name:
        from mtpd.teachers.module_adapter import build_module_teacher

        return build_module_teacher(name, weights=weights, num_classes=num_classes, device=device)
    table = _table()
    if name not in table:
        raise TeacherError(
            f"unknown teacher {name!r}; registered: {', '.join(sorted(table))}; "
            "or use mmdet:CONFIG for an mmdet model, or package.module:factory for your own nn.Module"
        )
    return table[name](weights=weights, num_classes=num_classes, device=device)
