"""mtpd.models: the architecture registry and the shared dense-output definition."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.image_list import ImageList
from torchvision.ops.misc import FrozenBatchNorm2d

from mtpd.models import (
    DenseOutputs,
    arch_checkpoint,
    arch_family,
    arch_info,
    build_arch,
    dense_outputs,
    feature_levels,
    flatten_level,
    level_grid_sizes,
    list_archs,
    model_anchors,
    output_specs,
    unflatten_level,
)

TINY = ["retinanet_tiny", "retinanet_tiny_wide", "retinanet_swin_tiny", "fcos_tiny", "ssd_tiny"]
HEAVY = [n for n in list_archs() if "tiny" not in n]  # a family's own tiny arch is tested with its family
EXPECTED = {
    "retinanet_resnet18_fpn",
    "retinanet_resnet34_fpn",
    "retinanet_resnet50_fpn",
    "retinanet_resnet50_fpn_v2",
    "retinanet_mobilenet_v2_fpn",
    "retinanet_mobilenet_v3_fpn",
    "fcos_resnet50_fpn",
    "fasterrcnn_resnet50_fpn",
    "maskrcnn_resnet50_fpn",
    "retinanet_resnet101_fpn",
    "retinanet_resnext101_fpn",
    *TINY,
}


def _seeded(name: str, num_classes: int = 4, **options):
    torch.manual_seed(0)
    return build_arch(name, num_classes, **options)


@pytest.fixture(scope="module")
def heavy_models():
    # Random init, built once: R50-class construction dominates this file's time.
    return {n: build_arch(n, 3).eval() for n in HEAVY}


def test_registry_lists_every_arch_with_family_and_coco_weights():
    assert EXPECTED <= set(list_archs())
    assert arch_family("fcos_tiny") == "fcos" and arch_family("maskrcnn_resnet50_fpn") == "maskrcnn"
    assert arch_info("retinanet_resnet50_fpn").coco_weights.url.endswith("retinanet_resnet50_fpn_coco-eeacb38b.pth")
    assert arch_info("retinanet_resnet101_fpn").coco_weights is None
    assert set(list_archs("fcos")) == {"fcos_resnet50_fpn", "fcos_tiny"}


def test_unknown_arch_and_option_errors_list_choices():
    with pytest.raises(ValueError, match="registered: .*retinanet_tiny"):
        build_arch("retinanet_nope", 3)
    with pytest.raises(ValueError, match="accepts: .*fpn_channels"):
        build_arch("retinanet_tiny", 3, fpn_chans=32)
    with pytest.raises(ValueError, match="contiguous"):
        build_arch("retinanet_tiny", 3, levels=(3, 5))


@pytest.mark.parametrize("name", HEAVY)
def test_heavy_archs_build_and_match_their_specs(heavy_models, name):
    model = heavy_models[name]
    specs = output_specs(model)
    family = arch_family(model)
    want = (2, 3, 4, 5, 6) if family in ("fasterrcnn", "maskrcnn") else (3, 4, 5, 6, 7)
    assert specs["fpn"].levels == want and specs["fpn"].channels == 256
    # Only FPN here: head shapes are checked on the tiny models; 64 px keeps R101/X101 cheap.
    with torch.no_grad():
        out = dense_outputs(model, torch.randn(1, 3, 64, 64), ["fpn"])
    assert set(out) == set(specs["fpn"].keys())
    for lvl in want:
        assert out[f"fpn.p{lvl}"].shape == (1, 256, -(-64 // 2**lvl), -(-64 // 2**lvl))


def test_rcnn_levels_come_from_strides_not_key_names(heavy_models):
    assert feature_levels(heavy_models["fasterrcnn_resnet50_fpn"]) == {"0": 2, "1": 3, "2": 4, "3": 5, "pool": 6}
    specs = output_specs(heavy_models["maskrcnn_resnet50_fpn"])
    assert specs["rpn_obj"].channels == 3 and specs["rpn_box"].channels == 12
    with torch.no_grad():
        out = dense_outputs(heavy_models["fasterrcnn_resnet50_fpn"], torch.randn(1, 3, 64, 64), ["rpn_obj"])
    assert sorted(out) == [f"rpn_obj.p{lvl}" for lvl in (2, 3, 4, 5, 6)]


def test_norm_follows_pretraining_and_backbone_weights_load(tmp_path):
    scratch = build_arch("retinanet_resnet18_fpn", 2)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in scratch.modules())
    assert all(p.requires_grad for p in scratch.parameters())
    import torchvision

    torch.manual_seed(1)
    r18 = torchvision.models.resnet18()
    path = tmp_path / "r18.pth"
    torch.save(r18.state_dict(), path)
    model = build_arch("retinanet_resnet18_fpn", 2, backbone_weights=str(path))
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    assert torch.equal(model.backbone.body.layer3[0].conv1.weight, r18.layer3[0].conv1.weight)
    assert not model.backbone.body.layer1[0].conv1.weight.requires_grad  # torchvision's 3 trainable stages
    # The checkpoint keeps what the ImageNet init implied, so the next stage trains the same way.
    ckpt = arch_checkpoint(model)
    assert ckpt["arch_options"] == {"norm": "frozen_bn", "trainable_backbone_layers": 3}
    again = build_arch(ckpt["arch"], ckpt["num_classes"], **ckpt["arch_options"])
    again.load_state_dict(ckpt["model"])
    assert (
        isinstance(again.backbone.body.bn1, FrozenBatchNorm2d)
        and not again.backbone.body.layer1[0].conv1.weight.requires_grad
    )
    hub = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        with pytest.raises(ValueError, match="hub/checkpoints/resnet18-f37072fd.pth; download https://"):
            build_arch("retinanet_resnet18_fpn", 2, backbone_weights="imagenet")
    finally:
        torch.hub.set_dir(hub)


@pytest.mark.parametrize("name", TINY)
def test_tiny_archs_train_from_scratch(name):
    model = _seeded(name, 3)
    n_params = sum(p.numel() for p in model.parameters())
    assert 2e5 < n_params < (1e6 if name in ("retinanet_tiny", "fcos_tiny") else 4e6)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    # The model's own forward (its transform resizes to 128) still works, for training and eval.
    model.train()
    target = {"boxes": torch.tensor([[8.0, 8.0, 40.0, 48.0]]), "labels": torch.tensor([1])}
    losses = model([torch.rand(3, 96, 64)], [target])
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    model.eval()
    with torch.no_grad():
        assert "boxes" in model([torch.rand(3, 64, 64)])[0]


@pytest.mark.parametrize("name", ["retinanet_tiny", "fcos_tiny", "ssd_tiny"])
def test_dense_outputs_equal_torchvision_head(name):
    model = _seeded(name, 5).eval()
    x = torch.randn(2, 3, 96, 64)
    specs = output_specs(model)
    with torch.no_grad():
        out = dense_outputs(model, x, list(specs))
        feats = list(model.backbone(x).values())
        ref = model.head(feats)
    for spec in specs.values():
        assert [tuple(out[k].shape) for k in spec.keys()] == [
            (2, spec.channels, h, w) for h, w in level_grid_sizes((96, 64), spec.levels)
        ]
    refs = {"cls": ref["cls_logits"], "box": ref["bbox_regression"], "ctr": ref.get("bbox_ctrness")}
    for name_ in ("cls", "box", "ctr"):
        if name_ not in specs:
            continue
        s = specs[name_]
        k = s.channels // s.num_anchors
        flat = torch.cat([flatten_level(out[key], s.num_anchors, k) for key in s.keys()], dim=1)
        torch.testing.assert_close(flat, refs[name_], rtol=0, atol=1e-6)
    # Only what was asked: FPN alone returns FPN keys only.
    assert set(dense_outputs(model, x, ["fpn"])) == set(specs["fpn"].keys())


def test_dense_outputs_module_for_ddp():
    model = _seeded("retinanet_tiny")
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(TypeError, match="DenseOutputs"):
        dense_outputs(torch.nn.DataParallel(model), x, ["fpn"])
    wrapped = DenseOutputs(model, ["fpn", "cls"])
    out = wrapped(x)
    assert out["cls.p3"].requires_grad  # students keep gradients
    torch.testing.assert_close(out["cls.p5"], dense_outputs(model, x, ["cls"])["cls.p5"])


def test_flatten_roundtrip_and_order():
    t = torch.arange(2 * 6 * 3 * 4, dtype=torch.float32).view(2, 6, 3, 4)  # A=3, K=2
    flat = flatten_level(t, 3, 2)
    assert flat.shape == (2, 3 * 4 * 3, 2)
    # Row (y=1, x=2, anchor=1) holds channels 1*K..1*K+1 at that location.
    assert torch.equal(flat[0, (1 * 4 + 2) * 3 + 1], t[0, 2:4, 1, 2])
    assert torch.equal(unflatten_level(flat, 3, 3, 4), t)


@pytest.mark.parametrize("name", ["retinanet_tiny", "fcos_tiny"])
def test_model_anchors_match_anchor_generator(name):
    model = _seeded(name).eval()
    x = torch.randn(1, 3, 128, 96)
    with torch.no_grad():
        feats = list(model.backbone(x).values())
    ref = model.anchor_generator(ImageList(x, [(128, 96)]), feats)[0]
    assert torch.equal(model_anchors(model, (128, 96)), ref)
    specs = output_specs(model)
    assert (
        ref.shape[0]
        == sum(h * w for h, w in level_grid_sizes((128, 96), specs["cls"].levels)) * specs["cls"].num_anchors
    )


def test_arch_checkpoint_carries_the_architecture():
    model = _seeded("retinanet_tiny", 3, fpn_channels=32, backbone_weights=None)
    ckpt = arch_checkpoint(model, epoch=2)
    assert ckpt["arch"] == "retinanet_tiny" and ckpt["num_classes"] == 3 and ckpt["epoch"] == 2
    assert ckpt["arch_options"] == {"fpn_channels": 32}
    rebuilt = build_arch(ckpt["arch"], ckpt["num_classes"], **ckpt["arch_options"])
    rebuilt.load_state_dict(ckpt["model"])


def test_an_unknown_arch_option_is_named_on_one_line() -> None:
    """Options come from a plan's YAML: a key with a newline is named by repr, and every accepted option listed."""
    with pytest.raises(ValueError, match=r"does not take option\(s\) '\\n', wdith; it accepts: .*width=") as err:
        build_arch("retinanet_tiny", 3, **{"wdith": 8, "\n": 1})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "make",
    [
        lambda: build_arch("retinanet_tiny", 7),
        lambda: build_arch("fcos_tiny", 7),
        lambda: build_arch("ssd_tiny", 7),
        lambda: __import__("torchvision").models.detection.ssdlite320_mobilenet_v3_large(
            num_classes=7, weights=None, weights_backbone=None
        ),
        lambda: __import__("torchvision").models.detection.fasterrcnn_mobilenet_v3_large_fpn(
            num_classes=7, weights=None, weights_backbone=None
        ),
        lambda: __import__("torchvision").models.detection.maskrcnn_resnet50_fpn(
            num_classes=7, weights=None, weights_backbone=None
        ),
    ],
    ids=["retinanet", "fcos", "ssd", "ssdlite", "fasterrcnn", "maskrcnn"],
)
def test_every_family_reads_its_class_count_off_a_state_dict(make) -> None:
    """``infer_num_classes`` asks each family's adapter (``classes_in_state``); exactly one family claims a dict."""
    from mtpd.models import ADAPTERS, adapter_for, infer_num_classes, model_num_classes

    model = make()
    state = model.state_dict()
    claims = {a.family: a.classes_in_state(state) for a in ADAPTERS if a.classes_in_state(state) is not None}
    assert claims == {adapter_for(model).family: model_num_classes(model)} and infer_num_classes(state) == 7


def test_an_mmdet_retinanet_checkpoint_is_imported_by_its_adapter(tmp_path) -> None:
    """Weight inheritance reads an mmdet RetinaNet's ``neck.``/``bbox_head.`` keys under torchvision's names."""
    from mtpd.checkpoint import save
    from mtpd.trainer.student import inherit_from_teacher

    teacher = build_arch("retinanet_tiny", 5)
    tv = teacher.state_dict()
    mm = {
        "neck.lateral_convs.0.conv.weight": tv["backbone.fpn.inner_blocks.0.0.weight"],
        "neck.fpn_convs.1.conv.bias": tv["backbone.fpn.layer_blocks.1.0.bias"],
        "bbox_head.retina_cls.weight": tv["head.classification_head.cls_logits.weight"],
        "bbox_head.reg_convs.0.conv.weight": tv["head.regression_head.conv.0.0.weight"],
    }
    save({"state_dict": mm}, tmp_path / "mmdet.pth")
    student = build_arch("retinanet_tiny", 5)
    copied = inherit_from_teacher(student, str(tmp_path / "mmdet.pth"), ["neck", "head"])
    assert sorted(copied) == sorted(
        [
            "backbone.fpn.inner_blocks.0.0.weight",
            "backbone.fpn.layer_blocks.1.0.bias",
            "head.classification_head.cls_logits.weight",
            "head.regression_head.conv.0.0.weight",
        ]
    )
    assert torch.equal(
        student.state_dict()["head.classification_head.cls_logits.weight"], mm["bbox_head.retina_cls.weight"]
    )
