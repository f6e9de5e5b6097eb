"""A family added as one adapter module and one registry line: torchvision's SSD (``ssd_tiny``).

It trains as a student distilled from an existing store (its FPN shares the tiny teachers' levels and
channels), evaluates, exports to ONNX with parity, and mirrors its box deltas by its own rule.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_VIEW, tiny_build
from test_trainer import write_plan

from mtpd.data import CocoDataset, ViewSpec
from mtpd.models import adapter_for, build_arch, output_specs
from mtpd.models.detect import detector_forward
from mtpd.output_spec import NEGATE_DX
from mtpd.trainer.plan import load_plan
from mtpd.trainer.stage import run_plan
from mtpd.trainer.student import label_offset, load_student


def test_ssd_outputs_count_the_background_and_match_the_head() -> None:
    torch.manual_seed(0)
    model = build_arch("ssd_tiny", 11, width=8)  # 10 classes + background
    specs = output_specs(model)
    assert label_offset(model) == 1 and label_offset("ssd_tiny") == 1
    assert specs["cls"].num_anchors == 4 and specs["cls"].num_classes == 11 and specs["cls"].channels == 44
    assert specs["box"].mirror == NEGATE_DX and specs["fpn"].levels == (3, 4, 5)
    x = torch.randn(2, 3, 64, 64)
    # The per-level maps flatten to exactly what torchvision's own SSD head returns.
    model.eval()
    with torch.no_grad():
        feats = list(model.backbone(x).values())
        ref = model.head(feats)
        out = detector_forward(model, x, [(64, 64), (64, 64)], None, names=("cls", "box"), detect=True)
    a = adapter_for(model)
    head = a.forward(x, [(64, 64)] * 2, None, ("cls", "box"), detect=False).outputs
    assert set(head) == {f"{n}.p{lvl}" for n in ("cls", "box") for lvl in (3, 4, 5)}
    flat = torch.cat([head[f"cls.p{lvl}"].permute(0, 2, 3, 1).reshape(2, -1, 11) for lvl in (3, 4, 5)], 1)
    torch.testing.assert_close(flat, ref["cls_logits"])
    assert out.detections is not None and len(out.detections) == 2


def test_ssd_trains_as_a_distilled_student_evaluates_and_exports(tmp_path, digits) -> None:
    from mtpd.export import OnnxDetector, compare, export_model

    store = tiny_build(digits, tmp_path / "store", outputs=["fpn"]).store
    stage = {
        "name": "ssd",
        "stores": [store],
        "losses": [{"name": "mgd", "weight": 1e-4}],
        "epochs": 2,
        "optimizer": {"type": "adamw", "lr": 0.002},
        "schedule": {"warmup_iters": 2},
    }
    plan = load_plan(write_plan(tmp_path, digits, [], [stage], student={"arch": "ssd_tiny", "options": {"width": 8}}))
    events: list[dict] = []
    (result,) = run_plan(plan, [1], log=None, on_event=events.append)
    steps = [e for e in events if e["event"] == "step"]
    assert {"mgd", "det_bbox_regression", "det_classification"} <= set(steps[0])
    assert "AP" in result.metrics  # evaluated on the val split
    metrics = json.loads((tmp_path / "run" / "stage_1" / "metrics.json").read_text())
    assert metrics["AP"] == result.metrics["AP"]

    student = load_student(result.checkpoint)
    assert adapter_for(student).family == "ssd"
    spec = ViewSpec(**TINY_VIEW)
    exported = export_model(student, tmp_path / "ssd.onnx", spec)
    report = compare(
        student, OnnxDetector(exported.path), CocoDataset(digits["val"]["ann"], digits["val"]["images"]), spec
    )
    assert report.images == 4 and report.exact == report.same_count, report.line()


@pytest.mark.parametrize("n", [1, 3])
def test_ssd_default_boxes_mirror_exactly(n: int) -> None:
    """SSD's default boxes sit at cell centres: the flipped view's boxes are the mirrored ones, column for column
    (torchvision's AnchorGenerator places them at cell corners, one stride off)."""
    model = build_arch("ssd_tiny", 3, width=8)
    a = adapter_for(model)
    anchors = a.anchors((64, 64 * n)).view(-1, 4)
    mirrored = torch.stack([64 * n - anchors[:, 2], anchors[:, 1], 64 * n - anchors[:, 0], anchors[:, 3]], 1)
    # Row order: level, then (h, w, anchor): reverse w within each level's grid.
    out, start = [], 0
    for lvl in (3, 4, 5):
        h, w = -(-64 // 2**lvl), -(-64 * n // 2**lvl)
        block = mirrored[start : start + h * w * 4].view(h, w, 4, 4)
        out.append(block.flip(1).reshape(-1, 4))
        start += h * w * 4
    torch.testing.assert_close(torch.cat(out), anchors, atol=1e-4, rtol=0)
