"""Teachers: detectors that load once and map prepared views to named per-level outputs.

``build_teacher(name, weights, num_classes, device)`` accepts a registered name
(``available()``), ``mmdet:CONFIG`` or ``package.module:factory``.
"""

from mtpd.teachers.base import Teacher, TeacherError, TeacherIdentity
from mtpd.teachers.registry import TeacherSpec, available, build_teacher, register_teacher

__all__ = [
    "Teacher",
    "TeacherError",
    "TeacherIdentity",
    "TeacherSpec",
    "available",
    "build_teacher",
    "register_teacher",
]
