"""A teacher whose forward runs under autocast (``mtpd-cache build --amp bf16|fp16``): convolutions and matmuls
in bf16 or fp16, outputs handed on as fp32 before any encoding, so the store's codes and error bounds apply to
what the teacher computed. The precision is part of the teacher's identity: an AMP store never passes for an
fp32 one (the catalog keys stores by it)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from mtpd.output_spec import OutputSpec
from mtpd.teachers.base import Teacher, TeacherError, TeacherIdentity, run_teacher

AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


class AutocastTeacher:
    """``teacher`` run under ``torch.autocast(dtype=AMP[amp])`` on its device."""

    def __init__(self, teacher: Teacher, amp: str) -> None:
        if amp not in AMP:
            raise TeacherError(f"--amp {amp!r} is not one of off, {', '.join(AMP)}")
        self.teacher, self.amp = teacher, amp
        ident = teacher.identity
        self.identity: TeacherIdentity = dataclasses.replace(ident, extra={**ident.extra, "amp": amp})

    def output_specs(self) -> dict[str, OutputSpec]:
        return self.teacher.output_specs()

    def to(self, device: str | torch.device) -> "AutocastTeacher":
        self.teacher = self.teacher.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return torch.device(getattr(self.teacher, "device", "cpu"))

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, outputs: Sequence[str], sizes: Sequence[tuple[int, int]] | None = None
    ) -> dict[str, torch.Tensor]:
        with torch.autocast(self.device.type, dtype=AMP[self.amp]):
            out = run_teacher(self.teacher, images, outputs, sizes)
        return {k: v.float() for k, v in out.items()}

    def __repr__(self) -> str:
        return f"AutocastTeacher({self.teacher!r}, amp={self.amp!r})"
