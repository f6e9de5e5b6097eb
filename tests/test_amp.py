"""Mixed precision on the CPU (bf16 autocast): the student's forward in bf16, every loss in fp32; the first
step's losses stay close to fp32's, a bf16 stage trains, and a resume reproduces the uninterrupted run
bitwise. fp16 keeps its loss scale in last.pt."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_resumes_bitwise, tiny_build
from test_trainer import write_plan
from torchvision.models.detection.image_list import ImageList

from mtpd.trainer.plan import PlanError, load_plan
from mtpd.trainer.stage import Stage, run_plan

LOSSES = [{"name": "mgd", "weight": 2.0e-4}, {"name": "kd", "weight": 1.0}, {"name": "pfi"}]


def stage(store: str, **over) -> dict:
    return {
        "name": "s",
        "stores": [store],
        "losses": LOSSES,
        "epochs": 2,
        "eval": False,
        "optimizer": {"type": "adamw", "lr": 0.002},
        "schedule": {"warmup_iters": 2},
        **over,
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory, digits, tiny_teacher_ckpt) -> str:
    from mtpd.teachers.registry import TeacherSpec

    out = tmp_path_factory.mktemp("amp") / "store"
    return tiny_build(digits, out, TeacherSpec("retinanet_tiny", tiny_teacher_ckpt)).store


def first_step_losses(tmp_path: Path, digits: dict, store: str, amp: str) -> dict[str, float]:
    plan = load_plan(write_plan(tmp_path / amp, digits, [], [stage(store)], amp=amp))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    engine, _, _ = Stage(plan, 1, log=None).build()
    engine.step()
    return engine.state.losses


def test_bf16_losses_stay_close_to_fp32(tmp_path, digits, store) -> None:
    (tmp_path / "off").mkdir(), (tmp_path / "bf16").mkdir()
    fp32 = first_step_losses(tmp_path, digits, store, "off")
    bf16 = first_step_losses(tmp_path, digits, store, "bf16")
    assert set(fp32) == set(bf16) >= {"det_classification", "det_bbox_regression", "mgd", "kd", "pfi"}
    for k, v in fp32.items():
        # bf16 keeps 8 mantissa bits (relative 0.4 %) per product; the student's outputs drift by a few of
        # those through its layers, and every loss then sums in fp32.
        assert bf16[k] == pytest.approx(v, rel=0.05), (k, v, bf16[k])
        assert bf16[k] != v  # the forward did run in bf16


def test_a_bf16_stage_resumes_bitwise(tmp_path, digits, store) -> None:
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a, b = (
        load_plan(write_plan(tmp_path / d, digits, [], [stage(store)], amp="bf16", checkpoint_every=1)) for d in "ab"
    )
    assert_resumes_bitwise(a, b, 4)  # stops in epoch 2 (3 iterations per epoch)


def test_fp16_keeps_its_loss_scale_in_last_pt(tmp_path, digits, store) -> None:
    plan = load_plan(write_plan(tmp_path, digits, [], [stage(store, epochs=1, amp="fp16")]))
    run_plan(plan, [1], log=None)
    last = torch.load(Path(plan.output_dir) / "stage_1" / "last.pt", weights_only=True)
    assert last["scaler"]["scale"] > 0
    engine, checkpointer, _ = Stage(plan, 1, resume=True, log=None).build()
    checkpointer.restore(engine)
    assert engine.scaler.get_scale() == last["scaler"]["scale"]


def test_amp_values_are_checked(tmp_path, digits, store) -> None:
    with pytest.raises(PlanError, match=r"stages\[0\] \(s\)\.amp: 'fp8' is not one of off, bf16, fp16"):
        load_plan(write_plan(tmp_path, digits, [], [stage(store, amp="fp8")]))
    with pytest.raises(PlanError, match=r"^amp: 'half'"):
        load_plan(write_plan(tmp_path, digits, [], [stage(store)], amp="half"))


def test_an_amp_build_is_another_store(tmp_path, digits, tiny_teacher_ckpt) -> None:
    """--amp bf16: the teacher's forward under autocast, its identity (and so the catalog's name) says so, and
    its decoded maps stay near the fp32 build's."""
    from mtpd.cache import open_store
    from mtpd.cache.catalog import identity_digest
    from mtpd.teachers.registry import TeacherSpec

    fp32 = tiny_build(digits, tmp_path / "fp32", TeacherSpec("retinanet_tiny", tiny_teacher_ckpt))
    bf16 = tiny_build(digits, tmp_path / "bf16", TeacherSpec("retinanet_tiny", tiny_teacher_ckpt, amp="bf16"))
    assert bf16.header.teacher["extra"]["amp"] == "bf16" and "amp" not in fp32.header.teacher["extra"]
    assert identity_digest(bf16.header) != identity_digest(fp32.header)
    a, b = open_store(fp32.store), open_store(bf16.store)
    for name in ("fpn", "cls", "box"):
        x, y = a.read(0, [name])[name], b.read(0, [name])[name]
        for xs, ys in zip(x, y):
            err = np.sqrt(((xs - ys) ** 2).mean() / (xs**2).mean())
            assert 0 < err < 0.05, (name, err)  # bf16 moved the maps, by far less than small's ~10 %


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: fp16 autocast with a loss scale")
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_an_amp_stage_trains_on_cuda(tmp_path, digits, store, amp) -> None:
    plan = load_plan(write_plan(tmp_path, digits, [], [stage(store, epochs=1)], amp=amp))
    (result,) = run_plan(plan, [1], device="cuda", log=None)
    state = torch.load(result.checkpoint, weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_anchors_stay_fp32_under_autocast() -> None:
    """The anchor generator reads its dtype from the maps it is given: the adapters hand it fp32 stand-ins."""
    from mtpd.models import adapter_for, build_arch

    model = build_arch("retinanet_tiny", 3).train()
    x = torch.randn(2, 3, 64, 64)
    t = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 40.0]]), "labels": torch.tensor([1])}] * 2
    a = adapter_for(model)
    ref = a.forward(x, [(64, 64)] * 2, t, (), detect=False).losses
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = a.forward(x, [(64, 64)] * 2, t, (), detect=False).losses
    assert all(v.dtype == torch.float32 for v in got.values())
    torch.testing.assert_close(got["bbox_regression"], ref["bbox_regression"], rtol=0.05, atol=1e-3)
    feats = list(model.backbone(x).values())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf = model.anchor_generator(ImageList(x, [(64, 64)] * 2), [f.bfloat16() for f in feats])[0]
        fp = model.anchor_generator(ImageList(x, [(64, 64)] * 2), a.stand_ins(feats))[0]
    assert fp.dtype == torch.float32 and bf.dtype == torch.bfloat16
    torch.testing.assert_close(fp, a.anchors((64, 64)))


def test_channels_last_trains_the_same_student(tmp_path, digits, store) -> None:
    """channels_last changes the memory layout of weights and images, not what is computed: the final weights
    match the contiguous run's up to float rounding, and the checkpoint loads into a plain model."""
    from mtpd.trainer.student import load_student

    finals = []
    for cl in (False, True):
        (tmp_path / str(cl)).mkdir()
        plan = load_plan(write_plan(tmp_path / str(cl), digits, [], [stage(store, epochs=1)], channels_last=cl))
        (result,) = run_plan(plan, [1], log=None)
        finals.append(torch.load(result.checkpoint, weights_only=True)["model"])
    for k, v in finals[0].items():
        if v.is_floating_point():
            torch.testing.assert_close(finals[1][k], v, rtol=1e-3, atol=1e-4, msg=k)
    assert load_student(tmp_path / "True" / "run" / "stage_1" / "final.pt") is not None
