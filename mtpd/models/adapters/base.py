"""The adapter contract: everything that differs between detector families, in one class per family.

A ``DetectorAdapter`` is bound to one model (``adapter_for(model)`` finds the family's class). Teachers,
students, stores and export ask it, never the model's type or a family name:

- ``output_specs()``: each dense output's kind, levels, channels, anchors, classes and mirror rule;
- ``dense(images, names, sizes)``: those outputs on prepared views (``sizes``: each view's valid
  (h, w) before padding, for models that must not attend to padding);
- ``forward(images, sizes, targets, names, detect)``: detection losses, dense outputs, detections;
- ``anchor_generator()``, ``num_classes()`` (torchvision's count), ``label_offset`` (1 where class 0
  is background), ``needs_masks`` (instance masks in the training targets);
- ``postprocess()`` and ``deploy(image, sizes)``: what export needs.

Written after detectron2's model contract (one forward that returns losses in training and
detections in eval) and timm's explicit registries (``mtpd.models.adapters.ADAPTERS``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from mtpd.models.levels import feature_levels, level_grid_sizes, unwrap
from mtpd.output_spec import OutputSpec

Sizes = Sequence[tuple[int, int]]


@dataclass
class DetectorOutput:
    losses: dict[str, Tensor]  # torchvision's detection losses (training only)
    outputs: dict[str, Tensor]  # "fpn.p3", "cls.p3", ... on the padded batch grid
    detections: list[dict[str, Tensor]] | None  # per image boxes (view pixels), scores, labels (eval only)


def labelled_part(
    targets: list[dict | None], head: dict[str, Tensor], anchors: list[Tensor], feats: list[Tensor]
) -> tuple[list[dict], dict[str, Tensor], list[Tensor], list[Tensor]]:
    """The images of a batch that have targets (a ``None`` target: an unlabelled pool image, which the detection
    loss must not read as all background), with their head outputs, anchors and features; the batch itself when
    every image has targets. One-stage losses sum per image and divide by the images given, so this is the loss
    of the labelled images alone."""
    keep = [i for i, t in enumerate(targets) if t is not None]
    if len(keep) == len(targets):
        return targets, head, anchors, feats  # type: ignore[return-value]
    idx = torch.as_tensor(keep, device=anchors[0].device)
    return (
        [targets[i] for i in keep],  # type: ignore[misc]
        {k: v[idx] for k, v in head.items()},
        [anchors[i] for i in keep],
        [f[idx] for f in feats],
    )


class DetectorAdapter(ABC):
    """One detector family's answers (see the module docstring); subclasses set the class attributes."""

    family: ClassVar[str] = ""
    display: ClassVar[str] = ""  # the class users know it by, for messages
    model_type: ClassVar[type[nn.Module]] = nn.Module
    label_offset: ClassVar[int] = 0
    needs_masks: ClassVar[bool] = False
    # Whether a batch may hold images without targets (the unlabelled pool's): the detection loss then reads the
    # others (``labelled_part``). Two-stage detectors sample RoIs from every image's ground truth: not theirs.
    unlabelled_images: ClassVar[bool] = True
    # Output name -> mirror rule (mtpd.output_spec.MIRRORS) where it differs from the kind's default.
    mirrors: ClassVar[dict[str, str]] = {}
    # Where a state dict of the family keeps its parts, by key prefix: what weight inheritance copies.
    parts: ClassVar[dict[str, tuple[str, ...]]] = {"neck": ("backbone.fpn.",), "head": ("head.",)}

    def __init__(self, model: nn.Module) -> None:
        self.model = unwrap(model)

    # -- what the family produces --------------------------------------------------------
    @abstractmethod
    def output_specs(self) -> dict[str, OutputSpec]: ...

    @abstractmethod
    def dense(self, images: Tensor, names: Sequence[str], sizes: Sizes | None = None) -> dict[str, Tensor]:
        """``{name}.p{level}`` -> [B, C, h, w] for each name, in the model's mode, keeping gradients."""
        ...

    @abstractmethod
    def forward(
        self, images: Tensor, sizes: Sizes, targets: list[dict] | None, names: Sequence[str], detect: bool
    ) -> DetectorOutput: ...

    @abstractmethod
    def anchor_generator(self) -> AnchorGenerator: ...

    @abstractmethod
    def num_classes(self) -> int | None:
        """Classes as torchvision's constructor counts them (with the background where ``label_offset``)."""
        ...

    # -- the family's state dicts (no model needed) ---------------------------------------------
    @classmethod
    def classes_in_state(cls, state: dict[str, Tensor]) -> int | None:
        """The class count (as ``num_classes()`` counts) a state dict of this family was saved with, read off
        its class head; None when the dict is not of this family."""
        return None

    @classmethod
    def import_state(cls, state: dict[str, Tensor]) -> dict[str, Tensor] | None:
        """Another framework's checkpoint of this family (an mmdet RetinaNet's ``neck.``/``bbox_head.`` keys)
        under the names this family's torchvision models use, for weight inheritance; None when ``state`` is
        not one this family knows (a torchvision state dict needs no import)."""
        return None

    # -- export ----------------------------------------------------------------------------
    @abstractmethod
    def postprocess(self) -> dict:
        """The post-processing settings an exported model runs with (thresholds, caps)."""
        ...

    def deploy(self, image: Tensor, sizes: Sizes) -> tuple[Tensor, Tensor, Tensor]:
        """(boxes, scores, labels) of one prepared view after NMS, labels as the model numbers them."""
        det = self.forward(image, sizes, None, (), detect=True).detections
        assert det is not None
        return det[0]["boxes"], det[0]["scores"], det[0]["labels"]

    # -- shared helpers --------------------------------------------------------------------
    def dense_postprocess(self) -> dict:
        """The settings of torchvision's one-stage ``postprocess_detections`` (RetinaNet, FCOS, SSD)."""
        m = self.model
        return {
            "score_thresh": float(m.score_thresh),
            "nms_thresh": float(m.nms_thresh),
            "detections_per_img": int(m.detections_per_img),
            "topk_candidates": int(m.topk_candidates),
        }

    def levels(self) -> tuple[int, ...]:
        return tuple(feature_levels(self.model).values())

    def spec(self, name: str, kind: str, channels: int, num_anchors: int = 1, num_classes: int = 0) -> OutputSpec:
        return OutputSpec(name, kind, self.levels(), channels, num_anchors, num_classes, self.mirrors.get(name, ""))

    def check_names(self, names: Sequence[str]) -> None:
        specs = self.output_specs()
        unknown = [n for n in names if n not in specs]
        if unknown:
            raise ValueError(
                f"{type(self.model).__name__} cannot produce {', '.join(unknown)}; it has: {', '.join(specs)}"
            )

    @staticmethod
    def stand_ins(feats: Sequence[Tensor]) -> list[Tensor]:
        """Zero-channel fp32 stand-ins of ``feats`` for an anchor generator, which reads only their shapes, dtype
        and device: under autocast the maps are bf16/fp16, and anchors made in that dtype would be rounded."""
        return [torch.empty(f.shape[0], 0, *f.shape[-2:], device=f.device) for f in feats]

    def anchors(self, image_size: tuple[int, int], grid_sizes: Sizes | None = None) -> Tensor:
        """All anchors for a padded image of ``image_size`` (H, W) as one [Σ_l H_l·W_l·A, 4] xyxy tensor in
        ``flatten_level`` order over levels, from the model's own generator (strides as image // grid)."""
        if grid_sizes is None:
            grid_sizes = level_grid_sizes(image_size, list(self.levels()))
        param = next(self.model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        h, w = image_size
        # Zero-channel stand-ins: the generator reads only shapes, dtype and device.
        images = ImageList(torch.empty(1, 0, h, w, device=device), [(h, w)])
        feats = [torch.empty(1, 0, gh, gw, device=device) for gh, gw in grid_sizes]
        return self.anchor_generator()(images, feats)[0]
