"""Reader throughput: full-size cached targets through the trainer's DataLoader, per worker core, per preset.

    .venv/bin/python bench/reader.py            # 800x1333 views, P3-P7 x 256 channels (minutes)
    .venv/bin/python bench/reader.py --quick    # tiny sizes (seconds; the CI smoke test)

A training GPU is fed by DataLoader workers on the host's CPU cores, so the
figure that matters is samples per second per worker core. Each measurement
runs the trainer's loader settings (``mtpd.trainer.targets``: forkserver/spawn
workers, one thread each) and reports wall-clock samples/s and samples per
CPU-second the workers used (the per-core rate, which, unlike wall time, does
not move with the load other jobs put on this shared machine). Workers hand the
stored codes over; the training process decodes them on its device
(``CodedBatch.decode``): its cost is measured apart, on this CPU with one thread
(an upper bound for a GPU). Modes:

- ``targets``: what the cache adds to a loader: store read and collate of the
  teacher codes onto the batch grid (the image path is left out), per preset;
- ``full``: the trainer's samples: image decode and resize, ground truth, targets;
- ``images``: the same loader without stores: what an undistilled loader costs;
- ``no crc32c (what-if)``: the ``small`` store's very codes without the
  per-sample crc32c every store carries: what checked reads cost.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as `python bench/reader.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    CycleSampler,
    build_stores,
    cpu_seconds,
    interleave,
    median,
    natural_images,
    ratio,
    report,
    table,
)

TITLE = "Reader (bench/reader.py)"


class TargetsOnly:
    """Map-style dataset of teacher targets alone, read exactly as ``DistillDataset`` reads them."""

    def __init__(self, ds) -> None:
        from mtpd.data import view_meta

        self.ds = ds
        self.metas = [view_meta(ds.spec, (r.height, r.width), "orig") for r in ds.dataset.images]

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, idx: int):
        from mtpd.trainer.targets import Sample

        image_id = self.ds.dataset.images[idx].image_id
        return Sample(None, self.metas[idx], image_id, None, None, self.ds.teacher_targets(image_id, "orig"))


class TargetsCollate:
    """Collate of ``TargetsOnly`` samples: the store's own ``collate_codes``."""

    def __init__(self, metas: list[dict]) -> None:
        self.metas = metas

    def __call__(self, samples: list):
        from mtpd.cache.read import collate_codes

        padded = (max(s.meta.padded[0] for s in samples), max(s.meta.padded[1] for s in samples))
        return [collate_codes([s.teacher[k] for s in samples], m, padded) for k, m in enumerate(self.metas)]


def measure(dataset, collate_fn, batch: int, workers: int, samples: int) -> tuple[float, float]:
    """(samples/s wall, samples per worker CPU-second) over ``samples`` samples after the first batch."""
    import multiprocessing

    from torch.utils.data import DataLoader

    from mtpd.trainer.targets import worker_init

    n_batches = max(2, samples // batch) + 1
    ctx = None
    if workers:
        method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        ctx = multiprocessing.get_context(method)
    # The trainer's loader settings (make_loader): spawn-safe context, one thread per worker.
    loader = DataLoader(
        dataset,
        batch_size=batch,
        sampler=CycleSampler(len(dataset), n_batches * batch),
        num_workers=workers,
        collate_fn=collate_fn,
        multiprocessing_context=ctx,
        worker_init_fn=worker_init if workers else None,
    )
    it = iter(loader)
    next(it)  # worker start-up excluded
    pids = [w.pid for w in getattr(it, "_workers", [])]
    cpu0 = sum(cpu_seconds(p) for p in pids) if pids else time.process_time()
    t0 = time.perf_counter()
    count = 0
    for _ in range(n_batches - 1):  # not to exhaustion: the workers exit then, and their CPU counters go with them
        next(it)
        count += batch
    wall = time.perf_counter() - t0
    cpu = (sum(cpu_seconds(p) for p in pids) if pids else time.process_time()) - cpu0
    del it, loader
    return count / wall, count / max(cpu, 1e-9)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--size", default="800x1333", help="view short x long side")
    p.add_argument("--images", type=int, default=2, help="distinct images in the stores (the loader cycles over them)")
    p.add_argument("--samples", type=int, default=64, help="samples per measurement")
    p.add_argument("--batch", type=int, default=2, help="samples per batch (MTPD: 2 per GPU)")
    p.add_argument("--teacher", default="retinanet_resnet50_fpn")
    p.add_argument("--classes", type=int, default=80)
    p.add_argument("--workers", default="1,2", help="DataLoader worker counts to measure")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--budget-min", type=float, default=9.0)
    p.add_argument("--work-dir", default=None)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one worker count, few samples: a smoke test")
    p.add_argument(
        "--extra",
        action="append",
        default=None,
        metavar="PRECISION",
        help=f"a precision string measured beside the presets (repeatable; default: {', '.join(EXTRA)})",
    )
    a = p.parse_args(argv)
    if a.extra is None:
        a.extra = list(EXTRA)
    a.extra = [e for e in a.extra if e not in PRESETS]
    if a.quick:
        a.size, a.images, a.samples, a.teacher, a.classes, a.workers, a.rounds = (
            "64x96",
            2,
            8,
            "retinanet_tiny",
            10,
            "0",
            1,
        )
    return a


# micro fits its codebooks with faiss (the `codes` extra): measured where it is installed
PRESETS = ("lossless", "high", "compact", "small", "tiny") + (("micro",) if importlib.util.find_spec("faiss") else ())
# The other feature code at 1/16 of fp32 that the store-code study tries (bench/studies/store_codes.yaml)
EXTRA = ("small+features=transform:bits=2",)
TARGETED = ("small", "tiny", "micro")  # presets with the >= 60 samples/s per worker core target; so is every extra
NOCRC = "small, no crc32c (what-if)"


def recodec(src: str, dst: str, crc: bool = True) -> None:
    """A copy of store ``src`` (same codes, side parameters and state), with or without the per-sample crc32c:
    a what-if made here without touching the library's defaults."""
    from mtpd.cache.store import StoreReader, create_store, mark_done, read_shard_blocks, write_shard

    r = StoreReader(src)
    calib = {
        name: {key: np.asarray(r.root[f"calib/{name}/{key}"][:]) for key in r.root[f"calib/{name}"].array_keys()}
        for name in (r.root["calib"].group_keys() if "calib" in r.root else [])
    }
    idx = r.root["index"]
    root = create_store(
        dst,
        r.header,
        r.image_ids,
        r.orig_size,
        r.file_names(),
        np.asarray(idx["view_size"][:]),
        r.grid,
        chunk_checksum=crc,
        calibration=calib,
    )
    for shard in range(r.header.num_shards):
        nbytes, checksum = write_shard(root, r.header, shard, read_shard_blocks(r.root, r.header, shard))
        mark_done(root, shard, nbytes, checksum)


def breakdown(ds, samples: int, batch: int) -> dict[str, float]:
    """In-process CPU ms per sample of the parts of the targets path: store read (zarr + Blosc) and collate
    (in a worker), then decode (in the training process, here on this CPU).

    Run with a DataLoader worker's settings (one torch and Blosc thread): with more threads the
    small copies pay OpenMP's start-up and spinning, which workers never see.
    """
    import torch

    from mtpd.cache.read import code_levels, collate_codes, valid_masks
    from mtpd.trainer.targets import worker_init

    threads = torch.get_num_threads()
    worker_init(0)  # zarr and Blosc keep these settings: the bench reads nothing after this
    t = TargetsOnly(ds)
    feed = ds.feeds[0]
    r, outputs = feed.reader, feed.header.outputs
    read = coll = dec = 0.0
    for i in range(0, samples, batch):
        c0 = time.process_time()
        for k in range(batch):
            r.read_codes((i + k) % len(t))
        c1 = time.process_time()
        smps = [t[(i + k) % len(t)] for k in range(batch)]
        c2 = time.process_time()
        coded = [s.teacher[0] for s in smps]
        padded = smps[0].meta.padded
        cb = collate_codes(coded, outputs, padded)
        masks = valid_masks(padded, [s.meta.size for s in smps], sorted(code_levels(coded, outputs)))
        c3 = time.process_time()
        cb.decode(outputs, masks)
        c4 = time.process_time()
        read, coll, dec = read + c1 - c0, coll + c3 - c2, dec + c4 - c3
    torch.set_num_threads(threads)
    n = len(range(0, samples, batch)) * batch
    return {"read": 1000 * read / n, "collate": 1000 * coll / n, "decode": 1000 * dec / n}


def main(argv: list[str] | None = None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse(argv)
    t_start = time.monotonic()
    short, long = (int(x) for x in a.size.lower().split("x"))
    workers = [int(w) for w in a.workers.split(",")]
    from mtpd.cache.inspect import store_info
    from mtpd.cache.store import StoreReader
    from mtpd.data import CocoDataset, ViewSpec
    from mtpd.trainer.targets import Collate, DistillDataset

    with tempfile.TemporaryDirectory(prefix="mtpd-bench-reader-") as tmp:
        work = Path(a.work_dir or tmp)
        data = natural_images(work / "data", a.images, round(short * 0.6), round(long * 0.6), num_classes=a.classes)
        views = ViewSpec(short=short, long=long)
        names = (*PRESETS, *a.extra)
        stores = {p: (p, ["fpn"]) for p in names}
        paths = {k: str(work / re.sub(r"[^A-Za-z0-9.-]+", "_", k)) for k in stores}
        print(f"building {len(stores)} stores from one pass of {a.teacher} over {a.images} image(s) ...", flush=True)
        t_infer, _, _ = build_stores(
            a.teacher, data["ann"], data["images"], {paths[k]: v for k, v in stores.items()}, views, a.classes
        )
        paths[NOCRC] = str(work / "small_nocrc")
        recodec(paths["small"], paths[NOCRC], crc=False)
        coco = CocoDataset(data["ann"], data["images"])
        ds = {k: DistillDataset(coco, views, [p]) for k, p in paths.items()}
        metas = {k: [f.header.outputs for f in d.feeds] for k, d in ds.items()}
        configs = [("targets", k, TargetsOnly(ds[k]), TargetsCollate(metas[k]), workers[:1]) for k in paths]
        configs += [
            ("full", "small", ds["small"], Collate(metas["small"]), workers),
            ("images", "no store", DistillDataset(coco, views, []), Collate([]), workers[:1]),
        ]
        results, cpu_per_sample = run_configs(a, configs, t_start)
        parts = {k: breakdown(ds[k], max(4, a.samples // 8), a.batch) for k in names}
        sizes = {k: store_info(paths[k])["outputs"]["fpn"] for k in names}
        fpn = StoreReader(paths["small"]).header.outputs["fpn"]
        shape = (list(fpn.levels), fpn.channels, fpn.l_max)
    body = render(a, short, long, workers, results, cpu_per_sample, t_infer, shape, parts, sizes)
    return report(
        TITLE,
        f"{short}x{long}, batch {a.batch}" + (" (quick)" if a.quick else ""),
        "reader.py",
        argv,
        body,
        write=not a.no_write,
    )


def run_configs(a, configs: list, t_start: float) -> tuple[dict, dict]:
    """Every (mode, store, dataset, collate, worker counts) measured in interleaved rounds."""
    runs, results = {}, {}
    for mode, store, dset, coll, ws in configs:
        for w in ws:
            key = f"{mode} | {store} | {w}"
            results[key] = []

            def run(dset=dset, coll=coll, w=w, key=key) -> float:
                results[key].append(measure(dset, coll, a.batch, w, a.samples))
                return 1.0 / results[key][-1][1]  # CPU-seconds per sample: what the ratios compare

            runs[key] = run
    print(f"measuring {len(runs)} loader configurations, {a.rounds} round(s) ...", flush=True)
    cpu_per_sample = interleave(
        runs, a.rounds, deadline=t_start + 60 * a.budget_min, log=lambda s: print(s[:300], flush=True)
    )
    return results, cpu_per_sample


def render(
    a,
    short: int,
    long: int,
    workers: list[int],
    results: dict,
    cpu_per_sample: dict,
    t_infer: float,
    shape: tuple[list[int], int, int],
    parts: dict,
    sizes: dict,
) -> str:
    rows = []
    for key, vals in results.items():
        mode, store, w = key.split(" | ")
        rows.append([mode, store, int(w), median([v[0] for v in vals]), median([v[1] for v in vals])])
    w1 = workers[0]
    names = (*PRESETS, *a.extra)
    per_core = {k: median([v[1] for v in results[f"targets | {k} | {w1}"]]) for k in names}
    crc_cost = ratio(cpu_per_sample[f"targets | small | {w1}"], cpu_per_sample[f"targets | {NOCRC} | {w1}"])
    full = median([v[1] for v in results[f"full | small | {w1}"]])
    plain = median([v[1] for v in results[f"images | no store | {w1}"]])
    levels, channels, cells = shape
    preset_rows = []
    for k in names:
        targeted = k in TARGETED or k in a.extra
        target = "≥ 60" if targeted else "–"
        met = ("yes" if per_core[k] >= 60 else "no") if targeted else "–"
        p, sz = parts[k], sizes[k]
        preset_rows.append(
            [
                k,
                sz["encoding"],
                f"{sz['stored_bytes'] / a.images / 2**20:.2f}",
                f"1/{1 / sz['fraction_of_fp32']:.1f}",
                per_core[k],
                target,
                met,
                f"{p['read']:.1f} / {p['collate']:.1f}",
                f"{p['decode']:.1f}",
            ]
        )
    lines = [
        f"Stores of `{a.teacher}` (random init, `--weights none`) on {a.images} natural-image-like image(s), views "
        f"{short}x{long}: P{levels[0]}–P{levels[-1]} x {channels} channels = {cells:,} cells x {channels} = "
        f"{cells * channels / 1e6:.2f} M feature values per sample (the teacher pass took {t_infer:.0f} s, not "
        f"counted). Batch {a.batch}; files in the page cache (local disk, not object storage). 'per worker core' = "
        "samples per CPU-second used by the loader's worker processes; wall samples/s moves with the machine's "
        f"load, per-core rates much less. Medians of {len(next(iter(results.values())))} interleaved round(s). "
        "Decode runs in the training process (on its GPU when it has one); here it is timed on this CPU, one "
        f"thread, as an upper bound. MiB / sample counts each store's calibration (PCA bases, transform bases, pq "
        f"codebooks: MiBs per store) over its {a.images} image(s): at COCO's 118k images it vanishes, so read those "
        "codes' size from bench/store.py's rows.",
        "",
        table(
            [
                "preset",
                "FPN encoding",
                "MiB / sample",
                "of fp32",
                "samples/s per worker core",
                "target",
                "met",
                "worker ms: read / collate",
                "training-process decode ms (CPU)",
            ],
            preset_rows,
        ),
        "",
        table(["mode", "store", "workers", "samples/s (wall)", "samples/s per worker core"], rows),
        "",
        table(
            ["check", "measured", "target", "met"],
            [
                [
                    "checked reads (small): CPU per sample with / without crc32c and shard checks",
                    f"{crc_cost}",
                    "≤ 1.05",
                    "yes" if crc_cost.median <= 1.05 else "no",
                ],
                ["full samples per core: with small store / without", f"{full:.3g} / {plain:.3g}", "–", "–"],
            ],
        ),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
