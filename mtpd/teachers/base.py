"""The Teacher protocol: load once, map a batch of prepared views to named per-level outputs."""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field
from typing import Protocol, Sequence, runtime_checkable

import torch

from mtpd.errors import MtpdError
from mtpd.output_spec import OutputSpec

# ``--weights none`` builds every teacher from this seed (and records it in the identity): the same
# command gives the same random teacher, in every Ray worker and on every rerun or resume.
INIT_SEED = 0


class TeacherError(MtpdError, ValueError):
    """A teacher that cannot be built or asked for what was requested; the message says what to do."""


@dataclass(frozen=True)
class TeacherIdentity:
    """What makes two teachers the same for a store: registry name, config, weights."""

    name: str
    config: str = ""
    weights: str = "none"
    weights_sha256: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@runtime_checkable
class Teacher(Protocol):
    """A detector run in eval mode on prepared views (its own resizing bypassed)."""

    identity: TeacherIdentity

    def output_specs(self) -> dict[str, OutputSpec]:
        """Every output this teacher can produce, by store name."""
        ...

    def to(self, device: str | torch.device) -> "Teacher": ...

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, outputs: Sequence[str]) -> dict[str, torch.Tensor]:
        """images: [B, 3, H, W], normalised and padded by ``mtpd.data.prepare_view``
        (H, W multiples of 32). Returns ``{name}.p{level}`` -> [B, C, h, w] for each
        requested output name. A teacher may also take ``sizes=[(h, w), ...]``, each view's
        valid size before padding (attention models mask the padding with it): ``run_teacher``
        passes it to those that do."""
        ...


def run_teacher(
    teacher: Teacher, images: torch.Tensor, outputs: Sequence[str], sizes: Sequence[tuple[int, int]] | None = None
) -> dict[str, torch.Tensor]:
    """``teacher(images, outputs)``, with ``sizes=`` when the teacher's ``__call__`` takes it (a user's Teacher
    written before sizes existed keeps working)."""
    if sizes is not None and _takes_sizes(type(teacher)):
        return teacher(images, outputs, sizes=[tuple(int(v) for v in s) for s in sizes])
    return teacher(images, outputs)


def _takes_sizes(cls: type) -> bool:
    try:
        return "sizes" in inspect.signature(cls.__call__).parameters
    except (TypeError, ValueError):
        return False


def check_outputs(teacher: Teacher, outputs: Sequence[str], teacher_name: str) -> None:
    specs = teacher.output_specs()
    unknown = [o for o in outputs if o not in specs]
    if unknown:
        raise TeacherError(
            f"teacher {teacher_name!r} cannot produce output(s) {', '.join(unknown)}; it has: {', '.join(specs)} (pass "
            "--outputs from those)"
        )
