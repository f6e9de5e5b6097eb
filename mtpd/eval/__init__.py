"""Evaluation: plain views of a COCO set and COCO box AP, shared by training, export and the CLI (no store, no
teacher: ``mtpd.export`` runs a finished student through it without the trainer)."""

from mtpd.eval.coco import coco_box_ap, detections_to_coco
from mtpd.eval.predict import evaluate, predict, view_detections_to_coco
from mtpd.eval.views import View, ViewBatch, ViewDataset, collate_views, view_loader

__all__ = [
    "View",
    "ViewBatch",
    "ViewDataset",
    "coco_box_ap",
    "collate_views",
    "detections_to_coco",
    "evaluate",
    "predict",
    "view_detections_to_coco",
    "view_loader",
]
