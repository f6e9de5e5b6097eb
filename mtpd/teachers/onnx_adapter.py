"""Teachers from any framework: an ONNX graph run once in ONNX Runtime (``--teacher onnx:MAPPING.yaml``).

A teacher only runs forward, once, to fill a store, so it need not live in PyTorch: Ultralytics, PaddleDetection,
TensorFlow and mmdeploy models all export to ONNX. A small mapping file says which graph tensors are which
output and level, and how the graph wants its input (``mtpd-cache onnx-map GRAPH.onnx`` drafts one)::

    model: nanodet.onnx              # relative to this file; its sha256 is part of the teacher's identity
    input:
      name: data                     # default: the graph's only input
      color: bgr                     # rgb (default) or bgr
      mean: [103.53, 116.28, 123.675]  # on 0-255 pixels, in the graph's channel order
      std: [57.375, 57.12, 58.395]
      size: [416, 416]               # fixed H, W of the graph (views are zero-padded to it); omit if dynamic
    outputs:
      fpn: {kind: feature, levels: {3: "neck_p3", 4: "neck_p4", 5: "neck_p5"}}
      cls: {kind: logits, num_classes: 80, levels: {3: "cls_p3", ...}}
      box: {kind: deltas, mirror: swap_lr, levels: {3: "reg_p3", ...}}

Every tensor must be [1 or B, C, h, w] with h = ceil(H / 2**level) (``layout: nchw``, the default) or
[B, h·w, C] (``layout: flat``, reshaped on the level's grid). Intermediate tensors become graph outputs with
``onnx.utils.extract_model`` (onnx's own tool); the extracted graph runs in ONNX Runtime on the CPU, or with the
CUDA execution provider when the device is cuda and the runtime has it. The view (ImageNet-normalised RGB from
``prepare_view``) is mapped to the graph's own normalisation, so teacher and student still see the same pixels.
"""

from __future__ import annotations

import difflib
import json
import math
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from mtpd.checkpoint import sha256_file
from mtpd.data.views import IMAGENET_MEAN, IMAGENET_STD
from mtpd.onnx_mapping import MappingError, onnx_reference, read_mapping
from mtpd.output_spec import MIRRORS, OutputSpec
from mtpd.teachers.base import TeacherError, TeacherIdentity, check_outputs
from mtpd.teachers.convert import InputConversion

KINDS = ("feature", "logits", "deltas", "objectness")


def _mapping(path: Path) -> dict:
    try:
        return read_mapping(path)
    except MappingError as e:
        raise TeacherError(str(e)) from None


def _reference(mapping: str | Path) -> tuple[str, Path]:
    try:
        return onnx_reference(mapping)
    except MappingError as e:
        raise TeacherError(str(e)) from None


def _input_size(value_info, given: tuple[int, ...] | None, where: str) -> tuple[int, int] | None:
    """The graph's fixed (H, W), from its input's shape and the mapping's ``input.size``; None when both are
    dynamic. One-line errors for what mtpd cannot feed: not [B, 3, H, W], a batch fixed above 1, a size that
    disagrees with the graph's, one side fixed and the other not with no ``size`` given."""
    dims = [d.dim_value if d.HasField("dim_value") else None for d in value_info.type.tensor_type.shape.dim]
    name = value_info.name
    if len(dims) != 4 or dims[1] not in (None, 3):
        raise TeacherError(f"{where}.input: graph input {name!r} is {dims}; an image input is [B, 3, H, W] (NCHW)")
    if dims[0] not in (None, 1):
        raise TeacherError(
            f"{where}.input: graph input {name!r} has its batch fixed at {dims[0]}; mtpd runs one view at a time: "
            "export the graph with batch 1 or a dynamic batch"
        )
    fixed = tuple(dims[2:])
    if given is not None and len(given) != 2:
        raise TeacherError(f"{where}.input.size: give [H, W], got {list(given)}")
    if all(fixed):
        if given is not None and given != fixed:
            raise TeacherError(f"{where}.input.size: {list(given)}, but the graph's input is fixed at {list(fixed)}")
        return fixed  # type: ignore[return-value]
    if any(fixed) and given is None:
        raise TeacherError(f"{where}.input: graph input {name!r} fixes one side ({dims}); give input.size: [H, W]")
    return given  # type: ignore[return-value]


def _conversion(inp: dict, where: str) -> InputConversion:
    """View space (ImageNet-normalised RGB) -> the graph's: pixel = x·std_v + mean_v, then order, then (p − m) / s."""
    color = inp.get("color", "rgb")
    if color not in ("rgb", "bgr"):
        raise TeacherError(f"{where}.input.color: {color!r} is not rgb or bgr")
    mean = [float(v) for v in inp.get("mean", [0.0, 0.0, 0.0])]
    std = [float(v) for v in inp.get("std", [1.0, 1.0, 1.0])]
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise TeacherError(f"{where}.input: mean and std need 3 values each (std positive)")
    perm = [0, 1, 2] if color == "rgb" else [2, 1, 0]
    scale = [IMAGENET_STD[p] / std[c] for c, p in enumerate(perm)]
    shift = [(IMAGENET_MEAN[p] - mean[c]) / std[c] for c, p in enumerate(perm)]
    return InputConversion(perm, scale, shift)


class OnnxTeacher:
    """An ONNX graph's named tensors as a ``Teacher`` (see the module docstring)."""

    def __init__(self, mapping_path: str, device: str = "cpu") -> None:
        import onnx
        import onnxruntime as ort

        name, self.model_path = _reference(mapping_path)
        self.path = Path(mapping_path).expanduser().resolve()
        m = _mapping(self.path)
        if not self.model_path.is_file():
            raise TeacherError(f"{self.path}: model {self.model_path} not found")
        graph = onnx.load(str(self.model_path))
        inputs = [i for i in graph.graph.input if i.name not in {t.name for t in graph.graph.initializer}]
        inp = dict(m.get("input") or {})
        self.input_name = str(inp.get("name") or (inputs[0].name if len(inputs) == 1 else ""))
        if self.input_name not in [i.name for i in inputs]:
            raise TeacherError(
                f"{self.path}.input.name: {self.input_name!r} is not a graph input; it has {[i.name for i in inputs]}"
            )
        given = tuple(int(v) for v in inp["size"]) if inp.get("size") else None
        self.size = _input_size(next(i for i in inputs if i.name == self.input_name), given, str(self.path))
        self.conversion = _conversion(inp, str(self.path))
        self.specs, self.tensors, self.layouts = self._outputs(m["outputs"], graph)
        # onnx's own extraction: the tensors named become the graph's outputs; everything after them is cut.
        names = [t for per in self.tensors.values() for t in per.values()]
        with tempfile.TemporaryDirectory(prefix="mtpd-onnx-") as tmp:
            cut = Path(tmp) / "teacher.onnx"
            onnx.utils.extract_model(str(self.model_path), str(cut), [self.input_name], names, check_model=False)
            providers = ["CPUExecutionProvider"]
            if str(device).startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
            self.session = ort.InferenceSession(str(cut), providers=providers)
        self.device = torch.device(device)
        digest = sha256_file(self.model_path)
        self.identity = TeacherIdentity(
            name=name,
            config=json.dumps(m, sort_keys=True, default=str),
            weights=str(self.model_path),
            weights_sha256=digest,
            extra={"runtime": f"onnxruntime {ort.__version__}", "providers": providers},
        )

    def _outputs(self, outs: dict, graph) -> tuple[dict[str, OutputSpec], dict[str, dict[int, str]], dict[str, str]]:
        known = {o for n in graph.graph.node for o in n.output} | {i.name for i in graph.graph.input}
        specs, tensors, layouts = {}, {}, {}
        for name, o in outs.items():
            where = f"{self.path}.outputs.{name}"
            if not isinstance(o, dict) or not isinstance(o.get("levels"), dict) or not o["levels"]:
                raise TeacherError(f"{where}: give 'kind' and 'levels' (level -> graph tensor name)")
            kind, mirror, layout = o.get("kind", "feature"), str(o.get("mirror", "")), o.get("layout", "nchw")
            if kind == "deltas" and not mirror:
                mirror = "none"  # a graph's box code is unknown until the mapping says (negate_dx, swap_lr)
            if kind not in KINDS or (mirror and mirror not in MIRRORS) or layout not in ("nchw", "flat"):
                raise TeacherError(f"{where}: kind one of {KINDS}, mirror one of {MIRRORS}, layout nchw or flat")
            per = {int(lvl): str(t) for lvl, t in o["levels"].items()}
            for lvl, t in per.items():
                if t not in known:
                    near = difflib.get_close_matches(t, sorted(known), n=3, cutoff=0.5)
                    raise TeacherError(f"{where}.levels.{lvl}: no tensor {t!r} in {self.model_path.name}; near: {near}")
            tensors[name], layouts[name] = per, layout
            specs[name] = OutputSpec(
                name, kind, tuple(sorted(per)), 0, int(o.get("num_anchors", 1)), int(o.get("num_classes", 0)), mirror
            )
        return specs, tensors, layouts

    def output_specs(self) -> dict[str, OutputSpec]:
        if any(s.channels == 0 for s in self.specs.values()):
            self._probe()
        return dict(self.specs)

    def _probe(self) -> None:
        """Channels and strides measured on one blank view (the graph's fixed size, else 256 px)."""
        h, w = self.size or (256, 256)
        res = self._run(torch.zeros(1, 3, h, w), (h, w))
        for name, spec in self.specs.items():
            chans = {int(res[f"{name}.p{lvl}"].shape[1]) for lvl in spec.levels}
            if len(chans) != 1:
                raise TeacherError(f"{self.path}.outputs.{name}: channels differ by level ({sorted(chans)})")
            self.specs[name] = OutputSpec(
                name, spec.kind, spec.levels, chans.pop(), spec.num_anchors, spec.num_classes, spec.mirror
            )

    @property
    def input_size(self) -> tuple[int, int] | None:
        """The graph's fixed (H, W), which every padded view must fit; None when it takes any size."""
        return self.size

    def to(self, device: str | torch.device) -> "OnnxTeacher":
        self.device = torch.device(device)  # the session runs where it was made; outputs go to this device
        return self

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, outputs: Sequence[str], sizes: Sequence[tuple[int, int]] | None = None
    ) -> dict[str, torch.Tensor]:
        check_outputs(self, outputs, self.identity.name)
        padded = tuple(images.shape[-2:])
        x = images.detach().float().cpu()
        if self.size is not None:
            if padded[0] > self.size[0] or padded[1] > self.size[1]:
                raise TeacherError(
                    f"{self.identity.name}: views of {padded} do not fit the graph's fixed input {self.size}; use "
                    f"--short/--long within {self.size}"
                )
            x = torch.nn.functional.pad(x, (0, self.size[1] - padded[1], 0, self.size[0] - padded[0]))
        res = self._run(x, padded)
        return {k: v.to(self.device) for k, v in res.items() if k.split(".")[0] in outputs}

    def _run(self, x: torch.Tensor, keep: tuple[int, int]) -> dict[str, torch.Tensor]:
        """The graph on [B, 3, H, W] views (one at a time when its batch is fixed at 1), each tensor cropped to the
        cells of a ``keep``-sized view."""
        feed = self.conversion(x).numpy().astype(np.float32)
        order = [(n, lvl, t) for n, per in self.tensors.items() for lvl, t in per.items()]
        fetched = [
            self.session.run([t for _, _, t in order], {self.input_name: feed[i : i + 1]}) for i in range(len(feed))
        ]
        out = {}
        for j, (name, lvl, _) in enumerate(order):
            maps = [self._level(np.asarray(f[j]), name, lvl, x.shape[-2:]) for f in fetched]
            gh, gw = math.ceil(keep[0] / 2**lvl), math.ceil(keep[1] / 2**lvl)
            out[f"{name}.p{lvl}"] = torch.from_numpy(np.concatenate(maps)[:, :, :gh, :gw].copy())
        return out

    def _level(self, t: np.ndarray, name: str, lvl: int, size: Any) -> np.ndarray:
        h, w = math.ceil(int(size[0]) / 2**lvl), math.ceil(int(size[1]) / 2**lvl)
        if self.layouts[name] == "flat":
            if t.ndim != 3 or t.shape[1] != h * w:
                raise TeacherError(
                    f"{self.path}.outputs.{name}.levels.{lvl}: {list(t.shape)} is not [B, h·w = {h * w}, C] for a "
                    f"{tuple(size)} input at stride {2**lvl}"
                )
            t = t.reshape(t.shape[0], h, w, t.shape[2]).transpose(0, 3, 1, 2)
        if t.ndim != 4 or tuple(t.shape[-2:]) != (h, w):
            raise TeacherError(
                f"{self.path}.outputs.{name}.levels.{lvl}: shape {list(t.shape)} does not fit stride {2**lvl} of a "
                f"{tuple(size)} input (want [B, C, {h}, {w}]); check the level, or layout: flat"
            )
        return t

    def __repr__(self) -> str:
        return f"OnnxTeacher({str(self.path)!r})"


def build_onnx_teacher(mapping: str, weights: str = "none", num_classes: int | None = None, device: str = "cpu"):
    """``--teacher onnx:MAPPING.yaml``; the graph holds its weights, so ``weights`` must be none."""
    if weights not in ("none", "", None):
        raise TeacherError(f"onnx:{mapping}: the graph holds its own weights; drop --weights ({weights})")
    return OnnxTeacher(mapping, device)
