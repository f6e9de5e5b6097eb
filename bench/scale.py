"""What a store costs as the image count grows from 1k to COCO's 118,287: build, inspect, resume, read, train.

    .venv/bin/python bench/scale.py                          # 1000, 10000 and 118287 images (an hour or more)
    .venv/bin/python bench/scale.py --sizes 1000,10000       # a subset
    .venv/bin/python bench/scale.py --quick                  # 64 and 256 images, no Ray (the CI smoke test)

Every size runs the product's own paths on a set of small synthetic images (``--size`` px; the COCO list cycles
over ``--distinct`` image files, so 118k entries need no 118k files) and a random-init tiny teacher:

- build: ``build_store`` on Ray with ``--workers`` actors, into a cache root (the catalog's path);
- inspect: ``mtpd-cache info``, ``ls`` and ``verify`` through their ``main`` (in this process: import time aside);
- resume: the same build again with every shard done, and with half the shards marked not done;
- read: a ``StoreReader`` opened, then random samples through the trainer's read path (``StoreFeed.read_sample``);
- train: a one-stage plan from the store, from ``Stage`` construction to the end of its first step.

Peak RSS is the driver's (this process, reset before the build) and the reader's (reset before it opens).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/scale.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import natural_images, peak_rss_mib, report, reset_peak_rss, table

TITLE = "Scale (bench/scale.py)"
COCO_TRAIN = 118_287


def cycled_set(work: Path, n: int, size: int, distinct: int) -> dict:
    """A COCO list of ``n`` images cycling over ``distinct`` synthetic files (ids 1..n, one box each)."""
    base = natural_images(work / "base", distinct, size, size, seed=0)
    coco = json.loads(Path(base["ann"]).read_text())
    files = coco["images"]
    images = [{**files[i % len(files)], "id": i + 1} for i in range(n)]
    ann = [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [2, 2, size / 2, size / 2], "iscrowd": 0}
           for i in range(n)]  # fmt: skip
    path = work / f"scale_{n}.json"
    path.write_text(json.dumps({"images": images, "annotations": ann, "categories": coco["categories"]}))
    return {"ann": str(path), "images": base["images"]}


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def quiet(main, argv: list[str]) -> int:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return main(argv)


def build(data: dict, root: Path, size: int, workers: int):
    from mtpd.cache.build import build_store
    from mtpd.data import ViewSpec
    from mtpd.teachers.registry import TeacherSpec

    return build_store(
        TeacherSpec("retinanet_tiny", "none", 10),
        data["ann"],
        data["images"],
        views=ViewSpec(short=size, long=size, views=("orig", "hflip")),
        root=str(root),
        outputs=["fpn"],
        precision="small",
        workers=workers,
        progress=False,
    )


def steady_rate(rep) -> float:
    """Images per second once the pipeline is full: the shards landing after the first quarter (actor start and
    teacher construction are not a cost per image)."""
    done = sorted(rep.shard_done_at.values())
    k = len(done) // 4
    if len(done) - k < 2:
        return float("nan")
    per_shard = rep.images / len(done)
    return per_shard * (len(done) - 1 - k) / (done[-1] - done[k])


def on_disk(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def reads(store: str, n: int, samples: int) -> tuple[float, float, float]:
    """(open seconds, random samples per second, reader peak RSS MiB) through the trainer's read path."""
    from mtpd.cache.read import StoreFeed

    reset_peak_rss()
    t_open, feed = timed(lambda: StoreFeed(store))
    rng = random.Random(0)
    ids = [rng.randrange(1, n + 1) for _ in range(samples)]
    feed.read_sample(ids[0], "orig")  # the first shard check and zarr's lazy set-up are not a steady read
    t, _ = timed(lambda: [feed.read_sample(i, rng.choice(("orig", "hflip"))) for i in ids])
    return t_open, samples / t, peak_rss_mib()


def first_step(data: dict, store: str, size: int, work: Path) -> float:
    """Seconds from building a cached stage (student, stores, loader) to the end of its first step."""
    from mtpd.trainer.plan import Plan, from_dict
    from mtpd.trainer.stage import Stage

    plan = from_dict(
        Plan,
        {
            "output_dir": str(work / "run"),
            "student": {"arch": "retinanet_tiny", "options": {"width": 8, "fpn_channels": 32}},
            "data": {
                "train_ann": data["ann"],
                "train_images": data["images"],
                "short": size,
                "long": size,
                "batch_size": 8,
                "workers": 0,
            },  # fmt: skip
            "stages": [{"name": "s", "stores": [store], "losses": [{"name": "mgd"}], "epochs": 1, "eval": False}],
        },
    )

    def go() -> None:
        engine, _, _ = Stage(plan, 1, log=None).build()
        engine.step()

    return timed(go)[0]


def half_undone(store: str) -> int:
    """Mark every other shard not done (its bytes stay): the state of a build stopped half way."""
    import numpy as np

    from mtpd.cache.store import open_root, store_header

    shards = open_root(store, "r+")["index/shards"]
    undone = list(range(0, store_header(store).num_shards, 2))
    for s in undone:
        shards[s] = np.zeros(3, dtype=np.uint64)
    return len(undone)


def measure(n: int, a: argparse.Namespace, work: Path) -> dict:
    from mtpd.cli.cache import main as cache_main

    data = cycled_set(work / f"data_{n}", n, a.size, a.distinct)
    root = work / f"cache_{n}"
    reset_peak_rss()
    t_build, rep = timed(lambda: build(data, root, a.size, a.workers))
    driver = peak_rss_mib()
    store = str(rep.store)
    steady = steady_rate(rep)
    files, nbytes = on_disk(Path(store))
    t_info, _ = timed(lambda: quiet(cache_main, ["info", store]))
    t_ls, _ = timed(lambda: quiet(cache_main, ["ls", "--root", str(root)]))
    t_verify, _ = timed(lambda: quiet(cache_main, ["verify", store]))
    t_resume, _ = timed(lambda: build(data, root, a.size, a.workers))
    undone = half_undone(store)
    t_half, _ = timed(lambda: build(data, root, a.size, a.workers))
    t_open, rate, reader = reads(store, n, a.samples)
    t_step = first_step(data, store, a.size, work / f"train_{n}")
    out = {
        "images": n,
        "shards": rep.shards_total,
        "build_s": t_build,
        "build_img_s": n / t_build,
        "steady_img_s": steady,
        "files": files,
        "mib": nbytes / 2**20,
        "info_s": t_info,
        "ls_s": t_ls,
        "verify_s": t_verify,
        "resume_done_s": t_resume,
        "resume_half_s": t_half,
        "undone": undone,
        "driver_mib": driver,
        "reader_open_s": t_open,
        "reads_s": rate,
        "reader_mib": reader,
        "first_step_s": t_step,
    }
    print(json.dumps(out), flush=True)
    if not a.keep:
        shutil.rmtree(root, ignore_errors=True)
    return out


def render(rows: list[dict], a: argparse.Namespace) -> str:
    first = rows[0]
    cols = [
        ("images", "images", "{:,}"),
        ("shards", "shards", "{:,}"),
        ("build img/s", "build_img_s", "{:.0f}"),
        ("steady img/s", "steady_img_s", "{:.0f}"),
        ("files", "files", "{:,}"),
        ("MiB", "mib", "{:.1f}"),
        ("info s", "info_s", "{:.2f}"),
        ("ls s", "ls_s", "{:.2f}"),
        ("verify s", "verify_s", "{:.1f}"),
        ("resume (all done) s", "resume_done_s", "{:.1f}"),
        ("resume (half done) s", "resume_half_s", "{:.1f}"),
        ("driver peak MiB", "driver_mib", "{:.0f}"),
        ("reader open s", "reader_open_s", "{:.2f}"),
        ("random reads/s", "reads_s", "{:.0f}"),
        ("reader peak MiB", "reader_mib", "{:.0f}"),
        ("first step s", "first_step_s", "{:.1f}"),
    ]
    lines = [
        f"Synthetic {a.size} px images ({a.distinct} distinct files, the list cycling over them), a random-init "
        f"`retinanet_tiny` teacher, `small` FPN stores of orig + hflip, Ray with {a.workers} workers (one instance "
        "for every build; build img/s counts actor start, steady img/s the shards landing after the first quarter); "
        "`info`, `ls` "
        "and `verify` timed in this process (no interpreter start); random reads through the trainer's read path "
        f"({a.samples} samples); first step: a cached MGD stage, batch 8, from `Stage` construction.",
        "",
        table([c[0] for c in cols], [[fmt.format(r[k]) for _, k, fmt in cols] for r in rows]),
        "",
    ]
    if len(rows) > 1:
        last = rows[-1]
        checks = [
            ("build cost per image (steady)", first["steady_img_s"] / last["steady_img_s"], "≤ 1.15×"),
            ("driver peak RSS", last["driver_mib"] / first["driver_mib"], "≤ 1.5×"),
            ("reader peak RSS", last["reader_mib"] / first["reader_mib"], "≤ 1.5×"),
            ("random reads", first["reads_s"] / last["reads_s"], "≤ 1.15× slower"),
        ]
        lines.append(
            table(
                [f"{last['images']:,} vs {first['images']:,} images", "ratio", "target"],
                [[name, f"{v:.2f}", t] for name, v, t in checks],
            )
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default=f"1000,10000,{COCO_TRAIN}", help="image counts, comma-separated")
    p.add_argument("--size", type=int, default=64, help="image and view side, px")
    p.add_argument("--distinct", type=int, default=64, help="distinct image files the list cycles over")
    p.add_argument("--workers", type=int, default=2, help="Ray actors of each build")
    p.add_argument("--samples", type=int, default=2000, help="random reads per store")
    p.add_argument("--work-dir", default=None, help="where data and stores go (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep each size's store")
    p.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    p.add_argument("--quick", action="store_true", help="64 and 256 images, 200 reads: a smoke test")
    a = p.parse_args(argv)
    if a.quick:  # builds in this process: a smoke test of the script, not of Ray's start-up
        a.sizes, a.samples, a.distinct, a.workers = "64,256", 200, 16, 0
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import ray

    from mtpd.cache.ray_local import ensure_ray

    started = ensure_ray(None, a.workers)  # one Ray instance for every build (a build alone would start its own)
    try:
        with tempfile.TemporaryDirectory(prefix="mtpd-bench-scale-") as tmp:
            work = Path(a.work_dir or tmp)
            rows = [measure(int(n), a, work) for n in a.sizes.split(",")]
    finally:
        if started:
            ray.shutdown()
    key = f"{a.size} px, {a.workers} Ray workers" + (" (quick)" if a.quick else "")
    return report(TITLE, key, "scale.py", argv, render(rows, a), write=not (a.no_write or a.quick))


if __name__ == "__main__":
    main()
