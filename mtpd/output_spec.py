"""Names and shapes of dense detector outputs; shared by teachers, stores and students (no torch)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

# How a map of the original view becomes the flipped view's (columns are always reversed; this says what
# happens to the channels). Adapters declare one per output; a header without one falls back to its kind's.
REVERSE = "reverse"  # channels keep their meaning: features, class and objectness maps (anchors are symmetric)
NEGATE_DX = "negate_dx"  # (dx, dy, dw, dh) per anchor: dx changes sign (RetinaNet, RPN, ATSS deltas)
SWAP_LR = "swap_lr"  # (l, t, r, b) per anchor, each one value or a group of distribution bins: l and r swap
NONE = "none"  # no known rule: such an output cannot be mirrored (build the store with both views)
MIRRORS = (REVERSE, NEGATE_DX, SWAP_LR, NONE)
_KIND_MIRROR = {"feature": REVERSE, "logits": REVERSE, "objectness": REVERSE, "deltas": NEGATE_DX}


@dataclass(frozen=True)
class OutputSpec:
    """One named output of a teacher, over its FPN levels.

    ``name`` is the group in the store (``fpn``, ``cls``, ``box``, ``ctr``,
    ``rpn_obj``, ``rpn_box``); per level the teacher returns ``{name}.p{level}``
    as a [B, channels, H/stride, W/stride] tensor.
    ``kind``: ``feature`` (FPN/neck maps), ``logits`` (class logits, sigmoid
    per anchor and class), ``deltas`` (box regression) or ``objectness``.
    ``mirror``: one of ``MIRRORS`` (see above); empty means the kind's default.
    """

    name: str
    kind: str
    levels: tuple[int, ...]
    channels: int
    num_anchors: int = 1
    num_classes: int = 0
    mirror: str = ""

    def __post_init__(self) -> None:
        if self.mirror and self.mirror not in MIRRORS:
            raise ValueError(f"output {self.name!r}: mirror rule {self.mirror!r} is not one of {', '.join(MIRRORS)}")

    @property
    def mirror_rule(self) -> str:
        """The rule, the kind's default when none was declared (box deltas: dx negated)."""
        return self.mirror or _KIND_MIRROR.get(self.kind, NONE)

    def mirror_channels(self) -> tuple[list[int], list[float]]:
        """(source channel, sign) per channel: the flipped view's channel c is ``sign[c] * orig[perm[c]]`` after
        the columns are reversed. ValueError when the output cannot be mirrored.

        Exact for what the channels mean; not for where anchors sit: torchvision and mmdet place a cell's
        anchor at its top-left corner (``i·stride``), so a mirrored cell's anchor is up to one stride from the
        flipped view's (FCOS/GFL distances and RetinaNet dx are off by that shift over the anchor's size).
        That residue is part of the ``flip_error`` the builder measures; SSD's centred boxes have none."""
        rule, c = self.mirror_rule, self.channels
        perm, sign = list(range(c)), [1.0] * c
        if rule == REVERSE:
            return perm, sign
        group = c // max(1, self.num_anchors)  # one anchor's 4 coordinates (x bins each)
        if rule == NONE or group % 4 or group * self.num_anchors != c:
            raise ValueError(
                f"output {self.name!r} ({self.kind}, {c} channels) has no mirror rule; build the store with both "
                "views (--views orig,hflip) or train with flip: false"
            )
        bins = group // 4
        if rule == NEGATE_DX and bins != 1:
            raise ValueError(
                f"output {self.name!r}: negate_dx needs 4 channels (dx, dy, dw, dh) per anchor, got {group} with "
                f"{self.num_anchors} anchor(s); declare the anchors, or a rule that fits the code"
            )
        for a in range(self.num_anchors):
            base = a * group
            if rule == NEGATE_DX:
                for b in range(bins):
                    sign[base + b] = -1.0
            else:  # SWAP_LR: the l group and the r group trade places
                for b in range(bins):
                    perm[base + b], perm[base + 2 * bins + b] = base + 2 * bins + b, base + b
        return perm, sign

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
            mirror=str(d.get("mirror", "")),
        )
