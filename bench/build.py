"""Cache-build throughput against teacher-only inference over the same images, batch size and device.

    .venv/bin/python bench/build.py             # RetinaNet-R50, 800x1333, compact fpn+cls+box (minutes)
    .venv/bin/python bench/build.py --quick     # tiny teacher and sizes (seconds; the CI smoke test)

Both candidates run in a Ray actor with the same CPU/GPU share and torch threads:

- teacher-only: the builder's own worker (``ShardWriter``, on a store the product laid out before
  the rounds), of which only ``ShardComputer.load`` and ``infer`` run over every image (decode,
  views, forward, outputs copied to the host), images of the next shard decoded while the current
  one runs, outputs dropped: a plain inference loop;
- build: ``mtpd.cache.build.build_store`` itself (one worker): the same, plus
  flatten, quantise, compress, write whole shards and mark them done.

The rounds alternate the two. Throughput is reported end to end (actor start,
teacher construction and, for the build, store creation included, as a user
waits for them) and in steady state: shards finished per second after the
first ``SHARDS_IN_FLIGHT`` (once the build's pipeline is full), for both.
Shards hold ``--batch`` images, so every forward sees a full batch.

On a shared CPU machine wall-clock rates move with other jobs' load from one
minute to the next, so the steady state is also measured in CPU-seconds per
image of the worker process (read from /proc as each shard lands): the
throughput ratio the two would have with the machine's cores to themselves and
no idle core to hide encoding in, i.e. a lower bound for a GPU worker, whose
host cores are otherwise idle.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/build.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import cpu_seconds, interleave, median, natural_images, ratio, report, table

TITLE = "Build (bench/build.py)"


def _pid_of(title: str) -> int | None:
    """The process whose command line (Ray sets it to ``ray::Class...``) starts with ``title``."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if f.read().startswith(title.encode()):
                        return int(entry)
            except OSError:
                continue
    return None


class TeacherOnly:
    """Ray actor: the teacher's part of the product's build worker and nothing else.

    It is the builder's own ``ShardWriter`` (same teacher, threads, zarr settings and ``ShardComputer``),
    opened on a store ``build_store`` made before the rounds, of which only ``load`` and ``infer`` run:
    nothing is encoded or written."""

    def __init__(self, teacher, ann: str, images: str, store: str, batch_size: int, threads: int) -> None:
        from mtpd.cache.compute import ShardWriter

        writer = ShardWriter(teacher, ann, images, store, batch_size, threads)
        self.computer, self.shards = writer.computer, writer.header.num_shards

    def run(self) -> list[tuple[float, float]]:
        """(wall-clock time, this process's CPU-seconds) at which each shard's outputs were on the host."""
        from concurrent.futures import ThreadPoolExecutor

        done = []
        with ThreadPoolExecutor(1) as pre:
            nxt = pre.submit(self.computer.load, 0)
            for s in range(self.shards):
                views = nxt.result()
                if s + 1 < self.shards:
                    nxt = pre.submit(self.computer.load, s + 1)  # decode ahead, as a DataLoader would
                raw = self.computer.infer(s, views)
                del raw
                done.append((time.time(), cpu_seconds(os.getpid())))
        return done


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--size", default="512x853", help="view short x long side (teacher and writer costs both scale with pixels)"
    )
    p.add_argument("--images", type=int, default=6, help="images per run")
    p.add_argument("--batch", type=int, default=1, help="views per teacher forward, both candidates")
    p.add_argument("--teacher", default="retinanet_resnet50_fpn")
    p.add_argument("--classes", type=int, default=80)
    p.add_argument("--outputs", default="fpn,cls,box")
    p.add_argument("--precision", default="compact", help="the preset with the most encoding work")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--amp", default="off", choices=["off", "bf16", "fp16"], help="the teacher's forward (both candidates)"
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--budget-min", type=float, default=9.0)
    p.add_argument("--work-dir", default=None)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny teacher and sizes: a smoke test")
    a = p.parse_args(argv)
    if a.quick:
        a.size, a.images, a.teacher, a.classes, a.rounds = "64x96", 5, "retinanet_tiny", 10, 1
    return a


def main(argv: list[str] | None = None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse(argv)
    t_start = time.monotonic()
    short, long = (int(x) for x in a.size.lower().split("x"))
    import ray

    from mtpd.cache.build import BuildRequest, build_store, open_or_create, plan_store
    from mtpd.data import ViewSpec
    from mtpd.teachers.registry import TeacherSpec

    views = ViewSpec(short=short, long=long)
    spec = TeacherSpec(a.teacher, "none", a.classes, a.device, amp=a.amp)
    outputs = a.outputs.split(",")
    started = False
    if TeacherOnly.__module__ != "__main__":
        # Imported (the smoke test): ship the actor class by value, Ray workers need not import `bench`.
        ray.cloudpickle.register_pickle_by_value(sys.modules[TeacherOnly.__module__])
    if not ray.is_initialized():
        # Idle OpenMP threads sleep instead of spinning, so worker CPU-seconds count work, not waiting.
        from mtpd.cache.ray_local import start_local_ray

        start_local_ray(os.cpu_count() or 1, runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}})
        started = True
    # What build_store gives its single worker: every core as torch threads on CPU, 2 threads beside a GPU.
    threads = 2 if a.device.startswith("cuda") else max(1, int(ray.cluster_resources().get("CPU", 1)))
    opts = {"num_gpus": 1, "num_cpus": 1} if a.device.startswith("cuda") else {"num_cpus": 1}
    results: dict[str, list[tuple[float, float]]] = {"teacher-only": [], "build": []}
    try:
        with tempfile.TemporaryDirectory(prefix="mtpd-bench-build-") as tmp:
            work = Path(a.work_dir or tmp)
            data = natural_images(work / "data", a.images, round(short * 0.6), round(long * 0.6), num_classes=a.classes)

            def store_options(on_shard=None) -> dict:
                return dict(
                    views=views,
                    outputs=outputs,
                    precision=a.precision,
                    batch_size=a.batch,
                    workers=1,
                    images_per_shard=a.batch,
                    progress=False,
                    on_shard=on_shard,
                    flip_calibration=0,  # a one-off before the first shard, not part of shard throughput
                )

            # The teacher-only worker's store: laid out and calibrated by the product, once, before the rounds
            # (created, no shard written: ShardWriter needs its header and index, nothing more).
            layout_store = str(work / "teacher_only_store")
            req = BuildRequest(spec, data["ann"], data["images"], layout_store, **store_options())
            layout, dataset = plan_store(req)
            open_or_create(layout_store, layout, dataset, None, spec, 0)

            def teacher_only() -> float:
                t0 = time.time()
                actor = (
                    ray.remote(TeacherOnly)
                    .options(**opts)
                    .remote(spec, data["ann"], data["images"], layout_store, a.batch, threads)
                )
                done = ray.get(actor.run.remote())
                ray.kill(actor)
                return _record(results["teacher-only"], t0, done, a.images, a.batch)

            def build() -> float:
                out = work / "store"
                shutil.rmtree(out, ignore_errors=True)
                done: list[tuple[float, float]] = []
                pid: list[int | None] = []

                def landed(shard: int, nbytes: int) -> None:
                    if not pid:
                        pid.append(_pid_of("ray::ShardWriter"))
                    done.append((time.time(), cpu_seconds(pid[0]) if pid[0] else float("nan")))

                t0 = time.time()
                build_store(spec, data["ann"], data["images"], str(out), **store_options(landed))
                return _record(results["build"], t0, done, a.images, a.batch)

            print(
                f"{a.teacher} over {a.images} image(s) at {short}x{long}, batch {a.batch}, {a.precision} {a.outputs}; "
                f"{a.rounds} round(s) ...",
                flush=True,
            )
            interleave({"teacher-only": teacher_only, "build": build}, a.rounds, deadline=t_start + 60 * a.budget_min)
    finally:
        if started:
            ray.shutdown()
    body = render(a, short, long, threads, results)
    return report(
        TITLE,
        f"{a.teacher}, {short}x{long}, batch {a.batch}, {a.precision} {a.outputs}, {a.device}"
        + (" (quick)" if a.quick else ""),
        "build.py",
        argv,
        body,
        write=not a.no_write,
    )


def _record(sink: list, t0: float, done: list[tuple[float, float]], images: int, per_shard: int) -> float:
    """Append (end-to-end images/s, steady images/s, steady CPU-s per image); return the run's seconds."""
    from mtpd.cache.dispatch import SHARDS_IN_FLIGHT

    done = sorted(done)
    wall = [d[0] for d in done]
    total = wall[-1] - t0
    k = min(SHARDS_IN_FLIGHT, len(done) - 2)
    nan = float("nan")
    steady = (len(done) - 1 - k) * per_shard / (wall[-1] - wall[k]) if k >= 0 and wall[-1] > wall[k] else nan
    cpu = (done[-1][1] - done[k][1]) / ((len(done) - 1 - k) * per_shard) if k >= 0 else nan
    sink.append((images / total, steady, cpu))
    return total


def render(a, short: int, long: int, threads: int, results: dict) -> str:
    rows = []
    for name, vals in results.items():
        rows.append([name, median([v[0] for v in vals]), median([v[1] for v in vals]), median([v[2] for v in vals])])
    e2e = ratio([v[0] for v in results["build"]], [v[0] for v in results["teacher-only"]])
    steady = ratio([v[1] for v in results["build"]], [v[1] for v in results["teacher-only"]])
    cpu = ratio([v[2] for v in results["teacher-only"]], [v[2] for v in results["build"]])
    lines = [
        f"Teacher `{a.teacher}` (random init), {a.classes} classes, outputs {a.outputs} at `{a.precision}`; "
        f"{a.images} natural-image-like image(s) at {short}x{long}, batch {a.batch}, device {a.device}, one Ray "
        "worker with "
        f"{threads} torch thread(s) for both candidates. Medians of {len(results['build'])} interleaved round(s); "
        "ratios per round [range].",
        "",
        table(["candidate", "images/s end to end", "images/s steady", "worker CPU-s / image, steady"], rows),
        "",
        table(
            ["throughput ratio build / teacher-only", "measured", "target", "met"],
            [
                [
                    "steady state, from worker CPU-s per image (load-independent)",
                    str(cpu),
                    "≥ 0.9",
                    "yes" if cpu.median >= 0.9 else "no",
                ],
                [
                    "steady state, wall clock (moves with other jobs' load)",
                    str(steady),
                    "≥ 0.9",
                    "yes" if steady.median >= 0.9 else "no",
                ],
                ["end to end, wall clock (incl. actor start, teacher build, store creation)", str(e2e), "–", "–"],
            ],
        ),
        "",
    ]
    t_cpu = median([v[2] for v in results["teacher-only"]])
    b_cpu = median([v[2] for v in results["build"]])
    extra = (
        f"The build spent {b_cpu - t_cpu:.3g} CPU-s per image beyond the teacher's {t_cpu:.3g}"
        if b_cpu - t_cpu > 0.02 * t_cpu
        else "The build's extra CPU (flatten, quantise, Blosc, checksum, zarr write) is within this run's "
        "noise of the "
        f"teacher's {t_cpu:.3g} CPU-s per image (bench/store.py measures it alone)"
    )
    lines.append(
        f"{extra}. Encoding and writing run outside the teacher lock, on other threads, while the next shard's "
        "forward runs "
        "(`SHARDS_IN_FLIGHT` shards per worker); on this 2-core machine the teacher already keeps both cores busy, "
        "so the extra "
        "CPU work can only fill the forward's idle gaps and the CPU-s ratio is the honest bound here. On a GPU worker "
        "the forward "
        "runs on the GPU and the same work lands on host cores that are otherwise idle: the build keeps pace as long "
        "as the host "
        "has about (teacher images/s x extra CPU-s per image) cores for it (see docs/scaling.md). "
        "End to end, a few images "
        "carry fixed costs (Ray actor start, a second teacher construction to validate outputs before Ray "
        "starts, store "
        "creation) that COCO's 118k images amortise."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
