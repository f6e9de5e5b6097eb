"""Unlabelled pools: image sets without annotations (a folder, or the digits generator's pool), cached like any
set, and stages that draw part or all of each batch from them with losses that need no labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_VIEW, assert_resumes_bitwise, assert_store_is_the_teacher
from PIL import Image
from test_trainer import write_plan

from mtpd.cli import data as data_cli
from mtpd.data import CocoDataset, ViewSpec
from mtpd.trainer.plan import PlanError, load_plan
from mtpd.trainer.sampler import MixSampler
from mtpd.trainer.stage import run_plan

TEACHER_OUTPUTS = ("fpn", "cls", "box")


@pytest.fixture(scope="module")
def pooled(tmp_path_factory) -> dict:
    """The session's digits set (same seed and counts) with an unlabelled pool of 12 images."""
    from mtpd.data.digits import make_digits

    return make_digits(tmp_path_factory.mktemp("pooled"), train=10, val=4, size=64, seed=0, pool=12)


def build(ann: str, images: str, out: Path, ckpt: str):
    from mtpd.cache.build import build_store
    from mtpd.teachers.registry import TeacherSpec

    return build_store(
        TeacherSpec("retinanet_tiny", ckpt),
        ann,
        images,
        str(out),
        views=ViewSpec(views=("orig", "hflip"), **TINY_VIEW),
        precision="lossless",
        outputs=list(TEACHER_OUTPUTS),
        workers=0,
        images_per_shard=4,
        progress=False,
    )


@pytest.fixture(scope="module")
def stores(tmp_path_factory, pooled, tiny_teacher_ckpt) -> dict:
    root = tmp_path_factory.mktemp("pool_stores")
    return {
        which: str(build(pooled[which]["ann"], pooled[which]["images"], root / which, tiny_teacher_ckpt).store)
        for which in ("train", "pool")
    }


# ----------------------------------------------------------------------------- image sets


def test_the_digits_pool_is_unlabelled_and_leaves_train_and_val_as_they_were(pooled, digits) -> None:
    for split in ("train", "val"):  # the session's set was made without a pool
        assert Path(pooled[split]["ann"]).read_bytes() == Path(digits[split]["ann"]).read_bytes()
    pool = json.loads(Path(pooled["pool"]["ann"]).read_text())
    withheld = json.loads(Path(pooled["pool"]["withheld"]).read_text())
    assert len(pool["images"]) == 12 and pool["annotations"] == [] and pool["info"]["unlabelled"]
    assert pool["images"] == withheld["images"] and len(withheld["annotations"]) >= 12  # 2-6 digits an image
    train0 = np.asarray(Image.open(Path(pooled["train"]["images"]) / "000000.png"))
    pool0 = np.asarray(Image.open(Path(pooled["pool"]["images"]) / "000000.png"))
    assert not np.array_equal(train0, pool0)  # its own stream: other images
    ds = CocoDataset(pooled["pool"]["ann"], pooled["pool"]["images"])
    assert len(ds) == 12 and ds.annotations(0).boxes.shape == (0, 4)


def test_mtpd_data_pool_lists_a_folder_recursively(tmp_path, capsys) -> None:
    folder = tmp_path / "frames"
    (folder / "cam_b" / "day2").mkdir(parents=True)
    (folder / ".thumbs").mkdir()
    Image.new("RGB", (40, 30)).save(folder / "cam_b" / "day2" / "a.PNG")
    Image.new("RGB", (20, 50)).save(folder / "z.jpg")
    Image.new("RGB", (8, 8)).save(folder / "m.webp")
    Image.new("RGB", (8, 8)).save(folder / ".thumbs" / "hidden.png")
    (folder / "notes.txt").write_text("not an image")
    cats = tmp_path / "train.json"
    cats.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 3, "name": "tree"}]}))
    out = tmp_path / "pool.json"
    assert data_cli.main(["pool", "--images", str(folder), "--out", str(out), "--categories-from", str(cats)]) == 0
    assert "wrote 3 unlabelled images" in capsys.readouterr().out
    coco = json.loads(out.read_text())
    assert [(im["id"], im["file_name"], im["width"], im["height"]) for im in coco["images"]] == [
        (1, "cam_b/day2/a.PNG", 40, 30),
        (2, "m.webp", 8, 8),
        (3, "z.jpg", 20, 50),
    ]
    assert coco["annotations"] == [] and coco["categories"] == [{"id": 3, "name": "tree"}]
    first = out.read_bytes()
    assert data_cli.main(["pool", "--images", str(folder), "--out", str(out), "--quiet"]) == 0
    assert json.loads(out.read_text())["images"] == json.loads(first)["images"]  # same folder, same list


def test_an_unreadable_image_is_named_or_skipped(tmp_path, capsys) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    Image.new("RGB", (16, 16)).save(folder / "good.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "pool.json"
    assert data_cli.main(["pool", "--images", str(folder), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "broken.jpg: not a readable image" in err and "--skip-bad" in err and not out.exists()
    assert data_cli.main(["pool", "--images", str(folder), "--out", str(out), "--quiet", "--skip-bad"]) == 0
    assert "skipped (unreadable):" in capsys.readouterr().out
    assert [im["file_name"] for im in json.loads(out.read_text())["images"]] == ["good.png"]
    (tmp_path / "empty").mkdir()
    assert data_cli.main(["pool", "--images", str(tmp_path / "empty"), "--out", str(out), "--quiet"]) == 2
    assert "no jpg, jpeg, png or webp files under it" in capsys.readouterr().err


# ----------------------------------------------------------------------------- stores


def test_a_pool_store_holds_the_teacher_on_the_pool(stores, pooled, tiny_teacher_ckpt) -> None:
    from mtpd.cache.store import store_header
    from mtpd.teachers import build_teacher

    teacher = build_teacher("retinanet_tiny", weights=tiny_teacher_ckpt)
    ds = CocoDataset(pooled["pool"]["ann"], pooled["pool"]["images"])
    h = store_header(stores["pool"])
    assert h.manifest_sha256 == ds.manifest_hash() and h.num_images == 12
    assert_store_is_the_teacher(stores["pool"], teacher, ds, (0, 11))


def test_the_catalog_finds_a_named_teachers_pool_store_or_says_how_to_build_it(
    tmp_path, pooled, tiny_teacher_ckpt
) -> None:
    from mtpd.trainer.store_refs import MissingStore, stage_stores

    ref = {"name": "retinanet_tiny", "weights": tiny_teacher_ckpt, "outputs": list(TEACHER_OUTPUTS)}
    st = {"name": "p", "teacher": {**ref, "precision": "lossless"}, "pool": 1.0, "losses": [{"name": "mgd"}]}
    plan = load_plan(write_plan(tmp_path, pooled, [], [st], data=pool_data(pooled), cache_root=str(tmp_path / "c")))
    with pytest.raises(MissingStore, match=r"for this plan's pool and views .*--ann \S*instances_pool.json"):
        stage_stores(plan, plan.stages[0], "pool")
    from mtpd.cache.build import build_store
    from mtpd.teachers.registry import TeacherSpec

    built = build_store(
        TeacherSpec("retinanet_tiny", tiny_teacher_ckpt),
        pooled["pool"]["ann"],
        pooled["pool"]["images"],
        views=ViewSpec(views=("orig", "hflip"), **TINY_VIEW),
        root=str(tmp_path / "c"),
        precision="lossless",
        outputs=list(TEACHER_OUTPUTS),
        workers=0,
        progress=False,
    )
    assert stage_stores(plan, plan.stages[0], "pool") == [str(built.store)]


# ----------------------------------------------------------------------------- sampling


def test_mixed_batches_cover_the_labelled_set_each_epoch_and_the_pool_before_repeating() -> None:
    s = MixSampler(n_lab=10, n_pool=7, per_lab=3, per_pool=2, seed=5)
    seen_pool: list[int] = []
    for epoch in range(3):
        s.set_epoch(epoch)
        idx = list(s)
        batches = [idx[i : i + 5] for i in range(0, len(idx), 5)]
        assert len(batches) == s.iters() == 4 and all(len(b) == 5 for b in batches)
        assert all(all(i < 10 for i in b[:3]) and all(i >= 10 for i in b[3:]) for b in batches)
        assert set(i for b in batches for i in b[:3]) == set(range(10))  # the last batch wraps round
        seen_pool += [i for b in batches for i in b[3:]]
    for cycle in range(len(seen_pool) // 7):  # every pool image once per cycle of the stream
        assert sorted(seen_pool[cycle * 7 : (cycle + 1) * 7]) == list(range(10, 17))
    s.set_epoch(2, start=5)
    resumed = list(s)
    s.set_epoch(2)
    assert resumed == list(s)[5:]  # a resume skips exactly the batches done
    ranks = [MixSampler(10, 7, 3, 2, seed=5, rank=r, world=2) for r in (0, 1)]
    assert sorted(list(ranks[0]) + list(ranks[1])) == sorted(list(MixSampler(10, 7, 3, 2, seed=5)))
    only = MixSampler(0, 7, 0, 4, seed=5)
    assert sorted(set(only)) == list(range(7)) and len(only) == 8


# ----------------------------------------------------------------------------- training


def pool_data(pooled: dict, **over) -> dict:
    return {
        "train_ann": pooled["train"]["ann"],
        "train_images": pooled["train"]["images"],
        "val_ann": pooled["val"]["ann"],
        "val_images": pooled["val"]["images"],
        "pool_ann": pooled["pool"]["ann"],
        "pool_images": pooled["pool"]["images"],
        "short": 64,
        "long": 64,
        "batch_size": 4,
        "workers": 0,
        **over,
    }


def pool_stage(stores: dict, share: float, **over) -> dict:
    return {
        "name": f"pool{share}",
        "stores": [] if share == 1 else [stores["train"]],
        "pool_stores": [stores["pool"]],
        "pool": share,
        "losses": [{"name": "mgd", "weight": 2.0e-4}, {"name": "kd", "weight": 1.0}],
        "epochs": 2,
        "optimizer": {"type": "adamw", "lr": 0.002},
        "schedule": {"warmup_iters": 2},
        **over,
    }


def test_the_detection_loss_reads_the_labelled_images_alone(pooled) -> None:
    from mtpd.models import build_arch
    from mtpd.models.detect import detector_forward

    torch.manual_seed(0)
    # eval: batch norm on running statistics, so each image's outputs do not depend on the batch beside it
    model = build_arch("retinanet_tiny", num_classes=10, width=8, fpn_channels=32).eval()
    lab = CocoDataset(pooled["train"]["ann"], pooled["train"]["images"])
    pool = CocoDataset(pooled["pool"]["ann"], pooled["pool"]["images"])
    images = torch.stack([torch.tensor(d.load_image(0)).permute(2, 0, 1).float() / 255 for d in (lab, pool)])
    ann = lab.annotations(0)
    target = {"boxes": torch.as_tensor(ann.boxes), "labels": torch.as_tensor(ann.labels)}
    sizes = [(64, 64), (64, 64)]
    mixed = detector_forward(model, images, sizes, [target, None], detect=False).losses
    alone = detector_forward(model, images[:1], sizes[:1], [target], detect=False).losses
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    as_background = detector_forward(model, images, sizes, [target, empty], detect=False).losses
    for k in alone:
        torch.testing.assert_close(mixed[k], alone[k], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(mixed["classification"], as_background["classification"])


def test_pool_stages_train_and_evaluate_on_the_labelled_val_set(tmp_path, pooled, stores) -> None:
    stages = [pool_stage(stores, 1.0, epochs=1), pool_stage(stores, 0.5)]
    plan = load_plan(write_plan(tmp_path, pooled, [], stages, data=pool_data(pooled)))
    res = run_plan(plan, [1, 2], log=None)
    assert all("AP" in r.metrics for r in res)
    logs = [
        [json.loads(x) for x in (Path(plan.output_dir) / f"stage_{k}" / "log.jsonl").read_text().splitlines()]
        for k in (1, 2)
    ]
    assert not any(k.startswith("det_") for rec in logs[0] for k in rec)  # the pool alone: no detection loss
    assert all({"det_classification", "mgd", "kd"} <= set(rec) for rec in logs[1])
    assert logs[0][-1]["iter"] == 3  # 12 pool images, 4 a batch
    assert logs[1][-1]["iter"] == 5 and logs[1][-1]["epoch"] == 2  # 10 labelled images, 2 a batch
    used = {s["path"] for r in res for s in r.metrics["stores"]}
    assert used == {stores["train"], stores["pool"]}


def test_a_pool_stage_runs_its_teacher_live_as_the_online_reference(tmp_path, pooled, stores, tiny_teacher_ckpt):
    from mtpd.teachers import build_teacher

    teacher = build_teacher("retinanet_tiny", weights=tiny_teacher_ckpt)
    plan = load_plan(write_plan(tmp_path, pooled, [], [pool_stage(stores, 0.5, eval=False)], data=pool_data(pooled)))
    res = run_plan(plan, [1], log=None, online=[teacher])
    assert "stores" not in res[0].metrics  # no store read
    logs = [json.loads(x) for x in (Path(plan.output_dir) / "stage_1" / "log.jsonl").read_text().splitlines()]
    assert all({"det_classification", "mgd", "kd"} <= set(rec) for rec in logs)


def test_a_mixed_stage_resumes_bitwise(tmp_path, pooled, stores) -> None:
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    stage = pool_stage(stores, 0.5, eval=False)
    a, b = (
        load_plan(write_plan(tmp_path / d, pooled, [], [stage], data=pool_data(pooled), checkpoint_every=1))
        for d in "ab"
    )
    assert_resumes_bitwise(a, b, 7)  # in epoch 2 (5 iterations an epoch)


# ----------------------------------------------------------------------------- the plan check


def test_the_plan_check_refuses_what_a_pool_cannot_serve(tmp_path, pooled, stores) -> None:
    def check(stages, **data):
        plan = load_plan(write_plan(tmp_path, pooled, [], stages, data=pool_data(pooled, **data)))
        run_plan(plan, [1], log=None)

    with pytest.raises(PlanError, match=r"stages\[0\] \(pool1.0\)\.losses: rm read\(s\) ground-truth boxes"):
        check([pool_stage(stores, 1.0, losses=[{"name": "rm"}, {"name": "mgd", "weight": 2.0e-4}])])
    with pytest.raises(PlanError, match=r"learns from its losses only"):
        check([pool_stage(stores, 1.0, losses=[])])
    with pytest.raises(PlanError, match=r"data\.pool_ann is not set; list the images with `mtpd-data pool"):
        check([pool_stage(stores, 0.5)], pool_ann=None, pool_images=None)
    with pytest.raises(PlanError, match=r"pool_stores: 0 for 1 store\(s\)"):
        check([pool_stage(stores, 0.5, pool_stores=[])])
    with pytest.raises(PlanError, match=r"pool: 0.1 of a batch of 4 rounds to 0 images"):
        check([pool_stage(stores, 0.1)])
    path = write_plan(tmp_path, pooled, [], [pool_stage(stores, 0.5)], data=pool_data(pooled))
    plan = yaml.safe_load(path.read_text())
    plan["student"] = {"arch": "fasterrcnn_resnet50_fpn"}
    (tmp_path / "rcnn.yaml").write_text(yaml.safe_dump(plan))
    with pytest.raises(
        PlanError, match=r"two-stage student \(FasterRCNN\).*use a student that can \(RetinaNet, FCOS, SSD\)"
    ):
        run_plan(load_plan(tmp_path / "rcnn.yaml"), [1], log=None)


def test_a_store_of_other_pixels_under_the_same_file_list_is_refused(tmp_path, pooled, stores) -> None:
    """A pool and a train set may list the same file names (000000.png ...) in other folders: the manifest agrees,
    the pixels do not, and the store's content probe tells them apart."""
    import shutil

    from mtpd.cache.schema import StoreError
    from mtpd.trainer.targets import DistillDataset

    other = tmp_path / "other"
    shutil.copytree(pooled["train"]["images"], other)
    Image.new("RGB", (64, 64), "white").save(other / "000000.png")
    ds = CocoDataset(pooled["train"]["ann"], other)
    train = CocoDataset(pooled["train"]["ann"], pooled["train"]["images"])
    assert ds.manifest_hash() == train.manifest_hash() and ds.content_probe() != train.content_probe()
    spec = ViewSpec(views=("orig", "hflip"), **TINY_VIEW)
    DistillDataset(train, spec, [stores["train"]])  # its own images: accepted
    with pytest.raises(StoreError, match=r"built on other images than \S*other holds"):
        DistillDataset(ds, spec, [stores["train"]])


def test_the_unlabelled_example_runs_end_to_end(tmp_path) -> None:
    """examples/unlabelled/run.sh at a tiny scale: the folder listed, the teacher cached over both sets into the
    catalog, the plan's pool-only and mixed stages trained, the student evaluated."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    plan = yaml.safe_load((repo / "examples" / "unlabelled" / "plan.yaml").read_text())
    d = plan["data"]
    d |= {
        "train_ann": str(out / "digits/annotations/instances_train.json"),
        "train_images": str(out / "digits/images/train"),
        "val_ann": str(out / "digits/annotations/instances_val.json"),
        "val_images": str(out / "digits/images/val"),
        "pool_ann": str(out / "frames.json"),
        "pool_images": str(out / "digits/images/pool"),
        "batch_size": 4,
    }
    plan |= {"cache_root": str(out / "cache"), "output_dir": str(out / "runs")}
    for s in plan["stages"]:
        s["epochs"], s["schedule"]["warmup_iters"] = 1, 2
        s["teacher"]["weights"] = str(repo / "mtpd" / "demo" / "teachers" / "strong.pt")
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    env = {**os.environ, "BIN": str(Path(sys.executable).parent), "OUT": str(out), "PLAN": str(tmp_path / "plan.yaml")}
    env |= {"TRAIN": "8", "VAL": "4", "POOL": "8"}
    res = subprocess.run(
        ["bash", str(repo / "examples" / "unlabelled" / "run.sh")], cwd=repo, env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "wrote 8 unlabelled images" in res.stdout and "AP" in res.stdout
    stores = sorted(p.name.split("-")[1] for p in (out / "cache").iterdir() if p.is_dir())
    assert stores == ["frames", "instances_train"]
    assert (out / "runs" / "stage_2" / "final.pt").is_file()
