"""Student-only artifacts for deployment: ONNX (or TorchScript) with post-processing and the view recipe
inside, ONNX Runtime evaluation fed as ``mtpd-eval`` feeds PyTorch, and parity checks between the two.

Needs the ``export`` extra (onnx, onnxscript, onnxruntime) for ONNX; the core install runs without it.
"""

from mtpd.export.graph import DeployableDetector, DetectorInfo, ExportError, describe, reference_detections
from mtpd.export.parity import ParityReport, compare, pair_detections
from mtpd.export.runtime import OnnxDetector, evaluate_onnx, predict_onnx
from mtpd.export.writer import DEFAULT_OPSET, FORMATS, ExportResult, export_model, parse_size

__all__ = [
    "DEFAULT_OPSET",
    "DeployableDetector",
    "DetectorInfo",
    "ExportError",
    "ExportResult",
    "FORMATS",
    "OnnxDetector",
    "ParityReport",
    "compare",
    "describe",
    "evaluate_onnx",
    "export_model",
    "pair_detections",
    "parse_size",
    "predict_onnx",
    "reference_detections",
]
