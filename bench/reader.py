"""Reader throughput: full-size cached targets through the trainer's DataLoader, per worker core.

    .venv/bin/python bench/reader.py            # 800x1333 views, P3-P7 x 256 channels (minutes)
    .venv/bin/python bench/reader.py --quick    # tiny sizes (seconds; the CI smoke test)

A training GPU is fed by DataLoader workers on the host's CPU cores, so the
figure that matters is samples per second per worker core. Each measurement
runs ``mtpd.trainer.targets.make_loader`` with 1 and with 2 worker processes
and reports wall-clock samples/s and samples per CPU-second the workers used
(the per-core rate, which, unlike wall time, does not move with the load other
jobs put on this shared machine). Modes:

- ``targets``: what the cache adds to a loader: store read, decode and collate
  of the teacher maps onto the batch grid (the image path is left out);
- ``full``: the trainer's samples: image decode and resize, ground truth, targets;
- ``images``: the same loader without stores: what an undistilled loader costs;
- ``targets (before)``: the reader as it was before this benchmark (decode to
  float32, transpose to [C, h, w], then copy into a contiguous batch), kept here
  as the reference the library change is measured against.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as `python bench/reader.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import build_stores, interleave, median, natural_images, ratio, report, table

TITLE = "Reader (bench/reader.py)"


class CycleSampler:
    def __init__(self, n: int, length: int) -> None:
        self.n, self.length = n, length

    def __iter__(self):
        return (i % self.n for i in range(self.length))

    def __len__(self) -> int:
        return self.length


class TargetsOnly:
    """Map-style dataset of teacher targets alone, read exactly as ``DistillDataset`` reads them."""

    def __init__(self, ds, legacy: bool = False) -> None:
        from mtpd.data import view_meta

        self.ds, self.legacy = ds, legacy
        self.metas = [view_meta(ds.spec, (r.height, r.width), "orig") for r in ds.dataset.images]

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, idx: int):
        from mtpd.trainer.targets import Sample

        image_id = self.ds.dataset.images[idx].image_id
        if self.legacy:
            teacher = legacy_targets(self.ds, image_id, "orig")
        else:
            teacher = self.ds.teacher_targets(image_id, "orig")
        return Sample(None, self.metas[idx], image_id, None, None, teacher)


def legacy_targets(ds, image_id: int, view: str) -> list[dict]:
    """The reader before this benchmark: ``StoreReader.read`` decodes to float32 [C, h, w] copies."""
    import torch

    out = []
    for r, names in zip(ds.readers(), ds.outputs):
        maps = r.read(r.sample_index(image_id, view), names)
        out.append({n: [torch.from_numpy(m) for m in per_level] for n, per_level in maps.items()})
    return out


class TargetsCollate:
    """Collate of ``TargetsOnly`` samples: the library's ``collate_teacher``, or the former contiguous copy."""

    def __init__(self, metas: list[dict], legacy: bool) -> None:
        self.metas, self.legacy = metas, legacy

    def __call__(self, samples: list):
        from mtpd.trainer.targets import collate_teacher

        padded = (max(s.meta.padded[0] for s in samples), max(s.meta.padded[1] for s in samples))
        if not self.legacy:
            return collate_teacher(samples, self.metas, padded)
        import torch

        teacher = []
        for k in range(len(samples[0].teacher)):
            out = {}
            for name, per_level in samples[0].teacher[k].items():
                for j, lvl in enumerate(self.metas[k][name]["levels"]):
                    gh, gw = -(-padded[0] // 2**lvl), -(-padded[1] // 2**lvl)
                    t = torch.zeros(len(samples), per_level[j].shape[0], gh, gw)
                    for i, s in enumerate(samples):
                        m = s.teacher[k][name][j]
                        t[i, :, : m.shape[1], : m.shape[2]] = m
                    out[f"{name}.p{lvl}"] = t
            teacher.append(out)
        return teacher, {}


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (the DataLoader's worker processes)."""
    import os

    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
    cpu0 = sum(_cpu_seconds(p) for p in pids) if pids else time.process_time()
    t0 = time.perf_counter()
    count = 0
    for _ in range(n_batches - 1):  # not to exhaustion: the workers exit then, and their CPU counters go with them
        next(it)
        count += batch
    wall = time.perf_counter() - t0
    cpu = (sum(_cpu_seconds(p) for p in pids) if pids else time.process_time()) - cpu0
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
    a = p.parse_args(argv)
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


def recodec(src: str, dst: str, cname: str, crc: bool = True) -> None:
    """A copy of store ``src`` whose outputs use Blosc ``cname`` (same values, same layout), with or without
    the per-sample crc32c: what-ifs for the codec choice, made here without touching the library's defaults."""
    from mtpd.cache.store import StoreReader, create_store, mark_done, output_codec, read_shard_blocks, write_shard

    r = StoreReader(src)
    idx = r.root["index"]
    root = create_store(
        dst,
        r.header,
        r.image_ids,
        r.orig_size,
        r.file_names(),
        np.asarray(idx["view_size"][:]),
        r.grid,
        codec=output_codec(cname),
        chunk_checksum=crc,
    )
    for shard in range(r.header.num_shards):
        nbytes, checksum = write_shard(root, r.header, shard, read_shard_blocks(r.root, r.header, shard))
        mark_done(root, shard, nbytes, checksum)


def breakdown(ds, samples: int) -> dict[str, float]:
    """In-process CPU ms per sample of the two parts of the targets path: store read (zarr + Blosc) and collate.

    Run with a DataLoader worker's settings (one torch and Blosc thread): with more threads the
    small copies pay OpenMP's start-up and spinning, which workers never see.
    """
    import torch

    from mtpd.trainer.targets import collate_teacher, worker_init

    threads = torch.get_num_threads()
    worker_init(0)  # zarr and Blosc keep these settings: the bench reads nothing after this

    t = TargetsOnly(ds)
    r = ds.readers()[0]
    metas = [r.header.outputs]
    read = coll = 0.0
    for i in range(samples):
        c0 = time.process_time()
        r.read_rows(i % len(t))
        c1 = time.process_time()
        smp = t[i % len(t)]
        c2 = time.process_time()
        collate_teacher([smp], metas, smp.meta.padded)
        c3 = time.process_time()
        read += c1 - c0
        coll += c3 - c2
    torch.set_num_threads(threads)
    return {"read": 1000 * read / samples, "collate": 1000 * coll / samples}


def main(argv: list[str] | None = None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse(argv)
    t_start = time.monotonic()
    short, long = (int(x) for x in a.size.lower().split("x"))
    workers = [int(w) for w in a.workers.split(",")]
    one = workers[:1]
    from mtpd.cache.store import StoreReader
    from mtpd.data import CocoDataset, ViewSpec
    from mtpd.trainer.targets import Collate, DistillDataset

    with tempfile.TemporaryDirectory(prefix="mtpd-bench-reader-") as tmp:
        work = Path(a.work_dir or tmp)
        data = natural_images(work / "data", a.images, round(short * 0.6), round(long * 0.6), num_classes=a.classes)
        views = ViewSpec(short=short, long=long)
        stores = {
            "compact, fpn": ("compact", ["fpn"]),
            "high, fpn": ("high", ["fpn"]),
            "lossless, fpn": ("lossless", ["fpn"]),
            "compact, fpn+cls+box": ("compact", ["fpn", "cls", "box"]),
        }
        paths = {k: str(work / k.replace(", ", "_").replace("+", "_")) for k in stores}
        print(
            f"building {len(stores)} stores from one pass of {a.teacher} "
            f"over {a.images} image(s) at {short}x{long} ...",
            flush=True,
        )
        t_infer, _, _ = build_stores(
            a.teacher, data["ann"], data["images"], {paths[k]: v for k, v in stores.items()}, views, a.classes
        )
        lz4 = "compact, fpn, Blosc-lz4 (what-if)"
        paths[lz4] = str(work / "compact_fpn_lz4")
        recodec(paths["compact, fpn"], paths[lz4], "lz4")
        nocrc = "compact, fpn, no crc32c (what-if)"
        paths[nocrc] = str(work / "compact_fpn_nocrc")
        recodec(paths["compact, fpn"], paths[nocrc], "zstd", crc=False)
        coco = CocoDataset(data["ann"], data["images"])
        ds = {k: DistillDataset(coco, views, [p]) for k, p in paths.items()}
        metas = {k: [r.header.outputs for r in d.readers()] for k, d in ds.items()}
        configs = [  # (mode, store, dataset, collate, worker counts)
            (
                "targets",
                "compact, fpn",
                TargetsOnly(ds["compact, fpn"]),
                TargetsCollate(metas["compact, fpn"], False),
                workers,
            ),
            ("targets", lz4, TargetsOnly(ds[lz4]), TargetsCollate(metas[lz4], False), one),
            ("targets", nocrc, TargetsOnly(ds[nocrc]), TargetsCollate(metas[nocrc], False), one),
            ("targets", "high, fpn", TargetsOnly(ds["high, fpn"]), TargetsCollate(metas["high, fpn"], False), one),
            (
                "targets",
                "lossless, fpn",
                TargetsOnly(ds["lossless, fpn"]),
                TargetsCollate(metas["lossless, fpn"], False),
                one,
            ),
            (
                "targets",
                "compact, fpn+cls+box",
                TargetsOnly(ds["compact, fpn+cls+box"]),
                TargetsCollate(metas["compact, fpn+cls+box"], False),
                one,
            ),
            (
                "targets (before)",
                "compact, fpn",
                TargetsOnly(ds["compact, fpn"], legacy=True),
                TargetsCollate(metas["compact, fpn"], True),
                one,
            ),
            ("full", "compact, fpn", ds["compact, fpn"], Collate(metas["compact, fpn"]), workers),
            ("images", "no store", DistillDataset(coco, views, []), Collate([]), one),
        ]
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
        parts = {k: breakdown(ds[k], max(4, a.samples // 8)) for k in ("compact, fpn", lz4)}
        sizes = {k: _output_mib(Path(paths[k])) / a.images for k in ("compact, fpn", lz4)}
        fpn = StoreReader(paths["compact, fpn"]).header.outputs["fpn"]
        shape = (fpn["levels"], int(fpn["channels"]), int(fpn["l_max"]))
    body = render(a, short, long, workers, results, cpu_per_sample, t_infer, shape, parts, sizes, lz4)
    return report(
        TITLE,
        f"{short}x{long}, batch {a.batch}" + (" (quick)" if a.quick else ""),
        "reader.py",
        argv,
        body,
        write=not a.no_write,
    )


def _output_mib(store: Path) -> float:
    return sum(f.stat().st_size for f in (store / "outputs").rglob("*") if f.is_file()) / 2**20


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
    lz4: str,
) -> str:
    rows = []
    for key, vals in results.items():
        mode, store, w = key.split(" | ")
        rows.append([mode, store, int(w), median([v[0] for v in vals]), median([v[1] for v in vals])])
    w1 = workers[0]
    per_core = median([v[1] for v in results[f"targets | compact, fpn | {w1}"]])
    speedup = ratio(
        cpu_per_sample[f"targets (before) | compact, fpn | {w1}"], cpu_per_sample[f"targets | compact, fpn | {w1}"]
    )
    lz4_gain = ratio(cpu_per_sample[f"targets | compact, fpn | {w1}"], cpu_per_sample[f"targets | {lz4} | {w1}"])
    nocrc = "compact, fpn, no crc32c (what-if)"
    # Checked reads: per-sample crc32c plus each shard's size check on its first read, against the same reads without.
    crc_cost = ratio(cpu_per_sample[f"targets | compact, fpn | {w1}"], cpu_per_sample[f"targets | {nocrc} | {w1}"])
    full = median([v[1] for v in results[f"full | compact, fpn | {w1}"]])
    plain = median([v[1] for v in results[f"images | no store | {w1}"]])
    levels, channels, cells = shape
    pz, pl = parts["compact, fpn"], parts[lz4]
    lines = [
        f"Stores of `{a.teacher}` (random init, `--weights none`) on {a.images} natural-image-like image(s), views "
        f"{short}x{long}: "
        f"P{levels[0]}–P{levels[-1]} x {channels} channels = {cells:,} cells x {channels} = "
        f"{cells * channels / 1e6:.2f} M feature values per sample "
        f"(the teacher pass took {t_infer:.0f} s, not counted). Batch {a.batch}; files in the page cache (local disk, "
        "not object storage). "
        "'per worker core' = samples per CPU-second used by the loader's worker processes "
        f"({w1 if w1 else 'in-process'} "
        "being the single-worker row); wall samples/s moves with the machine's load, per-core rates much less. "
        "Medians of "
        f"{len(next(iter(results.values())))} interleaved round(s). The Blosc-lz4 row is a what-if: the compact "
        "store's very "
        f"values re-written with Blosc lz4 (bitshuffle) instead of zstd; the library's codec is unchanged. The "
        "no-crc32c row is the same store without the per-sample crc32c every store now carries: it measures what "
        "checked reads cost.",
        "",
        table(["mode", "store", "workers", "samples/s (wall)", "samples/s per worker core"], rows),
        "",
        table(
            ["check", "measured", "target", "met"],
            [
                [
                    "compact FPN-only targets, samples/s per worker core",
                    per_core,
                    "≥ 60",
                    "yes" if per_core >= 60 else "no",
                ],
                ["reader before → after (CPU per sample, same run)", f"{speedup} x faster", "–", "–"],
                [
                    "checked reads: CPU per sample with / without crc32c and shard checks",
                    f"{crc_cost}",
                    "≤ 1.05",
                    "yes" if crc_cost.median <= 1.05 else "no",
                ],
                [
                    "in-process CPU ms per sample, zstd: store read / collate",
                    f"{pz['read']:.1f} / {pz['collate']:.1f}",
                    "–",
                    "–",
                ],
                [
                    "in-process CPU ms per sample, lz4: store read / collate",
                    f"{pl['read']:.1f} / {pl['collate']:.1f}",
                    "–",
                    "–",
                ],
                [
                    "what-if Blosc-lz4 vs zstd: speed / MiB per sample",
                    f"{lz4_gain} x faster / {sizes[lz4]:.2f} vs {sizes['compact, fpn']:.2f}",
                    "–",
                    "–",
                ],
                ["full samples per core: with compact store / without", f"{full:.3g} / {plain:.3g}", "–", "–"],
            ],
        ),
        "",
    ]
    if per_core < 60:
        lines.append(
            f"Gap: 60 samples/s per core is {1000 / 60:.1f} ms per sample; a compact FPN sample here costs "
            f"{1000 / per_core:.0f} ms of "
            f"worker CPU: the store read ({pz['read']:.0f} ms, mostly Blosc-zstd decompressing "
            f"{cells * channels * 2 / 2**20:.1f} MiB of "
            f"fp16), the collate ({pz['collate']:.1f} ms: cast and placement in one pass) and the DataLoader hand-off "
            "(the rest: "
            f"allocating {cells * channels * 4 / 2**20:.0f} MiB of float32 targets per sample in shared memory, "
            "pickling, the worker "
            "loop). Decompression alone is near the budget at this size on these cores. Blosc lz4 instead of zstd "
            "(the README's "
            f"codec) reads {lz4_gain.median:.2f}x as fast in this run for "
            f"{sizes[lz4] / sizes['compact, fpn'] - 1:+.0%} "
            "bytes (rows above; "
            "a codec change is a format decision, left to the store's owners); handing fp16 targets to the training "
            "process and "
            "casting on the GPU would halve the shared-memory bytes but changes the Batch contract (a proposal). A "
            "training GPU "
            "needs about 10–50 samples/s (the README's Scaling to COCO section): 1–3 worker cores for targets "
            "at this rate."
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
