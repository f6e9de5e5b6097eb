"""Readers of Pascal VOC XML, YOLO txt and CSV box annotations; every error names its file and line.

Hand-written on the standard library (expat, csv) rather than through a converter library, for
reasons measured on globox 2.9.0 and supervision 0.31.2, the two pure-Python readers of these formats:
- neither names the line of a bad entry: globox says "Error while reading file '.../labels/img3.txt':
  Syntax error in txt annotation file.", supervision names the file only;
- both accept a 6-value YOLO line: globox reads it as `class conf cx cy w h`, silently shifting the
  box (`0 0.5 0.5 0.2 0.2 0.9` on a 64x48 image came back with ymin -12), supervision drops the 6th value;
- globox raises a bare KeyError('ok6') for a label file whose image is missing, and an AssertionError
  or "Syntax error in imagenet annotation file." (no file name) for a bad VOC file;
- supervision decodes every VOC image with OpenCV for its size and pairs XML to image by stem,
  ignoring <filename>; neither reads one-row-per-box CSV.
The formats are a few fields each, so the parsers are short and own their messages.
"""

from __future__ import annotations

import csv
import io
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from xml.parsers import expat

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from mtpd.errors import MtpdError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
YOLO_FIELDS = "class cx cy w h"
CSV_COLUMNS = ("image", "xmin", "ymin", "xmax", "ymax", "label")
# Header names other tools write for the same columns (keras-retinanet, TF object detection CSVs).
CSV_ALIASES = {
    "image": ("image", "filename", "file_name", "image_path", "path", "file"),
    "xmin": ("xmin", "x_min", "x1", "left"),
    "ymin": ("ymin", "y_min", "y1", "top"),
    "xmax": ("xmax", "x_max", "x2", "right"),
    "ymax": ("ymax", "y_max", "y2", "bottom"),
    "label": ("label", "class", "class_name", "category", "name"),
}


class AnnotationError(MtpdError, ValueError):
    """A bad annotation or image reference; the message starts with ``file:line:``."""


@dataclass(frozen=True)
class Box:
    """One box in source-image pixels (xyxy), its class and where it was written."""

    label: str
    xyxy: tuple[float, float, float, float]
    where: str  # "labels/img3.txt:2": for later errors (unknown class)
    crowd: bool = False  # VOC <difficult>: ignored in training and evaluation, as COCO's iscrowd is


@dataclass
class Item:
    """One source image: its path relative to the images folder, size and boxes."""

    file_name: str  # posix path relative to --images
    width: int
    height: int
    where: str  # the annotation that referenced it
    boxes: list[Box] = field(default_factory=list)


# ------------------------------------------------------------------- shared


def image_size(images: Path, rel: str, where: str) -> tuple[int, int]:
    """(width, height) from the image header (nothing is decoded); a missing or unreadable image is named."""
    path = images / rel
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise AnnotationError(f"{where}: image {rel} not found in {images}; check --images") from None
    except (UnidentifiedImageError, OSError) as e:
        raise AnnotationError(f"{where}: image {path} is not a readable image ({e})") from None


def number(text: str | None, what: str, where: str) -> float:
    try:
        v = float(text or "")
    except (TypeError, ValueError):
        raise AnnotationError(f"{where}: {what} is {text!r}, not a number") from None
    if not math.isfinite(v):
        raise AnnotationError(f"{where}: {what} is {text!r}, not a finite number")
    return v


def checked_box(label: str, xyxy: tuple[float, ...], size: tuple[int, int], where: str, crowd: bool = False) -> Box:
    """The box clipped to the image; inverted boxes and boxes wholly outside the image are errors."""
    x0, y0, x1, y1 = xyxy
    if x1 <= x0:
        raise AnnotationError(f"{where}: xmax {x1:g} <= xmin {x0:g}")
    if y1 <= y0:
        raise AnnotationError(f"{where}: ymax {y1:g} <= ymin {y0:g}")
    w, h = size
    c = (min(max(x0, 0.0), w), min(max(y0, 0.0), h), min(max(x1, 0.0), w), min(max(y1, 0.0), h))
    if c[2] <= c[0] or c[3] <= c[1]:
        raise AnnotationError(f"{where}: box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) lies outside the {w}x{h} image")
    return Box(label, c, where, crowd)


def relative_image(images: Path, name: str, where: str) -> str:
    """``name`` as a posix path relative to the images folder (absolute paths must lie inside it)."""
    p = Path(name.strip())
    if p.is_absolute():
        try:
            p = p.relative_to(images.resolve())
        except ValueError:
            raise AnnotationError(f"{where}: image {name} is outside --images {images}") from None
    if not p.parts or ".." in p.parts:
        raise AnnotationError(f"{where}: image name {name!r} must be a path inside --images")
    return p.as_posix()


def _files(folder: Path, suffixes: tuple[str, ...], what: str, option: str = "--annotations") -> list[Path]:
    """Files under ``folder`` (recursively, hidden ones skipped) with one of ``suffixes``, sorted."""
    if not folder.is_dir():
        raise AnnotationError(f"{folder}: not a folder; pass {option} with the folder of {what}")
    return sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in suffixes and p.is_file() and not p.name.startswith(".")
    )


# ---------------------------------------------------------------------- VOC


def _parse_xml(path: Path) -> tuple[ET.Element, dict[int, int]]:
    """The XML tree and each element's line (ElementTree keeps no lines; expat reports them as it parses)."""
    builder = ET.TreeBuilder()
    parser = expat.ParserCreate()
    lines: dict[int, int] = {}
    parser.StartElementHandler = lambda tag, attrs: lines.setdefault(
        id(builder.start(tag, attrs)), parser.CurrentLineNumber
    )
    parser.EndElementHandler = builder.end
    parser.CharacterDataHandler = builder.data
    try:
        with open(path, "rb") as f:
            parser.ParseFile(f)
    except expat.ExpatError as e:
        raise AnnotationError(f"{path}: not XML (line {e.lineno}: {expat.ErrorString(e.code)})") from None
    return builder.close(), lines


def _voc_object(obj: ET.Element, lines: dict[int, int], path: Path, size: tuple[int, int]) -> Box:
    at = lambda el: f"{path}:{lines.get(id(el), '?')}"
    name = (obj.findtext("name") or "").strip()
    if not name:
        raise AnnotationError(f"{at(obj)}: <object> has no <name>")
    bnd = obj.find("bndbox")
    if bnd is None:
        raise AnnotationError(f"{at(obj)}: <object> {name!r} has no <bndbox>")
    coords = []
    for tag in ("xmin", "ymin", "xmax", "ymax"):
        el = bnd.find(tag)
        if el is None:
            raise AnnotationError(f"{at(bnd)}: <bndbox> of {name!r} has no <{tag}>")
        coords.append(number(el.text, f"<{tag}>", at(el)))
    difficult = (obj.findtext("difficult") or "0").strip() not in ("0", "", "false")
    # Coordinates are taken as written (no 1-based shift), as globox, supervision and mmdet 3 read them.
    return checked_box(name, tuple(coords), size, at(bnd), crowd=difficult)


def _voc_size(root: ET.Element, lines: dict[int, int], path: Path, rel: str, actual: tuple[int, int]) -> None:
    """A <size> that disagrees with the image means the XML describes another picture."""
    size = root.find("size")
    if size is None:
        return
    w, h = size.findtext("width"), size.findtext("height")
    try:
        said = (int(float(w or 0)), int(float(h or 0)))
    except ValueError:
        return  # a garbled <size> is not needed: the image header gives the size
    if said != (0, 0) and said != actual:
        raise AnnotationError(
            f"{path}:{lines.get(id(size), '?')}: <size> says {said[0]}x{said[1]} but image {rel} is "
            f"{actual[0]}x{actual[1]}; fix the XML or pair it with the right image"
        )


def read_voc(annotations: Path, images: Path, progress: bool = False) -> list[Item]:
    """One Item per XML file (``<filename>`` relative to ``images``)."""
    items: dict[str, Item] = {}
    paths = _files(annotations, (".xml",), "Pascal VOC XML files")
    for path in tqdm(paths, desc="read voc", unit="file", disable=not progress):
        root, lines = _parse_xml(path)
        fn = root.find("filename")
        if fn is None or not (fn.text or "").strip():
            raise AnnotationError(f"{path}:{lines[id(root)]}: no <filename>; VOC XML names its image there")
        where = f"{path}:{lines[id(fn)]}"
        rel = relative_image(images, fn.text, where)
        if rel in items:
            raise AnnotationError(f"{where}: image {rel} is also described by {items[rel].where.split(':')[0]}")
        size = image_size(images, rel, where)
        _voc_size(root, lines, path, rel, size)
        boxes = [_voc_object(obj, lines, path, size) for obj in root.iter("object")]
        items[rel] = Item(rel, size[0], size[1], where, boxes)
    if not items:
        raise AnnotationError(f"{annotations}: no .xml files found; pass the folder of Pascal VOC XML files")
    return list(items.values())


# --------------------------------------------------------------------- YOLO


def _yolo_line(text: str, where: str, names: list[str], size: tuple[int, int]) -> Box:
    values = text.split()
    if len(values) != 5:
        hint = " (a segmentation polygon? export boxes)" if len(values) > 6 else ""
        raise AnnotationError(f"{where}: 5 values expected ({YOLO_FIELDS}), got {len(values)}{hint}")
    try:
        k = int(values[0])
    except ValueError:
        raise AnnotationError(f"{where}: class {values[0]!r} is not a class index (0..{len(names) - 1})") from None
    if not 0 <= k < len(names):
        raise AnnotationError(f"{where}: unknown class {k}; --classes has {len(names)} names (0..{len(names) - 1})")
    cx, cy, bw, bh = (number(v, f, where) for v, f in zip(values[1:], YOLO_FIELDS.split()[1:]))
    if not all(-1e-3 <= v <= 1 + 1e-3 for v in (cx, cy, bw, bh)):
        raise AnnotationError(f"{where}: cx cy w h must be normalised to 0..1, got {' '.join(values[1:])}")
    w, h = size
    xyxy = ((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h)
    return checked_box(names[k], xyxy, size, where)


def read_yolo(annotations: Path, images: Path, names: list[str], progress: bool = False) -> list[Item]:
    """Every image under ``images``; its boxes from the .txt of the same relative path and stem.

    An image without a label file is a negative (no objects), as YOLO trainers treat it; a label
    file without an image is an error. LabelImg's ``classes.txt`` beside the labels is skipped.
    """
    by_stem: dict[str, str] = {}
    for p in _files(images, IMAGE_SUFFIXES, "images", "--images"):
        rel = p.relative_to(images).as_posix()
        stem = rel.rsplit(".", 1)[0]
        if stem in by_stem:
            raise AnnotationError(f"{images / rel}: {by_stem[stem]} has the same name; YOLO pairs labels by name")
        by_stem[stem] = rel
    labels = [p for p in _files(annotations, (".txt",), "YOLO .txt labels") if p.name != "classes.txt"]
    items = {rel: None for rel in by_stem.values()}
    for path in tqdm(labels, desc="read yolo", unit="file", disable=not progress):
        stem = path.relative_to(annotations).with_suffix("").as_posix()
        if stem not in by_stem:
            raise AnnotationError(
                f"{path}: image {stem}.* not found in {images} (looked for {', '.join(IMAGE_SUFFIXES)})"
            )
        rel = by_stem[stem]
        size = image_size(images, rel, str(path))
        lines = read_text(path).splitlines()
        boxes = [_yolo_line(t, f"{path}:{i}", names, size) for i, t in enumerate(lines, 1) if t.strip()]
        items[rel] = Item(rel, size[0], size[1], str(path), boxes)
    if not labels:
        raise AnnotationError(f"{annotations}: no .txt label files found; pass the folder of YOLO labels")
    for rel, item in items.items():
        if item is None:
            size = image_size(images, rel, str(images / rel))
            items[rel] = Item(rel, size[0], size[1], str(images / rel), [])
    return list(items.values())


# ---------------------------------------------------------------------- CSV


def _is_data(row: list[str]) -> bool:
    """Whether a first row is a box (its coordinates are numbers or empty) rather than a header."""
    try:
        [float(c) for c in row[1:5] if c.strip()]
        return True
    except ValueError:
        return False


def _csv_header(row: list[str], where: str) -> dict[str, int]:
    """Column positions named by a header row."""
    cells = [c.strip().lower() for c in row]
    cols = {}
    for col, names in CSV_ALIASES.items():
        found = [i for i, c in enumerate(cells) if c in names]
        if not found:
            raise AnnotationError(
                f"{where}: header has no {col!r} column (accepted: {', '.join(names)}); got {', '.join(row)}"
            )
        cols[col] = found[0]
    return cols


def _csv_row(
    row: list[str], cols: dict[str, int], width: int, where: str, images: Path, sizes: dict
) -> tuple[str, Box | None]:
    if len(row) != width:
        names = ",".join(CSV_COLUMNS) if width == len(CSV_COLUMNS) else "as the header"
        raise AnnotationError(f"{where}: {width} columns expected ({names}), got {len(row)}")
    v = {c: row[i].strip() for c, i in cols.items()}
    if not v["image"]:
        raise AnnotationError(f"{where}: empty image name")
    rel = relative_image(images, v["image"], where)
    if rel not in sizes:
        sizes[rel] = image_size(images, rel, where)
    if not any(v[c] for c in CSV_COLUMNS[1:]):
        return rel, None  # `image,,,,,`: an image with no objects (keras-retinanet's negatives)
    if not v["label"]:
        raise AnnotationError(f"{where}: empty label")
    xyxy = tuple(number(v[c], c, where) for c in CSV_COLUMNS[1:5])
    return rel, checked_box(v["label"], xyxy, sizes[rel], where)


def read_text(path: Path) -> str:
    """A text file's contents; a file that is not UTF-8 is an error naming the file and line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise AnnotationError(f"{path}:{line}: not UTF-8 text ({e.reason}); save it as UTF-8") from None


def read_csv(path: Path, images: Path) -> list[Item]:
    """One row per box: image,xmin,ymin,xmax,ymax,label (pixels); an optional header row may reorder them."""
    if not path.is_file():
        raise AnnotationError(f"{path}: CSV file not found; pass --annotations with the CSV of boxes")
    items: dict[str, Item] = {}
    sizes: dict[str, tuple[int, int]] = {}
    cols: dict[str, int] | None = None
    width = len(CSV_COLUMNS)
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    try:
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if not any(c.strip() for c in row):
                continue
            if cols is None:
                if not _is_data(row):
                    cols, width = _csv_header(row, where), len(row)
                    continue
                cols = {c: i for i, c in enumerate(CSV_COLUMNS)}
            rel, box = _csv_row(row, cols, width, where, images, sizes)
            item = items.setdefault(rel, Item(rel, *sizes[rel], where))
            if box is not None:
                item.boxes.append(box)
    except csv.Error as e:  # a NUL byte, an unclosed quote
        raise AnnotationError(f"{path}:{reader.line_num}: {e}") from None
    if not items:
        raise AnnotationError(f"{path}: no rows; expected {','.join(CSV_COLUMNS)} per box")
    return list(items.values())
