"""Augmented views (random scale, crop, flip): their boxes match their pixels, a bank of them is stored exactly
as the teacher sees it, students train on them (fresh each epoch, or from a bank) and resume bitwise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_VIEW, assert_resumes_bitwise, assert_store_is_the_teacher
from test_trainer import write_plan

from mtpd.data import CocoDataset, ViewSpec, boxes_to_view, prepare_view
from mtpd.data.augment import Aug, AugmentError, AugmentPolicy
from mtpd.data.views import crop_boxes
from mtpd.trainer.plan import PlanError, load_plan
from mtpd.trainer.stage import Stage, run_plan

POLICY = AugmentPolicy(scale=(0.5, 1.6), bank=3, seed=7)


def bright_box(x: torch.Tensor, meta) -> tuple[float, float, float, float] | None:
    """xyxy of the pixels brighter than mid-grey in a prepared view's valid region (None: none)."""
    mean = torch.tensor(ViewSpec().mean).view(3, 1, 1)
    std = torch.tensor(ViewSpec().std).view(3, 1, 1)
    raw = (x * std + mean)[:, : meta.size[0], : meta.size[1]].mean(0)
    ys, xs = torch.nonzero(raw > 128, as_tuple=True)
    if len(ys) == 0:
        return None
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


@pytest.mark.parametrize("draw", range(12))
def test_an_augmented_views_boxes_match_its_pixels(draw) -> None:
    img = np.zeros((90, 120, 3), dtype=np.uint8)
    box = np.array([[30.0, 20.0, 70.0, 56.0]])  # xyxy, source pixels
    img[20:56, 30:70] = 255
    spec = ViewSpec(short=64, long=96)
    aug = AugmentPolicy(scale=(0.5, 2.0)).draw([draw])
    x, meta = prepare_view(img, spec, "aug", aug=aug)
    assert meta.padded == (int(np.ceil(meta.size[0] / 32) * 32), int(np.ceil(meta.size[1] / 32) * 32))
    boxes, keep = crop_boxes(boxes_to_view(box, meta), meta)
    seen = bright_box(x, meta)
    if keep[0]:
        assert seen is not None
        # bilinear resizing blurs the edge by up to a pixel each side
        np.testing.assert_allclose(boxes[0], seen, atol=1.5, err_msg=f"{aug} {meta}")
    else:  # dropped: its centre is outside the crop, so at most half of it can show
        cx, cy = (box[0, 0] + box[0, 2]) / 2 * meta.scale[0], (box[0, 1] + box[0, 3]) / 2 * meta.scale[1]
        dy, dx = meta.offset
        assert not (dx < cx < dx + meta.size[1] and dy < cy < dy + meta.size[0])


def test_policies_are_checked_and_parsed() -> None:
    assert AugmentPolicy.parse("scale=0.5:1.5,bank=8,flip=0.25,crop=0,seed=3") == AugmentPolicy(
        (0.5, 1.5), False, 0.25, 8, 3
    )
    with pytest.raises(AugmentError, match=r"augment.scale: \[low, high\]"):
        AugmentPolicy(scale=(1.5, 0.5))
    with pytest.raises(AugmentError, match="unknown field 'scael'"):
        AugmentPolicy.parse("scael=1:2")
    a, b = POLICY.bank_draw(5, "aug1"), POLICY.bank_draw(5, "aug1")
    assert a == b and a != POLICY.bank_draw(6, "aug1")  # by image id and k, the same on every call
    with pytest.raises(AugmentError, match="aug0..aug2"):
        POLICY.bank_draw(5, "aug3")
    # no jitter, no flip: the plain view, pixel for pixel (the crop offsets have no room to act)
    img = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    spec = ViewSpec(short=40, long=64)
    x_aug, m_aug = prepare_view(img, spec, "aug", aug=AugmentPolicy(flip=0.0).draw([0]))
    x, m = prepare_view(img, spec)
    assert torch.equal(x_aug, x) and m_aug.size == m.size and m_aug.offset == (0, 0)
    assert torch.equal(prepare_view(img, spec, "aug", aug=Aug(flip=True))[0], prepare_view(img, spec, "hflip")[0])


def bank_spec() -> ViewSpec:
    return ViewSpec(views=POLICY.bank_views(), augment=POLICY.to_dict(), **TINY_VIEW)


@pytest.fixture(scope="module")
def bank_store(tmp_path_factory, digits, tiny_teacher_ckpt) -> str:
    from mtpd.cache.build import build_store
    from mtpd.teachers.registry import TeacherSpec

    out = tmp_path_factory.mktemp("bank") / "store"
    rep = build_store(
        TeacherSpec("retinanet_tiny", tiny_teacher_ckpt),
        digits["train"]["ann"],
        digits["train"]["images"],
        str(out),
        views=bank_spec(),
        precision="lossless",
        outputs=["fpn", "cls", "box"],
        workers=0,
        images_per_shard=4,
        progress=False,
    )
    return str(rep.store)


def test_a_bank_views_targets_are_the_teachers_on_that_view(bank_store, digits, tiny_teacher_ckpt) -> None:
    from mtpd.cache.store import store_header
    from mtpd.teachers import build_teacher

    teacher = build_teacher("retinanet_tiny", weights=tiny_teacher_ckpt)
    h = store_header(bank_store)
    assert h.view_names == ("aug0", "aug1", "aug2") and h.views["augment"]["seed"] == 7
    ds = CocoDataset(digits["train"]["ann"], digits["train"]["images"])
    sizes = assert_store_is_the_teacher(bank_store, teacher, ds, (0, 7))
    assert len(sizes) > 1  # the bank's views differ in scale


def aug_stage(stores: list[str], **over) -> dict:
    return {
        "name": "aug",
        "stores": stores,
        "losses": [{"name": "mgd", "weight": 2.0e-4}, {"name": "kd", "weight": 1.0}] if stores else [],
        "epochs": 2,
        "eval": False,
        "optimizer": {"type": "adamw", "lr": 0.002},
        "schedule": {"warmup_iters": 2},
        **over,
    }


def augment(bank: int = 3, seed: int = 7) -> dict:
    return {"scale": [0.5, 1.6], "bank": bank, "seed": seed}


def with_augment(tmp_path: Path, digits: dict, stages: list[dict], aug: dict, **over) -> Path:
    path = write_plan(tmp_path, digits, [], stages, **over)
    plan = yaml.safe_load(path.read_text())
    plan["data"]["augment"] = aug
    path.write_text(yaml.safe_dump(plan))
    return path


def test_students_train_on_bank_views_from_stores_and_on_fresh_views_live(tmp_path, digits, bank_store) -> None:
    (tmp_path / "bank").mkdir(), (tmp_path / "fresh").mkdir()
    plan = load_plan(with_augment(tmp_path / "bank", digits, [aug_stage([bank_store], eval=True)], augment()))
    res = run_plan(plan, [1], log=None)
    assert "AP" in res[0].metrics
    seen = []
    stage = Stage(plan, 1, log=None)
    engine, _, _ = stage.build()
    ds = engine.loader.dataset
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        seen.append([ds[i].meta.view for i in range(len(ds))])
    assert set(seen[0] + seen[1]) <= {"aug0", "aug1", "aug2"} and seen[0] != seen[1]  # a bank view per epoch
    # no store holds fresh views: with bank 0 a cached stage is refused, a plain one trains on a new view each epoch
    with pytest.raises(PlanError, match=r"data.augment.bank is 0, so every epoch draws fresh views"):
        run_plan(load_plan(with_augment(tmp_path / "fresh", digits, [aug_stage([bank_store])], augment(0))), [1])
    plain = load_plan(with_augment(tmp_path / "fresh", digits, [aug_stage([])], augment(0)))
    run_plan(plain, [1], log=None)
    ds = Stage(plain, 1, log=None).build()[0].loader.dataset
    ds.set_epoch(0)
    a = [ds[i].meta for i in range(3)]
    ds.set_epoch(1)
    b = [ds[i].meta for i in range(3)]
    assert all(m.view == "aug" for m in a + b) and a != b


def test_a_store_of_another_policy_is_refused(tmp_path, digits, bank_store) -> None:
    from mtpd.cache.schema import StoreError

    plan = load_plan(with_augment(tmp_path, digits, [aug_stage([bank_store])], augment(seed=8)))
    with pytest.raises(StoreError, match=r"augmented views were drawn with .*'seed': 7.* data.augment is .*'seed': 8"):
        run_plan(plan, [1], log=None)


def test_a_stage_on_a_bank_resumes_bitwise(tmp_path, digits, bank_store) -> None:
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    stages = [aug_stage([bank_store])]
    a, b = (load_plan(with_augment(tmp_path / d, digits, stages, augment(), checkpoint_every=1)) for d in "ab")
    assert_resumes_bitwise(a, b, 5)  # in epoch 2 (3 iterations an epoch)


def test_mtpd_cache_build_augment_writes_a_bank(tmp_path, digits, capsys) -> None:
    from conftest import build_args

    from mtpd.cache.store import store_header
    from mtpd.cli.cache import main

    out = tmp_path / "bank"
    args = build_args(digits["train"]["ann"], digits["train"]["images"], "--augment", "scale=0.8:1.2,bank=2")
    assert main([*args, "--out", str(out), "--workers", "0"]) == 0
    h = store_header(str(out))
    assert h.view_names == ("aug0", "aug1") and h.views["augment"]["scale"] == [0.8, 1.2]
    assert main([*build_args(digits["train"]["ann"], digits["train"]["images"], "--augment", "bank=0")]) == 2
    assert "give bank=K" in capsys.readouterr().err
