"""Bring your own detector: ``student.arch: package.module:factory`` trains, evaluates, resumes, exports and
serves as a teacher; ``mtpd-eval --arch`` evaluates a plain state dict; every factory mistake is one line.

The factories live in a module written into a temporary folder and are imported from the current directory,
as a user's ``./my_detectors.py`` would be (console scripts do not put the current directory on sys.path).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import eval_args, tiny_build
from test_trainer import write_plan

from mtpd.factory import FactoryError
from mtpd.models import output_specs
from mtpd.trainer.plan import PlanError, StudentConfig, load_plan
from mtpd.trainer.stage import Stage
from mtpd.trainer.student import build_student, inherit_from_teacher, label_offset, load_student, save_student

MODULE = "mtpd_user_dets"
RETINA = f"{MODULE}:small_retinanet"
OPTIONS = {"width": 8, "levels": 2}

USER_MODULE = '''
"""A user's own detectors: torchvision heads on a small conv backbone with its own FPN."""
from collections import OrderedDict

from torch import nn
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import mobilenet_backbone
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign


class SmallBackbone(nn.Module):
    """Stride-2 conv stages; the last ``levels`` of them (from stride 8 on) feed an FPN under ``fpn``."""

    def __init__(self, width=8, channels=16, levels=3):
        super().__init__()
        chans = [width * 2**i for i in range(2 + levels)]
        self.body = nn.ModuleList(
            nn.Sequential(nn.Conv2d(cin, c, 3, 2, 1), nn.BatchNorm2d(c), nn.ReLU())
            for cin, c in zip([3] + chans[:-1], chans)
        )
        self.fpn = FeaturePyramidNetwork(chans[2:], channels)
        self.out_channels = channels

    def forward(self, x):
        feats = OrderedDict()
        for i, stage in enumerate(self.body):
            x = stage(x)
            if i >= 2:
                feats[f"c{i + 1}"] = x
        return self.fpn(feats)


def _anchors(levels):
    return AnchorGenerator(tuple((16 * 2**i,) for i in range(levels)), ((0.5, 1.0, 2.0),) * levels)


def small_retinanet(num_classes, width=8, channels=16, levels=3):
    return RetinaNet(SmallBackbone(width, channels, levels), num_classes, anchor_generator=_anchors(levels))


def small_fasterrcnn(num_classes, width=8):
    backbone = SmallBackbone(width, 16, 3)
    pool = MultiScaleRoIAlign(["c3", "c4", "c5"], 7, 2)
    return FasterRCNN(backbone, num_classes, rpn_anchor_generator=_anchors(3), box_roi_pool=pool)


def fixed_retinanet():
    return small_retinanet(10)


def ignores_num_classes(num_classes):
    return small_retinanet(3)


def broken(num_classes):
    raise RuntimeError("boom\\nsecond line of the traceback text")


def not_a_detector(num_classes):
    return nn.Conv2d(3, 8, 3)


def mobilenet_retinanet(num_classes):
    backbone = mobilenet_backbone(backbone_name="mobilenet_v3_small", weights=None, fpn=True, trainable_layers=6)
    return RetinaNet(backbone, num_classes, anchor_generator=_anchors(3))


def no_out_channels(num_classes):
    backbone = SmallBackbone()
    del backbone.out_channels
    return RetinaNet(backbone, num_classes, anchor_generator=_anchors(3))


def lost_out_channels(num_classes):
    model = small_retinanet(num_classes)
    del model.backbone.out_channels
    return model
'''


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("user_code")
    (d / f"{MODULE}.py").write_text(USER_MODULE)
    (d / "mtpd_user_broken_import.py").write_text("raise RuntimeError('cannot start\\nat all')\n")
    return d


def _from_cwd(mp: pytest.MonkeyPatch, user_dir: Path) -> None:
    """Run from ``user_dir`` with it off sys.path and its modules unimported: only mtpd's cwd rule finds them."""
    mp.chdir(user_dir)
    mp.setattr(sys, "path", [p for p in sys.path if p not in ("", str(user_dir))])
    for name in (MODULE, "mtpd_user_broken_import"):
        mp.delitem(sys.modules, name, raising=False)


@pytest.fixture
def user_cwd(monkeypatch, user_dir) -> Path:
    _from_cwd(monkeypatch, user_dir)
    return user_dir


@pytest.fixture(scope="module")
def store(tmp_path_factory, digits) -> str:
    """The tiny teacher's store (P3-P5, 64-ch FPN) on the digits train split, built in this process."""
    out = Path(tmp_path_factory.mktemp("factory_store")) / "tiny"
    tiny_build(digits, out)
    return str(out)


def _stage(store: str) -> list[dict]:
    return [
        {
            "name": "s",
            "stores": [store],
            "losses": [{"name": "mgd", "weight": 2.0e-4}],
            "epochs": 2,
            "optimizer": {"type": "sgd", "lr": 0.01},
            "schedule": {"warmup_iters": 2},
        }
    ]


def _plan(where: Path, digits: dict, store: str, arch: str = RETINA, **over) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    student = {"arch": arch, "options": dict(OPTIONS)}
    return write_plan(where, digits, [store], _stage(store), student=student, **over)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits, store, user_dir) -> Path:
    """``mtpd-train`` on a plan whose student is the user's factory: stage_1/final.pt."""
    from mtpd.cli.train import main

    base = Path(tmp_path_factory.mktemp("factory_run"))
    with pytest.MonkeyPatch.context() as mp:
        _from_cwd(mp, user_dir)
        assert main(["--plan", str(_plan(base, digits, store)), "--stage", "1", "--device", "cpu"]) == 0
        assert str(user_dir) in sys.path  # put there by mtpd, as `python -m` would
    return base / "run" / "stage_1" / "final.pt"


def test_the_checkpoint_records_the_factory(trained, user_cwd):
    ckpt = torch.load(trained, weights_only=True)
    assert (ckpt["arch"], ckpt["num_classes"], ckpt["arch_options"]) == (RETINA, 10, OPTIONS)
    metrics = json.loads(trained.with_name("metrics.json").read_text())
    assert 0.0 <= metrics["AP"] <= 1.0
    model = load_student(trained)  # imports the factory again
    assert type(model).__name__ == "RetinaNet" and output_specs(model)["fpn"].levels == (3, 4)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ckpt["model"][k], msg=k)


def test_mtpd_eval_on_the_factory_students_checkpoint(trained, user_cwd, digits, capsys):
    from mtpd.cli.eval import main

    assert main(eval_args(digits, trained, "--json")) == 0
    stats = json.loads(capsys.readouterr().out)
    assert set(stats) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert stats["AP"] == json.loads(trained.with_name("metrics.json").read_text())["AP"]


def test_resume_after_finishing_keeps_the_weights(trained, user_cwd, capsys):
    from mtpd.cli.train import main

    before = torch.load(trained, weights_only=True)["model"]
    plan = trained.parent / "plan.yaml"
    assert main(["--plan", str(plan), "--stage", "1", "--device", "cpu", "--resume"]) == 0
    after = torch.load(trained, weights_only=True)["model"]
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0, msg=k)


def test_resume_after_a_kill_matches_the_uninterrupted_run(tmp_path, trained, user_cwd, digits, store):
    ref = torch.load(trained, weights_only=True)["model"]
    plan = load_plan(_plan(tmp_path, digits, store, checkpoint_every=1))
    calls = []

    def killer(msg: str) -> None:
        calls.append(msg)
        if len(calls) == 4:  # epoch 1 has 3 iterations: this stops in epoch 2, after a checkpoint
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Stage(plan, 1, log=killer).run()
    last = torch.load(Path(plan.output_dir) / "stage_1" / "last.pt", weights_only=True)
    assert 3 <= last["step"] < 6 and not (Path(plan.output_dir) / "stage_1" / "final.pt").exists()
    Stage(plan, 1, resume=True, log=lambda s: None).run()
    got = torch.load(Path(plan.output_dir) / "stage_1" / "final.pt", weights_only=True)["model"]
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)


def test_the_checkpoint_serves_as_teacher_and_for_inheritance(trained, user_cwd):
    from mtpd.teachers.registry import build_teacher

    student = load_student(trained).eval()
    teacher = build_teacher(RETINA, weights=str(trained))  # the factory again, with the checkpoint's options
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = teacher(images, ["fpn"])
        ref = student.backbone(images)
    assert sorted(got) == ["fpn.p3", "fpn.p4"]
    torch.testing.assert_close(got["fpn.p3"], ref["c3"])
    fresh = build_student(StudentConfig(arch=RETINA, options=OPTIONS), 10)
    copied = inherit_from_teacher(fresh, str(trained), ["neck", "head"])
    assert copied and all(k.startswith(("backbone.fpn.", "head.")) for k in copied)


def test_export_rebuilds_the_factory_student(tmp_path, trained, user_cwd, capsys):
    from mtpd.cli.export import main

    out = tmp_path / "student.pt"
    assert main(["--checkpoint", str(trained), "--out", str(out), "--format", "torchscript"]) == 0
    assert RETINA in capsys.readouterr().out and out.is_file()


def test_levels_and_classes_of_factory_students(tmp_path, user_cwd):
    three = build_student(StudentConfig(arch=RETINA, options={"levels": 3}), 10)
    fpn = output_specs(three)["fpn"]
    assert (fpn.levels, fpn.channels, output_specs(three)["cls"].num_classes) == ((3, 4, 5), 16, 10)
    assert output_specs(build_student(StudentConfig(arch=RETINA, options=OPTIONS), 10))["fpn"].levels == (3, 4)
    # An R-CNN counts the background: the factory is given 11 for 10 dataset classes.
    rcnn = build_student(StudentConfig(arch=f"{MODULE}:small_fasterrcnn"), 10)
    assert rcnn.roi_heads.box_predictor.cls_score.out_features == 11 and label_offset(rcnn) == 1
    assert output_specs(rcnn)["fpn"].levels == (3, 4, 5) and "rpn_obj" in output_specs(rcnn)
    save_student(rcnn, tmp_path / "rcnn.pt")
    assert torch.load(tmp_path / "rcnn.pt", weights_only=True)["num_classes"] == 11
    again = load_student(tmp_path / "rcnn.pt")  # called once, with the recorded 11
    torch.testing.assert_close(
        again.roi_heads.box_predictor.cls_score.weight, rcnn.roi_heads.box_predictor.cls_score.weight
    )
    assert build_student(StudentConfig(arch=f"{MODULE}:fixed_retinanet"), 10).head.classification_head.num_classes == 10


def test_mtpd_eval_of_a_plain_state_dict(tmp_path, user_cwd, digits, capsys):
    from mtpd.cli.eval import main
    from mtpd.models import build_arch, build_factory_arch

    torch.manual_seed(0)
    model = build_factory_arch(RETINA, 10, **OPTIONS)
    sd = model.state_dict()
    files = {name: tmp_path / f"{name}.pt" for name in ("raw", "model", "state_dict")}
    torch.save(sd, files["raw"])
    torch.save({"model": sd}, files["model"])
    torch.save({"state_dict": sd, "epoch": 3}, files["state_dict"])
    arch = ["--arch", RETINA, "--options", json.dumps(OPTIONS), "--json"]
    aps = []
    for path in files.values():
        assert main(eval_args(digits, path, *arch)) == 0
        aps.append(json.loads(capsys.readouterr().out)["AP"])
    assert aps[0] == aps[1] == aps[2]

    # A registered architecture, its class count given.
    torch.save(build_arch("retinanet_tiny", 10, width=8).state_dict(), tmp_path / "tiny.pt")
    tiny = ["--arch", "retinanet_tiny", "--num-classes", "10", "--options", '{"width": 8}']
    assert main(eval_args(digits, tmp_path / "tiny.pt", *tiny)) == 0 and "AP50" in capsys.readouterr().out

    # Without --arch, or with options that build another model: one line saying what to pass.
    for extra, expected in (([], "--arch"), (["--arch", RETINA], "does not fit")):
        assert main(eval_args(digits, files["raw"], *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err
    with pytest.raises(SystemExit):
        main(eval_args(digits, files["raw"], "--arch", RETINA, "--options", "[1]"))


@pytest.mark.parametrize(
    "name, expected",
    [
        ("mtpd_no_such_module_abc:factory", "cannot import module 'mtpd_no_such_module_abc'"),
        (f"{MODULE}:nope", f"module '{MODULE}' has no 'nope'; callables there: "),
        ("mtpd_user_broken_import:factory", "importing 'mtpd_user_broken_import' raised RuntimeError: cannot start"),
        (f"{MODULE}:broken", "broken(num_classes=10) raised RuntimeError: boom; fix the factory"),
        (f"{MODULE}:not_a_detector", "returned a torch.nn.modules.conv.Conv2d: mtpd students are torchvision"),
        (f"{MODULE}:mobilenet_retinanet", "'0' and '1' both have stride 32"),
        (f"{MODULE}:no_out_channels", "the backbone has no out_channels (no_out_channels(num_classes=10) raised"),
        (f"{MODULE}:lost_out_channels", "the backbone has no out_channels (SmallBackbone.out_channels is not an"),
        (f"{MODULE}:ignores_num_classes", "was given num_classes=10 but returned a RetinaNet with 3 classes"),
        ("no_colon_module:", "expected package.module:factory"),
    ],
)
def test_factory_errors_are_one_line(user_cwd, name, expected):
    with pytest.raises(FactoryError) as e:
        build_student(StudentConfig(arch=name), 10)
    text = str(e.value)
    assert "\n" not in text and name in text and expected in text, text
    if "stride" in expected:
        assert "returned_layers" in text


def test_a_factory_that_ignores_the_class_count(user_cwd):
    with pytest.raises(FactoryError, match=r"takes no num_classes and returned a RetinaNet with 10 classes, but 5"):
        build_student(StudentConfig(arch=f"{MODULE}:fixed_retinanet"), 5)
    with pytest.raises(PlanError, match="student.init: .* is a factory"):
        build_student(StudentConfig(arch=RETINA, init="/some/backbone.pth"), 10)


def test_mtpd_train_reports_a_factory_error_on_one_line(tmp_path, user_cwd, digits, store, capsys):
    from mtpd.cli.train import main

    plan = _plan(tmp_path, digits, store, arch=f"{MODULE}:mobilenet_retinanet")
    d = yaml.safe_load(plan.read_text())
    d["student"]["options"] = {}
    plan.write_text(yaml.safe_dump(d))
    assert main(["--plan", str(plan), "--stage", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{MODULE}:mobilenet_retinanet" in err and "returned_layers" in err, err


def test_a_model_save_student_cannot_describe(tmp_path):
    with pytest.raises(ValueError, match="build_factory_arch"):
        save_student(torch.nn.Conv2d(1, 1, 1), tmp_path / "x.pt")
