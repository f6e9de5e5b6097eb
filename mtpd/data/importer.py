"""Import Pascal VOC, YOLO or CSV box annotations into mtpd's COCO layout, optionally cut into tiles.

The layout is the digits set's, so every mtpd command takes an imported set as it takes digits:

  OUT/images/{train,val}/<path under IMAGES>     an untiled image: hard link to the source
                                                 (a copy where OUT is on another file system)
  OUT/images/{train,val}/<stem>_x<X>_y<Y>.png    a tile: PNG crop whose top-left is (X, Y) in the source
  OUT/annotations/instances_{train,val}.json     COCO instances, file_name relative to the split's folder

Images are split into train and val before tiling, so tiles of one image never straddle splits.
Tiles without boxes are kept: they are the negatives a detector learns background from. An image
no larger than the tile is not cut (it is linked as it is).
Category ids are 1..K in the order of ``--classes`` when given (YOLO's class indices), else of the
sorted class names; CocoDataset maps ascending ids to labels 0..K-1, so labels follow the same order.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from mtpd.data.readers import AnnotationError, Item, read_csv, read_text, read_voc, read_yolo
from mtpd.data.tiling import TileSpec, clip_to_tile, tiles

FORMATS = ("voc", "yolo", "csv")
SPLITS = ("train", "val")
GENERATOR = "mtpd.data.importer.import_dataset"


# ------------------------------------------------------------------ classes


def _names_from_yaml(path: Path) -> list[str]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        raise AnnotationError(f"{path}:{'' if line is None else line + 1}: not YAML ({e.__class__.__name__})") from None
    names = data.get("names") if isinstance(data, dict) else None
    if isinstance(names, dict):  # Ultralytics also writes {0: person, 1: bicycle, ...}
        if sorted(names) != list(range(len(names))):
            raise AnnotationError(f"{path}: names keys must be 0..{len(names) - 1}, got {sorted(names)}")
        names = [names[k] for k in range(len(names))]
    if not isinstance(names, list):
        raise AnnotationError(f"{path}: no 'names' list (a YOLO data.yaml lists class names under names:)")
    return [str(n) for n in names]


def load_classes(spec: str | Sequence[str] | None) -> list[str] | None:
    """Class names in category order from a names.txt (one a line), a data.yaml's ``names``, or "a,b,c"."""
    if spec is None:
        return None
    if not isinstance(spec, str):
        names, where = [str(n) for n in spec], ["classes"] * len(spec)
    elif Path(spec).is_file():
        path = Path(spec)
        if path.suffix.lower() in (".yaml", ".yml"):
            names = _names_from_yaml(path)
            where = [str(path)] * len(names)
        else:
            numbered = [(t, f"{path}:{i}") for i, t in enumerate(read_text(path).splitlines(), 1)]
            names, where = [t for t, _ in numbered if t.strip()], [w for t, w in numbered if t.strip()]
    elif Path(spec).suffix.lower() in (".txt", ".names", ".yaml", ".yml"):
        raise AnnotationError(f"{spec}: classes file not found; pass names.txt, data.yaml or a list like cat,dog")
    else:
        names = spec.split(",")
        where = ["--classes"] * len(names)
    names = [n.strip() for n in names]
    seen: dict[str, str] = {}
    for n, w in zip(names, where):
        if not n:
            raise AnnotationError(f"{w}: empty class name")
        if n in seen:
            raise AnnotationError(f"{w}: class {n!r} is listed twice (first at {seen[n]})")
        seen[n] = w
    if not names:
        raise AnnotationError(f"{spec}: no class names")
    return names


def category_names(items: list[Item], classes: list[str] | None) -> list[str]:
    """Names of category ids 1..K: ``classes`` in order, or the sorted names the boxes use."""
    if classes is None:
        names = sorted({b.label for it in items for b in it.boxes})
        if not names:
            raise AnnotationError("no boxes in the annotations; pass --classes to import a set of negatives")
        return names
    known = set(classes)
    for it in items:
        for b in it.boxes:
            if b.label not in known:
                shown = ", ".join(classes[:20]) + (", ..." if len(classes) > 20 else "")
                raise AnnotationError(f"{b.where}: unknown class {b.label!r}; --classes has: {shown}")
    return list(classes)


# -------------------------------------------------------------------- split


def split_items(items: list[Item], val_fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """Train and val by image: the val images are the round(n * val_fraction) of least hash(seed, file name).

    A hash order rather than a shuffle: an image's side depends on its name and the seed only, so
    adding images to the source moves few of the old ones across.
    """
    if not 0 <= val_fraction < 1:
        raise AnnotationError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    key = lambda it: hashlib.sha256(f"{seed}\0{it.file_name}".encode()).digest()
    order = sorted(items, key=key)
    k = round(len(items) * val_fraction)
    if val_fraction > 0 and len(items) > 1:
        k = min(max(k, 1), len(items) - 1)  # both splits non-empty when a split was asked for
    by_name = lambda its: sorted(its, key=lambda it: it.file_name)
    return by_name(order[k:]), by_name(order[:k])


# ------------------------------------------------------------------ writing


def _place(src: Path, dst: Path) -> None:
    """Hard-link ``src`` at ``dst`` (no bytes copied), copying where links are impossible."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another file system, or one without hard links
        shutil.copyfile(src, dst)


def _annotation(image_id: int, cat: int, xyxy: tuple[float, ...], crowd: bool) -> dict:
    x0, y0, x1, y1 = (round(float(v), 4) for v in xyxy)
    w, h = round(x1 - x0, 4), round(y1 - y0, 4)
    area = round(w * h, 4)
    return {"image_id": image_id, "category_id": cat, "bbox": [x0, y0, w, h], "area": area, "iscrowd": int(crowd)}


def _tile_item(item: Item, src: Path, dst_dir: Path, spec: TileSpec, cats: dict[str, int]) -> tuple[list, list, int]:
    """Tile records, their annotations (image ids as tile indices) and how many boxes no tile kept."""
    with Image.open(src) as im:
        pixels = im.convert("RGB")
    stem = item.file_name.rsplit(".", 1)[0]
    records, anns, kept = [], [], set()
    for t, tile in enumerate(tiles(item.width, item.height, spec)):
        name = f"{stem}_x{tile[0]}_y{tile[1]}.png"
        (dst_dir / name).parent.mkdir(parents=True, exist_ok=True)
        pixels.crop(tile).save(dst_dir / name, format="PNG", compress_level=1)
        w, h = tile[2] - tile[0], tile[3] - tile[1]
        records.append({"file_name": name, "height": h, "width": w, "source": item.file_name, "tile": tile[:2]})
        for b, box in enumerate(item.boxes):
            clipped = clip_to_tile(box.xyxy, tile, spec.min_visible)
            if clipped is not None:
                anns.append(_annotation(t, cats[box.label], clipped, box.crowd))
                kept.add(b)
    return records, anns, len(item.boxes) - len(kept)


def _write_split(
    items: list[Item], images: Path, out: Path, split: str, cats: dict[str, int], spec: TileSpec | None, bar: tqdm
) -> dict:
    dst_dir = out / "images" / split
    dst_dir.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    anns: list[dict] = []
    names: set[str] = set()
    lost = 0
    for item in items:
        src = images / item.file_name
        if spec is None or (item.width <= spec.size and item.height <= spec.size):
            _place(src, dst_dir / item.file_name)
            recs = [{"file_name": item.file_name, "height": item.height, "width": item.width, "source": item.file_name}]
            new = [_annotation(0, cats[b.label], b.xyxy, b.crowd) for b in item.boxes]
        else:
            recs, new, dropped = _tile_item(item, src, dst_dir, spec, cats)
            lost += dropped
        for a in new:  # ids from 1, as COCO tools expect; tile indices become image ids
            a["image_id"] = len(records) + a["image_id"] + 1
            anns.append({"id": len(anns) + 1, **a})
        base = len(records)
        records.extend({"id": base + i + 1, **r} for i, r in enumerate(recs))
        for r in recs:
            if r["file_name"] in names:  # e.g. tiles of a.jpg and a.png, or a source already named a_x0_y0.png
                raise AnnotationError(f"{dst_dir / r['file_name']}: two outputs have this name; rename one source")
            names.add(r["file_name"])
        bar.update(1)
    return {"images": records, "annotations": anns, "lost": lost}


def _prepare_out(out: Path, images: Path) -> None:
    """Refuse an --out that overlaps the source; clear image folders an earlier import wrote."""
    o, i = out.resolve(), images.resolve()
    if o == i or o in i.parents or i in o.parents:
        raise AnnotationError(f"{out}: --out and --images {images} overlap; write the COCO set to another folder")
    for split in SPLITS:
        folder = out / "images" / split
        if not folder.is_dir() or not any(folder.iterdir()):
            continue
        ann = out / "annotations" / f"instances_{split}.json"
        try:
            ours = json.loads(ann.read_text(encoding="utf-8")).get("info", {}).get("generator") == GENERATOR
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise AnnotationError(
                f"{folder}: holds files no finished mtpd-data import wrote; choose an empty --out or empty this one"
            )
        shutil.rmtree(folder)  # a rerun must not leave images of the last run that no JSON names


def _write_json(path: Path, data: dict) -> None:
    # Written last and renamed into place: a half-finished run leaves no annotation file behind.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, separators=(",", ":")) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_items(
    fmt: str, images: Path, annotations: Path, classes: list[str] | None, progress: bool = False
) -> list[Item]:
    """The source images and boxes of ``annotations`` in format ``fmt``."""
    if fmt not in FORMATS:
        raise AnnotationError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if not images.is_dir():
        raise AnnotationError(f"{images}: not a folder; pass --images with the folder the annotations refer to")
    if fmt == "voc":
        return read_voc(annotations, images, progress)
    if fmt == "csv":
        return read_csv(annotations, images)
    if classes is None:
        raise AnnotationError("YOLO labels hold class indices: pass --classes names.txt, data.yaml or a,b,c")
    return read_yolo(annotations, images, classes, progress)


def import_dataset(
    fmt: str,
    images: str | os.PathLike,
    annotations: str | os.PathLike,
    out: str | os.PathLike,
    *,
    classes: str | Sequence[str] | None = None,
    tile: TileSpec | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Write ``annotations`` (format ``fmt``: voc, yolo or csv) over ``images`` as a COCO set under ``out``.

    Returns ``{"root", "categories", "train": {...}, "val": {...}}``; each split has ``ann``, ``images``,
    ``num_images`` (written, tiles counted), ``num_sources``, ``num_boxes`` and ``lost_boxes`` (boxes
    no tile showed ``min_visible`` of).
    """
    images, annotations, out = Path(images), Path(annotations), Path(out)
    names = load_classes(classes)
    items = read_items(fmt, images, annotations, names, progress)
    cat_names = category_names(items, names)
    cats = {n: i + 1 for i, n in enumerate(cat_names)}
    splits = split_items(items, val_fraction, seed)
    _prepare_out(out, images)  # only once the input is known good: a bad annotation leaves OUT as it was
    result: dict = {"root": str(out), "categories": cat_names}
    info = {"generator": GENERATOR, "format": fmt, "images": str(images), "annotations": str(annotations)}
    info |= {"val_fraction": val_fraction, "seed": seed, "tile": None if tile is None else vars(tile)}
    with tqdm(total=len(items), desc=f"import {fmt}", unit="img", disable=not progress) as bar:
        for split, part in zip(SPLITS, splits):
            w = _write_split(part, images, out, split, cats, tile, bar)
            ann = out / "annotations" / f"instances_{split}.json"
            categories = [{"id": i, "name": n, "supercategory": ""} for n, i in cats.items()]
            body = {"images": w["images"], "annotations": w["annotations"], "categories": categories}
            _write_json(ann, {"info": {**info, "split": split}, "licenses": [], **body})
            result[split] = {
                "ann": str(ann),
                "images": str(out / "images" / split),
                "num_images": len(w["images"]),
                "num_sources": len(part),
                "num_boxes": len(w["annotations"]),
                "lost_boxes": w["lost"],
            }
    return result
