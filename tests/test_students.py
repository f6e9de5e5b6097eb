"""Every student family trains a step on prepared views and predicts, through the same code as stages."""

from __future__ import annotations

import pytest
import torch

from mtpd.data import CocoDataset, ViewSpec
from mtpd.models import arch_family
from mtpd.models.detect import DetectorStep, detector_forward
from mtpd.trainer.plan import StudentConfig
from mtpd.trainer.student import build_student, label_offset
from mtpd.trainer.targets import DistillDataset, make_loader

ARCHS = [
    "retinanet_resnet18_fpn",
    "retinanet_resnet34_fpn",
    "retinanet_resnet50_fpn",
    "retinanet_mobilenet_v2_fpn",
    "retinanet_mobilenet_v3_fpn",
    "fcos_resnet50_fpn",
    "fasterrcnn_resnet50_fpn",
    "maskrcnn_resnet50_fpn",
    "fcos_tiny",
    "retinanet_tiny",
]


@pytest.mark.parametrize("arch", ARCHS)
def test_student_trains_one_step_and_predicts(arch, digits):
    torch.manual_seed(0)
    student = build_student(StudentConfig(arch=arch), num_classes=10)
    family = arch_family(student)
    ds = DistillDataset(
        CocoDataset(digits["train"]["ann"], digits["train"]["images"]),
        ViewSpec(short=64, long=64, views=("orig", "hflip")),
        flip=True,
        seed=0,
        with_masks=family == "maskrcnn",
    )
    batch = next(iter(make_loader(ds, 2, shuffle=False, workers=0, seed=0)))
    targets = [{"boxes": b, "labels": l + label_offset(student)} for b, l in zip(batch.boxes, batch.labels)]
    if family == "maskrcnn":
        assert batch.instance_masks is not None and batch.instance_masks[0].shape[-2:] == batch.images.shape[-2:]
        for t, m in zip(targets, batch.instance_masks):
            t["masks"] = m
    student.train()
    losses, outputs = DetectorStep(student)(batch.images, batch.image_sizes, targets, ["fpn"])
    total = sum(losses.values())
    assert torch.isfinite(total) and total > 0
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(k.startswith("fpn.p") for k in outputs) and outputs
    student.eval()
    out = detector_forward(student, batch.images, batch.image_sizes, None, names=(), detect=True)
    assert len(out.detections) == 2 and all(set(d) >= {"boxes", "scores", "labels"} for d in out.detections)
