"""COCO-format datasets, deterministic views, the digits benchmark data, and imports of VOC/YOLO/CSV boxes."""

from mtpd.data.coco import Annotations, CocoDataset, DatasetError, ImageRecord
from mtpd.data.importer import import_dataset
from mtpd.data.readers import AnnotationError
from mtpd.data.tiling import TileSpec, TilingError
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
    "AnnotationError",
    "Annotations",
    "CocoDataset",
    "DatasetError",
    "ImageRecord",
    "TileSpec",
    "TilingError",
    "VIEW_NAMES",
    "ViewMeta",
    "ViewSpec",
    "ViewSpecError",
    "boxes_from_view",
    "boxes_to_view",
    "grid_size",
    "import_dataset",
    "masks_to_view",
    "prepare_view",
    "view_meta",
]
