"""Writing a student-only artifact: ONNX (with the view recipe in its metadata) or TorchScript.

Exporter: torch's TorchScript-based ONNX exporter (``torch.onnx.export(..., dynamo=False)``).
The torch.export-based one (the default since torch 2.9) stops at torchvision's ``batched_nms``,
which branches on the number of boxes, a data-dependent size; torchvision's detection models
carry tracing paths (``torchvision._is_tracing``) for the older exporter, whose output keeps
H and W dynamic. Opset 17 by default: torchvision's ``RoIAlign`` and ``NonMaxSuppression``
lowerings need 11 or more (16 and up for the ``RoiAlign`` with half-pixel coordinates), and
ONNX Runtime builds of recent years all run 17.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from mtpd.checkpoint import sha256_file
from mtpd.data import ViewSpec
from mtpd.export.graph import (
    INPUT_NAMES,
    OUTPUT_NAMES,
    DeployableDetector,
    DetectorInfo,
    ExportError,
)

DEFAULT_OPSET = 17
MIN_OPSET = 11
METADATA_VERSION = "1"
FORMATS = ("onnx", "torchscript")


@dataclass(frozen=True)
class ExportResult:
    path: Path
    format: str
    metadata: dict[str, str]  # the ONNX metadata_props (TorchScript: the extra file mtpd.json)


def recipe_text(spec: ViewSpec, size: tuple[int, int] | None) -> str:
    """How to turn an RGB image into the model's input, in words (also what ``prepare_view`` does)."""
    fixed = f"then zero-pad again to exactly {size[0]}x{size[1]}" if size else "H and W may vary"
    return (
        f"RGB uint8 [H0, W0, 3] -> resize keeping the aspect ratio so the short side is {spec.short} and the long "
        f"side at most {spec.long} (scale = min({spec.short}/min(H0, W0), {spec.long}/max(H0, W0)); h = int(H0*scale"
        f" + 0.5), w likewise), bilinear, align_corners=False, no antialias -> float32 (x - mean) / std per channel "
        f"with mean {list(spec.mean)} and std {list(spec.std)} on 0-255 values -> CHW -> zero-pad bottom/right to a "
        f"multiple of {spec.pad}, {fixed}; feed image [1, 3, H, W] and image_size [h, w] (int64, before padding). "
        "Boxes come back xyxy in view pixels: divide x by w/W0 and y by h/H0 for source pixels."
    )


def export_metadata(info: DetectorInfo, spec: ViewSpec, size: tuple[int, int] | None, opset: int | None, source: str):
    """The ``mtpd.*`` keys every export carries (values are strings; JSON where structured)."""
    return {
        "mtpd.metadata_version": METADATA_VERSION,
        "mtpd.view": json.dumps({k: v for k, v in spec.to_dict().items() if k != "views"}),
        "mtpd.recipe": recipe_text(spec, size),
        "mtpd.input_size": f"{size[0]}x{size[1]}" if size else "dynamic",
        "mtpd.inputs": json.dumps(
            {"image": "[1, 3, H, W] float32 prepared view", "image_size": "[2] int64 (h, w) before padding"}
        ),
        "mtpd.outputs": json.dumps(
            {
                "boxes": "[N, 4] float32 xyxy, view pixels",
                "scores": "[N] float32, descending per class after NMS",
                "labels": f"[N] int64 dataset class index 0..{info.num_classes - 1}",
            }
        ),
        "mtpd.model": json.dumps(
            {"name": info.name, "family": info.family, "num_classes": info.num_classes, "masks": False}
        ),
        "mtpd.postprocess": json.dumps(info.postprocess),
        "mtpd.exporter": json.dumps(
            {"torch": torch.__version__, "exporter": "torchscript-based (dynamo=False)", "opset": opset}
        ),
        "mtpd.source": source,
    }


def parse_size(text: str | None) -> tuple[int, int] | None:
    """``HxW`` (``--size``) -> (H, W); None for a dynamic input."""
    if text is None:
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ExportError(f"--size {text!r} is not HxW (e.g. 128x128); leave it out for a dynamic input") from None
    return h, w


def _check_size(size: tuple[int, int] | None, spec: ViewSpec) -> None:
    if size is None:
        return
    h, w = size
    if h <= 0 or w <= 0 or h % spec.pad or w % spec.pad:
        raise ExportError(f"--size {h}x{w}: both sides must be positive multiples of the view padding {spec.pad}")
    if min(h, w) < spec.short:
        side = -(-spec.long // spec.pad) * spec.pad
        raise ExportError(
            f"--size {h}x{w} cannot hold a view whose short side is {spec.short}; use {side}x{side} to fit every "
            "view of the recipe, or leave --size out"
        )


def _example(spec: ViewSpec, size: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random view to trace with: at ``size``, else a landscape view of the recipe."""
    h, w = size or spec.padded_size(spec.short, spec.long)
    vh, vw = size or spec.resized_size(spec.short, spec.long)
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, h, w, generator=gen)
    image[..., vh:, :] = 0
    image[..., vw:] = 0
    return image, torch.tensor([vh, vw], dtype=torch.int64)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


def _import_onnx():
    try:
        import onnx
    except ImportError:
        raise ExportError("ONNX export needs the export extra: pip install 'mtpd[export]'") from None
    return onnx


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """torch's TorchScript-based exporter prints its whole IR graph to the process's stdout (from C++) when an
    operator fails to convert; the error that follows says all a user needs."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _write_onnx(module: DeployableDetector, example, tmp: Path, size, opset: int) -> None:
    dynamic = None
    if size is None:
        dynamic = {"image": {2: "height", 3: "width"}} | {n: {0: "detections"} for n in OUTPUT_NAMES}
    try:
        with warnings.catch_warnings(), torch.no_grad(), _quiet_stdout():
            warnings.simplefilter("ignore")  # tracer warnings about shapes turned into constants are expected
            torch.onnx.export(
                module,
                example,
                str(tmp),
                input_names=list(INPUT_NAMES),
                output_names=list(OUTPUT_NAMES),
                dynamic_axes=dynamic,
                opset_version=opset,
                dynamo=False,
            )
    except Exception as e:  # noqa: BLE001 - tracing and symbolic errors come in many types; one message for all
        raise ExportError(
            f"cannot export {module.label} to ONNX (opset {opset}): {_first_line(e)}; replace the operation it "
            "names in the model, try another --opset, or use --format torchscript"
        ) from None


def export_model(
    model: nn.Module,
    path: str | os.PathLike,
    spec: ViewSpec,
    *,
    format: str = "onnx",
    size: tuple[int, int] | None = None,
    opset: int = DEFAULT_OPSET,
    name: str | None = None,
    source: str | os.PathLike | None = None,
) -> ExportResult:
    """Write ``model`` (a torchvision detector of a family with an adapter, registered or the user's own) as a
    student-only artifact that maps one view prepared by ``spec`` to its detections after NMS.

    ``size`` fixes the input to [1, 3, H, W] (views are zero-padded to it); None keeps H, W dynamic.
    ``name`` (default: the registered arch, else the model's class) and ``source`` (the checkpoint file the
    model was read from, recorded with its sha256) go into the metadata and into error messages.
    The file is written through a temporary name, so a failed export leaves nothing behind.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}: choose from {', '.join(FORMATS)}")
    if format == "onnx" and not MIN_OPSET <= opset:
        raise ExportError(f"--opset {opset}: torchvision's detection models need opset {MIN_OPSET} or newer")
    _check_size(size, spec)
    onnx = _import_onnx() if format == "onnx" else None
    module = DeployableDetector(model, name, source)
    origin = "nn.Module" if source is None else str(source)
    if source is not None and Path(source).is_file():
        origin += f" sha256={sha256_file(source)}"
    meta = export_metadata(module.info, spec, size, opset if format == "onnx" else None, origin)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        if onnx is None:
            _write_torchscript(module, _example(spec, size), tmp, meta)
        else:
            _write_onnx(module, _example(spec, size), tmp, size, opset)
            proto = onnx.load(str(tmp))
            del proto.metadata_props[:]
            for k, v in meta.items():
                proto.metadata_props.add(key=k, value=v)
            proto.doc_string = f"mtpd student {module.info.name}: " + meta["mtpd.recipe"]
            onnx.checker.check_model(proto)
            onnx.save(proto, str(tmp))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        for m, mode in modes:  # the caller's model leaves in the modes it came in
            m.training = mode
    return ExportResult(out, format, meta)


def _write_torchscript(module: DeployableDetector, example, tmp: Path, meta: dict[str, str]) -> None:
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(module, example, check_trace=False)
    except Exception as e:  # noqa: BLE001
        raise ExportError(
            f"cannot trace {module.label} to TorchScript: {_first_line(e)}; replace the operation it names"
        ) from None
    # A deployment artifact, not a checkpoint: torch.jit.save, with the metadata as an extra file.
    torch.jit.save(traced, str(tmp), _extra_files={"mtpd.json": json.dumps(meta)})
