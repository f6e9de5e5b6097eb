"""Names and shapes of dense detector outputs; shared by teachers, stores and students (no torch)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class OutputSpec:
    """One named output of a teacher, over its FPN levels.

    ``name`` is the group in the store (``fpn``, ``cls``, ``box``, ``ctr``,
    ``rpn_obj``, ``rpn_box``); per level the teacher returns ``{name}.p{level}``
    as a [B, channels, H/stride, W/stride] tensor.
    ``kind``: ``feature`` (FPN/neck maps), ``logits`` (class logits, sigmoid
    per anchor and class), ``deltas`` (box regression) or ``objectness``.
    """

    name: str
    kind: str
    levels: tuple[int, ...]
    channels: int
    num_anchors: int = 1
    num_classes: int = 0

    @property
    def strides(self) -> tuple[int, ...]:
        return tuple(2**lvl for lvl in self.levels)

    def keys(self) -> list[str]:
        return [f"{self.name}.p{lvl}" for lvl in self.levels]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["levels"] = list(self.levels)
        d["strides"] = list(self.strides)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "OutputSpec":
        return cls(
            name=d["name"],
            kind=d["kind"],
            levels=tuple(d["levels"]),
            channels=int(d["channels"]),
            num_anchors=int(d.get("num_anchors", 1)),
            num_classes=int(d.get("num_classes", 0)),
        )
