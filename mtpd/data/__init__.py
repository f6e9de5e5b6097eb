"""COCO-format datasets, deterministic views, and the digits benchmark data."""

from mtpd.data.coco import Annotations, CocoDataset, DatasetError, ImageRecord
from mtpd.data.views import (
    VIEW_NAMES,
    ViewMeta,
    ViewSpec,
    ViewSpecError,
    boxes_from_view,
    boxes_to_view,
    grid_size,
    masks_to_view,
    prepare_view,
    view_meta,
)

__all__ = [
    "Annotations",
    "CocoDataset",
    "DatasetError",
    "ImageRecord",
    "VIEW_NAMES",
    "ViewMeta",
    "ViewSpec",
    "ViewSpecError",
    "boxes_from_view",
    "boxes_to_view",
    "grid_size",
    "masks_to_view",
    "prepare_view",
    "view_meta",
]
