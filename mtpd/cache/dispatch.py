"""Running a build's shards: in this process, or on Ray actors kept busy, with the driver alone marking shards
done as they land (``_Run``). A build of several stores (one per precision) computes each shard once and
writes it to every store that lacks it."""

from __future__ import annotations

import contextlib
import time
from typing import Callable

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
# Failures of the machinery, not of the data: the actor's process died (killed, out of memory), its node was
# lost, or an object went with it. The shard goes to a fresh actor; a data error (the teacher or an image
# raised) stops the build as before.
SYSTEM_ERRORS = (
    ray.exceptions.RayActorError,  # ActorDiedError, ActorUnavailableError
    ray.exceptions.WorkerCrashedError,
    ray.exceptions.NodeDiedError,
    ray.exceptions.LocalRayletDiedError,
    ray.exceptions.ObjectLostError,  # OwnerDiedError, ObjectReconstructionFailedError, ...
)
MAX_RETRIES = 3  # writes of one shard after system failures, before the build stops


def _root_cause(err: BaseException) -> BaseException:
    cause = getattr(err, "cause", None)
    return _root_cause(cause) if isinstance(cause, BaseException) and cause is not err else err


def start_actors(
    req: BuildRequest, dataset: CocoDataset, stores: str | list[str], n_pending: int
) -> tuple[list, Callable[[], object]]:
    """One ShardWriter actor per GPU (or ``workers`` CPU actors), never more than shards to write; and how to start
    another like them (to replace one that died)."""
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
    # No restarts by Ray itself: the driver replaces a dead actor and counts the shards it writes again.
    actor_cls = ray.remote(max_concurrency=SHARDS_IN_FLIGHT, max_restarts=0, max_task_retries=0)(ShardWriter)

    def start():
        return actor_cls.options(**opts).remote(
            req.teacher,
            str(dataset.ann_file),
            str(dataset.image_dir),
            stores,
            req.batch_size,
            threads,
            req.storage_options,
            req.skip_bad,
        )

    return [start() for _ in range(min(n_workers, n_pending))], start


class Run:
    """The driver's side of a build of one or more stores: it alone marks shards done, as they land."""

    def __init__(self, reqs: list[BuildRequest]) -> None:
        self.reqs = reqs
        self.roots: list = []
        self.headers: list[StoreHeader] = []
        self.reports: list[BuildReport] = []
        self.retries = 0  # shards written again after a system failure

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


def dispatch(
    actors: list,
    jobs: list[tuple[int, list[int]]],
    run: Run,
    progress: bool,
    respawn: Callable[[], object] | None = None,
    max_retries: int = MAX_RETRIES,
) -> None:
    """Keep ``SHARDS_IN_FLIGHT`` shards in flight per actor; mark each done as it lands.

    A shard lost to a system failure (``SYSTEM_ERRORS``) goes back to the front of the queue, and its actor is
    replaced by ``respawn()`` (once, whatever number of its shards were lost), up to ``max_retries`` times per
    shard; each retry is counted on the progress line and in the reports. After a data error, or a shard out of
    retries, no new shard starts, but shards already in flight are finished and marked, so a rerun redoes as
    little as possible.
    """
    _Dispatch(actors, jobs, run, respawn, max_retries).run(progress)


class _Dispatch:
    """``dispatch``'s state: the queue, the shards in flight and on which actor, tries per shard, replacements."""

    def __init__(self, actors: list, jobs: list, run: Run, respawn, max_retries: int) -> None:
        self.queue, self.run_, self.respawn, self.max_retries = list(jobs), run, respawn, max_retries
        self.jobs = jobs
        self.inflight: dict = {}
        self.tries: dict[int, int] = {}
        self.live = list(actors)
        self.replaced: dict[int, object] = {}  # id of a dead actor -> its replacement
        self.first_error: BaseException | None = None

    def submit(self, actor) -> None:
        shard, which = self.queue.pop(0)
        self.inflight[actor.run_many.remote(shard, which)] = (actor, shard, which)

    def fill(self, actor) -> None:
        while self.queue and sum(a is actor for a, _, _ in self.inflight.values()) < SHARDS_IN_FLIGHT:
            self.submit(actor)

    def replacement(self, actor):
        if id(actor) not in self.replaced:
            with contextlib.suppress(Exception):  # it may be gone already, with its node
                ray.kill(actor, no_restart=True)
            self.replaced[id(actor)] = self.respawn()
            self.live[self.live.index(actor)] = self.replaced[id(actor)]
        return self.replaced[id(actor)]

    def lost(self, actor, shard: int, which: list[int], e: BaseException, bar) -> None:
        """A shard lost with its worker: again on a fresh actor, or the build stops when it is out of tries."""
        self.tries[shard] = self.tries.get(shard, 0) + 1
        if self.first_error is None and self.respawn is not None and self.tries[shard] <= self.max_retries:
            self.run_.retries += 1
            bar.set_postfix(retries=self.run_.retries)
            self.queue.insert(0, (shard, which))
            self.fill(self.replacement(actor))
            return
        self.first_error = self.first_error or BuildError(
            f"shard {shard} was lost {self.tries[shard]} time(s) with its worker ({type(e).__name__}: "
            f"{_root_cause(e)}); rerun the same command to resume"
        )
        self.queue.clear()

    def run(self, progress: bool) -> None:
        for actor in self.live:
            self.fill(actor)
        run = self.run_
        bar = tqdm(
            total=run.images(self.jobs), unit="img", desc="mtpd-cache build", disable=not progress, dynamic_ncols=True
        )
        try:
            while self.inflight:
                ready, _ = ray.wait(list(self.inflight), num_returns=1)
                actor, shard, which = self.inflight.pop(ready[0])
                try:
                    results = ray.get(ready[0])
                except SYSTEM_ERRORS as e:
                    self.lost(actor, shard, which, e, bar)
                    continue
                except Exception as e:  # noqa: BLE001 - a data error stops the build, below
                    self.first_error = self.first_error or _root_cause(e)
                    self.queue.clear()
                    continue
                run.land(shard, results)
                bar.update(len(run.headers[0].shard_images(shard)))
                if self.queue:
                    self.submit(actor)
        finally:
            bar.close()
            for rep in run.reports:
                rep.retries = run.retries
            for actor in self.live:
                ray.kill(actor)
        if isinstance(self.first_error, OSError):
            raise self.first_error  # build_store words it
        if self.first_error is not None:
            raise BuildError(str(self.first_error)) from self.first_error
