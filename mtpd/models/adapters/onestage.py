"""torchvision's one-stage detectors, RetinaNet and FCOS, on prepared views.

torchvision's ``forward`` resizes and normalises through ``model.transform``; mtpd's views are
already prepared, so these adapters drive the same pieces (backbone, head convs per level, anchor
generator, ``compute_loss``, ``postprocess_detections``) directly. The detection losses are
torchvision's own; the head runs per level without torchvision's flattening to [B, H·W·A, K]
(``flatten_level`` gives that order when a loss or the loss computation needs it).

Mirror rules: RetinaNet regresses (dx, dy, dw, dh) per anchor, so a mirrored map negates dx;
FCOS regresses (l, t, r, b) distances, so a mirrored map swaps l and r.
"""

from __future__ import annotations

import re
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from mtpd.models.adapters.base import DetectorAdapter, DetectorOutput, Sizes, labelled_part
from mtpd.models.levels import backbone_features, feature_levels, flatten_level
from mtpd.output_spec import NEGATE_DX, SWAP_LR, OutputSpec


class RetinaNetAdapter(DetectorAdapter):
    family = "retinanet"
    display = "RetinaNet"
    model_type = RetinaNet
    mirrors = {"box": NEGATE_DX}
    head_outputs: tuple[str, ...] = ("cls", "box")  # the dense head's outputs, all of which the loss reads
    centerness: ClassVar[bool] = False  # a state dict of the family has a centre-ness branch (FCOS)
    centerness: ClassVar[bool] = False  # a state dict of the family has a centre-ness branch (FCOS)
    # mmdet RetinaNet names -> torchvision RetinaNet names, for inheriting from mmdet teachers' checkpoints.
    MMDET_KEYS: ClassVar[list[tuple[str, str]]] = [
        (r"^neck\.lateral_convs\.(\d+)\.conv\.", r"backbone.fpn.inner_blocks.\1.0."),
        (r"^neck\.fpn_convs\.([0-2])\.conv\.", r"backbone.fpn.layer_blocks.\1.0."),
        (r"^neck\.fpn_convs\.3\.conv\.", "backbone.fpn.extra_blocks.p6."),
        (r"^neck\.fpn_convs\.4\.conv\.", "backbone.fpn.extra_blocks.p7."),
        (r"^bbox_head\.cls_convs\.(\d+)\.conv\.", r"head.classification_head.conv.\1.0."),
        (r"^bbox_head\.reg_convs\.(\d+)\.conv\.", r"head.regression_head.conv.\1.0."),
        (r"^bbox_head\.retina_cls\.", "head.classification_head.cls_logits."),
        (r"^bbox_head\.retina_reg\.", "head.regression_head.bbox_reg."),
    ]

    @classmethod
    def classes_in_state(cls, state: dict[str, Tensor]) -> int | None:
        logits = state.get("head.classification_head.cls_logits.weight")
        reg = state.get("head.regression_head.bbox_reg.weight")
        if logits is None or reg is None or ("head.regression_head.bbox_ctrness.weight" in state) != cls.centerness:
            return None
        return int(logits.shape[0]) // max(1, int(reg.shape[0]) // 4)  # class logits per anchor

    @classmethod
    def import_state(cls, state: dict[str, Tensor]) -> dict[str, Tensor] | None:
        if not any(k.startswith("bbox_head.retina_cls.") for k in state):
            return None
        mapped = {}
        for k, v in state.items():
            for pat, rep in cls.MMDET_KEYS:
                if re.match(pat, k):
                    mapped[re.sub(pat, rep, k)] = v
                    break
        return mapped

    def output_specs(self) -> dict[str, OutputSpec]:
        cls_head = self.model.head.classification_head
        a, k = int(cls_head.num_anchors), int(cls_head.num_classes)
        return {
            "fpn": self.spec("fpn", "feature", int(self.model.backbone.out_channels)),
            "cls": self.spec("cls", "logits", a * k, num_anchors=a, num_classes=k),
            "box": self.spec("box", "deltas", a * 4, num_anchors=a),
        }

    def box_map(self, t: Tensor) -> Tensor:
        return self.model.head.regression_head.bbox_reg(t)

    def dense(self, images: Tensor, names: Sequence[str], sizes: Sizes | None = None) -> dict[str, Tensor]:
        self.check_names(names)
        head, want = self.model.head, set(names)
        levels = feature_levels(self.model)
        out: dict[str, Tensor] = {}
        for key, f in backbone_features(self.model, images).items():
            p = f"p{levels[key]}"
            if "fpn" in want:
                out[f"fpn.{p}"] = f
            if "cls" in want:
                c = head.classification_head
                out[f"cls.{p}"] = c.cls_logits(c.conv(f))
            if want & {"box", "ctr"}:
                t = head.regression_head.conv(f)
                if "box" in want:
                    out[f"box.{p}"] = self.box_map(t)
                if "ctr" in want:
                    out[f"ctr.{p}"] = head.regression_head.bbox_ctrness(t)
        return out

    def head_dict(self, outs: dict[str, Tensor], levels: list[int]) -> dict[str, Tensor]:
        """The head's outputs as torchvision's ``compute_loss`` / ``postprocess_detections`` take them, in fp32
        (under autocast the head convs run in bf16/fp16; the losses sum over every anchor)."""
        specs = self.output_specs()
        a, k = specs["cls"].num_anchors, specs["cls"].num_classes
        return {
            "cls_logits": torch.cat([flatten_level(outs[f"cls.p{lvl}"], a, k) for lvl in levels], 1).float(),
            "bbox_regression": torch.cat([flatten_level(outs[f"box.p{lvl}"], a, 4) for lvl in levels], 1).float(),
        }

    def compute_loss(self, targets: list[dict], head: dict, anchors: list[Tensor], feats: list[Tensor]) -> dict:
        return self.model.compute_loss(targets, head, anchors)

    def forward(
        self, images: Tensor, sizes: Sizes, targets: list[dict] | None, names: Sequence[str], detect: bool
    ) -> DetectorOutput:
        outs = self.dense(images, ["fpn", *self.head_outputs])
        levels = sorted(feature_levels(self.model).values())
        feats = [outs[f"fpn.p{lvl}"] for lvl in levels]
        head = self.head_dict(outs, levels)
        image_sizes = [tuple(s) for s in sizes]
        anchors = self.model.anchor_generator(ImageList(images, image_sizes), self.stand_ins(feats))
        losses = self.compute_loss(*labelled_part(targets, head, anchors, feats)) if targets is not None else {}
        detections = None
        if detect:
            a = self.output_specs()["cls"].num_anchors
            counts = [f.shape[-2] * f.shape[-1] * a for f in feats]
            split_head = {key: list(v.split(counts, 1)) for key, v in head.items()}
            split_anchors = [list(x.split(counts)) for x in anchors]
            with torch.no_grad():
                detections = self.model.postprocess_detections(split_head, split_anchors, image_sizes)
        return DetectorOutput(losses, {n: v for n, v in outs.items() if n.split(".")[0] in names}, detections)

    def anchor_generator(self) -> AnchorGenerator:
        return self.model.anchor_generator

    def num_classes(self) -> int | None:
        return int(self.model.head.classification_head.num_classes)

    def postprocess(self) -> dict:
        return self.dense_postprocess()


class FCOSAdapter(RetinaNetAdapter):
    family = "fcos"
    display = "FCOS"
    model_type = FCOS
    mirrors = {"box": SWAP_LR}
    head_outputs = ("cls", "box", "ctr")
    centerness = True

    def output_specs(self) -> dict[str, OutputSpec]:
        specs = super().output_specs()
        a = specs["cls"].num_anchors
        # box: (l, t, r, b) distances after torchvision's ReLU; ctr: one centre-ness logit per location.
        specs["ctr"] = self.spec("ctr", "logits", a, num_anchors=a, num_classes=1)
        return specs

    def box_map(self, t: Tensor) -> Tensor:
        # FCOS regresses distances through a ReLU inside its head (torchvision's FCOSRegressionHead).
        return F.relu(self.model.head.regression_head.bbox_reg(t))

    def head_dict(self, outs: dict[str, Tensor], levels: list[int]) -> dict[str, Tensor]:
        head = super().head_dict(outs, levels)
        a = self.output_specs()["cls"].num_anchors
        head["bbox_ctrness"] = torch.cat([flatten_level(outs[f"ctr.p{lvl}"], a, 1) for lvl in levels], 1).float()
        return head

    def compute_loss(self, targets: list[dict], head: dict, anchors: list[Tensor], feats: list[Tensor]) -> dict:
        per_level = [f.shape[-2] * f.shape[-1] for f in feats]
        return self.model.compute_loss(targets, head, anchors, per_level)
