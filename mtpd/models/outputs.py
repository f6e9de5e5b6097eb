"""Dense outputs of a torchvision detector on a prepared batch: the one definition of
``fpn.p3``, ``cls.p3``, … shared by teachers (cached) and students (online).

The model's own forward resizes, normalises and pads; mtpd has already done all
three in ``mtpd.data.prepare_view``, so here the backbone runs on the prepared
tensor directly and the head convs run per level, without torchvision's
flattening to [B, H·W·A, K]. ``flatten_level`` gives that flattening when a loss
needs torchvision's anchor order; ``model_anchors`` gives the anchors in it.
"""

from __future__ import annotations

import math
import weakref
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList

from mtpd.models.registry import arch_family, unwrap
from mtpd.output_spec import OutputSpec

# Probe input: tall and thin, so it is cheap yet long enough that every level up to
# stride 256 has a distinct size along H (sizes round up: ceil(H / stride)).
_PROBE_HW = (256, 32)
_LEVELS: "weakref.WeakKeyDictionary[nn.Module, dict[str, int]]" = weakref.WeakKeyDictionary()


def _features(model: nn.Module, images: Tensor) -> "OrderedDict[str, Tensor]":
    out = model.backbone(images)
    return OrderedDict([("0", out)]) if isinstance(out, Tensor) else out


def feature_levels(model: nn.Module) -> dict[str, int]:
    """Backbone output key -> P-level (log2 of its stride), in the backbone's order.

    Found once per backbone by a forward on a small probe, in eval mode and without
    gradients, so keys ('0', '1', 'pool', 'p6' …) never need interpreting by name.
    """
    model = unwrap(model)
    backbone = model.backbone
    if backbone in _LEVELS:
        return _LEVELS[backbone]
    param = next(backbone.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    # Eval mode so BatchNorm statistics do not move; restore each module's own flag after.
    modes = [(m, m.training) for m in backbone.modules()]
    backbone.eval()
    try:
        with torch.no_grad():
            feats = _features(model, torch.zeros(1, 3, *_PROBE_HW, device=device, dtype=dtype))
    finally:
        for m, mode in modes:
            m.training = mode
    levels: dict[str, int] = {}
    for key, f in feats.items():
        stride = _PROBE_HW[0] // f.shape[-2]
        lvl = int(round(math.log2(stride))) if stride > 0 else -1
        if 2**lvl != stride:
            raise ValueError(
                f"backbone output {key!r} has stride {stride} on a {_PROBE_HW[0]}-px probe: not a power of two"
            )
        twin = next((k for k, v in levels.items() if v == lvl), None)
        if twin is not None:
            raise ValueError(
                f"backbone outputs {twin!r} and {key!r} both have stride {stride}, so both would be level P{lvl}"
            )
        levels[key] = lvl
    _LEVELS[backbone] = levels
    return levels


def output_specs(model: nn.Module) -> dict[str, OutputSpec]:
    """Every dense output this detector can produce, by store name.

    RetinaNet: fpn, cls (A·K logits), box (A·4 deltas). FCOS: fpn, cls (K), box (4 ltrb
    distances, after torchvision's ReLU), ctr (1). Faster/Mask R-CNN: fpn (P2–P6), rpn_obj
    (A), rpn_box (4A). RoI-head outputs depend on proposals and are not dense outputs.
    """
    model = unwrap(model)
    family = arch_family(model)
    levels = tuple(feature_levels(model).values())
    specs = {"fpn": OutputSpec("fpn", "feature", levels, int(model.backbone.out_channels))}
    if family in ("retinanet", "fcos"):
        cls_head = model.head.classification_head
        a, k = int(cls_head.num_anchors), int(cls_head.num_classes)
        specs["cls"] = OutputSpec("cls", "logits", levels, a * k, num_anchors=a, num_classes=k)
        specs["box"] = OutputSpec("box", "deltas", levels, a * 4, num_anchors=a)
        if family == "fcos":
            specs["ctr"] = OutputSpec("ctr", "logits", levels, a, num_anchors=a, num_classes=1)
    else:
        counts = set(model.rpn.anchor_generator.num_anchors_per_location())
        if len(counts) != 1:
            raise ValueError(
                f"RPN anchors per location differ by level ({sorted(counts)}); dense outputs need one count"
            )
        a = counts.pop()
        specs["rpn_obj"] = OutputSpec("rpn_obj", "objectness", levels, a, num_anchors=a, num_classes=1)
        specs["rpn_box"] = OutputSpec("rpn_box", "deltas", levels, a * 4, num_anchors=a)
    return specs


def dense_outputs(model: nn.Module, images: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
    """``{name}.p{level}`` -> [B, C, h, w] for each requested output name.

    ``images``: [B, 3, H, W] from ``prepare_view`` (normalised, padded to /32); the model's
    transform is bypassed. Runs in the model's current mode and keeps gradients, so
    students call it while training; teachers wrap it in ``torch.no_grad``. Only what is
    asked is computed: ``["fpn"]`` skips the head entirely.

    Under DistributedDataParallel wrap ``DenseOutputs(model, names)`` in DDP instead of
    passing the DDP model here: reaching into ``.module`` would skip gradient sync.
    """
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise TypeError(
            f"dense_outputs got a {type(model).__name__}: calling through .module would bypass it "
            "(no gradient sync); wrap DenseOutputs(model, names) in it and call that"
        )
    specs = output_specs(model)
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise ValueError(f"{type(model).__name__} cannot produce {', '.join(unknown)}; it has: {', '.join(specs)}")
    family = arch_family(model)
    levels = feature_levels(model)
    feats = _features(model, images)
    want = set(names)
    out: dict[str, Tensor] = {}
    for key, f in feats.items():
        p = f"p{levels[key]}"
        if "fpn" in want:
            out[f"fpn.{p}"] = f
        if family in ("retinanet", "fcos"):
            head = model.head
            if "cls" in want:
                c = head.classification_head
                out[f"cls.{p}"] = c.cls_logits(c.conv(f))
            if want & {"box", "ctr"}:
                r = head.regression_head
                t = r.conv(f)
                if "box" in want:
                    # FCOS regresses distances through a ReLU inside its head; RetinaNet has none.
                    box = r.bbox_reg(t)
                    out[f"box.{p}"] = F.relu(box) if family == "fcos" else box
                if "ctr" in want:
                    out[f"ctr.{p}"] = r.bbox_ctrness(t)
        elif want & {"rpn_obj", "rpn_box"}:
            h = model.rpn.head
            t = h.conv(f)
            if "rpn_obj" in want:
                out[f"rpn_obj.{p}"] = h.cls_logits(t)
            if "rpn_box" in want:
                out[f"rpn_box.{p}"] = h.bbox_pred(t)
    return out


class DenseOutputs(nn.Module):
    """``dense_outputs`` as a module, so DDP / DataParallel can wrap it:
    ``DDP(DenseOutputs(student, ["fpn", "cls", "box"]))(images)``."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.names = list(names)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return dense_outputs(self.model, images, self.names)


def flatten_level(t: Tensor, num_anchors: int, num_values: int) -> Tensor:
    """[B, A·K, H, W] -> [B, H·W·A, K] in torchvision's order (location-major, then anchor)."""
    b, c, h, w = t.shape
    if c != num_anchors * num_values:
        raise ValueError(f"flatten_level: {c} channels is not A·K = {num_anchors}·{num_values}")
    return t.view(b, num_anchors, num_values, h, w).permute(0, 3, 4, 1, 2).reshape(b, h * w * num_anchors, num_values)


def unflatten_level(t: Tensor, num_anchors: int, height: int, width: int) -> Tensor:
    """Inverse of ``flatten_level``: [B, H·W·A, K] -> [B, A·K, H, W]."""
    b, n, k = t.shape
    if n != height * width * num_anchors:
        raise ValueError(f"unflatten_level: {n} rows is not H·W·A = {height}·{width}·{num_anchors}")
    return t.reshape(b, height, width, num_anchors, k).permute(0, 3, 4, 1, 2).reshape(b, num_anchors * k, height, width)


def level_grid_sizes(image_size: tuple[int, int], levels: Sequence[int]) -> list[tuple[int, int]]:
    """Feature map sizes of a padded image: ceil(H / 2^l) — every torchvision backbone here
    halves with stride-2 convs/pools padded so that sizes round up."""
    h, w = image_size
    return [(-(-h // 2**lvl), -(-w // 2**lvl)) for lvl in levels]


def model_anchors(
    model: nn.Module, image_size: tuple[int, int], grid_sizes: Sequence[tuple[int, int]] | None = None
) -> Tensor:
    """All anchors of ``model`` for a padded image of ``image_size`` (H, W), as one
    [Σ_l H_l·W_l·A, 4] xyxy tensor in the order of ``flatten_level`` over levels.

    Uses the model's own anchor generator (RetinaNet/FCOS ``anchor_generator``, R-CNN
    ``rpn.anchor_generator``), which takes each level's stride as image size // grid size,
    exactly as in the model's forward. ``grid_sizes`` defaults to ``level_grid_sizes``.
    """
    model = unwrap(model)
    gen = model.rpn.anchor_generator if arch_family(model) in ("fasterrcnn", "maskrcnn") else model.anchor_generator
    if grid_sizes is None:
        grid_sizes = level_grid_sizes(image_size, list(feature_levels(model).values()))
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    h, w = image_size
    # Zero-channel stand-ins: the generator reads only shapes, dtype and device.
    images = ImageList(torch.empty(1, 0, h, w, device=device), [(h, w)])
    feats = [torch.empty(1, 0, gh, gw, device=device) for gh, gw in grid_sizes]
    return gen(images, feats)[0]
