"""The transformer teacher (``retinanet_swin_tiny``) through the whole product: stores of every preset that
decode within their bounds, teacher ordering across families (CKA against a conv teacher), a conv student
trained from its store, evaluated and exported."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_VIEW, tiny_build
from test_format2 import needs_faiss
from test_trainer import write_plan

from mtpd.cache import open_store
from mtpd.cache.schema import PRECISIONS
from mtpd.data import CocoDataset, ViewSpec, prepare_view
from mtpd.models import arch_checkpoint, build_arch, output_specs
from mtpd.output_spec import NEGATE_DX, REVERSE
from mtpd.teachers.registry import TeacherSpec
from mtpd.trainer.plan import load_plan
from mtpd.trainer.stage import run_plan
from mtpd.trainer.student import load_student
from mtpd.trainer.teacher_order import measure

SWIN = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), fpn_channels=32)


@pytest.fixture(scope="module")
def swin_ckpt(tmp_path_factory) -> str:
    torch.manual_seed(0)
    model = build_arch("retinanet_swin_tiny", 10, **SWIN)
    path = tmp_path_factory.mktemp("swin") / "swin.pt"
    torch.save(arch_checkpoint(model), path)
    return str(path)


def test_the_swin_teacher_is_a_transformer_with_a_pyramid() -> None:
    from torchvision.models.swin_transformer import SwinTransformerBlock

    model = build_arch("retinanet_swin_tiny", 10)
    assert sum(isinstance(m, SwinTransformerBlock) for m in model.modules()) == 10  # depths (2, 2, 4, 2)
    specs = output_specs(model)
    assert specs["fpn"].levels == (3, 4, 5) and specs["fpn"].channels == 64
    assert specs["cls"].channels == 9 * 10  # retinanet_tiny's anchors and head
    # RetinaNet's adapter: a store of the original view serves its mirror by flipping the maps, and dx's sign.
    assert specs["fpn"].mirror_rule == specs["cls"].mirror_rule == REVERSE and specs["box"].mirror_rule == NEGATE_DX
    assert sum(p.numel() for p in model.parameters()) < 3.5e6  # the shipped checkpoint stays small


# Relative RMSE of each preset's decoded maps against the teacher run again here (a recompute in another batch
# differs by float noise, so fp16's half-ulp bound cannot be checked this way: the encodings' own tests do that).
MAX_REL_RMSE = {
    "lossless": 5e-4,
    "high": 4e-3,
    "compact": 1.5e-2,
    "small": 0.08,
    "tiny": 0.25,
    "micro": 0.075,
}  # 2-3x the measured (micro 3.1x)


@pytest.mark.parametrize(
    "precision", [pytest.param(p, marks=needs_faiss) if p == "micro" else p for p in sorted(PRECISIONS)]
)
def test_every_preset_stores_the_swin_teacher(tmp_path, digits, swin_ckpt, precision) -> None:
    report = tiny_build(
        digits, tmp_path / precision, TeacherSpec("retinanet_swin_tiny", swin_ckpt), precision=precision
    )
    store = open_store(report.store)
    teacher = TeacherSpec("retinanet_swin_tiny", swin_ckpt).build()
    coco = CocoDataset(digits["train"]["ann"], digits["train"]["images"])
    x, _ = prepare_view(coco.load_image(0), ViewSpec(views=("orig", "hflip"), **TINY_VIEW), "orig")
    want = teacher(x[None], ["fpn", "cls"])
    got = store.read(store.sample_index(coco.images[0].image_id, "orig"), ["fpn"])["fpn"]
    for j, lvl in enumerate((3, 4, 5)):
        ref = want[f"fpn.p{lvl}"][0]
        err = float((torch.from_numpy(got[j]) - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())
        assert err < MAX_REL_RMSE[precision], (precision, lvl, err)


def test_plan_order_measures_swin_against_a_conv_teacher_and_a_conv_student_distils(
    tmp_path, digits, swin_ckpt, tiny_teacher_ckpt, capsys
) -> None:
    swin = tiny_build(digits, tmp_path / "swin", TeacherSpec("retinanet_swin_tiny", swin_ckpt)).store
    conv = tiny_build(digits, tmp_path / "conv", TeacherSpec("retinanet_tiny", tiny_teacher_ckpt)).store
    stage = {
        "name": "from_swin",
        "stores": [swin],
        "losses": [{"name": "mgd", "weight": 1e-4}, {"name": "kd", "weight": 1.0}],
        "epochs": 1,
        "optimizer": {"type": "adamw", "lr": 0.002},
        "schedule": {"warmup_iters": 2},
    }
    plan = load_plan(write_plan(tmp_path, digits, [], [stage]))  # student: retinanet_tiny, FPN 32 (the swin's)
    (result,) = run_plan(plan, [1], log=None)
    assert "AP" in result.metrics
    student = load_student(result.checkpoint)
    res = measure(student, [swin, conv], CocoDataset(digits["train"]["ann"], digits["train"]["images"]), 4)
    assert {r.store for r in res} == {swin, conv}
    assert all(0.0 <= r.distance <= 1.0 and set(r.cka) == {3, 4, 5} for r in res)
    # The conv student deploys as any other: mtpd-export, then mtpd-eval --onnx against its checkpoint.
    pytest.importorskip("onnxruntime")
    from mtpd.cli.eval import main as eval_main
    from mtpd.cli.export import main as export_main

    onnx_path = tmp_path / "student.onnx"
    assert export_main(["--checkpoint", str(result.checkpoint), "--out", str(onnx_path)]) == 0
    capsys.readouterr()
    data = ["--ann", digits["val"]["ann"], "--images", digits["val"]["images"]]
    assert eval_main(["--onnx", str(onnx_path), "--checkpoint", str(result.checkpoint), "--json", *data]) == 0
    both = json.loads(capsys.readouterr().out)
    assert both["parity"]["fraction"] == 1.0 and abs(both["AP"] - both["pytorch"]["AP"]) <= 0.002
