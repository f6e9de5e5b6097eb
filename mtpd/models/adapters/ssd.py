"""torchvision's SSD (and SSDlite) on prepared views: a one-stage family with default boxes, hard
negative mining and a background class.

Dense outputs per level: ``cls`` (A·K logits, K counting the background, as torchvision's SSD does:
``label_offset`` 1) and ``box`` (A·4 deltas, box coder weights 10, 10, 5, 5), from the head's per-level
convs (``module_list``), in the layout torchvision's ``SSDHead`` flattens them from. Mirror rule: the
deltas negate dx; SSD's default boxes sit at cell centres, clipped to the image, so a mirrored map's
anchors are exactly the flipped view's.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssd import SSD
from torchvision.ops import box_iou

from mtpd.models.adapters.base import DetectorAdapter, DetectorOutput, Sizes, labelled_part
from mtpd.models.levels import backbone_features, feature_levels, flatten_level
from mtpd.output_spec import NEGATE_DX, OutputSpec


class SSDAdapter(DetectorAdapter):
    family = "ssd"
    display = "SSD"
    model_type = SSD
    label_offset = 1
    mirrors = {"box": NEGATE_DX}

    @classmethod
    def classes_in_state(cls, state: dict[str, Tensor]) -> int | None:
        def last_conv(head: str) -> Tensor | None:  # SSDLite's level heads end in a 1x1 conv after a depthwise one
            convs = [v for k, v in state.items() if k.startswith(f"head.{head}.module_list.0.") and v.ndim == 4]
            return convs[-1] if convs else None

        logits, reg = last_conv("classification_head"), last_conv("regression_head")
        if logits is None or reg is None:
            return None
        return int(logits.shape[0]) // max(1, int(reg.shape[0]) // 4)  # with the background, as torchvision counts

    def anchors_per_location(self) -> int:
        counts = set(self.model.anchor_generator.num_anchors_per_location())
        if len(counts) != 1:
            raise ValueError(f"SSD default boxes per location differ by level ({sorted(counts)}); need one count")
        return counts.pop()

    def output_specs(self) -> dict[str, OutputSpec]:
        a, k = self.anchors_per_location(), int(self.model.head.classification_head.num_columns)
        return {
            "fpn": self.spec("fpn", "feature", int(self.model.backbone.out_channels)),
            "cls": self.spec("cls", "logits", a * k, num_anchors=a, num_classes=k),
            "box": self.spec("box", "deltas", a * 4, num_anchors=a),
        }

    def dense(self, images: Tensor, names: Sequence[str], sizes: Sizes | None = None) -> dict[str, Tensor]:
        self.check_names(names)
        head, want = self.model.head, set(names)
        levels = feature_levels(self.model)
        out: dict[str, Tensor] = {}
        for i, (key, f) in enumerate(backbone_features(self.model, images).items()):
            p = f"p{levels[key]}"
            if "fpn" in want:
                out[f"fpn.{p}"] = f
            if "cls" in want:
                out[f"cls.{p}"] = head.classification_head.module_list[i](f)
            if "box" in want:
                out[f"box.{p}"] = head.regression_head.module_list[i](f)
        return out

    def forward(
        self, images: Tensor, sizes: Sizes, targets: list[dict] | None, names: Sequence[str], detect: bool
    ) -> DetectorOutput:
        m = self.model
        outs = self.dense(images, ["fpn", "cls", "box"])
        levels = sorted(feature_levels(m).values())
        feats = [outs[f"fpn.p{lvl}"] for lvl in levels]
        specs = self.output_specs()
        a, k = specs["cls"].num_anchors, specs["cls"].num_classes
        head = {  # torchvision SSDHead's own flattening: location-major, then default box; fp32 for the loss
            "cls_logits": torch.cat([flatten_level(outs[f"cls.p{lvl}"], a, k) for lvl in levels], 1).float(),
            "bbox_regression": torch.cat([flatten_level(outs[f"box.p{lvl}"], a, 4) for lvl in levels], 1).float(),
        }
        image_sizes = [tuple(s) for s in sizes]
        self.check_sizes(images, image_sizes)
        anchors = m.anchor_generator(ImageList(images, image_sizes), self.stand_ins(feats))
        losses: dict[str, Tensor] = {}
        if targets is not None:  # SSD.forward's matching, then its loss (hard negative mining)
            lab_targets, lab_head, lab_anchors, _ = labelled_part(targets, head, anchors, feats)
            matched = []
            for anchors_i, t in zip(lab_anchors, lab_targets):
                if t["boxes"].numel() == 0:
                    matched.append(torch.full((anchors_i.shape[0],), -1, dtype=torch.int64, device=anchors_i.device))
                else:
                    matched.append(m.proposal_matcher(box_iou(t["boxes"], anchors_i)))
            losses = m.compute_loss(lab_targets, lab_head, lab_anchors, matched)
        detections = None
        if detect:
            with torch.no_grad():
                detections = m.postprocess_detections(head, anchors, image_sizes)
        return DetectorOutput(losses, {n: v for n, v in outs.items() if n.split(".")[0] in names}, detections)

    @staticmethod
    def check_sizes(images: Tensor, sizes: Sizes) -> None:
        """SSD's default boxes scale with the image (torchvision resizes every input to one size): a batch of
        views of different sizes would give each view boxes of the padded batch's shape."""
        padded = tuple(images.shape[-2:])
        plain = [tuple(int(v) for v in s) for s in sizes if all(isinstance(v, int) for v in s)]  # traced: tensors
        if any(s != padded for s in plain):
            raise ValueError(
                f"SSD default boxes scale with the view, so every view must be {padded} here, got "
                f"{sorted(set(plain))}: train SSD students on views of one size (square images, short == long)"
            )

    def anchor_generator(self) -> DefaultBoxGenerator:
        return self.model.anchor_generator

    def num_classes(self) -> int | None:
        return int(self.model.head.classification_head.num_columns)

    def postprocess(self) -> dict:
        return self.dense_postprocess()
