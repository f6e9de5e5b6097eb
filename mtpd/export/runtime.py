"""Running an ONNX export with ONNX Runtime, fed exactly as ``mtpd-eval`` feeds the PyTorch student.

The export's metadata (``mtpd.view``) holds the view recipe; views come from the same
``prepare_view`` through the same ``ViewDataset`` as PyTorch evaluation, one view per run
(each padded on its own, as every mtpd view is), and detections become COCO results through
the same function, so the two APs are computed on equal terms.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from mtpd.data import CocoDataset, ViewSpec, boxes_from_view, prepare_view
from mtpd.eval import ViewDataset, coco_box_ap, view_detections_to_coco
from mtpd.export.graph import INPUT_NAMES, ExportError


class OnnxDetector:
    """An mtpd ONNX export in an ONNX Runtime session: ``detector(view, (h, w))`` -> boxes, scores, labels."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise ExportError("running ONNX exports needs the export extra: pip install 'mtpd[export]'") from None
        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"{self.path}: no such ONNX file; write one with mtpd-export --format onnx")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types for bad files
            raise ExportError(f"{self.path}: ONNX Runtime cannot load it ({type(e).__name__}); re-export it") from None
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        if "mtpd.view" not in self.metadata:
            raise ExportError(f"{self.path}: not an mtpd export (no mtpd.view metadata); write it with mtpd-export")
        self.spec = ViewSpec.from_dict(json.loads(self.metadata["mtpd.view"]))
        fixed = self.metadata.get("mtpd.input_size", "dynamic")
        self.input_size = None if fixed == "dynamic" else tuple(int(v) for v in fixed.split("x"))
        self.model = json.loads(self.metadata.get("mtpd.model", "{}"))

    def __call__(self, image: torch.Tensor, size: tuple[int, int]) -> dict[str, np.ndarray]:
        """Detections of one prepared view [3, H, W] whose valid (unpadded) region is ``size`` (h, w)."""
        x = image.detach().to("cpu", torch.float32)
        if x.ndim == 3:
            x = x[None]
        if self.input_size is not None:
            (h, w), (hi, wi) = self.input_size, x.shape[-2:]
            if hi > h or wi > w:
                raise ExportError(
                    f"{self.path}: a {hi}x{wi} view does not fit the model's fixed {h}x{w} input; re-export with a "
                    "larger --size, or without --size"
                )
            x = F.pad(x, (0, w - wi, 0, h - hi))  # zeros, as the view's own padding
        feed = {INPUT_NAMES[0]: x.numpy(), INPUT_NAMES[1]: np.asarray(size, dtype=np.int64)}
        boxes, scores, labels = self.session.run(None, feed)
        return {"boxes": boxes, "scores": scores, "labels": labels}

    def detect(self, rgb: np.ndarray) -> dict[str, np.ndarray]:
        """Detections of one uint8 RGB image [H, W, 3], boxes in its own pixels."""
        view, meta = prepare_view(rgb, self.spec)
        det = self(view, meta.size)
        return det | {"boxes": boxes_from_view(det["boxes"], meta).astype(np.float32)}


def predict_onnx(
    detector: OnnxDetector, dataset: CocoDataset, spec: ViewSpec | None = None, progress: bool = False
) -> list[dict]:
    """COCO detection results (source-image coordinates) of the export for every image of ``dataset``."""
    ds = ViewDataset(dataset, spec or detector.spec)
    results: list[dict] = []
    for i in tqdm(range(len(ds)), desc="eval onnx", unit="image", disable=not progress):
        sample = ds[i]
        det = detector(sample.image, sample.meta.size)
        results += view_detections_to_coco(
            sample.image_id, sample.meta, det["boxes"], det["scores"], det["labels"], dataset.label_to_cat
        )
    return results


def evaluate_onnx(
    path: str | os.PathLike | OnnxDetector, dataset: CocoDataset, spec: ViewSpec | None = None, progress: bool = False
) -> dict:
    """AP, AP50, AP75, APs, APm, APl (0-1) and the number of detections of an ONNX export, as ``evaluate``."""
    detector = path if isinstance(path, OnnxDetector) else OnnxDetector(path)
    results = predict_onnx(detector, dataset, spec, progress)
    stats = coco_box_ap(dataset.ann_file, results)
    stats["detections"] = len(results)
    return stats
