"""`mtpd-cache`: build, inspect and verify teacher stores."""

from __future__ import annotations

import argparse
import json
import sys

from mtpd.cli import HelpFormatter, add_trust_flag
from mtpd.cli import catalog as catalog_cli
from mtpd.cli.options import teacher_and_data, teacher_spec

EPILOG = """examples:
  mtpd-cache build --teacher retinanet_resnet50_fpn --weights default \\
      --ann coco/annotations/instances_train2017.json --images coco/train2017 \\
      --out stores/r50_train --views orig,hflip --precision compact --device cuda
  mtpd-cache build --teacher mmdet:retinanet_x101_64x4d_fpn_1x_coco --weights x101.pth ...
  mtpd-cache build --teacher mypkg.models:make_teacher --weights none ...
  mtpd-cache onnx-map model.onnx --out model.yaml       # draft the mapping an ONNX teacher needs
  mtpd-cache build --teacher onnx:model.yaml ...
  mtpd-cache info stores/r50_train
  mtpd-cache verify stores/r50_train
  mtpd-cache estimate --teacher retinanet_resnet50_fpn --weights default --ann ... --images ... --sample 32
  mtpd-cache build --teacher ... --ann ... --images ...        # no --out: under the cache root, by identity
  mtpd-cache ls
  mtpd-cache rm --unused-days 90

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
    r = sub.add_parser(
        "resample-error",
        help="measure how far a plain store's features warped onto augmented views are from its teacher's own "
        "(data.augment.resample), and record it in the store",
    )
    r.add_argument("store")
    r.add_argument("--ann", required=True, help="the store's COCO annotation file")
    r.add_argument("--images", required=True, help="the store's image folder")
    r.add_argument("--augment", required=True, help="the plan's policy, e.g. scale=0.75:1.33 (crop, flip as in plans)")
    r.add_argument("--weights", default=None, help="the teacher's weights, if they moved since the build")
    r.add_argument("--n-images", type=int, default=8, help="images measured (default: 8)")
    r.add_argument("--draws", type=int, default=4, help="augmented views drawn per image (default: 4)")
    o = sub.add_parser(
        "onnx-map",
        help="draft the mapping file an ONNX teacher needs (--teacher onnx:MAPPING.yaml): the graph's [B, C, h, w] "
        "tensors by level, with guesses of the neck and heads to check",
    )
    o.add_argument("graph", help="the .onnx file")
    o.add_argument(
        "--size",
        type=int,
        nargs="+",
        metavar="N",
        help="input H W (or N for N x N) to lay the tensors out for (default: the graph's fixed input size)",
    )
    o.add_argument("--out", default=None, help="write the draft here (default: print it)")
    catalog_cli.add_parsers(sub)
    return p


def _build_options(b: argparse.ArgumentParser) -> None:
    teacher_and_data(b.add_argument_group("what to cache"))
    where = b.add_argument_group("where")
    where.add_argument(
        "--out",
        default=None,
        help="store path or fsspec URL (s3://..., gs://..., file://...); default: under the cache root, named by "
        "the store's identity (an existing complete store is reused, a partial one resumed)",
    )
    where.add_argument("--root", default=None, help="cache root (default: $MTPD_CACHE_ROOT, else ~/.cache/mtpd)")
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
    from mtpd.cache.build import build_stores
    from mtpd.errors import MtpdError

    teacher, views = teacher_spec(a)
    outputs = [x.strip() for x in a.outputs.split(",") if x.strip()] if a.outputs else None
    several = len(a.precision) > 1
    if several and a.out and "{precision}" not in a.out:
        raise MtpdError(
            f"--out {a.out}: several precisions need one store each: put {{precision}} in the path "
            "(e.g. stores/teacher-{precision}), or leave --out out to build under the cache root"
        )
    outs = [a.out.replace("{precision}", p) if a.out else None for p in a.precision]
    reports = build_stores(
        teacher,
        a.ann,
        a.images,
        a.precision,
        outs,
        views=views,
        root=a.root,
        outputs=outputs,
        batch_size=a.batch_size,
        workers=a.workers,
        images_per_shard=a.images_per_shard,
        address=a.address,
        progress=not a.no_progress,
        verbose=a.verbose,
        repair=a.repair,
        skip_bad=a.skip_bad,
    )
    for rep in reports:
        rate = rep.images / rep.seconds if rep.seconds else 0.0
        if rep.shards_written == 0 and rep.shards_skipped == rep.shards_total:
            print(f"{rep.store}: complete already (same teacher, data, views, outputs and precision): nothing to do")
            continue
        print(
            f"{rep.store}: {rep.shards_written} shards written, {rep.shards_skipped} already done, "
            f"{rep.bytes_written / 2**20:.1f} MiB in {rep.seconds:.1f}s ({rate:.1f} img/s overall"
            f"{', one teacher pass for ' + str(len(reports)) + ' stores' if several else ''})"
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


def _resample_error(a: argparse.Namespace) -> int:
    from mtpd.cache.resample_error import record_resample_error
    from mtpd.cache.resample_record import format_resample_error
    from mtpd.data.augment import AugmentPolicy

    policy = AugmentPolicy.parse(a.augment)
    err = record_resample_error(a.store, a.ann, a.images, policy, a.weights, a.n_images, a.draws)
    print(f"{a.store}: relative RMSE of resampled features against the teacher on {a.n_images} images x {a.draws} "
          f"views ({a.augment}), recorded in the store: {format_resample_error(err)}")  # fmt: skip
    return 0


def _onnx_map(a: argparse.Namespace) -> int:
    from pathlib import Path

    from mtpd.errors import MtpdError
    from mtpd.teachers.onnx_map import draft_mapping, render

    if a.size is not None and len(a.size) not in (1, 2):
        raise MtpdError(f"--size: give H W or one N, got {len(a.size)} numbers")
    size = None if a.size is None else (a.size[0], a.size[-1])
    out = Path(a.out) if a.out else None
    if out is not None and out.exists():
        raise MtpdError(f"--out {out}: exists already; a draft never replaces a mapping: give another path")
    draft = draft_mapping(a.graph, size)
    text = render(draft, out.parent if out else Path.cwd())
    if out is None:
        sys.stdout.write(text)
        return 0
    out.write_text(text)
    found = ", ".join(f"{k} ({o['kind']}, levels {', '.join(map(str, o['levels']))})" for k, o in draft.outputs.items())
    print(f"{out}: a draft mapping: {found}; check its lines marked EDIT, then --teacher onnx:{out}")
    return 0


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
        if a.cmd == "resample-error":
            return _resample_error(a)
        if a.cmd == "onnx-map":
            return _onnx_map(a)
        if a.cmd in catalog_cli.COMMANDS:
            return catalog_cli.COMMANDS[a.cmd](a)
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
