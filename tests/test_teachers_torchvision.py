"""Torchvision and module teachers: weights handling, identity, outputs."""

from __future__ import annotations

import hashlib
import json
import sys
import types

import pytest
import torch

from mtpd.checkpoint import CheckpointError
from mtpd.models import arch_checkpoint, build_arch, dense_outputs
from mtpd.output_spec import OutputSpec
from mtpd.teachers import Teacher, TeacherError, TeacherIdentity, available, build_teacher
from mtpd.teachers.torchvision_adapter import TorchvisionTeacher


def _tiny(name: str = "retinanet_tiny", num_classes: int = 3, **options):
    torch.manual_seed(0)
    return build_arch(name, num_classes, **options).eval()


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.randn(2, 3, 64, 96)


def test_every_arch_is_a_teacher_and_unknown_names_are_listed():
    names = available()
    assert {"retinanet_tiny", "retinanet_resnet50_fpn", "maskrcnn_resnet50_fpn"} <= set(names)
    with pytest.raises(TeacherError, match="registered: .*retinanet_tiny.*package.module:factory"):
        build_teacher("retinanet_r9000", weights="none", num_classes=3)


def test_random_teacher_follows_the_protocol(images):
    t = build_teacher("fcos_tiny", weights="none", num_classes=4)
    assert isinstance(t, Teacher) and not t.model.training
    assert set(t.output_specs()) == {"fpn", "cls", "box", "ctr"}
    out = t(images, ["fpn", "ctr"])
    assert set(out) == {f"{n}.p{lvl}" for n in ("fpn", "ctr") for lvl in (3, 4, 5)}
    assert out["ctr.p3"].shape == (2, 1, 8, 12) and not out["ctr.p3"].requires_grad
    assert t.identity.weights == "none" and t.identity.weights_sha256 == ""
    with pytest.raises(TeacherError, match="cannot produce output"):
        t(images, ["rpn_obj"])
    with pytest.raises(TeacherError, match="--num-classes"):
        build_teacher("fcos_tiny", weights="none")


@pytest.mark.parametrize("layout", ["arch_checkpoint", "raw", "state_dict_key"])
def test_teacher_from_checkpoint_reproduces_the_model(tmp_path, images, layout):
    model = _tiny(num_classes=5, fpn_channels=32)
    ckpt = arch_checkpoint(model)
    if layout == "raw":
        model = _tiny(num_classes=5)  # without metadata the default options must fit
        ckpt = model.state_dict()
    elif layout == "state_dict_key":
        model = _tiny(num_classes=5)
        ckpt = {"state_dict": model.state_dict(), "epoch": 3}
    path = tmp_path / "student.pth"
    torch.save(ckpt, path)
    t = build_teacher("retinanet_tiny", weights=str(path), device="cpu")
    assert t.output_specs()["cls"].num_classes == 5  # from metadata or the head's weight shape
    with torch.no_grad():
        ref = dense_outputs(model, images, ["fpn", "cls", "box"])
    got = t(images, ["fpn", "cls", "box"])
    assert set(got) == set(ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6)
    ident = t.identity
    assert ident.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert json.loads(ident.config)["num_classes"] == 5
    with pytest.raises(TeacherError, match="has 5 classes but --num-classes is 7"):
        build_teacher("retinanet_tiny", weights=str(path), num_classes=7)


def test_legacy_torchvision_checkpoint_loads(tmp_path, images):
    # torchvision's v1 COCO files predate Conv2dNormActivation (head keys conv.{2i}.*) and
    # the zip format (no mmap): both must load as torchvision itself loads them.
    model = _tiny(num_classes=2)
    legacy = {k.replace("conv.0.0.", "conv.0."): v for k, v in model.state_dict().items() if "num_batches" not in k}
    assert "head.classification_head.conv.0.weight" in legacy
    path = tmp_path / "legacy.pth"
    torch.save(legacy, path, _use_new_zipfile_serialization=False)
    t = build_teacher("retinanet_tiny", weights=str(path))
    with torch.no_grad():
        ref = dense_outputs(model, images, ["box"])
    torch.testing.assert_close(t(images, ["box"])["box.p3"], ref["box.p3"], rtol=0, atol=1e-6)


def test_misfit_weights_raise_one_line(tmp_path):
    path = tmp_path / "wide.pth"
    torch.save(_tiny("retinanet_tiny_wide").state_dict(), path)
    with pytest.raises(TeacherError) as e:
        build_teacher("retinanet_tiny", weights=str(path))
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "retinanet_tiny" in msg and "mis-shaped" in msg
    path2 = tmp_path / "fcos.pth"
    torch.save(_tiny("fcos_tiny").state_dict(), path2)
    with pytest.raises(TeacherError, match=r"4 mis-shaped.*; 6 unexpected: head.classification_head.conv.1.weight"):
        build_teacher("retinanet_tiny", weights=str(path2), num_classes=3)
    tagged = tmp_path / "tagged.pth"
    torch.save(arch_checkpoint(_tiny("fcos_tiny")), tagged)
    with pytest.raises(TeacherError, match="saved from arch 'fcos_tiny'"):
        build_teacher("retinanet_tiny", weights=str(tagged))


def test_missing_and_unreadable_files_name_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pth does not exist"):
        build_teacher("retinanet_tiny", weights=str(tmp_path / "nope.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*junk.pth"):
        build_teacher("retinanet_tiny", weights=str(junk))


def test_default_weights_come_only_from_the_local_torch_cache(tmp_path):
    hub = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        expected = tmp_path / "hub" / "checkpoints" / "retinanet_resnet50_fpn_coco-eeacb38b.pth"
        with pytest.raises(TeacherError) as e:
            build_teacher("retinanet_resnet50_fpn", weights="default")
        assert str(expected) in str(e.value)
        assert "https://download.pytorch.org/models/retinanet_resnet50_fpn_coco-eeacb38b.pth" in str(e.value)
        with pytest.raises(TeacherError, match="no COCO weights for retinanet_tiny"):
            build_teacher("retinanet_tiny", weights="default")
    finally:
        torch.hub.set_dir(hub)


def test_module_teacher_wraps_a_torchvision_factory(tmp_path, images):
    t = build_teacher("mtpd.models.tiny:example_detector", weights="none", num_classes=4)
    assert isinstance(t, TorchvisionTeacher)
    assert t.identity.name == "mtpd.models.tiny:example_detector"
    assert t.output_specs()["cls"].num_classes == 4
    # With a checkpoint the class count comes from the file, and its weights are loaded.
    src = _tiny(num_classes=2)
    path = tmp_path / "m.pth"
    torch.save(src.state_dict(), path)
    t2 = build_teacher("mtpd.models.tiny:example_detector", weights=str(path))
    with torch.no_grad():
        torch.testing.assert_close(
            t2(images, ["cls"])["cls.p4"], dense_outputs(src, images, ["cls"])["cls.p4"], rtol=0, atol=1e-6
        )
    with pytest.raises(TeacherError, match="cannot import module 'mtpd_no_such_pkg.mod'"):
        build_teacher("mtpd_no_such_pkg.mod:factory")
    with pytest.raises(TeacherError, match="has no 'nothing_here'"):
        build_teacher("mtpd.models.tiny:nothing_here")


class _EchoTeacher:
    """A minimal Teacher-protocol object: returns the mean image as a one-level 'fpn'."""

    def __init__(self) -> None:
        self.identity = TeacherIdentity(name="echo")

    def output_specs(self) -> dict[str, OutputSpec]:
        return {"fpn": OutputSpec("fpn", "feature", (3,), 1)}

    def to(self, device):
        return self

    def __call__(self, images, outputs):
        return {"fpn.p3": images.mean(1, keepdim=True)[..., ::8, ::8]}


def test_module_teacher_passes_protocol_objects_through(monkeypatch):
    mod = types.ModuleType("mtpd_test_factories")
    mod.make = lambda: _EchoTeacher()
    mod.not_a_model = lambda: 42
    monkeypatch.setitem(sys.modules, "mtpd_test_factories", mod)
    t = build_teacher("mtpd_test_factories:make")
    assert isinstance(t, _EchoTeacher) and t.identity.name == "mtpd_test_factories:make"
    with pytest.raises(TeacherError, match="returned a int"):
        build_teacher("mtpd_test_factories:not_a_model")


def test_weights_file_is_recorded_by_its_resolved_path(tmp_path, monkeypatch, tiny_teacher_ckpt):
    """A relative --weights names different files from different folders: the identity keeps the absolute path."""
    import shutil

    shutil.copy(tiny_teacher_ckpt, tmp_path / "t.pt")
    monkeypatch.chdir(tmp_path)
    t = build_teacher("retinanet_tiny", weights="t.pt")
    assert t.identity.weights == str((tmp_path / "t.pt").resolve())
