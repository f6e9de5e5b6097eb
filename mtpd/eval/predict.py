"""COCO box evaluation of a detector on a COCO-format set, through the same views as training."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from mtpd.data import CocoDataset, ViewMeta, ViewSpec, boxes_from_view
from mtpd.eval.coco import coco_box_ap, detections_to_coco
from mtpd.eval.views import ViewDataset, view_loader
from mtpd.models import adapter_for, unwrap
from mtpd.models.detect import detector_forward


@torch.no_grad()
def predict(
    model: nn.Module,
    dataset: CocoDataset,
    spec: ViewSpec,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    workers: int = 0,
    progress: bool = False,
) -> list[dict]:
    """COCO detection results (source-image coordinates) for every image of ``dataset``."""
    model.eval()
    offset = adapter_for(unwrap(model)).label_offset
    loader = view_loader(ViewDataset(dataset, spec), batch_size, workers)
    results: list[dict] = []
    for batch in tqdm(loader, desc="eval", unit="batch", disable=not progress):
        out = detector_forward(model, batch.images.to(device), batch.image_sizes, None, names=(), detect=True)
        for image_id, meta, det in zip(batch.image_ids, batch.metas, out.detections):
            labels = det["labels"].cpu().numpy() - offset
            results += view_detections_to_coco(
                image_id, meta, det["boxes"].cpu().numpy(), det["scores"].cpu().numpy(), labels, dataset.label_to_cat
            )
    return results


def view_detections_to_coco(
    image_id: int, meta: ViewMeta, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, label_to_cat: list[int]
) -> list[dict]:
    """COCO results of one view's detections (boxes in view pixels, labels as dataset class indices; negative
    labels, an R-CNN's background, are dropped): shared by PyTorch and ONNX evaluation."""
    keep = labels >= 0
    return detections_to_coco(image_id, boxes_from_view(boxes[keep], meta), scores[keep], labels[keep], label_to_cat)


def evaluate(
    model: nn.Module,
    dataset: CocoDataset,
    spec: ViewSpec,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    workers: int = 0,
    progress: bool = False,
) -> dict:
    """AP, AP50, AP75, APs, APm, APl (0-1) and the number of detections."""
    results = predict(model, dataset, spec, batch_size, device, workers, progress)
    stats = coco_box_ap(dataset.ann_file, results)
    stats["detections"] = len(results)
    return stats
