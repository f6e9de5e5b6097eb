"""torchvision's two-stage detectors, Faster R-CNN and Mask R-CNN, on prepared views.

Dense outputs are what depends on the image alone: the FPN maps and the RPN's objectness and
deltas. RoI-head outputs depend on the proposals (the student's own) and are never cached.
Class 0 is the background (``label_offset`` 1). Mask R-CNN trains with instance masks in its
targets and leaves through export with its boxes only (the mask head is not run there).
"""

from __future__ import annotations

from typing import ClassVar, Sequence

from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from mtpd.models.adapters.base import DetectorAdapter, DetectorOutput, Sizes
from mtpd.models.levels import backbone_features, feature_levels
from mtpd.output_spec import NEGATE_DX, OutputSpec


class FasterRCNNAdapter(DetectorAdapter):
    family = "fasterrcnn"
    unlabelled_images = False
    display = "FasterRCNN"
    model_type = FasterRCNN
    label_offset = 1
    mirrors = {"rpn_box": NEGATE_DX}
    parts = {"neck": ("backbone.fpn.",), "head": ("rpn.", "roi_heads.")}
    # The RoI heads' predictors beside the box predictor that a state dict of the family has (and no others).
    extra_predictors: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def classes_in_state(cls, state: dict[str, Tensor]) -> int | None:
        score = state.get("roi_heads.box_predictor.cls_score.weight")
        predictors = {
            k.split(".")[1] for k in state if k.startswith("roi_heads.") and k.split(".")[1].endswith("_predictor")
        }
        if score is None or predictors - {"box_predictor"} != cls.extra_predictors:
            return None
        return int(score.shape[0])  # with the background, as torchvision counts

    def output_specs(self) -> dict[str, OutputSpec]:
        counts = set(self.model.rpn.anchor_generator.num_anchors_per_location())
        if len(counts) != 1:
            raise ValueError(
                f"RPN anchors per location differ by level ({sorted(counts)}); dense outputs need one count"
            )
        a = counts.pop()
        return {
            "fpn": self.spec("fpn", "feature", int(self.model.backbone.out_channels)),
            "rpn_obj": self.spec("rpn_obj", "objectness", a, num_anchors=a, num_classes=1),
            "rpn_box": self.spec("rpn_box", "deltas", a * 4, num_anchors=a),
        }

    def dense(self, images: Tensor, names: Sequence[str], sizes: Sizes | None = None) -> dict[str, Tensor]:
        self.check_names(names)
        want = set(names)
        levels = feature_levels(self.model)
        out: dict[str, Tensor] = {}
        for key, f in backbone_features(self.model, images).items():
            p = f"p{levels[key]}"
            if "fpn" in want:
                out[f"fpn.{p}"] = f
            if want & {"rpn_obj", "rpn_box"}:
                h = self.model.rpn.head
                t = h.conv(f)
                if "rpn_obj" in want:
                    out[f"rpn_obj.{p}"] = h.cls_logits(t)
                if "rpn_box" in want:
                    out[f"rpn_box.{p}"] = h.bbox_pred(t)
        return out

    def forward(
        self, images: Tensor, sizes: Sizes, targets: list[dict] | None, names: Sequence[str], detect: bool
    ) -> DetectorOutput:
        m = self.model
        feats = backbone_features(m, images)
        levels = feature_levels(m)
        image_sizes = [tuple(s) for s in sizes]
        proposals, rpn_losses = m.rpn(ImageList(images, image_sizes), feats, targets)
        detections, roi_losses = m.roi_heads(feats, proposals, image_sizes, targets)
        outputs = {f"fpn.p{levels[key]}": f for key, f in feats.items()} if "fpn" in names else {}
        rpn_names = [n for n in names if n.startswith("rpn_")]
        if rpn_names:  # a second RPN head pass is cheap next to the RoI heads
            outputs.update(self.dense(images, rpn_names))
        return DetectorOutput({**rpn_losses, **roi_losses}, outputs, detections if detect else None)

    def anchor_generator(self) -> AnchorGenerator:
        return self.model.rpn.anchor_generator

    def num_classes(self) -> int | None:
        cls_score = getattr(getattr(self.model.roi_heads, "box_predictor", None), "cls_score", None)
        return int(cls_score.out_features) if isinstance(cls_score, nn.Linear) else None

    def postprocess(self) -> dict:
        rh = self.model.roi_heads
        return {
            "score_thresh": float(rh.score_thresh),
            "nms_thresh": float(rh.nms_thresh),
            "detections_per_img": int(rh.detections_per_img),
            "rpn_post_nms_top_n": int(self.model.rpn._post_nms_top_n["testing"]),
        }

    def deploy(self, image: Tensor, sizes: Sizes) -> tuple[Tensor, Tensor, Tensor]:
        """The box path of ``roi_heads`` in eval mode (mask head skipped), for one image: the same calls, in the
        same order, as ``RoIHeads.forward`` makes for boxes."""
        m = self.model
        feats = backbone_features(m, image)
        image_sizes = [tuple(s) for s in sizes]
        proposals, _ = m.rpn(ImageList(image, image_sizes), feats, None)
        rh = m.roi_heads
        box_features = rh.box_head(rh.box_roi_pool(feats, proposals, image_sizes))
        class_logits, box_regression = rh.box_predictor(box_features)
        boxes, scores, labels = rh.postprocess_detections(class_logits, box_regression, proposals, image_sizes)
        return boxes[0], scores[0], labels[0]


class MaskRCNNAdapter(FasterRCNNAdapter):
    family = "maskrcnn"
    display = "MaskRCNN"
    model_type = MaskRCNN
    extra_predictors = frozenset({"mask_predictor"})
    needs_masks = True
