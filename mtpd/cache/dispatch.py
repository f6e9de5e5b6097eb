"""Running a build's shards: in this process, or on Ray actors kept busy, with the driver alone marking shards
done as they land (``_Run``). A build of several stores (one per precision) computes each shard once and
writes it to every store that lacks it."""

from __future__ import annotations

import time

import ray
from tqdm import tqdm

from mtpd.cache.compute import ShardWriter
from mtpd.cache.request import BuildReport, BuildRequest
from mtpd.cache.schema import StoreHeader
from mtpd.cache.store import mark_done
from mtpd.data import CocoDataset
from mtpd.errors import MtpdError


class BuildError(MtpdError, RuntimeError):
    """A build that stopped; finished shards stay in the store, marked done."""


# Calls per actor at once: one in the teacher, the others encoding and writing. Each holds a
# shard's outputs in memory (float32 before encoding), so memory grows with this number.
SHARDS_IN_FLIGHT = 3


def _root_cause(err: BaseException) -> BaseException:
    cause = getattr(err, "cause", None)
    return _root_cause(cause) if isinstance(cause, BaseException) and cause is not err else err


def start_actors(req: BuildRequest, dataset: CocoDataset, stores: str | list[str], n_pending: int) -> list:
    """One ShardWriter actor per GPU (or ``workers`` CPU actors), never more than shards to write."""
    workers = req.workers
    if req.teacher.device.startswith("cuda"):
        n_gpu = int(ray.cluster_resources().get("GPU", 0))
        if n_gpu == 0:
            raise BuildError(
                "--device cuda but the Ray cluster has no GPUs; use --device cpu or start Ray on GPU nodes"
            )
        n_workers = min(workers if workers and workers > 0 else n_gpu, n_gpu)
        opts, threads = {"num_gpus": 1, "num_cpus": 1}, 2
    else:
        n_workers = max(1, workers)
        threads = max(1, int(ray.cluster_resources().get("CPU", 1)) // n_workers)
        opts = {"num_cpus": 1}
    actor_cls = ray.remote(max_concurrency=SHARDS_IN_FLIGHT, max_restarts=1, max_task_retries=2)(ShardWriter)
    return [
        actor_cls.options(**opts).remote(
            req.teacher,
            str(dataset.ann_file),
            str(dataset.image_dir),
            stores,
            req.batch_size,
            threads,
            req.storage_options,
            req.skip_bad,
        )
        for _ in range(min(n_workers, n_pending))
    ]


class Run:
    """The driver's side of a build of one or more stores: it alone marks shards done, as they land."""

    def __init__(self, reqs: list[BuildRequest]) -> None:
        self.reqs = reqs
        self.roots: list = []
        self.headers: list[StoreHeader] = []
        self.reports: list[BuildReport] = []

    def add(self, root, header: StoreHeader, report: BuildReport) -> None:
        self.roots.append(root)
        self.headers.append(header)
        self.reports.append(report)

    def images(self, jobs: list[tuple[int, list[int]]]) -> int:
        return sum(len(self.headers[0].shard_images(s)) for s, _ in jobs)

    def land(self, shard: int, results: list[tuple[int, int, int]]) -> None:
        for k, nbytes, checksum in results:
            mark_done(self.roots[k], shard, nbytes, checksum)
            rep = self.reports[k]
            rep.shards_written += 1
            rep.bytes_written += nbytes
            rep.shard_bytes[shard] = nbytes
            rep.shard_done_at[shard] = time.perf_counter()
            if self.reqs[k].on_shard:
                self.reqs[k].on_shard(shard, nbytes)


def run_in_process(
    req: BuildRequest, dataset: CocoDataset, stores: str | list[str], jobs: list[tuple[int, list[int]]], run: Run
) -> None:
    """``--workers 0``: the same shard writer in this process, no Ray (debugging, tiny sets, tests)."""
    import torch

    writer = ShardWriter(
        req.teacher,
        str(dataset.ann_file),
        str(dataset.image_dir),
        stores,
        req.batch_size,
        torch.get_num_threads(),
        req.storage_options,
        req.skip_bad,
    )
    writer.on_raw = req.on_raw
    bar = tqdm(
        total=run.images(jobs), unit="img", desc="mtpd-cache build", disable=not req.progress, dynamic_ncols=True
    )
    try:
        for shard, which in jobs:
            try:
                results = writer.run_many(shard, which)
            except OSError:
                raise  # build_store words it
            except Exception as e:  # noqa: BLE001 - the same one-line error as a Ray worker's
                raise BuildError(str(e)) from e
            run.land(shard, results)
            bar.update(len(run.headers[0].shard_images(shard)))
    finally:
        bar.close()
        for k, rep in enumerate(run.reports):
            rep.teacher_seconds = writer.teacher_seconds
            rep.encode_cpu_seconds = writer.encode_cpu_seconds[k]
        writer.computer.close()


def dispatch(actors: list, jobs: list[tuple[int, list[int]]], run: Run, progress: bool) -> None:
    """Keep ``SHARDS_IN_FLIGHT`` shards in flight per actor; mark each done as it lands.

    After a worker error no new shard starts, but shards already in flight are
    finished and marked, so a rerun redoes as little as possible.
    """
    queue = list(jobs)
    inflight: dict = {}

    def submit(actor) -> None:
        shard, which = queue.pop(0)
        inflight[actor.run_many.remote(shard, which)] = (actor, shard)

    for actor in actors:
        for _ in range(SHARDS_IN_FLIGHT):
            if queue:
                submit(actor)
    bar = tqdm(total=run.images(jobs), unit="img", desc="mtpd-cache build", disable=not progress, dynamic_ncols=True)
    first_error: BaseException | None = None
    try:
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            actor, shard = inflight.pop(ready[0])
            try:
                results = ray.get(ready[0])
            except Exception as e:  # noqa: BLE001 - any worker failure stops the build, below
                first_error = first_error or _root_cause(e)
                queue.clear()
                continue
            run.land(shard, results)
            bar.update(len(run.headers[0].shard_images(shard)))
            if queue:
                submit(actor)
    finally:
        bar.close()
        for actor in actors:
            ray.kill(actor)
    if isinstance(first_error, OSError):
        raise first_error  # build_store words it
    if first_error is not None:
        raise BuildError(str(first_error)) from first_error
