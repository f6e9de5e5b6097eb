"""The digits benchmark set: a small COCO-format detection dataset made offline.

Each image holds a few real handwritten digits (scikit-learn's bundled copy of
the UCI "optical recognition of handwritten digits" set: 1797 8×8 bitmaps with
16 grey levels) drawn at mixed scales on a cluttered background. It builds in
seconds and trains on a CPU, yet a detector has to learn shapes, not colours:
ink and background colours are random, and the clutter (smooth blotches, stray
strokes, faint fragments of digits, pixel noise) is never annotated.

Train and val draw from disjoint halves of the 1797 bitmaps, so val digits are
handwriting the model never saw. The same arguments give byte-identical files:
all randomness comes from one numpy generator per split, spawned from the seed,
and nothing depends on time or dict order.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SPLITS = ("train", "val")
# The unlabelled pool: a third stream of the seed (train's and val's bytes do not change with it), drawing the
# train half's handwriting, written without annotations; its labels go to a separate file, withheld.
POOL = "pool"
CATEGORIES = [{"id": d + 1, "name": str(d), "supercategory": "digit"} for d in range(10)]
MIN_SIZE = 32
MAX_SIZE = 4096
DIGITS_PER_IMAGE = (2, 6)  # inclusive; placement drops a digit that finds no free spot
MAX_IOU = 0.1  # digits may touch or overlap a little, as handwriting does
# IoU alone lets a small digit sit inside a large one's box (tiny IoU, full
# occlusion); bounding the overlap relative to the smaller box forbids that.
MAX_OVERLAP_OF_SMALLER = 0.25
MIN_CONTRAST = 90.0  # luma difference between ink and background, out of 255
INK_THRESHOLD = 0.3  # coverage above which a pixel counts as drawn ink (for the box)
PLACE_TRIES = 12
_FILE_RE = re.compile(r"^\d{6}\.png$")

ProgressFn = Callable[[int], None]


@dataclass(frozen=True)
class Glyph:
    """A rendered digit: coverage in [0, 1] and its ink box inside the patch."""

    alpha: np.ndarray  # [h, w] float32
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive) of pixels >= INK_THRESHOLD


# ---------------------------------------------------------------- source data


@functools.lru_cache(maxsize=1)
def _load_source() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's digits as (bitmaps [N, 8, 8] float32 in [0, 1], labels [N] int64)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(
            "the digits dataset needs scikit-learn (it ships the handwritten digits); "
            "install it with `pip install 'mtpd[bench]'` or `pip install scikit-learn`"
        ) from None
    digits = load_digits()
    return digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64)


def source_indices(split: str) -> np.ndarray:
    """Indices into sklearn's 1797 digits that ``split`` draws from.

    A contiguous split (first half train, second half val) rather than a random
    one because the file is roughly ordered by writer: contiguous halves keep
    most writers out of one of the two splits.
    """
    n = len(_load_source()[1])
    half = n // 2
    if split in ("train", POOL):
        return np.arange(0, half)
    if split == "val":
        return np.arange(half, n)
    raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")


# ------------------------------------------------------------------ rendering


def _luma(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114]))


def _ink_color(rng: np.random.Generator, bg: np.ndarray) -> np.ndarray:
    """A random colour at least MIN_CONTRAST luma away from ``bg``."""
    for _ in range(32):
        ink = rng.uniform(0, 255, 3)
        if abs(_luma(ink) - _luma(bg)) >= MIN_CONTRAST:
            return ink
    # Rejection rarely fails; fall back to whichever of black/white is farther.
    return np.zeros(3) if _luma(bg) > 127.5 else np.full(3, 255.0)


def _coverage(bitmap: np.ndarray, height: float, rng: np.random.Generator) -> np.ndarray:
    """Upsample an [h, w] bitmap smoothly so its rows span ``height`` pixels.

    Bicubic upsampling of the 16-level grid gives soft blobs; a narrow ramp on
    the result turns them into strokes with about one pixel of antialiasing,
    and a random ramp centre varies stroke thickness like different pens.
    """
    padded = np.pad(bitmap, 1)  # zero border: the cubic kernel must not clip strokes at the edge
    rows, cols = bitmap.shape
    scale = height / rows
    aspect = rng.uniform(0.8, 1.25)
    out_w = max(2, round((cols + 2) * scale * aspect))
    out_h = max(2, round((rows + 2) * scale))
    img = Image.fromarray((padded * 255).astype(np.uint8)).resize((out_w, out_h), Image.Resampling.BICUBIC)
    angle = rng.uniform(-12.0, 12.0)
    img = img.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
    v = np.asarray(img, dtype=np.float32) / 255.0
    centre = rng.uniform(0.4, 0.6)
    width = float(np.clip(1.5 / scale, 0.05, 0.4))  # ~1 px ramp whatever the scale
    return np.clip((v - (centre - width / 2)) / width, 0.0, 1.0)


def _crop_to_ink(alpha: np.ndarray) -> Glyph | None:
    """Trim empty margins and find the tight box of visible ink."""
    visible = np.nonzero(alpha > 0.0)
    if visible[0].size == 0:
        return None
    alpha = alpha[visible[0].min() : visible[0].max() + 1, visible[1].min() : visible[1].max() + 1]
    ys, xs = np.nonzero(alpha >= INK_THRESHOLD)
    if ys.size == 0:
        return None
    return Glyph(alpha, (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))


def render_glyph(bitmap: np.ndarray, height: float, rng: np.random.Generator) -> Glyph | None:
    """Render one 8×8 digit bitmap with its ink ``height`` pixels tall (before rotation)."""
    rows = np.nonzero(bitmap.max(axis=1) >= 0.2)[0]
    cols = np.nonzero(bitmap.max(axis=0) >= 0.2)[0]
    if rows.size == 0:
        return None
    # Crop to the inked cells first so ``height`` is the digit's height, not the 8×8 cell's.
    core = bitmap[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    return _crop_to_ink(_coverage(core, height, rng))


def render_fragment(bitmap: np.ndarray, height: float, rng: np.random.Generator) -> Glyph | None:
    """A random 3–4 cell window of a digit: stroke-like clutter that is not a digit."""
    h, w = int(rng.integers(3, 5)), int(rng.integers(3, 5))
    y, x = int(rng.integers(0, 9 - h)), int(rng.integers(0, 9 - w))
    window = bitmap[y : y + h, x : x + w]
    if window.max() < 0.3:
        return None
    return _crop_to_ink(_coverage(window, height, rng))


def _blend(canvas: np.ndarray, alpha: np.ndarray, color: np.ndarray, x: int, y: int) -> None:
    h, w = alpha.shape
    region = canvas[y : y + h, x : x + w]
    a = alpha[..., None]
    region *= 1.0 - a
    region += a * color


def _background(rng: np.random.Generator, size: int, bg: np.ndarray) -> np.ndarray:
    """Base colour plus smooth low-contrast blotches (a bicubic-upsampled random grid)."""
    cells = int(rng.integers(3, 7))
    grid = rng.normal(0.0, rng.uniform(6.0, 16.0), (cells, cells, 3)).astype(np.float32)
    field = np.stack(
        [np.asarray(Image.fromarray(grid[..., c]).resize((size, size), Image.Resampling.BICUBIC)) for c in range(3)],
        axis=-1,
    )
    return bg.astype(np.float32) + field


def _strokes(rng: np.random.Generator, canvas: np.ndarray, bg: np.ndarray) -> None:
    """A few faint random lines and ellipses: edges a detector must learn to ignore."""
    size = canvas.shape[0]
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    for _ in range(int(rng.integers(0, 4))):
        pts = [tuple(float(v) for v in rng.uniform(0, size, 2)) for _ in range(int(rng.integers(2, 4)))]
        draw.line(pts, fill=255, width=int(rng.integers(1, max(2, size // 48) + 1)))
    for _ in range(int(rng.integers(0, 3))):
        x0, y0 = rng.uniform(-size / 8, size, 2)
        r = rng.uniform(size / 32, size / 6, 2)
        draw.ellipse([float(x0), float(y0), float(x0 + r[0]), float(y0 + r[1])], fill=int(rng.integers(60, 160)))
    alpha = np.asarray(mask, dtype=np.float32) / 255.0 * rng.uniform(0.15, 0.4)
    _blend(canvas, alpha, _ink_color(rng, bg), 0, 0)


def _overlaps(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Whether two xyxy boxes overlap more than a placement may."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return False
    inter = iw * ih
    area_a, area_b = (a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])
    iou = inter / (area_a + area_b - inter)
    return iou > MAX_IOU or inter / min(area_a, area_b) > MAX_OVERLAP_OF_SMALLER


def _height_range(size: int) -> tuple[float, float]:
    """8–64 px digits at 128 px, scaled with the image (never below 6 px: unreadable)."""
    return max(6.0, 8.0 * size / 128), size / 2


def render_image(
    rng: np.random.Generator, size: int, bitmaps: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, list[tuple[int, tuple[int, int, int, int]]]]:
    """One uint8 RGB image and its (digit, xyxy box) list, drawn from ``bitmaps``."""
    bg = rng.uniform(0, 255, 3)
    canvas = _background(rng, size, bg)
    _strokes(rng, canvas, bg)
    lo, hi = _height_range(size)
    log_lo, log_hi = np.log(lo), np.log(hi)  # log-uniform heights: small digits are as common as large

    # Faint digit fragments go under the digits and stay unannotated (hard negatives).
    for _ in range(int(rng.integers(0, 3))):
        frag = render_fragment(bitmaps[rng.integers(len(bitmaps))], float(np.exp(rng.uniform(log_lo, log_hi))) / 2, rng)
        if frag is not None and frag.alpha.shape[0] <= size and frag.alpha.shape[1] <= size:
            x = int(rng.integers(0, size - frag.alpha.shape[1] + 1))
            y = int(rng.integers(0, size - frag.alpha.shape[0] + 1))
            _blend(canvas, frag.alpha * rng.uniform(0.25, 0.45), _ink_color(rng, bg), x, y)

    placed: list[tuple[int, tuple[int, int, int, int]]] = []
    target = int(rng.integers(DIGITS_PER_IMAGE[0], DIGITS_PER_IMAGE[1] + 1))
    # Spare attempts replace digits that were too wide or found no free spot,
    # so every image gets at least one (in practice nearly always ``target``).
    for _ in range(3 * target):
        if len(placed) == target:
            break
        k = int(rng.integers(len(bitmaps)))
        glyph = render_glyph(bitmaps[k], float(np.exp(rng.uniform(log_lo, log_hi))), rng)
        if glyph is None:
            continue
        gh, gw = glyph.alpha.shape
        if gh > size or gw > size:
            continue
        for _ in range(PLACE_TRIES):
            x = int(rng.integers(0, size - gw + 1))
            y = int(rng.integers(0, size - gh + 1))
            bx0, by0, bx1, by1 = glyph.box
            box = (x + bx0, y + by0, x + bx1, y + by1)
            if not any(_overlaps(box, other) for _, other in placed):
                _blend(canvas, glyph.alpha, _ink_color(rng, bg), x, y)
                placed.append((int(labels[k]), box))
                break

    canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * np.float32(rng.uniform(1.5, 6.0))
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), placed


# -------------------------------------------------------------------- writing


def _check_args(train: int, val: int, size: int, seed: int, pool: int = 0) -> None:
    for name, value in (("train", train), ("val", val), ("size", size), ("seed", seed), ("pool", pool)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an integer, got {value!r}")
    if train < 0 or val < 0 or pool < 0:
        raise ValueError(f"image counts must be >= 0, got train={train}, val={val}, pool={pool}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(
            f"size must be between {MIN_SIZE} and {MAX_SIZE} pixels, got {size}; digits need room to be legible"
        )
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")


def _write_json_atomic(path: Path, data: dict) -> None:
    # Written last and renamed into place: a half-finished run leaves no annotation file behind.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, separators=(",", ":")) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _make_split(
    out: Path, split: str, count: int, size: int, seed: int, rng: np.random.Generator, progress: ProgressFn | None
) -> dict:
    bitmaps_all, labels_all = _load_source()
    idx = source_indices(split)
    bitmaps, labels = bitmaps_all[idx], labels_all[idx]
    image_dir = out / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        pixels, boxes = render_image(rng, size, bitmaps, labels)
        file_name = f"{i:06d}.png"
        # Fast zlib level: the pixel noise barely compresses, and level 6 costs twice the time.
        Image.fromarray(pixels).save(image_dir / file_name, format="PNG", compress_level=1)
        image_id = i + 1  # ids from 1: COCO tools treat 0 as "no match"
        images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
        for digit, (x0, y0, x1, y1) in boxes:
            w, h = float(x1 - x0), float(y1 - y0)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": digit + 1,
                    "bbox": [float(x0), float(y0), w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        if progress is not None:
            progress(1)
    # A rerun with fewer images must not leave stale files that look like part of the set.
    keep = {im["file_name"] for im in images}
    for stale in sorted(p for p in image_dir.iterdir() if _FILE_RE.match(p.name) and p.name not in keep):
        stale.unlink()
    info = {
        "description": "mtpd digits: handwritten digits (sklearn load_digits) on cluttered backgrounds",
        "generator": "mtpd.data.digits.make_digits",
        "split": split,
        "seed": seed,
        "size": size,
        "num_images": count,
        "digit_height_px": list(_height_range(size)),
        "source_indices": [int(idx[0]), int(idx[-1]) + 1],  # half-open range into load_digits()
    }
    ann_path = out / "annotations" / f"instances_{split}.json"
    ann_path.parent.mkdir(parents=True, exist_ok=True)
    coco = {"info": info, "licenses": [], "images": images, "annotations": annotations, "categories": CATEGORIES}
    result = {"ann": str(ann_path), "images": str(image_dir), "num_images": count, "num_boxes": len(annotations)}
    if split == POOL:  # the labels exist (they measure pseudo-labels) but not in the file a student trains from
        withheld = out / "annotations" / "withheld_pool.json"
        _write_json_atomic(withheld, coco)
        coco = {**coco, "info": {**info, "unlabelled": True}, "annotations": []}
        result |= {"num_boxes": 0, "withheld": str(withheld)}
    _write_json_atomic(ann_path, coco)
    return result


def make_digits(
    out: str | os.PathLike,
    train: int,
    val: int,
    size: int = 128,
    seed: int = 0,
    *,
    pool: int = 0,
    progress: ProgressFn | None = None,
) -> dict:
    """Write the digits detection set under ``out`` and describe what was written.

    Layout: ``out/images/{train,val}/NNNNNN.png`` (RGB, size×size) and
    ``out/annotations/instances_{train,val}.json`` (COCO instances; category
    ids 1..10 named "0".."9"; file names relative to the split's image folder).
    ``progress`` is called with 1 after each image (for a progress bar).

    ``pool``: also write an unlabelled pool of that many images (``images/pool``,
    ``annotations/instances_pool.json`` with no annotations; the labels go to
    ``annotations/withheld_pool.json``), from its own stream of the seed and the
    train half's handwriting; train and val are the same bytes with or without it.

    Returns ``{"root": str, "train": {...}, "val": {...}}`` (and ``"pool"``) where
    each split has ``ann``, ``images``, ``num_images`` and ``num_boxes``.
    """
    _check_args(train, val, size, seed, pool)
    root = Path(out)
    _load_source()  # fail on a missing scikit-learn before creating any folders
    # One independent stream per split: val's images do not change when --train does.
    # (a SeedSequence's i-th child is the same however many are spawned: the pool's stream leaves the others be)
    streams = np.random.SeedSequence(int(seed)).spawn(len(SPLITS) + 1)
    result: dict = {"root": str(root)}
    counts = (int(train), int(val)) + ((int(pool),) if pool else ())
    for split, count, ss in zip((*SPLITS, POOL), counts, streams):
        result[split] = _make_split(root, split, count, int(size), int(seed), np.random.default_rng(ss), progress)
    return result
