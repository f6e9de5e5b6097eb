"""DETR-family mmdet teachers (DINO, Deformable DETR; bundled configs, random init, ResNet-18 backbone):
their neck maps and encoder memory are cached, the encoder masks each view's padding, query-based
outputs are refused in one line, and a conv student trains from a DINO store."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("mmdet", reason="needs the mmdet extra: `make install-mmdet` (mmcv 2.1 with compiled ops)")

from conftest import TINY_VIEW, tiny_build  # noqa: E402
from test_trainer import write_plan  # noqa: E402

from mtpd.cache import open_store  # noqa: E402
from mtpd.data import CocoDataset, ViewSpec, prepare_view  # noqa: E402
from mtpd.teachers.base import TeacherError, run_teacher  # noqa: E402
from mtpd.teachers.mmdet_config import resolve_config  # noqa: E402
from mtpd.teachers.registry import TeacherSpec, build_teacher  # noqa: E402
from mtpd.trainer.plan import load_plan  # noqa: E402
from mtpd.trainer.stage import run_plan  # noqa: E402

pytestmark = pytest.mark.mmdet

DINO = "dino-4scale_r50_8xb2-12e_coco"
DEFORMABLE = "deformable-detr_r50_16xb2-50e_coco"


def small_config(tmp_path, base: str) -> str:
    """The bundled config on a ResNet-18 (C3–C5: 128, 256, 512 channels), 10 classes, one encoder layer."""
    lines = [
        f"_base_ = [{str(resolve_config(base))!r}]",
        "model = dict(",
        "    backbone=dict(depth=18, init_cfg=None),",
        "    neck=dict(in_channels=[128, 256, 512]),",
        "    encoder=dict(num_layers=1),",
        "    decoder=dict(num_layers=1),",
        "    bbox_head=dict(num_classes=10),",
        ")",
    ]
    path = tmp_path / f"{base}_tiny.py"
    path.write_text("\n".join(lines) + "\n")
    return "mmdet:" + str(path)


@pytest.fixture(scope="module")
def dino_name(tmp_path_factory) -> str:
    return small_config(tmp_path_factory.mktemp("dino"), DINO)


@pytest.mark.parametrize("base", [DINO, DEFORMABLE])
def test_detr_teachers_offer_neck_maps_and_memory_and_refuse_queries(tmp_path, base) -> None:
    teacher = build_teacher(small_config(tmp_path, base))
    specs = teacher.output_specs()
    assert set(specs) == {"fpn", "memory"}
    assert specs["fpn"].levels == (3, 4, 5, 6) and specs["fpn"].channels == 256 == specs["memory"].channels
    # Neck maps and memory are features: an orig-only store serves flips with their columns reversed.
    assert specs["fpn"].mirror_rule == specs["memory"].mirror_rule == "reverse"
    x = torch.randn(2, 3, 64, 128)
    out = teacher(x, ["fpn", "memory"])
    for lvl in (3, 4, 5, 6):
        assert out[f"fpn.p{lvl}"].shape == out[f"memory.p{lvl}"].shape == (2, 256, -(-64 // 2**lvl), -(-128 // 2**lvl))
    with pytest.raises(
        TeacherError, match=r"cls, box of a DETR-family detector .* not cacheable; cache fpn and/or memory"
    ):
        teacher(x, ["cls", "box"])


def test_the_encoder_masks_each_views_padding(dino_name) -> None:
    """A view 64 wide padded to 128: its memory with its valid size given differs from the unmasked one, and
    equals what the same image gives when the padding holds something else entirely (the neck's padded cells
    are masked out of the encoder; the neck itself is a CNN, whose border cells see the padding)."""
    teacher = build_teacher(dino_name)
    g = torch.Generator().manual_seed(0)
    img = torch.randn(1, 3, 64, 64, generator=g)
    a = torch.cat([img, torch.zeros(1, 3, 64, 64)], dim=3)
    masked = run_teacher(teacher, a, ["memory"], [(64, 64)])
    plain = run_teacher(teacher, a, ["memory"], None)
    assert not torch.allclose(masked["memory.p3"][..., :8], plain["memory.p3"][..., :8])
    # Two views in one batch with different valid sizes: each row masked by its own size.
    both = run_teacher(teacher, torch.cat([a, a]), ["memory"], [(64, 64), (64, 128)])
    torch.testing.assert_close(both["memory.p4"][0], masked["memory.p4"][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(both["memory.p4"][1], plain["memory.p4"][0], rtol=1e-4, atol=1e-5)


def test_a_dino_store_holds_the_neck_output_and_a_conv_student_trains_from_it(tmp_path, digits, dino_name) -> None:
    report = tiny_build(digits, tmp_path / "dino", TeacherSpec(dino_name, "none"), outputs=["fpn"], batch_size=1)
    store = open_store(report.store)
    assert store.header.outputs["fpn"].levels == (3, 4, 5, 6)
    teacher = build_teacher(dino_name)
    coco = CocoDataset(digits["train"]["ann"], digits["train"]["images"])
    views = ViewSpec(views=("orig", "hflip"), **TINY_VIEW)
    for i in range(2):
        x, meta = prepare_view(coco.load_image(i), views, "orig")
        direct = run_teacher(teacher, x[None], ["fpn"], [meta.size])
        got = store.read(store.sample_index(coco.images[i].image_id, "orig"), ["fpn"])["fpn"]
        for lvl, m in zip((3, 4, 5, 6), got):
            ref = direct[f"fpn.p{lvl}"][0, :, : m.shape[1], : m.shape[2]].numpy()
            np.testing.assert_allclose(m, ref, rtol=2**-11, atol=1e-6)  # lossless: fp16's half ulp
    stage = {
        "name": "from_dino",
        "stores": [report.store],
        "losses": [{"name": "mgd", "weight": 1e-5}],
        "epochs": 1,
        "eval": False,
        "optimizer": {"type": "adamw", "lr": 0.001},
    }
    events: list[dict] = []
    run_plan(load_plan(write_plan(tmp_path, digits, [], [stage])), [1], log=None, on_event=events.append)
    # The student's P3–P5 are all in the store (its P6 is the DINO neck's own): nothing skipped, MGD trains.
    assert not [e for e in events if e["event"] == "levels_skipped"]
    steps = [e for e in events if e["event"] == "step"]
    assert steps and all(np.isfinite(e["mgd"]) and e["mgd"] > 0 for e in steps)
    assert [e for e in events if e["event"] == "stage_end"]
