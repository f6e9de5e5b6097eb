"""`mtpd-cache`: build, inspect and verify teacher stores."""

from __future__ import annotations

import argparse
import json
import sys

from mtpd.cache.schema import PRECISIONS
from mtpd.cli import HelpFormatter, add_trust_flag

EPILOG = """examples:
  mtpd-cache build --teacher retinanet_resnet50_fpn --weights default \\
      --ann coco/annotations/instances_train2017.json --images coco/train2017 \\
      --out stores/r50_train --views orig,hflip --precision compact --device cuda
  mtpd-cache build --teacher mmdet:retinanet_x101_64x4d_fpn_1x_coco --weights x101.pth ...
  mtpd-cache build --teacher mypkg.models:make_teacher --weights none ...
  mtpd-cache info stores/r50_train
  mtpd-cache verify stores/r50_train

Rerunning the same build resumes it: finished shards are skipped.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mtpd-cache",
        description="Run teachers once over a dataset into compressed Zarr stores, and inspect them.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    _build_options(
        sub.add_parser(
            "build",
            help="run a teacher over a COCO-format dataset and write its outputs to a store",
            formatter_class=HelpFormatter,
        )
    )
    i = sub.add_parser("info", help="what a store holds: teacher, dataset, views, outputs, progress, size")
    i.add_argument("store")
    i.add_argument("--json", action="store_true", help="print JSON")
    v = sub.add_parser("verify", help="exit 0 only if every shard is done and matches its checksum")
    v.add_argument("store")
    sub.add_parser("list-teachers", help="print the registered teacher names")
    return p


def _build_options(b: argparse.ArgumentParser) -> None:
    what = b.add_argument_group("what to cache")
    what.add_argument(
        "--teacher",
        required=True,
        help="registered name (see `mtpd-cache list-teachers`), mmdet:CONFIG, or package.module:factory",
    )
    what.add_argument(
        "--weights",
        default="none",
        help="checkpoint path, 'default' (COCO weights from the local torch cache) or 'none' (random "
        "init, seeded: the same command gives the same store)",
    )
    what.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="classes of a randomly initialised teacher (default: the dataset's)",
    )
    what.add_argument("--ann", required=True, help="COCO instances JSON")
    what.add_argument("--images", required=True, help="folder the JSON's file_name entries are relative to")
    what.add_argument("--out", required=True, help="store path or fsspec URL (s3://..., gs://..., file://...)")
    what.add_argument("--views", default="orig", help="comma-separated views: orig, hflip")
    what.add_argument("--short", type=int, default=800, help="short side of the resized view")
    what.add_argument("--long", type=int, default=1333, help="upper bound of the long side")
    what.add_argument(
        "--outputs",
        default=None,
        help="comma-separated outputs (fpn,cls,box,...); default: all dense outputs except RPN",
    )
    what.add_argument(
        "--precision",
        default="lossless",
        choices=list(PRECISIONS),
        help="lossless: fp16; high: BitRound 7 bits; compact: BitRound 5 bits + uint8 log-probabilities",
    )
    _run_options(b.add_argument_group("how to run"))


def _run_options(how: argparse._ArgumentGroup) -> None:
    how.add_argument(
        "--batch-size",
        type=int,
        default=2,
        help="views per teacher forward (only views of equal padded size are batched)",
    )
    how.add_argument(
        "--workers",
        type=int,
        default=1,
        help="Ray workers: CPU processes, or one per GPU with --device cuda (at most the GPU count); "
        "0 runs in this process without Ray",
    )
    how.add_argument(
        "--images-per-shard", type=int, default=16, help="images per shard: the unit of work, of writing and of resume"
    )
    how.add_argument("--device", default="cpu", help="cpu or cuda")
    how.add_argument(
        "--address",
        default=None,
        help="Ray cluster address ('auto' joins a running cluster); default: a local instance, "
        "reachable from this machine only (it binds to 127.0.0.1)",
    )
    how.add_argument(
        "--skip-bad",
        action="store_true",
        help="record unreadable images in the store and go on (training leaves them out); without it the first "
        "one stops the build, naming it",
    )
    how.add_argument(
        "--repair", action="store_true", help="re-check every done shard and rewrite only the damaged or missing ones"
    )
    how.add_argument("--no-progress", action="store_true", help="no progress bar")
    how.add_argument(
        "--verbose", action="store_true", help="show the local Ray instance's start-up messages and worker logs"
    )
    add_trust_flag(how)


def _build(a: argparse.Namespace) -> int:
    from mtpd.cache.build import build_store
    from mtpd.data import CocoDataset, ViewSpec
    from mtpd.teachers.registry import TeacherSpec

    views = ViewSpec(short=a.short, long=a.long, views=tuple(x.strip() for x in a.views.split(",") if x.strip()))
    num_classes = a.num_classes
    if num_classes is None and a.weights == "none":
        num_classes = CocoDataset(a.ann, a.images).num_classes
    teacher = TeacherSpec(a.teacher, a.weights, num_classes, a.device, trust_checkpoint=a.trust_checkpoint)
    outputs = [x.strip() for x in a.outputs.split(",") if x.strip()] if a.outputs else None
    rep = build_store(
        teacher,
        a.ann,
        a.images,
        a.out,
        views=views,
        outputs=outputs,
        precision=a.precision,
        batch_size=a.batch_size,
        workers=a.workers,
        images_per_shard=a.images_per_shard,
        address=a.address,
        progress=not a.no_progress,
        verbose=a.verbose,
        repair=a.repair,
        skip_bad=a.skip_bad,
    )
    rate = rep.images / rep.seconds if rep.seconds else 0.0
    print(
        f"{rep.store}: {rep.shards_written} shards written, {rep.shards_skipped} already done, "
        f"{rep.bytes_written / 2**20:.1f} MiB in {rep.seconds:.1f}s ({rate:.1f} img/s overall)"
    )
    from mtpd.cache.store import StoreReader

    bad = int(StoreReader(rep.store).bad_images().sum()) if not a.address else 0
    if bad:
        print(f"{rep.store}: {bad} unreadable image(s) skipped (--skip-bad); `mtpd-cache info` lists them")
    return 0


def _info(a: argparse.Namespace) -> int:
    from mtpd.cache.inspect import format_info, store_info

    info = store_info(a.store)
    print(json.dumps(info, indent=2) if a.json else format_info(info))
    return 0


def _verify(a: argparse.Namespace) -> int:
    from mtpd.cache.inspect import verify_store

    res = verify_store(a.store, progress=sys.stderr.isatty())
    for s in res.missing:
        print(f"missing  shard {s}: not written (rerun the build command to finish it)")
    for s, why in res.corrupt:
        print(f"corrupt  shard {s}: {why}")
    if res.ok:
        print(f"{a.store}: all {res.shards_total} shards done and verified")
        return 0
    print(f"{a.store}: {len(res.missing)} missing, {len(res.corrupt)} corrupt of {res.shards_total} shards")
    return 1


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    from mtpd.errors import MtpdError

    try:
        if a.cmd == "build":
            return _build(a)
        if a.cmd == "info":
            return _info(a)
        if a.cmd == "verify":
            return _verify(a)
        from mtpd.teachers.registry import available

        print("\n".join(available()))
        return 0
    except MtpdError as e:
        print(f"mtpd-cache: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mtpd-cache: interrupted; finished shards are kept, rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
