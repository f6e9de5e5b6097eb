"""mtpd-data: write benchmark datasets in COCO format.

mtpd-data digits --out data/digits --train 2000 --val 400 --size 128 --seed 0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

DIGITS_HELP = """\
Write the digits detection benchmark: real handwritten digits (scikit-learn's
bundled UCI set, 1797 8x8 bitmaps) drawn 2-6 per image at mixed scales (digit
height from size/16 to size/2 pixels) with random ink and background colours,
on backgrounds cluttered with blotches, faint strokes, unannotated digit
fragments and noise. 10 classes (category ids 1..10 named "0".."9").

Train and val use disjoint halves of the 1797 bitmaps, so val handwriting is
unseen in training. The same arguments always give byte-identical files.

Output:
  OUT/images/train/000000.png ...    RGB PNGs, SIZE x SIZE
  OUT/images/val/000000.png ...
  OUT/annotations/instances_train.json   COCO instances (file_name relative
  OUT/annotations/instances_val.json     to the split's image folder)
"""


def _count(text: str) -> int:
    """argparse type: a non-negative image count."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _size(text: str) -> int:
    """argparse type: an image side the digits set supports."""
    from mtpd.data.digits import MAX_SIZE, MIN_SIZE

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of pixels, got {text!r}") from None
    if not MIN_SIZE <= value <= MAX_SIZE:
        raise argparse.ArgumentTypeError(f"must be between {MIN_SIZE} and {MAX_SIZE} pixels, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtpd-data",
        description="Write benchmark datasets in COCO format (images/ + annotations/instances_*.json).",
    )
    sub = parser.add_subparsers(dest="command", metavar="DATASET", required=True)
    digits = sub.add_parser(
        "digits",
        help="handwritten digits on cluttered backgrounds (10 classes, offline, seconds to build)",
        description=DIGITS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    digits.add_argument(
        "--out", type=Path, required=True, help="output folder (created; existing files of the set are overwritten)"
    )
    digits.add_argument("--train", type=_count, default=2000, help="number of training images (default: %(default)s)")
    digits.add_argument("--val", type=_count, default=400, help="number of validation images (default: %(default)s)")
    digits.add_argument("--size", type=_size, default=128, help="image side in pixels, square (default: %(default)s)")
    digits.add_argument(
        "--seed", type=_count, default=0, help="random seed; same seed, same bytes (default: %(default)s)"
    )
    digits.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _run_digits(args: argparse.Namespace) -> int:
    from mtpd.data.digits import make_digits

    total = args.train + args.val
    with tqdm(total=total, desc="digits", unit="img", disable=args.quiet or total == 0) as bar:
        result = make_digits(args.out, args.train, args.val, args.size, args.seed, progress=bar.update)
    images = sum(result[s]["num_images"] for s in ("train", "val"))
    boxes = sum(result[s]["num_boxes"] for s in ("train", "val"))
    for split in ("train", "val"):
        r = result[split]
        print(f"  {split}: {r['num_images']} images, {r['num_boxes']} boxes -> {r['images']} + {r['ann']}")
    print(f"wrote {images} images and {boxes} boxes to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits on --help and bad arguments; callers get an exit code instead
        return e.code if isinstance(e.code, int) else 2
    handlers = {"digits": _run_digits}  # argparse has already rejected unknown names
    try:
        return handlers[args.command](args)
    except (ValueError, TypeError, ImportError, OSError) as e:
        # Expected failures (unwritable --out, missing scikit-learn) get one line, not a traceback.
        print(f"mtpd-data {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
