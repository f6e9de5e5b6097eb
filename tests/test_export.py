"""`mtpd-export` and `mtpd-eval --onnx`: student-only artifacts whose detections and AP equal PyTorch's."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

# The export extra (make test installs it); the core install runs without it.
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from mtpd.data import CocoDataset, ViewSpec  # noqa: E402
from mtpd.export import (  # noqa: E402
    ExportError,
    OnnxDetector,
    compare,
    export_model,
    pair_detections,
    reference_detections,
)
from mtpd.models import build_arch  # noqa: E402
from mtpd.trainer.student import label_offset  # noqa: E402

SPEC = ViewSpec(short=64, long=64)
# Small options: the R-CNNs are registered on ResNet-50 only; a 32-channel FPN keeps them quick on 64 px views.
FAMILIES = {
    "retinanet_tiny": dict(fpn_channels=32, width=8),
    "fcos_tiny": dict(fpn_channels=32, width=8),
    "fasterrcnn_resnet50_fpn": dict(fpn_channels=32),
    "maskrcnn_resnet50_fpn": dict(fpn_channels=32),
}
METADATA = {
    "mtpd.metadata_version",
    "mtpd.view",
    "mtpd.recipe",
    "mtpd.input_size",
    "mtpd.inputs",
    "mtpd.outputs",
    "mtpd.model",
    "mtpd.postprocess",
    "mtpd.exporter",
    "mtpd.source",
}


def lively(model: nn.Module) -> nn.Module:
    """Seeded random init whose one-stage heads give spread scores around the 0.05 threshold: torchvision's prior
    bias holds a random RetinaNet/FCOS at 0.01 (nothing would be compared) and its weights spread logits by
    little more than float noise (ties, which a detection cap breaks arbitrarily). The R-CNNs detect as built."""
    from mtpd.models import dense_outputs

    model.eval()
    if not hasattr(model, "head"):
        return model
    view = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cls = model.head.classification_head.cls_logits
        cls.bias.zero_()
        spread = torch.cat([t.flatten() for t in dense_outputs(model, view, ["cls"]).values()]).std()
        cls.weight.mul_(2.0 / float(spread))  # logits of std 2 ...
        cls.bias.fill_(-3.0)  # ... around sigmoid(-3) = 0.047
    return model


def val_set(digits: dict) -> CocoDataset:
    return CocoDataset(digits["val"]["ann"], digits["val"]["images"])


def check_parity(report, min_detections: int = 1) -> None:
    print(report.line())  # the numbers, under pytest -s
    assert report.images == 4 and report.detections >= min_detections
    # Every image where both keep as many detections pairs them up within 0.5 px and 1e-3 ...
    assert report.exact == report.same_count, report.mismatched
    # ... and on these views that is every image.
    assert report.fraction == 1.0, report.line()
    assert report.max_box_diff <= 0.5 and report.max_score_diff <= 1e-3


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    model = lively(build_arch("retinanet_tiny", 10, **FAMILIES["retinanet_tiny"]))
    path = Path(tmp_path_factory.mktemp("export")) / "retinanet_tiny.onnx"
    export_model(model, path, SPEC)
    return model, path


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_onnx_parity_for_every_family(arch, tmp_path, digits):
    torch.manual_seed(0)
    # 10 dataset classes, as a student is built for them (the R-CNNs add their background class)
    model = lively(build_arch(arch, 10 + label_offset(arch), **FAMILIES[arch]))
    result = export_model(model, tmp_path / f"{arch}.onnx", SPEC)
    proto = onnx.load(str(result.path))
    onnx.checker.check_model(proto)
    # Student-only: one view in, detections after NMS out; nothing of a loss (adapters, generators) inside.
    assert [i.name for i in proto.graph.input] == ["image", "image_size"]
    assert [o.name for o in proto.graph.output] == ["boxes", "scores", "labels"]
    weights = sum(int(np.prod(t.dims)) for t in proto.graph.initializer)
    assert weights <= 1.01 * sum(t.numel() for t in model.state_dict().values()) + 1000
    meta = {p.key: p.value for p in proto.metadata_props}
    assert set(meta) >= METADATA and meta["mtpd.input_size"] == "dynamic"
    assert ViewSpec.from_dict(json.loads(meta["mtpd.view"])) == SPEC
    model_meta = json.loads(meta["mtpd.model"])
    assert model_meta["name"] == arch and model_meta["num_classes"] == 10
    detector = OnnxDetector(result.path)
    assert detector.spec == SPEC and detector.input_size is None
    check_parity(compare(model, detector, val_set(digits), SPEC))


def test_dynamic_input_takes_other_view_sizes(tiny_export, digits):
    """Traced on a 64x64 view, the graph runs non-square views of other sizes, clipping to each valid size;
    ``detect`` prepares a raw image by the recipe in the file and maps boxes back to its pixels."""
    model, path = tiny_export
    detector = OnnxDetector(path)
    val = val_set(digits)
    rgb = np.concatenate([val.load_image(0)[:48], val.load_image(1)[:48]], axis=1)
    det = detector.detect(rgb)  # a 48x128 image: a 24x64 view (long side at most 64), padded to 32x64
    assert len(det["boxes"]) > 0 and det["boxes"][:, [0, 2]].max() <= 128 and det["boxes"][:, [1, 3]].max() <= 48
    assert det["boxes"][:, [1, 3]].max() > 24  # mapped back to the image's pixels, not left in the view's
    gen = torch.Generator().manual_seed(1)
    for (h, w), (vh, vw) in [((96, 160), (90, 150)), ((128, 64), (128, 40))]:
        view = torch.randn(3, h, w, generator=gen)
        view[:, vh:] = 0
        view[:, :, vw:] = 0
        ref = {k: v.numpy() for k, v in reference_detections(model, view, (vh, vw)).items()}
        got = detector(view, (vh, vw))
        assert len(ref["boxes"]) == len(got["boxes"]) > 0
        assert pair_detections(ref, got)[0] == len(ref["boxes"])
        assert got["boxes"][:, [0, 2]].max() <= vw and got["boxes"][:, [1, 3]].max() <= vh


def test_fixed_size_export(tmp_path, digits, tiny_export):
    model, _ = tiny_export
    result = export_model(model, tmp_path / "fixed.onnx", SPEC, size=(96, 96), opset=16)
    proto = onnx.load(str(result.path))
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 96, 96] and result.metadata["mtpd.input_size"] == "96x96"
    assert json.loads(result.metadata["mtpd.exporter"])["opset"] == 16
    detector = OnnxDetector(result.path)
    check_parity(compare(model, detector, val_set(digits), SPEC))  # views zero-padded to 96x96 on both sides
    with pytest.raises(ExportError, match="does not fit the model's fixed 96x96 input"):
        detector(torch.zeros(3, 128, 96), (128, 96))
    with pytest.raises(ExportError, match="multiples of the view padding 32"):
        export_model(model, tmp_path / "bad.onnx", SPEC, size=(100, 96))


def test_torchscript_export(tmp_path, digits, tiny_export):
    model, _ = tiny_export
    result = export_model(model, tmp_path / "student.pt", SPEC, format="torchscript")
    extra = {"mtpd.json": ""}
    traced = torch.jit.load(str(result.path), _extra_files=extra)
    meta = json.loads(extra["mtpd.json"])
    assert set(meta) >= METADATA and ViewSpec.from_dict(json.loads(meta["mtpd.view"])) == SPEC

    def run(view, size):
        with torch.no_grad():
            out = traced(view[None], torch.tensor(size))
        return {k: v.numpy() for k, v in zip(("boxes", "scores", "labels"), out)}

    check_parity(compare(model, run, val_set(digits), SPEC))


class SmallBackbone(nn.Module):
    """The user's own backbone: plain stride-2 convs, three maps at strides 8, 16, 32."""

    def __init__(self, channels: int = 24) -> None:
        super().__init__()
        chans = [3, 8, 16, channels, channels, channels]
        self.convs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(a, b, 3, stride=2, padding=1), nn.ReLU()) for a, b in zip(chans, chans[1:])
        )
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        out = OrderedDict()
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if i >= 2:
                out[f"p{i + 1}"] = x
        return out


def user_factory(num_classes: int = 5, backbone: type[nn.Module] = SmallBackbone) -> nn.Module:
    """A ``package.module:factory`` as a user writes it: a torchvision RetinaNet on its own small backbone."""
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    torch.manual_seed(0)
    anchors = AnchorGenerator(((16,), (32,), (64,)), ((0.5, 1.0, 2.0),) * 3)
    return RetinaNet(backbone(), num_classes, anchor_generator=anchors, detections_per_img=50)


def test_user_factory_model_exports(tmp_path, digits):
    model = lively(user_factory()).train()
    result = export_model(model, tmp_path / "factory.onnx", SPEC)
    assert model.training and model.backbone.training  # exported in eval mode, handed back as it came
    model.eval()
    info = json.loads(result.metadata["mtpd.model"])
    assert info["name"].endswith("RetinaNet") and info["family"] == "retinanet" and info["num_classes"] == 5
    assert json.loads(result.metadata["mtpd.postprocess"])["detections_per_img"] == 50
    assert result.metadata["mtpd.source"] == "nn.Module"
    check_parity(compare(model, OnnxDetector(result.path), val_set(digits), SPEC))


class FftBackbone(SmallBackbone):
    """A backbone with an operation ONNX has no conversion for in the TorchScript-based exporter."""

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return super().forward(torch.fft.rfft2(x, s=x.shape[-2:]).abs())


def test_unexportable_models_are_one_line_errors(tmp_path):
    with pytest.raises(ExportError) as e:
        export_model(nn.Conv2d(3, 8, 3), tmp_path / "conv.onnx", SPEC)
    text = str(e.value)
    assert "\n" not in text and "torch.nn.modules.conv.Conv2d" in text and "not a torchvision RetinaNet" in text
    model = user_factory(backbone=FftBackbone).eval()
    out = tmp_path / "fft.onnx"
    with pytest.raises(ExportError) as e:
        export_model(model, out, SPEC, source=tmp_path / "nope.pt")
    text = str(e.value)
    assert "\n" not in text, repr(text)
    assert "RetinaNet (from" in text and "aten::fft_rfft2" in text and "replace the" in text, text
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))  # nothing half-written left behind


def test_export_and_eval_onnx_clis_on_a_trained_student(tmp_path, digits, capsys):
    """mtpd-train (60 quick epochs, detection loss only) -> mtpd-export -> mtpd-eval --onnx: the export's AP
    equals the checkpoint's within 0.2 AP. Evaluated on the train split, which this student has fit, so the
    AP is far from zero and the comparison means something; val is checked for parity too."""
    from mtpd.cli.eval import main as eval_main
    from mtpd.cli.export import main as export_main

    ckpt = _train_tiny_student(tmp_path, digits)
    onnx_path = tmp_path / "student.onnx"
    assert export_main(["--checkpoint", str(ckpt), "--out", str(onnx_path)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert OnnxDetector(onnx_path).spec == SPEC  # short/long came from the plan.yaml beside the checkpoint
    ap, lines = {}, []
    for split in ("train", "val"):
        data = ["--ann", digits[split]["ann"], "--images", digits[split]["images"]]
        assert eval_main(["--checkpoint", str(ckpt), "--json", *data]) == 0
        torch_stats = json.loads(capsys.readouterr().out)
        assert eval_main(["--onnx", str(onnx_path), "--json", *data]) == 0
        onnx_stats = json.loads(capsys.readouterr().out)
        assert eval_main(["--onnx", str(onnx_path), "--checkpoint", str(ckpt), "--json", *data]) == 0
        both = json.loads(capsys.readouterr().out)
        lines.append(
            f"{split}: AP onnx {onnx_stats['AP']:.6f}, pytorch {torch_stats['AP']:.6f}; {both['parity']['line']}"
        )
        assert abs(onnx_stats["AP"] - torch_stats["AP"]) <= 0.002
        assert onnx_stats["detections"] == torch_stats["detections"] > 0
        assert both["pytorch"]["AP"] == torch_stats["AP"] and both["parity"]["fraction"] == 1.0
        ap[split] = torch_stats["AP"]
    assert ap["train"] > 0.02, ap
    # A fixed input at the views' own padded size (64x64 here) keeps the AP too.
    fixed = tmp_path / "fixed.onnx"
    assert export_main(["--checkpoint", str(ckpt), "--out", str(fixed), "--size", "64x64"]) == 0
    capsys.readouterr()
    assert eval_main(["--onnx", str(fixed), "--checkpoint", str(ckpt), "--json", *data]) == 0
    both = json.loads(capsys.readouterr().out)
    assert both["input_size"] == "64x64" and abs(both["AP"] - both["pytorch"]["AP"]) <= 0.002
    assert eval_main(["--onnx", str(onnx_path), "--checkpoint", str(ckpt), *data]) == 0
    out = capsys.readouterr().out
    assert "PyTorch checkpoint" in out and "AP difference" in out and "match exactly" in out
    print("\n".join(lines))  # the numbers, under pytest -s


def _train_tiny_student(tmp_path: Path, digits: dict) -> Path:
    from test_trainer import write_plan

    from mtpd.cli.train import main

    stages = [{"name": "s", "epochs": 60, "eval": False, "optimizer": {"type": "adamw", "lr": 0.01}}]
    plan = write_plan(tmp_path, digits, [], stages=stages, log_every=1000)
    assert main(["--plan", str(plan), "--stage", "1", "--device", "cpu"]) == 0
    return tmp_path / "run" / "stage_1" / "final.pt"


def test_cli_errors_are_one_line(tmp_path, digits, tiny_export, capsys):
    from mtpd.cli.eval import main as eval_main
    from mtpd.cli.export import main as export_main

    assert export_main(["--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope.pt" in err and "does not exist" in err
    # A plain ONNX file without mtpd's metadata is refused by name.
    plain = tmp_path / "plain.onnx"
    torch.onnx.export(nn.Conv2d(3, 3, 1), (torch.zeros(1, 3, 8, 8),), str(plain), dynamo=False)
    data = ["--ann", digits["val"]["ann"], "--images", digits["val"]["images"]]
    assert eval_main(["--onnx", str(plain), *data]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "plain.onnx: not an mtpd export" in err and "mtpd-export" in err
    with pytest.raises(SystemExit):
        eval_main(data)  # neither --checkpoint nor --onnx
    assert "give --checkpoint, --onnx, or both" in capsys.readouterr().err
