"""Unlabelled image sets ("pools"): a folder of images as a COCO file with no annotations.

A pool needs no labels: the teacher's cached features and dense outputs are what a student learns from. In
COCO form it goes through everything a labelled set does (store identity by manifest, catalog, resume,
``--skip-bad``, Ray builds). Categories may be copied from the labelled set the pool goes with, so that both
files name the same classes; nothing reads them for training.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from PIL import Image, UnidentifiedImageError

from mtpd.data.coco import DatasetError

POOL_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")

ProgressFn = Callable[[int], None]


def find_images(folder: Path) -> list[Path]:
    """Every image under ``folder`` (recursive, suffix case ignored, hidden folders skipped), sorted by path."""
    if not folder.is_dir():
        raise DatasetError(f"{folder}: image folder not found; pass --images with a folder of jpg/png/webp files")
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / f for f in files if Path(f).suffix.lower() in POOL_SUFFIXES and not f.startswith(".")]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def image_record(path: Path, folder: Path, image_id: int) -> dict:
    """A COCO image entry; the size comes from the file's header (PIL reads no pixels here)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    except (UnidentifiedImageError, OSError) as e:
        raise DatasetError(f"{path}: not a readable image ({type(e).__name__}: {e}); remove it or pass --skip-bad")
    return {"id": image_id, "file_name": path.relative_to(folder).as_posix(), "height": int(h), "width": int(w)}


def categories_of(ann: Path | None) -> list[dict]:
    if ann is None:
        return []
    try:
        cats = json.loads(ann.read_text())["categories"]
    except (OSError, ValueError, KeyError) as e:
        raise DatasetError(f"{ann}: cannot read its categories ({e}); pass a COCO instances JSON") from None
    return list(cats)


def write_pool(
    images: str | os.PathLike,
    out: str | os.PathLike,
    categories_from: str | os.PathLike | None = None,
    skip_bad: bool = False,
    progress: ProgressFn | None = None,
) -> dict:
    """Write ``out``: a COCO file listing every image under ``images`` with no annotations (file names relative
    to ``images``; ids 1..N in path order, so the same folder always gives the same file).

    ``skip_bad``: leave unreadable files out (listed in the result) instead of failing on the first.
    Returns ``{"ann", "images", "num_images", "skipped"}``.
    """
    folder = Path(images)
    files = find_images(folder)
    if not files:
        raise DatasetError(f"{folder}: no jpg, jpeg, png or webp files under it; point --images at the image folder")
    cats = categories_of(None if categories_from is None else Path(categories_from))
    records, skipped = [], []
    for path in files:
        try:
            records.append(image_record(path, folder, len(records) + 1))
        except DatasetError:
            if not skip_bad:
                raise
            skipped.append(str(path))
        if progress is not None:
            progress(1)
    info = {"description": f"unlabelled images under {folder}", "unlabelled": True, "num_images": len(records)}
    data = {"info": info, "licenses": [], "images": records, "annotations": [], "categories": cats}
    dst = Path(out)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.write_text(json.dumps(data, separators=(",", ":")) + "\n", encoding="utf-8")
    os.replace(tmp, dst)
    return {"ann": str(dst), "images": str(folder), "num_images": len(records), "skipped": skipped}
