"""The mmdet teacher adapter on small, randomly initialised bundled configs (CPU, 64-128 px).

Configs are shrunk with mmengine dotted-key overrides (ResNet-18, 32-channel
FPN, one head conv) so each model builds and runs in about a second; the
store test writes the same overrides into a config file that inherits from
the bundled one, which is how a user shrinks or edits a config for the CLI.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import assert_fp16_close

pytest.importorskip("mmdet", reason="needs the mmdet extra: `make install-mmdet` (mmcv 2.1 with compiled ops)")

from mtpd.checkpoint import CheckpointError  # noqa: E402
from mtpd.data.views import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from mtpd.teachers.base import Teacher, TeacherError  # noqa: E402
from mtpd.teachers.mmdet_adapter import build_mmdet_teacher  # noqa: E402
from mtpd.teachers.mmdet_config import configs_root, resolve_config  # noqa: E402
from mtpd.teachers.registry import TeacherSpec, build_teacher  # noqa: E402

pytestmark = pytest.mark.mmdet

RETINA = "retinanet_r50_fpn_1x_coco"
# ResNet-18 gives C2..C5 with 64..512 channels; a 32-channel FPN and head keep it fast.
SMALL = {
    "model.backbone.depth": 18,
    "model.neck.in_channels": [64, 128, 256, 512],
    "model.neck.out_channels": 32,
    "model.bbox_head.in_channels": 32,
    "model.bbox_head.feat_channels": 32,
    "model.bbox_head.stacked_convs": 1,
}
CAFFE_PREPROCESSOR = {
    "model.data_preprocessor.mean": [103.53, 116.28, 123.675],
    "model.data_preprocessor.std": [1.0, 1.0, 1.0],
    "model.data_preprocessor.bgr_to_rgb": False,
}


@pytest.fixture(scope="module")
def retina() -> Teacher:
    return build_mmdet_teacher(RETINA, num_classes=10, cfg_options=SMALL)


def _view(pixels: torch.Tensor) -> torch.Tensor:
    """RGB 0-255 [B, 3, H, W] -> what prepare_view feeds teachers (ImageNet-normalised)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def test_retinanet_outputs_match_specs_and_strides(retina: Teacher) -> None:
    assert isinstance(retina, Teacher)
    specs = retina.output_specs()
    assert set(specs) == {"fpn", "cls", "box"}
    for spec in specs.values():
        assert spec.levels == (3, 4, 5, 6, 7)
    assert (specs["fpn"].kind, specs["fpn"].channels) == ("feature", 32)
    # mmdet RetinaNet: 9 anchors, sigmoid classification so K = num_classes.
    assert (specs["cls"].kind, specs["cls"].channels, specs["cls"].num_anchors, specs["cls"].num_classes) == (
        "logits",
        90,
        9,
        10,
    )
    assert (specs["box"].kind, specs["box"].channels, specs["box"].num_anchors) == ("deltas", 36, 9)

    out = retina(torch.randn(2, 3, 64, 96), ["fpn", "cls", "box"])
    expected = {k for s in specs.values() for k in s.keys()}
    assert set(out) == expected
    for name, spec in specs.items():
        for lvl, stride in zip(spec.levels, spec.strides):
            t = out[f"{name}.p{lvl}"]
            assert t.shape == (2, spec.channels, math.ceil(64 / stride), math.ceil(96 / stride)), (name, lvl)
            assert torch.isfinite(t).all()


def test_outputs_subset_and_unknown(retina: Teacher) -> None:
    out = retina(torch.randn(1, 3, 64, 64), ["fpn"])
    assert sorted(out) == [f"fpn.p{lvl}" for lvl in range(3, 8)]
    with pytest.raises(TeacherError, match="cannot produce output"):
        retina(torch.randn(1, 3, 64, 64), ["ctr"])


def test_identity(retina: Teacher) -> None:
    ident = retina.identity
    assert ident.name == "mmdet:" + RETINA
    assert ident.config.startswith("sha256:") and (ident.weights, ident.weights_sha256) == ("none", "")
    json.dumps(ident.to_dict())  # goes into a store's root attributes
    other = build_mmdet_teacher(RETINA, num_classes=10, cfg_options={**SMALL, "model.bbox_head.stacked_convs": 2})
    assert other.identity.config != ident.config


def test_random_init_is_reproducible(retina: Teacher) -> None:
    """`none` weights are seeded: Ray workers building the same teacher agree."""
    again = build_mmdet_teacher(RETINA, num_classes=10, cfg_options=SMALL)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(again(x, ["cls"])["cls.p4"], retina(x, ["cls"])["cls.p4"], rtol=0, atol=0)
    assert retina.identity.extra["init_seed"] == 0


def test_checkpoint_round_trip(retina: Teacher, tmp_path) -> None:
    # Perturbed weights, so that matching outputs prove the checkpoint was loaded, not re-seeded.
    state = {
        k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in retina.model.state_dict().items()
    }
    path = tmp_path / "retina.pth"
    torch.save({"state_dict": state, "meta": {"classes": [str(i) for i in range(10)]}}, path)
    loaded = build_mmdet_teacher(RETINA, weights=str(path), num_classes=10, cfg_options=SMALL)
    again = build_mmdet_teacher(RETINA, weights=str(path), num_classes=10, cfg_options=SMALL)
    x = torch.randn(2, 3, 64, 96)
    a, b = again(x, ["fpn", "cls", "box"]), loaded(x, ["fpn", "cls", "box"])
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert not torch.equal(retina(x, ["box"])["box.p3"], b["box.p3"])
    for k, v in loaded.model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    assert loaded.identity.weights == str(path.resolve())
    assert len(loaded.identity.weights_sha256) == 64


def test_training_checkpoint_with_pickled_meta_loads_as_data(retina: Teacher, tmp_path) -> None:
    """mmengine training checkpoints pickle numpy objects in `meta`; they load through the allow-list of
    data types, without unpickling anything else and without --trust-checkpoint."""
    import warnings

    path = tmp_path / "epoch_12.pth"
    torch.save(
        {"state_dict": retina.model.state_dict(), "meta": {"seed": np.int64(0)}, "message_hub": np.zeros(2)}, path
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback to full unpickling happened
        loaded = build_mmdet_teacher(RETINA, weights=str(path), num_classes=10, cfg_options=SMALL)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(loaded(x, ["cls"])["cls.p3"], retina(x, ["cls"])["cls.p3"], rtol=0, atol=0)


def test_wrong_checkpoint_is_one_line_error(retina: Teacher, tmp_path) -> None:
    path = tmp_path / "retina10.pth"
    torch.save({"state_dict": retina.model.state_dict(), "meta": {}}, path)
    with pytest.raises(TeacherError, match=r"retina10\.pth does not fit.*retina_cls\.weight.*num_classes") as err:
        build_mmdet_teacher(RETINA, weights=str(path), num_classes=3, cfg_options=SMALL)
    assert "\n" not in str(err.value)
    with pytest.raises(TeacherError, match="missing from the checkpoint"):
        build_mmdet_teacher(
            RETINA, weights=str(path), num_classes=10, cfg_options={**SMALL, "model.bbox_head.stacked_convs": 2}
        )


def test_weight_errors(tmp_path) -> None:
    with pytest.raises(TeacherError, match="not found"):
        build_mmdet_teacher(RETINA, weights=str(tmp_path / "absent.pth"))
    with pytest.raises(TeacherError, match="download"):
        build_mmdet_teacher(RETINA, weights="default")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*bad.pth"):
        build_mmdet_teacher(RETINA, weights=str(bad), cfg_options=SMALL)
    with pytest.raises(TeacherError, match="no head with num_classes|cannot build"):
        build_mmdet_teacher(RETINA, cfg_options={**SMALL, "model.bbox_head": None}, num_classes=3)


def test_unknown_config_suggests_close_names() -> None:
    with pytest.raises(TeacherError, match=r"looked in .*configs.*close matches: retinanet_r50_fpn_1x_coco"):
        build_mmdet_teacher("retinanet_r50_fpn_1x_cocoo")
    assert resolve_config("retinanet/retinanet_r50_fpn_1x_coco") == resolve_config(RETINA)
    assert resolve_config(RETINA).is_relative_to(configs_root())


def _backbone_input(teacher: Teacher, x: torch.Tensor) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    handle = teacher.model.backbone.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    try:
        teacher(x, ["fpn"])
    finally:
        handle.remove()
    return seen[0]


def test_imagenet_rgb_model_sees_view_unchanged(retina: Teacher) -> None:
    x = _view(torch.rand(1, 3, 64, 64) * 255)
    torch.testing.assert_close(_backbone_input(retina, x), x)


def test_caffe_bgr_model_sees_converted_pixels() -> None:
    teacher = build_mmdet_teacher(RETINA, num_classes=10, cfg_options={**SMALL, **CAFFE_PREPROCESSOR})
    pixels = torch.rand(1, 3, 64, 64) * 255
    seen = _backbone_input(teacher, _view(pixels))
    # What mmdet gives a Caffe model: the BGR image minus the BGR mean, std 1.
    want = pixels[:, [2, 1, 0]] - torch.tensor([103.53, 116.28, 123.675]).view(1, 3, 1, 1)
    torch.testing.assert_close(seen, want, rtol=1e-5, atol=1e-3)
    assert teacher.identity.extra["input"]["channels"] == "bgr"


def test_bundled_caffe_config_and_custom_view_stats() -> None:
    """The bundled Caffe RetinaNet config, fed views normalised with other statistics."""
    name = "retinanet_r50-caffe_fpn_1x_coco"
    view_mean, view_std = (127.5, 127.5, 127.5), (127.5, 127.5, 127.5)
    teacher = build_mmdet_teacher(name, num_classes=10, cfg_options=SMALL, view_mean=view_mean, view_std=view_std)
    pixels = torch.rand(1, 3, 64, 64) * 255
    seen = _backbone_input(teacher, (pixels - 127.5) / 127.5)
    want = pixels[:, [2, 1, 0]] - torch.tensor([103.53, 116.28, 123.675]).view(1, 3, 1, 1)
    torch.testing.assert_close(seen, want, rtol=1e-5, atol=1e-3)


def test_fcos_offers_centerness() -> None:
    teacher = build_mmdet_teacher("fcos_r50-caffe_fpn_gn-head_1x_coco", num_classes=5, cfg_options=SMALL)
    specs = teacher.output_specs()
    assert set(specs) == {"fpn", "cls", "box", "ctr"}
    assert (specs["cls"].channels, specs["box"].channels, specs["ctr"].channels) == (5, 4, 1)
    # Batch 2: GroupNorm over a 1x1 P7 map with one channel per group needs more than one value.
    out = teacher(torch.randn(2, 3, 64, 96), ["ctr"])
    assert out["ctr.p7"].shape == (2, 1, 1, 1) and out["ctr.p3"].shape == (2, 1, 8, 12)


def test_two_stage_offers_fpn_and_rpn() -> None:
    small = {
        "model.backbone.depth": 18,
        "model.neck.in_channels": [64, 128, 256, 512],
        "model.neck.out_channels": 32,
        "model.rpn_head.in_channels": 32,
        "model.rpn_head.feat_channels": 32,
        "model.roi_head.bbox_roi_extractor.out_channels": 32,
        "model.roi_head.bbox_head.in_channels": 32,
        "model.roi_head.bbox_head.fc_out_channels": 64,
    }
    teacher = build_mmdet_teacher("faster-rcnn_r50_fpn_1x_coco", num_classes=10, cfg_options=small)
    specs = teacher.output_specs()
    assert set(specs) == {"fpn", "rpn_obj", "rpn_box"}
    assert specs["fpn"].levels == (2, 3, 4, 5, 6)
    assert (specs["rpn_obj"].kind, specs["rpn_obj"].channels, specs["rpn_box"].channels) == ("objectness", 3, 12)
    out = teacher(torch.randn(1, 3, 64, 96), ["fpn", "rpn_obj"])
    assert out["fpn.p2"].shape == (1, 32, 16, 24) and out["rpn_obj.p6"].shape == (1, 3, 1, 2)


def _small_config_file(tmp_path, num_classes: int = 3) -> str:
    """A user's config that inherits the bundled RetinaNet and shrinks it: the CLI-facing way to override."""
    lines = [f"_base_ = [{str(resolve_config(RETINA))!r}]", "model = dict("]
    lines += [
        "    backbone=dict(depth=18),",
        "    neck=dict(in_channels=[64, 128, 256, 512], out_channels=32),",
        f"    bbox_head=dict(num_classes={num_classes}, in_channels=32, feat_channels=32, stacked_convs=1),",
        ")",
    ]
    path = tmp_path / "retina_tiny.py"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_registry_builds_from_config_file(tmp_path) -> None:
    cfg = _small_config_file(tmp_path)
    teacher = build_teacher("mmdet:" + cfg)
    assert teacher.identity.name == "mmdet:" + cfg
    assert teacher.output_specs()["cls"].channels == 27


@pytest.mark.slow
def test_store_from_mmdet_teacher(tmp_path, digits, ray_session) -> None:
    """A Ray-built store of the mmdet teacher holds its own outputs on the same views."""
    build = pytest.importorskip("mtpd.cache.build")
    from mtpd.cache.store import StoreReader
    from mtpd.data import CocoDataset, ViewSpec, prepare_view

    cfg = _small_config_file(tmp_path, num_classes=10)
    ckpt = tmp_path / "retina_tiny.pth"
    teacher = build_teacher("mmdet:" + cfg)
    torch.save({"state_dict": teacher.model.state_dict(), "meta": {}}, ckpt)
    spec = TeacherSpec("mmdet:" + cfg, weights=str(ckpt))
    views = ViewSpec(short=64, long=64)
    ann, images = digits["val"]["ann"], digits["val"]["images"]
    report = build.build_store(
        spec,
        ann,
        images,
        str(tmp_path / "store"),
        views=views,
        precision="lossless",
        batch_size=2,
        workers=1,
        images_per_shard=2,
        progress=False,
    )
    assert report.shards_written == report.shards_total == 2

    reader = StoreReader(str(tmp_path / "store"))
    assert reader.header.teacher["name"] == spec.name and reader.header.teacher["weights_sha256"]
    assert set(reader.header.outputs) == {"fpn", "cls", "box"}
    ds = CocoDataset(ann, images)
    for idx in range(len(ds)):
        x, _ = prepare_view(ds.load_image(idx), views)
        direct = teacher(x[None], ["fpn", "cls", "box"])
        cached = reader.read(reader.sample_index(ds.images[idx].image_id, "orig"))
        for name, maps in cached.items():
            for lvl, m in zip(reader.header.outputs[name].levels, maps):
                ref = direct[f"{name}.p{lvl}"][0, :, : m.shape[1], : m.shape[2]].numpy()
                assert_fp16_close(m, ref, f"{name}.p{lvl}")  # the worker batched two views
