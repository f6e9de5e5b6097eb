"""mtpd-data: make COCO-format datasets (the digits benchmark, or an import of VOC/YOLO/CSV boxes).

mtpd-data digits --out data/digits --train 2000 --val 400 --size 128 --seed 0
mtpd-data import --format voc --images VOC2012/JPEGImages --annotations VOC2012/Annotations --out data/voc
mtpd-data pool --images frames/ --out data/pool.json --categories-from data/voc/annotations/instances_train.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from mtpd.errors import MtpdError, message

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

With --pool N, also an unlabelled pool of N images from the train half's
handwriting and a stream of its own (train and val keep their bytes):
  OUT/images/pool/000000.png ...
  OUT/annotations/instances_pool.json    COCO images, no annotations
  OUT/annotations/withheld_pool.json     the pool's labels, kept apart
"""

POOL_HELP = """List a folder of unlabelled images (recursive; jpg, jpeg, png, webp) as a COCO
file with no annotations: an image set `mtpd-cache build` caches a teacher over
and a plan's data.pool_ann trains students on (with losses that need no labels).

Image ids are 1..N in path order, file names relative to --images, sizes read
from each file's header; the same folder always gives the same file, so its
stores keep their identity. --categories-from copies a labelled set's
categories, so both files name the same classes.
"""

IMPORT_HELP = """\
Convert box annotations to mtpd's COCO layout (the digits set's), split by
image into train and val, and optionally cut large images into tiles.

Formats (--annotations):
  voc   a folder of Pascal VOC XML files; <filename> is relative to --images;
        coordinates are read as written; <difficult>1 becomes iscrowd (ignored)
  yolo  a folder of .txt files, one per image of the same name under --images,
        one box a line: class cx cy w h, normalised to 0..1; needs --classes;
        an image without a .txt is a negative (no objects)
  csv   one file, one box a row: image,xmin,ymin,xmax,ymax,label (pixels;
        image relative to --images); an optional header row may name the
        columns in another order; a row `image,,,,,` is an image with no boxes

Classes: category ids are 1..K in --classes order (a names.txt with one name
a line, a data.yaml's names, or a list like cat,dog), else sorted by name;
with --classes, any other name in the annotations is an error.

Tiling (--tile N): tiles of N x N pixels, stride N - overlap, the last tile
flush with the border; a box goes to every tile that shows at least
--min-visible of its area, clipped to the tile. Tiles without boxes are kept
(negatives); images no larger than a tile are kept whole.

Output:
  OUT/images/{train,val}/<path under IMAGES>    hard links (copies across file
                                                systems) of untiled images
  OUT/images/{train,val}/<stem>_x<X>_y<Y>.png   tiles
  OUT/annotations/instances_{train,val}.json    COCO instances (file_name
                                                relative to the split's folder)

Errors name the file and line at fault, e.g.
  labels/img3.txt:2: 5 values expected (class cx cy w h), got 4
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


def _fraction(text: str) -> float:
    """argparse type: a number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def _add_import(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import",
        help="convert Pascal VOC XML, YOLO txt or CSV boxes to COCO, with a train/val split and optional tiling",
        description=IMPORT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--format", required=True, choices=["voc", "yolo", "csv"], help="annotation format")
    p.add_argument(
        "--images", type=Path, required=True, metavar="DIR", help="folder the annotations' image names are relative to"
    )
    p.add_argument(
        "--annotations",
        type=Path,
        required=True,
        metavar="PATH",
        help="VOC: folder of .xml; YOLO: folder of .txt; CSV: the file",
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="output folder (a rerun replaces what an earlier import wrote there)",
    )
    p.add_argument(
        "--classes", metavar="FILE_OR_LIST", help="names.txt, data.yaml or a,b,c: class names in category-id order"
    )
    p.add_argument("--tile", type=_count, metavar="N", help="cut images larger than N x N pixels into N x N tiles")
    p.add_argument("--overlap", type=_count, metavar="M", help="pixels shared by neighbouring tiles (default: 0)")
    p.add_argument(
        "--min-visible", type=float, metavar="F", help="area fraction a tile must show to keep a box (default: 0.5)"
    )
    p.add_argument(
        "--val-fraction",
        type=_fraction,
        default=0.2,
        metavar="F",
        help="share of images (before tiling) in val (default: 0.2)",
    )
    p.add_argument(
        "--seed", type=_count, default=0, metavar="S", help="seed of the split; same seed, same split (default: 0)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_pool(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pool",
        help="list a folder of unlabelled images as a COCO file with no annotations (a pool to distil from)",
        description=POOL_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--images", type=Path, required=True, help="the folder of images (searched recursively)")
    p.add_argument("--out", type=Path, required=True, help="the COCO file to write, e.g. data/pool.json")
    p.add_argument("--categories-from", type=Path, metavar="ANN", help="copy the categories of this COCO file")
    p.add_argument("--skip-bad", action="store_true", help="leave unreadable images out instead of stopping")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtpd-data",
        description="Make datasets in COCO format (images/{train,val}/ + annotations/instances_{train,val}.json).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    digits = sub.add_parser(
        "digits",
        help="write the digits benchmark: handwritten digits on cluttered backgrounds (10 classes, offline)",
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
    digits.add_argument(
        "--pool", type=_count, default=0, help="also write an unlabelled pool of N images (default: none)"
    )
    digits.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_import(sub)
    _add_pool(sub)
    return parser


def _run_digits(args: argparse.Namespace) -> int:
    from mtpd.data.digits import make_digits

    total = args.train + args.val + args.pool
    with tqdm(total=total, desc="digits", unit="img", disable=args.quiet or total == 0) as bar:
        result = make_digits(args.out, args.train, args.val, args.size, args.seed, pool=args.pool, progress=bar.update)
    splits = [s for s in ("train", "val", "pool") if s in result]
    images = sum(result[s]["num_images"] for s in splits)
    boxes = sum(result[s]["num_boxes"] for s in splits)
    for split in splits:
        r = result[split]
        held = f" (labels withheld in {r['withheld']})" if "withheld" in r else ""
        print(f"  {split}: {r['num_images']} images, {r['num_boxes']} boxes -> {r['images']} + {r['ann']}{held}")
    print(f"wrote {images} images and {boxes} boxes to {args.out}")
    return 0


def _run_import(args: argparse.Namespace) -> int:
    from mtpd.data.importer import import_dataset
    from mtpd.data.tiling import TileSpec

    if args.tile is None and (args.overlap is not None or args.min_visible is not None):
        raise ValueError("--overlap and --min-visible apply to tiles: add --tile N")
    overlap = 0 if args.overlap is None else args.overlap
    min_visible = 0.5 if args.min_visible is None else args.min_visible
    tile = None if args.tile is None else TileSpec(args.tile, overlap, min_visible)
    result = import_dataset(
        args.format,
        args.images,
        args.annotations,
        args.out,
        classes=args.classes,
        tile=tile,
        val_fraction=args.val_fraction,
        seed=args.seed,
        progress=not args.quiet,
    )
    names = result["categories"]
    print(f"  categories 1..{len(names)}: {', '.join(names[:10])}{', ...' if len(names) > 10 else ''}")
    for split in ("train", "val"):
        r = result[split]
        tiles = f" ({r['num_sources']} source images)" if tile is not None else ""
        print(f"  {split}: {r['num_images']} images{tiles}, {r['num_boxes']} boxes -> {r['images']} + {r['ann']}")
    lost = result["train"]["lost_boxes"] + result["val"]["lost_boxes"]
    if lost:
        print(f"  {lost} boxes are in no tile (no tile shows --min-visible {min_visible} of them)")
    images = result["train"]["num_images"] + result["val"]["num_images"]
    boxes = result["train"]["num_boxes"] + result["val"]["num_boxes"]
    print(f"wrote {images} images and {boxes} boxes to {args.out}")
    return 0


def _run_pool(args: argparse.Namespace) -> int:
    from mtpd.data.pool import find_images, write_pool

    total = len(find_images(args.images))
    with tqdm(total=total, desc="pool", unit="img", disable=args.quiet or total == 0) as bar:
        r = write_pool(args.images, args.out, args.categories_from, args.skip_bad, progress=bar.update)
    for path in r["skipped"]:
        print(f"  skipped (unreadable): {path}")
    print(f"wrote {r['num_images']} unlabelled images -> {r['ann']} (file names relative to {r['images']})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits on --help and bad arguments; callers get an exit code instead
        return e.code if isinstance(e.code, int) else 2
    # argparse has already rejected unknown names
    handlers = {"digits": _run_digits, "import": _run_import, "pool": _run_pool}
    try:
        return handlers[args.command](args)
    except (MtpdError, ValueError, TypeError, ImportError, OSError) as e:
        # Expected failures (a bad annotation, unwritable --out, missing scikit-learn) get one line, not a traceback.
        print(f"mtpd-data: error: {message(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
