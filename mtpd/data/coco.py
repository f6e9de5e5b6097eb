"""COCO-format detection data: an instances JSON plus a folder of images."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from mtpd.errors import MtpdError


class DatasetError(MtpdError, ValueError):
    """Bad dataset input: the message names the file and what to do."""


@dataclass(frozen=True)
class ImageRecord:
    image_id: int
    file_name: str
    height: int
    width: int


@dataclass
class Annotations:
    """Ground truth of one image: xyxy boxes in source pixels, contiguous labels 0..K-1."""

    boxes: np.ndarray  # [n, 4] float32
    labels: np.ndarray  # [n] int64


def _is_int(v: object) -> bool:
    # Integral floats (480.0) too: some exporters write every number as a float.
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())


def _is_pos(v: object) -> bool:
    return _is_int(v) and v > 0


def _is_str(v: object) -> bool:
    return isinstance(v, str) and v != "" and "\x00" not in v


def _is_box(v: object) -> bool:
    return (
        isinstance(v, list)
        and len(v) == 4
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
    )


_EXPECTED = {
    _is_int: "an integer",
    _is_pos: "a positive integer",
    _is_str: "a file name",
    _is_box: "[x, y, w, h] numbers",
}


def _check_types(path: Path, where: str, record: dict, fields: dict) -> None:
    for key, ok in fields.items():
        if not ok(record[key]):
            raise DatasetError(f"{path}: {where}.{key} is {record[key]!r:.60}, not {_EXPECTED[ok]}; fix the COCO JSON")


def _load_json(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DatasetError(f"{path}: annotation file not found; pass --ann with a COCO instances JSON") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not valid JSON ({e}); pass a COCO instances JSON") from None
    if not isinstance(data, dict) or not all(
        isinstance(data.get(k), list) for k in ("images", "annotations", "categories")
    ):
        raise DatasetError(
            f"{path}: not a COCO instances file (needs lists 'images', 'annotations' and 'categories'); "
            "convert it to COCO format first"
        )
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or not all(k in im for k in ("id", "file_name", "height", "width")):
            raise DatasetError(f"{path}: images[{i}] lacks one of id, file_name, height, width; fix the COCO JSON")
        _check_types(
            path, f"images[{i}]", im, {"id": _is_int, "file_name": _is_str, "height": _is_pos, "width": _is_pos}
        )
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or "id" not in c:
            raise DatasetError(f"{path}: categories[{i}] has no 'id'; fix the COCO JSON")
        _check_types(path, f"categories[{i}]", c, {"id": _is_int})
    for i, a in enumerate(data["annotations"]):
        if not isinstance(a, dict) or not all(k in a for k in ("image_id", "bbox", "category_id")):
            raise DatasetError(f"{path}: annotations[{i}] lacks one of image_id, bbox, category_id; fix the COCO JSON")
        _check_types(path, f"annotations[{i}]", a, {"image_id": _is_int, "category_id": _is_int, "bbox": _is_box})
    return data


class CocoDataset:
    """Images and ground truth of a COCO-format set, in the JSON's image order.

    Category ids map to contiguous labels 0..K-1 in ascending id order (as mmdet
    does); ``label_to_cat`` maps back for evaluation.
    """

    def __init__(self, ann_file: str | os.PathLike, image_dir: str | os.PathLike) -> None:
        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir)
        data = _load_json(self.ann_file)
        if not self.image_dir.is_dir():
            raise DatasetError(
                f"{self.image_dir}: image folder not found; pass --images with the folder the JSON's file_name entries "
                "are relative to"
            )
        self.categories = sorted(data["categories"], key=lambda c: c["id"])
        self.cat_to_label = {c["id"]: i for i, c in enumerate(self.categories)}
        self.label_to_cat = [c["id"] for c in self.categories]
        self.class_names = [str(c.get("name", c["id"])) for c in self.categories]
        self.images = [
            ImageRecord(int(im["id"]), str(im["file_name"]), int(im["height"]), int(im["width"]))
            for im in data["images"]
        ]
        self._pos = {rec.image_id: i for i, rec in enumerate(self.images)}
        if len(self._pos) != len(self.images):
            raise DatasetError(f"{self.ann_file}: duplicate image ids; every image needs a unique id")
        per_image: dict[int, list[dict]] = {rec.image_id: [] for rec in self.images}
        for a in data["annotations"]:
            if a.get("iscrowd", 0):
                continue  # crowd regions are ignored in training, as mmdet and torchvision do
            if a["image_id"] not in per_image:
                raise DatasetError(
                    f"{self.ann_file}: annotation {a.get('id')} refers to unknown image_id {a['image_id']}"
                )
            if a["category_id"] not in self.cat_to_label:
                raise DatasetError(
                    f"{self.ann_file}: annotation {a.get('id')} has unknown category_id {a['category_id']}"
                )
            per_image[a["image_id"]].append(a)
        self._anns = per_image
        self._probes: dict[int, str] = {}  # content_probe's, by image count

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    def index_of(self, image_id: int) -> int:
        return self._pos[image_id]

    def manifest(self) -> list[list]:
        return [[r.image_id, r.file_name, r.height, r.width] for r in self.images]

    def manifest_hash(self) -> str:
        """sha256 of (image id, file name, height, width) of every image, in order."""
        return hashlib.sha256(json.dumps(self.manifest(), separators=(",", ":")).encode()).hexdigest()

    def content_probe(self, k: int = 8) -> str:
        """sha256 of the bytes of ``k`` images spread evenly over the set (by position), for telling apart sets
        whose manifests agree but whose pixels do not (a pool and a train set both of 000001.png ...); reading
        ``k`` files costs nothing next to a build. A missing file counts as missing, not as an error. Read once per
        dataset object: a stage checks each of its stores against it."""
        if k in self._probes:
            return self._probes[k]
        n = len(self.images)
        picks = sorted({round(i * (n - 1) / (k - 1)) for i in range(k)}) if n > 1 else list(range(n))
        h = hashlib.sha256()
        for idx in picks:
            h.update(f"{idx}:".encode())
            try:
                h.update(self.image_path(idx).read_bytes())
            except OSError:
                h.update(b"missing")
        self._probes[k] = h.hexdigest()
        return self._probes[k]

    def annotations(self, idx: int) -> Annotations:
        rec = self.images[idx]
        boxes, labels = [], []
        for a in self._anns[rec.image_id]:
            x, y, w, h = (float(v) for v in a["bbox"])
            if w <= 0 or h <= 0:
                continue
            boxes.append([x, y, x + w, y + h])
            labels.append(self.cat_to_label[a["category_id"]])
        return Annotations(np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(labels, dtype=np.int64))

    def instance_masks(self, idx: int) -> np.ndarray:
        """[n, H, W] uint8 masks, aligned with ``annotations(idx)`` (Mask R-CNN targets).

        Polygons and RLE decode through pycocotools; an annotation without a
        segmentation (e.g. the digits set) uses its filled box.
        """
        from pycocotools import mask as mask_utils

        rec = self.images[idx]
        masks = []
        for a in self._anns[rec.image_id]:
            x, y, w, h = (float(v) for v in a["bbox"])
            if w <= 0 or h <= 0:
                continue
            seg = a.get("segmentation")
            if seg:
                rle = (
                    mask_utils.frPyObjects(seg, rec.height, rec.width)
                    if isinstance(seg, list) or isinstance(seg.get("counts"), list)
                    else seg
                )
                m = mask_utils.decode(mask_utils.merge(rle) if isinstance(rle, list) else rle)
            else:
                m = np.zeros((rec.height, rec.width), np.uint8)
                m[int(y) : int(np.ceil(y + h)), int(x) : int(np.ceil(x + w))] = 1
            masks.append(m)
        return np.stack(masks) if masks else np.zeros((0, rec.height, rec.width), np.uint8)

    def image_path(self, idx: int) -> Path:
        return self.image_dir / self.images[idx].file_name

    def load_image(self, idx: int) -> np.ndarray:
        """uint8 RGB [H, W, 3]; a missing, unreadable, truncated or mis-sized file is a DatasetError."""
        rec = self.images[idx]
        path = self.image_path(idx)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise DatasetError(
                f"{path}: image file not found (image id {rec.image_id}); restore it or remove the image from "
                f"{self.ann_file.name}"
            ) from None
        except OSError as e:
            raise DatasetError(f"{path}: cannot read image ({e.strerror}); check its permissions") from None
        try:
            with contextlib.closing(Image.open(io.BytesIO(raw))) as im:
                im.load()  # decode fully now: a truncated file fails here, not later
                arr = np.asarray(im.convert("RGB"))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise DatasetError(
                f"{path}: corrupt or truncated image ({e}); re-export the file or remove image id {rec.image_id} from "
                f"{self.ann_file.name}"
            ) from None
        if arr.shape[:2] != (rec.height, rec.width):
            raise DatasetError(
                f"{path}: image is {arr.shape[1]}x{arr.shape[0]} but {self.ann_file.name} says "
                f"{rec.width}x{rec.height}; fix the JSON's width/height"
            )
        return arr

    def readable_images(self, n_images: int) -> Iterator[tuple[int, np.ndarray]]:
        """(index, pixels) of the first ``n_images`` images that load: an unreadable one is the build's to
        report (or skip), not a measurement's."""
        measured = 0
        for i in range(len(self)):
            if measured == n_images:
                return
            try:
                img = self.load_image(i)
            except DatasetError:
                continue
            measured += 1
            yield i, img
