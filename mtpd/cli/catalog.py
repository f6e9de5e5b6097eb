"""`mtpd-cache ls | rm | estimate`: the stores under a cache root, and the cost of one before it is built."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from mtpd.cli import HelpFormatter, add_trust_flag
from mtpd.cli.options import teacher_and_data, teacher_spec

ROOT_HELP = "cache root (default: $MTPD_CACHE_ROOT, else ~/.cache/mtpd)"


def add_parsers(sub: argparse._SubParsersAction) -> None:
    ls = sub.add_parser(
        "ls", help="the stores under the cache root: teacher, data, progress, size, use", formatter_class=HelpFormatter
    )
    ls.add_argument("--root", default=None, help=ROOT_HELP)
    ls.add_argument("--json", action="store_true", help="print JSON")
    rm = sub.add_parser("rm", help="remove stores (never one a build is writing)", formatter_class=HelpFormatter)
    rm.add_argument("stores", nargs="*", help="store paths or names under the root")
    rm.add_argument("--root", default=None, help=ROOT_HELP)
    rm.add_argument("--older-than", type=float, default=None, metavar="DAYS", help="stores created before this")
    rm.add_argument(
        "--unused-days",
        type=float,
        default=None,
        metavar="DAYS",
        help="stores no training run read for this long (never read: counted from creation)",
    )
    rm.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    est = sub.add_parser(
        "estimate",
        formatter_class=HelpFormatter,
        help="run the teacher on a sample and project the store's size and build time",
    )
    teacher_and_data(est.add_argument_group("what to cache"))
    est.add_argument("--sample", type=int, default=16, help="images to run (drawn with a fixed seed)")
    est.add_argument("--device", default="cpu", help="cpu or cuda: the device the time is measured on")
    est.add_argument("--gpus", type=int, default=1, help="also give the build time on this many such devices")
    est.add_argument("--batch-size", type=int, default=2, help="views per teacher forward (as the build's default)")
    est.add_argument("--root", default=None, help=ROOT_HELP + "; its free space is compared with the projection")
    add_trust_flag(est)


def _gib(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def _span(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.2f} days"
    return (
        f"{seconds / 3600:.2f} h"
        if seconds >= 3600
        else f"{seconds / 60:.1f} min"
        if seconds >= 60
        else f"{seconds:.1f} s"
    )


def _when(t: float | None) -> str:
    return "never" if t is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def ls(a: argparse.Namespace) -> int:
    from mtpd.cache.catalog import cache_root, scan

    root = cache_root(a.root)
    rows, foreign = scan(root)
    if a.json:
        print(json.dumps({"root": str(root), "stores": rows, "not_stores": foreign}, indent=2))
        return 0
    print(f"{len(rows)} store(s) under {root}")
    for r in rows:
        state = "complete" if r["complete"] else f"partial {r['images_done']}/{r['images_total']}"
        print(
            f"  {r['name']}\n    teacher {r['teacher']} ({Path(str(r['weights'])).name}), data {r['dataset']} "
            f"({r['images_total']} images, {state}), views {','.join(r['views'])} {r['short']}x{r['long']}, "
            f"outputs {','.join(r['outputs'])}, {r['precision']}, {_gib(r['bytes'])}\n"
            f"    created {_when(r['created'])}, last used {_when(r['last_used'])}, "
            f"read by {len(r['runs'])} run(s){': ' + ', '.join(r['runs']) if r['runs'] else ''}"
        )
    if foreign:
        print(f"not stores (ignored): {', '.join(foreign)}")
    return 0


def _selected(a: argparse.Namespace, rows: list[dict]) -> list[dict]:
    from mtpd.errors import MtpdError

    now, day = time.time(), 86400.0
    by_name = {r["name"]: r for r in rows} | {r["path"]: r for r in rows}
    chosen = []
    for s in a.stores:
        row = by_name.get(s) or by_name.get(str(Path(s).resolve()))
        if row is None:
            raise MtpdError(
                f"{s}: no store of that name or path under {a.root or 'the cache root'}; see `mtpd-cache ls`"
            )
        chosen.append(row)
    for r in rows:
        old = a.older_than is not None and now - r["created"] > a.older_than * day
        unused = a.unused_days is not None and now - (r["last_used"] or r["created"]) > a.unused_days * day
        if (old or unused) and r not in chosen:
            chosen.append(r)
    return chosen


def rm(a: argparse.Namespace) -> int:
    from mtpd.cache.catalog import cache_root, remove, scan
    from mtpd.errors import MtpdError

    if not a.stores and a.older_than is None and a.unused_days is None:
        print("mtpd-cache rm: name stores, or give --older-than or --unused-days", file=sys.stderr)
        return 2
    chosen = _selected(a, scan(cache_root(a.root))[0])
    if not chosen:
        print("nothing to remove")
        return 0
    for r in chosen:
        print(f"  {r['path']}  ({_gib(r['bytes'])}, last used {_when(r['last_used'])})")
    if not a.yes:
        try:
            answer = input(f"remove these {len(chosen)} store(s), {_gib(sum(r['bytes'] for r in chosen))}? [y/N] ")
        except EOFError:  # no terminal to ask: nothing is removed without --yes
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing removed")
            return 1
    refused = 0
    for r in chosen:
        try:
            remove(Path(r["path"]))
        except MtpdError as e:
            print(f"mtpd-cache rm: kept {r['name']}: {e}", file=sys.stderr)
            refused += 1
            continue
        print(f"removed {r['path']}")
    return 2 if refused else 0


def estimate(a: argparse.Namespace) -> int:
    from mtpd.cache.catalog import cache_root
    from mtpd.cache.estimate import estimate as run_estimate
    from mtpd.errors import MtpdError

    if a.gpus < 1 or a.sample < 2:
        raise MtpdError(f"--gpus must be at least 1 and --sample at least 2 (got {a.gpus}, {a.sample})")
    teacher, views = teacher_spec(a)
    outputs = [x.strip() for x in a.outputs.split(",") if x.strip()] if a.outputs else None
    if len(a.precision) > 1:
        return _estimate_presets(a, teacher, views, outputs)
    e = run_estimate(teacher, a.ann, a.images, views, outputs, a.precision[0], a.sample, batch_size=a.batch_size)
    size, size_pm = e.total_bytes()
    secs, secs_pm = e.total_seconds()
    print(f"sample: {e.sample} of {e.images} images, views {','.join(views.views)} at {views.short}x{views.long}")
    print(
        f"per image: {_gib(e.bytes_per_image)} ± {_gib(e.bytes_per_image_std)}, "
        f"{e.seconds_per_image:.3f} ± {e.seconds_per_image_std:.3f} s on one {e.device} device"
    )
    print(f"store: {_gib(size)} ± {_gib(size_pm)} (95 %)")
    print(f"build: {_span(secs)} ± {_span(secs_pm)} on one {e.device} device")
    if a.gpus > 1:
        k_secs, k_pm = e.total_seconds(a.gpus)
        print(f"build: {_span(k_secs)} ± {_span(k_pm)} on {a.gpus} such devices")
    root = cache_root(a.root)
    probe = next((p for p in [root, *root.parents] if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free
    verdict = "enough" if free > size + size_pm else "NOT enough"
    print(f"free space at {probe}: {_gib(free)} ({verdict} for the projected store)")
    return 0


def _estimate_presets(a: argparse.Namespace, teacher, views, outputs) -> int:
    """Several precisions from one teacher pass over the sample: bytes and error per output and level against
    lossless, and each whole store's projected size."""
    from mtpd.cache.estimate import estimate_presets

    res = estimate_presets(teacher, a.ann, a.images, views, outputs, a.precision, a.sample, batch_size=a.batch_size)
    first = res[0].cost
    size = f"{views.short}x{views.long}"
    print(f"sample: {first.sample} of {first.images} images, views {','.join(views.views)} at {size}")
    secs, pm = first.total_seconds(a.gpus)
    where = f"{a.gpus} {first.device} device(s)"
    also = "" if "lossless" in a.precision else " (and the lossless reference)"
    print(f"build of all {len(res)} stores{also} in one pass: {_span(secs)} ± {_span(pm)} on {where}")
    print("| precision | output | KiB / image | rel. RMSE vs lossless per level | store (95 %) |")
    print("|---|---|---:|---|---:|")
    for r in res:
        size, size_pm = r.cost.total_bytes()
        for k, (name, nbytes) in enumerate(sorted(r.output_bytes.items())):
            err = " ".join(f"P{lvl} {e:.3f}" for lvl, e in sorted(r.error.get(name, {}).items()))
            whole = f"{_gib(size)} ± {_gib(size_pm)}" if k == 0 else ""
            print(f"| {r.precision if k == 0 else ''} | {name} | {nbytes / 1024:.1f} | {err} | {whole} |")
    return 0


COMMANDS = {"ls": ls, "rm": rm, "estimate": estimate}
