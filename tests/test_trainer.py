"""The student pass: plans, stages from stores, resume, refusals, cached-vs-online equivalence."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import assert_fp16_close, eval_args

from mtpd.cache.schema import StoreError
from mtpd.checkpoint import CheckpointError
from mtpd.data import CocoDataset, ViewSpec
from mtpd.trainer.engine import TrainError
from mtpd.trainer.plan import PlanError, load_plan
from mtpd.trainer.stage import Stage, run_plan

REPO = Path(__file__).resolve().parents[1]


def write_plan(tmp_path: Path, digits: dict, stores: list[str], stages: list[dict] | None = None, **over) -> Path:
    plan = {
        "output_dir": str(tmp_path / "run"),
        "seed": 0,
        "log_every": 1,
        "student": {"arch": "retinanet_tiny", "options": {"fpn_channels": 32, "width": 8}},
        "data": {
            "train_ann": digits["train"]["ann"],
            "train_images": digits["train"]["images"],
            "val_ann": digits["val"]["ann"],
            "val_images": digits["val"]["images"],
            "short": 64,
            "long": 64,
            "flip": True,
            "batch_size": 4,
            "workers": 0,
        },
        "stages": stages
        if stages is not None
        else [
            {
                "name": "weak",
                "stores": stores,
                "losses": [{"name": "mgd", "weight": 2.0e-4}, {"name": "pfi"}],
                "epochs": 1,
                "optimizer": {"type": "adamw", "lr": 0.002},
                "schedule": {"warmup_iters": 2},
            },
            {
                "name": "strong",
                "stores": stores,
                "losses": [{"name": "rm"}, {"name": "mse", "weight": 0.1}],
                "epochs": 1,
                "optimizer": {"type": "adamw", "lr": 0.002},
                "schedule": {"warmup_iters": 2},
            },
        ],
    }
    for k, v in over.items():
        plan[k] = v
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


def test_two_stage_plan_end_to_end(tmp_path, digits, tiny_store):
    from mtpd.cli.train import main

    plan = write_plan(tmp_path, digits, [tiny_store])
    assert main(["--plan", str(plan), "--stage", "all", "--device", "cpu"]) == 0
    run = tmp_path / "run"
    for k in (1, 2):
        m = json.loads((run / f"stage_{k}" / "metrics.json").read_text())
        assert set(m) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"} and 0.0 <= m["AP"] <= 1.0
        assert (run / f"stage_{k}" / "final.pt").is_file() and (run / f"stage_{k}" / "plan.yaml").is_file()
        log = [json.loads(x) for x in (run / f"stage_{k}" / "log.jsonl").read_text().splitlines()]
        assert log and all(np.isfinite(r["loss"]) for r in log)
    assert {"mgd", "pfi"} <= set(json.loads((run / "stage_1" / "log.jsonl").read_text().splitlines()[0]))
    assert (run / "plan.resolved.yaml").is_file()
    # Stage 2 started from stage 1's weights, not from scratch.
    s1 = torch.load(run / "stage_1" / "final.pt", weights_only=False)["model"]
    s2 = torch.load(run / "stage_2" / "final.pt", weights_only=False)["model"]
    assert any(not torch.equal(s1[k], s2[k]) for k in s1 if s1[k].is_floating_point())


def test_cached_stage_never_imports_a_teacher(tmp_path, digits, tiny_store):
    """Run a cached stage in a fresh interpreter: the teachers package is not even imported."""
    plan = write_plan(tmp_path, digits, [tiny_store])
    code = (
        "import sys\n"
        "from mtpd.trainer.plan import load_plan\nfrom mtpd.trainer.stage import run_plan\n"
        f"run_plan(load_plan({str(plan)!r}), [1], log=lambda s: None)\n"
        "bad = [m for m in sys.modules if m.startswith('mtpd.teachers') or m.startswith('mmdet')]\n"
        "assert not bad, bad\nprint('NO_TEACHER_OK')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert "NO_TEACHER_OK" in r.stdout, r.stderr[-2000:]


def test_resume_after_interrupted_stage_matches_uninterrupted(tmp_path, digits, tiny_store):
    stages = [
        {
            "name": "s",
            "stores": [tiny_store],
            "losses": [{"name": "mgd", "weight": 2.0e-4}],
            "epochs": 2,
            "optimizer": {"type": "sgd", "lr": 0.01},
            "schedule": {"warmup_iters": 2},
        }
    ]
    ref_plan = load_plan(
        write_plan(tmp_path / "a", digits, [], stages, checkpoint_every=1) if (tmp_path / "a").mkdir() is None else None
    )
    run_plan(ref_plan, [1], log=lambda s: None)
    ref = torch.load(Path(ref_plan.output_dir) / "stage_1" / "final.pt", weights_only=False)["model"]

    (tmp_path / "b").mkdir()
    plan = load_plan(write_plan(tmp_path / "b", digits, [], stages, checkpoint_every=1))
    calls = []

    def killer(msg: str) -> None:
        calls.append(msg)
        if len(calls) == 4:  # epoch 1 has 3 iterations: this stops in epoch 2, after its first step was checkpointed
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Stage(plan, 1, log=killer).run()
    last = torch.load(Path(plan.output_dir) / "stage_1" / "last.pt", weights_only=False)
    assert (last["epoch"], last["iteration"]) == (1, 0) or last["step"] >= 3
    assert not (Path(plan.output_dir) / "stage_1" / "final.pt").exists()
    Stage(plan, 1, resume=True, log=lambda s: None).run()
    got = torch.load(Path(plan.output_dir) / "stage_1" / "final.pt", weights_only=False)["model"]
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)


def test_plan_errors_name_the_key(tmp_path, digits, tiny_store):
    good = yaml.safe_load(write_plan(tmp_path, digits, [tiny_store]).read_text())

    def err(mutate) -> str:
        d = json.loads(json.dumps(good))
        mutate(d)
        p = tmp_path / "bad.yaml"
        p.write_text(yaml.safe_dump(d))
        with pytest.raises(PlanError) as e:
            plan = load_plan(p)
            Stage(plan, 1).run()
        return str(e.value)

    assert "stages[0].losses[0].wieght: unknown key" in err(lambda d: d["stages"][0]["losses"][0].update(wieght=1))
    # A key that would break the one-line message (found by tests/test_fuzz.py) is shown quoted.
    assert "data.'\\n': unknown key" in err(lambda d: d["data"].update({"\n": None}))
    assert "data.batch_size: expected an integer" in err(lambda d: d["data"].update(batch_size="four"))
    assert "student.arch: required key is missing" in err(lambda d: d["student"].pop("arch"))
    msg = err(lambda d: d["stages"][0]["losses"][0].update(name="fitnet2"))
    assert "fitnet2" in msg and "mgd" in msg and "losses[0]" in msg
    assert "losses[0].store: index 3" in err(lambda d: d["stages"][0]["losses"][0].update(store=3))


def test_missing_stage_checkpoint(tmp_path, digits, tiny_store):
    plan = load_plan(write_plan(tmp_path, digits, [tiny_store]))
    with pytest.raises(
        CheckpointError, match=r"stage_1/final.pt: stage 1 checkpoint missing; run `mtpd-train --plan PLAN --stage 1`"
    ):
        Stage(plan, 2).run()


def test_store_of_another_dataset_or_view_is_refused(tmp_path, digits, tiny_store):
    plan = write_plan(tmp_path, digits, [tiny_store])
    d = yaml.safe_load(plan.read_text())
    d["data"]["train_ann"], d["data"]["train_images"] = digits["val"]["ann"], digits["val"]["images"]
    plan.write_text(yaml.safe_dump(d))
    with pytest.raises(StoreError, match="built on another dataset"):
        run_plan(load_plan(plan), [1], log=lambda s: None)
    d = yaml.safe_load(write_plan(tmp_path, digits, [tiny_store]).read_text())
    d["data"]["short"] = d["data"]["long"] = 96
    plan.write_text(yaml.safe_dump(d))
    with pytest.raises(StoreError, match="view short is 64 in the store but 96 in the plan"):
        run_plan(load_plan(plan), [1], log=lambda s: None)


def test_a_store_without_any_student_level_is_refused():
    """Shared levels are distilled and the others skipped (tests/test_levels.py); none shared is an error."""
    from mtpd.models import build_arch
    from mtpd.output_spec import OutputSpec
    from mtpd.trainer.plan import LossConfig, StageConfig
    from mtpd.trainer.stage import build_losses

    student = build_arch("retinanet_tiny", 10, fpn_channels=32, width=8)  # P3-P5
    stage = StageConfig(name="s", losses=[LossConfig(name="mgd")])
    store = [{"fpn": OutputSpec("fpn", "feature", (6, 7), 64)}]
    with pytest.raises(PlanError, match=r"lacks \['P3', 'P4', 'P5'\]; use a teacher with those levels"):
        build_losses(stage, student, store, ["store s"], "stages[0]")


def test_non_finite_loss_stops_with_iteration(tmp_path, digits, tiny_store):
    stages = [
        {
            "name": "s",
            "stores": [tiny_store],
            "losses": [{"name": "mse", "weight": float("nan")}],
            "epochs": 1,
            "optimizer": {"type": "sgd", "lr": 0.01},
        }
    ]
    plan = load_plan(write_plan(tmp_path, digits, [], stages))
    with pytest.raises(TrainError, match=r"non-finite loss at epoch 1 iteration 1 .*last good checkpoint: none yet"):
        run_plan(plan, [1], log=lambda s: None)


def test_inheritance_copies_neck_and_head(tmp_path, tiny_teacher_ckpt):
    from mtpd.models import build_arch
    from mtpd.trainer.student import inherit_from_teacher

    student = build_arch("retinanet_tiny", num_classes=10, width=8)  # narrower backbone, same neck and head widths
    copied = inherit_from_teacher(student, tiny_teacher_ckpt, ["neck", "head"])
    teacher = torch.load(tiny_teacher_ckpt, weights_only=False)["model"]
    assert copied and all(k.startswith(("backbone.fpn.", "head.")) for k in copied)
    sd = student.state_dict()
    for k in copied:
        torch.testing.assert_close(sd[k], teacher[k])
    assert not any(k.startswith("backbone.body.") for k in copied)


def test_inheritance_from_mismatched_neck_is_an_error(tiny_teacher_ckpt):
    from mtpd.models import build_arch
    from mtpd.trainer.student import inherit_from_teacher

    student = build_arch("retinanet_tiny", num_classes=10, fpn_channels=32)
    with pytest.raises(CheckpointError, match="cannot inherit the neck"):
        inherit_from_teacher(student, tiny_teacher_ckpt, ["neck"])


def test_eval_cli(tmp_path, digits, tiny_teacher_ckpt, capsys):
    from mtpd.cli.eval import main

    args = eval_args(digits, tiny_teacher_ckpt)
    assert main(args + ["--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert set(stats) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert main(args) == 0 and "AP50" in capsys.readouterr().out
    assert main(["--checkpoint", str(tmp_path / "nope.pt")] + args[2:]) == 2


def test_order_puts_the_identical_teacher_first(tmp_path, digits, tiny_store, tiny_teacher_ckpt, capsys):
    """A student equal to teacher A has distance 0 to A's store; a random other teacher is farther."""
    from mtpd.cache.build import build_store
    from mtpd.cli.plan import main
    from mtpd.teachers.registry import TeacherSpec

    other = str(tmp_path / "other")
    build_store(
        TeacherSpec("retinanet_tiny_wide", "none", 10),
        digits["train"]["ann"],
        digits["train"]["images"],
        other,
        views=ViewSpec(short=64, long=64, views=("orig", "hflip")),
        outputs=["fpn"],
        workers=0,
        images_per_shard=5,
        progress=False,
    )
    plan = write_plan(
        tmp_path,
        digits,
        [tiny_store],
        stages=[
            {"name": "a", "stores": [other], "losses": [{"name": "mse"}]},
            {"name": "b", "stores": [tiny_store], "losses": [{"name": "mse"}]},
        ],
    )
    out_plan = tmp_path / "ordered.yaml"
    assert (
        main(
            [
                "order",
                "--student",
                tiny_teacher_ckpt,
                "--stores",
                other,
                tiny_store,
                "--images",
                "6",
                "--plan",
                str(plan),
                "--write",
                str(out_plan),
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert tiny_store in lines[1] and lines[1].split()[1] == "0.0000"
    assert other in lines[2]
    assert [s["stores"][0] for s in yaml.safe_load(out_plan.read_text())["stages"]] == [tiny_store, other]


LOSS_CASES = [
    ("mgd", {}),
    ("mse", {}),
    ("pkd", {}),
    ("cwd", {}),
    ("cwd", {"target": "cls"}),
    ("kd", {}),
    ("rm", {}),
    ("pfi", {}),
]


def test_cached_and_online_losses_and_gradients_agree(digits, tiny_store, tiny_teacher_ckpt):
    """For the same batch and views, each loss from the lossless store equals the loss with the teacher
    run inside the step, within fp16 rounding, and so do the gradients w.r.t. the student."""
    from mtpd.models import build_arch, model_anchors, output_specs
    from mtpd.models.detect import detector_forward
    from mtpd.teachers.registry import build_teacher
    from mtpd.trainer.losses import DistillBatch, build_loss
    from mtpd.trainer.sources import OnlineTargets, StoreTargets
    from mtpd.trainer.targets import DistillDataset, make_loader

    ds = DistillDataset(
        CocoDataset(digits["train"]["ann"], digits["train"]["images"]),
        ViewSpec(short=64, long=64, views=("orig", "hflip")),
        [tiny_store],
        flip=True,
        seed=3,
        outputs=[["fpn", "cls"]],
    )
    batch = next(iter(make_loader(ds, 4, shuffle=False, workers=0, seed=0)))
    assert {m.view for m in batch.metas} == {"orig", "hflip"}  # both views exercised
    teacher = build_teacher("retinanet_tiny", weights=tiny_teacher_ckpt)
    online = OnlineTargets([teacher], [["fpn", "cls"]])(batch)[0][0]
    cached = StoreTargets(ds.feeds)(batch)[0][0]  # decoded where the batch lies, as the engine does
    for key, t in online.items():  # the store's only change to the teacher's values is fp16 rounding
        assert_fp16_close(cached[key], t, key)
    torch.manual_seed(0)
    student = build_arch("retinanet_tiny", num_classes=10, fpn_channels=32, width=8)
    specs = output_specs(student)
    anchors = model_anchors(student, tuple(batch.images.shape[-2:]))
    for name, params in LOSS_CASES:
        torch.manual_seed(1)
        loss = build_loss(
            name, levels=(3, 4, 5), student_channels=32, teacher_channels=64, num_anchors=9, num_classes=10, **params
        )
        results = []
        for targets in (cached, online):
            student.zero_grad()
            loss.zero_grad()
            if name == "mgd":
                loss.generator = torch.Generator().manual_seed(7)  # the same random mask both times
            out = detector_forward(student, batch.images, batch.image_sizes, None, names=("fpn", "cls"), detect=False)
            db = DistillBatch(
                out.outputs,
                targets,
                batch.masks,
                batch.boxes,
                batch.labels,
                anchors,
                specs["cls"].num_anchors,
                10,
                (3, 4, 5),
            )
            value = loss(db)
            value.backward()
            grads = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
            results.append((value.detach(), grads))
        (v_cached, g_cached), (v_online, g_online) = results
        assert float(v_online) != 0.0, name
        # Targets differ only by fp16 rounding (checked above), so losses agree to ~2^-11 relative;
        # the absolute floor (1e-6, a millionth of the detection loss) covers losses like rm whose
        # value is itself tiny for a barely trained teacher.
        torch.testing.assert_close(v_cached, v_online, rtol=2e-3, atol=1e-6, msg=f"{name} {params}")
        # Gradient vectors agree in direction and size up to that rounding.
        cos = torch.nn.functional.cosine_similarity(g_cached, g_online, dim=0)
        assert cos > 0.9999, (name, params, float(cos))
        torch.testing.assert_close(g_cached.norm(), g_online.norm(), rtol=5e-3, atol=1e-9, msg=f"{name} {params}")


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path, digits, tiny_store):
    """The same plan under torchrun: DistributedDataParallel on CPU (gloo), two ranks."""
    plan = write_plan(
        tmp_path,
        digits,
        [tiny_store],
        stages=[
            {
                "name": "s",
                "stores": [tiny_store],
                "losses": [{"name": "mse", "weight": 0.1}],
                "epochs": 1,
                "optimizer": {"type": "adamw", "lr": 0.001},
                "schedule": {"warmup_iters": 1},
            }
        ],
    )
    d = yaml.safe_load(plan.read_text())
    d["data"]["batch_size"] = 2
    plan.write_text(yaml.safe_dump(d))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            "29517",
            "-m",
            "mtpd.cli.train",
            "--plan",
            str(plan),
            "--stage",
            "1",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "run" / "stage_1"
    assert json.loads((run / "metrics.json").read_text())["AP"] >= 0.0
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    # 10 images over 2 ranks x 2 per batch: 3 steps per epoch on each rank, logged by rank 0 only.
    assert [r["iter"] for r in log] == [1, 2, 3]


def test_online_targets_match_cached_on_mixed_image_sizes(tmp_path, digits, tiny_teacher_ckpt):
    """With images of different shapes in one batch, the online path (no store read) makes the same
    valid-cell masks and the same maps on the batch grid as the cached path: zeros and mask 0 on padding."""
    from PIL import Image

    from mtpd.cache.build import build_store
    from mtpd.teachers.registry import TeacherSpec, build_teacher
    from mtpd.trainer.sources import OnlineTargets, StoreTargets
    from mtpd.trainer.targets import DistillDataset, make_loader

    # Three crops of real digit images: landscape, portrait and square, so padding differs per image.
    src = json.loads(Path(digits["train"]["ann"]).read_text())
    shapes = [(40, 64), (64, 24), (64, 64)]  # (h, w)
    images, anns = [], []
    (tmp_path / "images").mkdir()
    for i, (h, w) in enumerate(shapes):
        info = src["images"][i]
        Image.open(Path(digits["train"]["images"]) / info["file_name"]).crop((0, 0, w, h)).save(
            tmp_path / "images" / f"{i}.png"
        )
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": h, "width": w})
        anns.append(
            {
                "id": i + 1,
                "image_id": i + 1,
                "category_id": src["categories"][0]["id"],
                "bbox": [2, 2, 12, 12],
                "area": 144,
                "iscrowd": 0,
            }
        )
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": src["categories"]}))
    spec = ViewSpec(short=64, long=64, views=("orig", "hflip"))
    store = str(tmp_path / "store")
    build_store(
        TeacherSpec("retinanet_tiny", tiny_teacher_ckpt),
        str(ann),
        str(tmp_path / "images"),
        store,
        views=spec,
        outputs=["fpn"],
        precision="lossless",
        workers=0,
        images_per_shard=4,
        progress=False,
    )

    data = CocoDataset(str(ann), str(tmp_path / "images"))
    cached_ds = DistillDataset(data, spec, [store], flip=True, seed=1, outputs=[["fpn"]])
    cached = next(
        iter(
            make_loader(
                cached_ds,
                3,
                shuffle=False,
                workers=0,
                seed=0,
            )
        )
    )
    live = next(
        iter(
            make_loader(
                DistillDataset(data, spec, [], flip=True, seed=1, outputs=[["fpn"]]),
                3,
                shuffle=False,
                workers=0,
                seed=0,
            )
        )
    )
    assert [m.view for m in live.metas] == [m.view for m in cached.metas]
    assert len({m.size for m in live.metas}) == 3  # three different view sizes in the batch
    assert live.masks == {}  # nothing read from a store: the online path must make the masks
    teacher = build_teacher("retinanet_tiny", weights=tiny_teacher_ckpt)
    maps, live_masks = OnlineTargets([teacher], [["fpn"]])(live)
    maps = maps[0]

    assert sorted(live_masks) == sorted(cached.masks) and cached.masks
    for lvl, m in cached.masks.items():
        torch.testing.assert_close(live_masks[lvl], m, msg=f"mask level {lvl}")
        assert 0 < float(m.mean()) < 1, lvl  # some cells are padding at every level
    decoded = StoreTargets(cached_ds.feeds)(cached)[0][0]
    assert sorted(maps) == sorted(decoded)
    for key, t in maps.items():
        assert_fp16_close(decoded[key], t, key)
        lvl = int(key.split(".p")[1])
        assert float((t * (1 - live_masks[lvl])).abs().max()) == 0.0, key  # padding cells hold zeros


def test_a_finished_stage_is_not_trained_over(tmp_path, digits, capsys):
    from mtpd.cli.train import main

    stages = [{"name": "s", "epochs": 1, "eval": False, "optimizer": {"type": "adamw", "lr": 0.001}}]
    plan = write_plan(tmp_path, digits, [], stages)
    args = ["--plan", str(plan), "--stage", "1", "--device", "cpu"]
    assert main(args) == 0
    final = tmp_path / "run" / "stage_1" / "final.pt"
    first = final.stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has finished already" in err and "--overwrite" in err
    assert final.stat().st_mtime_ns == first  # untouched
    assert main(args + ["--overwrite"]) == 0 and final.stat().st_mtime_ns != first


def test_set_changes_the_plan_by_path_and_the_stage_records_it(tmp_path, digits, capsys):
    """`mtpd-train --set KEY=VALUE`: YAML values at dotted paths (`*` for every stage), applied before the plan is
    checked, and recorded in the stage's plan.yaml; a malformed or misplaced one is one line naming it."""
    from mtpd.cli.train import main

    stages = [{"name": "s", "epochs": 3, "eval": False, "optimizer": {"type": "adamw", "lr": 0.001}}]
    plan = write_plan(tmp_path, digits, [], stages)
    args = ["--plan", str(plan), "--stage", "1", "--device", "cpu"]
    assert main([*args, "--set", "stages.*.epochs=1", "--set", "data.augment={scale: [0.75, 1.33]}"]) == 0
    trained = load_plan(tmp_path / "run" / "stage_1" / "plan.yaml")
    assert trained.stages[0].epochs == 1 and tuple(trained.data.augment.scale) == (0.75, 1.33)
    assert load_plan(plan).stages[0].epochs == 3  # the file itself is untouched
    capsys.readouterr()
    for bad, words in (
        ("epochs", "give KEY=VALUE"),
        ("stages.4.epochs=1", "stages.4.epochs: '4' is not an index of a list of 1"),
        ("data.batch_size=four", "data.batch_size: expected an integer"),
        ("stages.*.epochs=[1", "the value is not valid YAML"),
    ):
        assert main([*args, "--overwrite", "--set", bad]) == 2, bad
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, (bad, err)


def test_a_changed_stage_stopped_midway_does_not_pass_for_finished(tmp_path, digits):
    """A finished stage rerun under a changed plan drops its old results before it writes the new plan: stopped
    midway, it leaves no old metrics.json beside the new plan.yaml for stage_done to take as finished."""
    from mtpd.trainer.stage import stage_done

    stages = [{"name": "s", "epochs": 1, "eval": False, "optimizer": {"type": "adamw", "lr": 0.001}}]
    plan_path = write_plan(tmp_path, digits, [], stages)
    run_plan(load_plan(plan_path), [1], log=None)
    assert stage_done(load_plan(plan_path), 1)
    changed = write_plan(tmp_path, digits, [], [{**stages[0], "optimizer": {"type": "adamw", "lr": 0.002}}])

    def stop(ev: dict) -> None:
        if ev["event"] == "step":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_plan(load_plan(changed), [1], log=None, on_event=stop)
    d = tmp_path / "run" / "stage_1"
    assert (d / "plan.yaml").is_file() and not (d / "metrics.json").exists() and not (d / "final.pt").exists()
    assert not stage_done(load_plan(changed), 1)


def test_auto_weights_match_only_what_auto_chose():
    """same_plan: a saved number passes for `weight: auto` when that stage's auto chose it (or, for runs that
    recorded nothing, any number), never when the stage trained with a fixed weight."""
    from mtpd.trainer.plan import Plan, from_dict, same_plan

    def plan(weight) -> Plan:
        stage = {"name": "s", "stores": ["x"], "losses": [{"name": "mgd", "weight": weight}]}
        data = {"train_ann": "a.json", "train_images": "i"}
        return from_dict(Plan, {"student": {"arch": "retinanet_tiny"}, "data": data, "stages": [stage]})

    saved, auto = plan(1e-4), plan("auto")
    assert same_plan(saved, auto, [{"mgd": 1e-4}])
    assert same_plan(saved, auto, [None])  # a stage finished before auto weights were recorded
    assert not same_plan(saved, auto, [{}])  # trained with a fixed 1e-4
    assert not same_plan(saved, auto, [{"mgd": 2e-4}])
    assert same_plan(saved, plan(1e-4), [{}]) and not same_plan(saved, plan(2e-4), [{}])
