"""`mtpd-cache build`: run a teacher once over a dataset with Ray workers, into a store.

The driver validates everything it can before Ray starts (dataset, views,
teacher, weights, outputs), creates the store and all its arrays, then hands
whole shards to workers. Workers load the teacher once, write their shards
straight to the store and return only (shard, bytes, checksum): no tensor
crosses Ray's object store. The driver alone marks shards done, so a rerun
skips them; a failure stops the build with finished shards kept and marked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import ray
from tqdm import tqdm

from mtpd.cache.calibrate import calibrate_store
from mtpd.cache.catalog import cache_root, store_path
from mtpd.cache.compute import Layout, ShardWriter, plan_layout
from mtpd.cache.flip import FLIP_CALIBRATION
from mtpd.cache.lock import WriterLock
from mtpd.cache.ray_local import ensure_ray
from mtpd.cache.schema import StoreError, StoreHeader, describe_differences, get_precision
from mtpd.cache.store import create_store, is_url, mark_done, open_root, read_header, shard_status
from mtpd.data import CocoDataset, ViewSpec
from mtpd.defaults import DEFAULT_PRECISION
from mtpd.errors import MtpdError
from mtpd.teachers.base import check_outputs
from mtpd.teachers.registry import TeacherSpec


class BuildError(MtpdError, RuntimeError):
    """A build that stopped; finished shards stay in the store, marked done."""


@dataclass
class BuildReport:
    store: str
    shards_total: int
    shards_written: int
    shards_skipped: int
    images: int
    seconds: float
    bytes_written: int
    header: StoreHeader = field(repr=False)


def _default_outputs(names: list[str]) -> list[str]:
    # RPN outputs are written only on request: MTPD distills two-stage teachers from FPN alone.
    return [n for n in names if not n.startswith("rpn_")]


# Calls per actor at once: one in the teacher, the others encoding and writing. Each holds a
# shard's outputs in memory (float32 before encoding), so memory grows with this number.
SHARDS_IN_FLIGHT = 3


def plan_store(req: BuildRequest) -> tuple[Layout, CocoDataset]:
    """Validate the inputs and lay the store out (the teacher is built once, on the CPU, for its output specs)."""
    prec = get_precision(req.precision)
    dataset = CocoDataset(req.ann, req.images)
    if len(dataset) == 0:
        raise StoreError(f"{req.ann}: no images; nothing to cache")
    if req.images_per_shard < 1:
        raise StoreError(f"--images-per-shard must be at least 1, got {req.images_per_shard}")
    model = dataclasses.replace(req.teacher, device="cpu").build()
    specs = model.output_specs()
    outputs = list(req.outputs) if req.outputs else _default_outputs(list(specs))
    check_outputs(model, outputs, req.teacher.name)
    identity = model.identity.to_dict()
    del model
    return plan_layout(dataset, req.views, specs, outputs, prec, req.images_per_shard, identity), dataset


def open_or_create(
    out: str,
    layout: Layout,
    dataset: CocoDataset,
    storage_options: dict | None,
    teacher: TeacherSpec | None = None,
    flip_calibration: int = 0,
) -> StoreHeader:
    """Create the store, or check that the one at ``out`` was built with the same settings (a resume).
    A new store without the 'hflip' view records how far mirrored maps are from the teacher's flipped
    view (``mtpd.cache.flip``), measured here with ``teacher``."""
    header = layout.header
    if _store_exists(out, storage_options):
        old = read_header(open_root(out, "r+", storage_options), out)
        diffs = describe_differences(old.identity(), header.identity())
        if diffs:
            raise StoreError(
                f"{out} was built with different settings and cannot be resumed: "
                + "; ".join(diffs[:4])
                + ("; …" if len(diffs) > 4 else "")
                + ". Use another --out, or delete the store to rebuild it."
            )
        return old
    calibration, attrs = calibrate_store(teacher, dataset, header, flip_calibration)
    recs = dataset.images
    create_store(
        out,
        header,
        image_ids=np.array([r.image_id for r in recs], np.int64),
        orig_sizes=np.array([[r.height, r.width] for r in recs], np.int32),
        file_names=[r.file_name for r in recs],
        view_sizes=layout.view_sizes,
        grids=layout.grids,
        storage_options=storage_options,
        calibration=calibration,
    )
    root = open_root(out, "r+", storage_options)
    root.attrs.update(attrs)
    return read_header(root, out)  # with the fitted state attached


def _store_exists(out: str, storage_options: dict | None) -> bool:
    try:
        root = open_root(out, "r", storage_options)
    except StoreError:
        return False
    # A store whose attributes were never written was interrupted while being created.
    return "mtpd_format" in dict(root.attrs)


def _root_cause(err: BaseException) -> BaseException:
    cause = getattr(err, "cause", None)
    return _root_cause(cause) if isinstance(cause, BaseException) and cause is not err else err


def _start_actors(req: BuildRequest, dataset: CocoDataset, n_pending: int) -> list:
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
            req.out,
            req.batch_size,
            threads,
            req.storage_options,
            req.skip_bad,
        )
        for _ in range(min(n_workers, n_pending))
    ]


@dataclass
class BuildRequest:
    """Everything one build is asked to do (``build_store``'s arguments, in one place)."""

    teacher: TeacherSpec
    ann: str
    images: str
    out: str
    views: ViewSpec = field(default_factory=ViewSpec)
    outputs: list[str] | None = None
    precision: str = DEFAULT_PRECISION
    batch_size: int = 2
    workers: int = 1
    images_per_shard: int = 16
    address: str | None = None
    storage_options: dict | None = None
    progress: bool = True
    on_shard: Callable[[int, int], None] | None = None
    verbose: bool = False  # the local Ray instance's start-up messages and worker logs
    repair: bool = False  # re-verify done shards and rewrite the damaged ones
    skip_bad: bool = False  # record unreadable images in the store and go on, instead of stopping
    flip_calibration: int = FLIP_CALIBRATION  # images to measure mirrored maps on (orig-only stores; 0: skip)


def build_store(
    teacher: TeacherSpec,
    ann: str,
    images: str,
    out: str | None = None,
    views: ViewSpec | None = None,
    root: str | None = None,
    **options: Any,
) -> BuildReport:
    """Build (or resume) a store. See the module docstring for the protocol; ``options`` are
    ``BuildRequest``'s fields.

    ``out`` None: the store goes under the cache root (``root``, else ``$MTPD_CACHE_ROOT``, else
    ~/.cache/mtpd), named by its identity (``mtpd.cache.catalog``): building it again finds it
    complete and writes nothing; a partial one resumes. ``on_shard(shard, stored_bytes)`` is called
    in the driver as each shard is marked done. A local store is written under its writer lock
    (``mtpd.cache.lock``): a second builder on it stops with a clear message.
    """
    req = BuildRequest(teacher, str(ann), str(images), "" if out is None else str(out), views or ViewSpec(), **options)
    layout, dataset = plan_store(req)
    if out is None:
        req.out = str(store_path(cache_root(root), layout.header))
    done = _complete_already(req, layout)
    if done is not None:
        return done  # read-only: needs no lock, so it also works on a root only readable to this user
    lock = None if is_url(req.out) else WriterLock(req.out)
    try:
        with lock or contextlib.nullcontext():
            if lock is not None:
                req.on_shard = _checking(lock, req.on_shard)
            return _build(req, layout, dataset)
    except OSError as e:
        ours = e.filename is None or str(e.filename).startswith(req.out)  # the store and its lock beside it
        if e.errno not in _WRITE_ERRNOS or not ours:
            raise BuildError(f"{req.out}: {e}") from None  # not a failure to write the store: say what happened
        raise _io_error(req.out, e) from None


def _complete_already(req: BuildRequest, layout: Layout) -> BuildReport | None:
    """The report of a store at ``req.out`` with this identity and every shard done (None otherwise)."""
    if req.repair or not _store_exists(req.out, req.storage_options):
        return None
    try:
        root = open_root(req.out, "r", req.storage_options)
        old = read_header(root, req.out)
        done = shard_status(root).done
    except (StoreError, KeyError, OSError):
        return None  # let the locked path say what is wrong
    if describe_differences(old.identity(), layout.header.identity()) or not done.all():
        return None
    return BuildReport(req.out, old.num_shards, 0, old.num_shards, old.num_images, 0.0, 0, old)


def _checking(lock: WriterLock, on_shard: Callable[[int, int], None] | None) -> Callable[[int, int], None]:
    """After each shard: stop if another builder took the lock over, then the caller's callback."""

    def on_done(shard: int, nbytes: int) -> None:
        lock.check()
        if on_shard is not None:
            on_shard(shard, nbytes)

    return on_done


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


def _io_error(out: str, e: OSError) -> BuildError:
    """One line for a store that cannot be written (disk full, no permission, read-only file system)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        advice = "free space on that file system or choose another --out"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        advice = "give this user write access there or choose another --out"
    else:
        advice = "fix the cause or choose another --out"
    where = f" ({e.filename})" if e.filename else ""
    return BuildError(
        f"{out}: cannot write the store: {e.strerror or e}{where}; the shards already done are kept and stay "
        f"marked done: {advice}, then rerun the same command to resume"
    )


def _build(req: BuildRequest, layout: Layout, dataset: CocoDataset) -> BuildReport:
    t0 = time.perf_counter()
    header = open_or_create(req.out, layout, dataset, req.storage_options, req.teacher, req.flip_calibration)
    root = open_root(req.out, "r+", req.storage_options)
    if req.repair:
        _unmark_damaged(req.out, root, req.storage_options)
    done = shard_status(root).done
    pending = [s for s in range(header.num_shards) if not done[s]]
    report = BuildReport(req.out, header.num_shards, 0, header.num_shards - len(pending), len(dataset), 0.0, 0, header)
    if pending and req.workers == 0 and not req.address:
        report = _run_in_process(req, dataset, pending, root, header, report)
    elif pending:
        started_ray = ensure_ray(req.address, req.workers, req.verbose)
        try:
            actors = _start_actors(req, dataset, len(pending))
            report = _dispatch(actors, pending, root, header, report, req.progress, req.on_shard)
        finally:
            if started_ray:
                ray.shutdown()
    report.seconds = time.perf_counter() - t0
    return report


def _unmark_damaged(out: str, root, storage_options: dict | None) -> None:
    """``--repair``: shards that fail their checksum (or cannot be read) count as not written."""
    from mtpd.cache.inspect import verify_store

    for shard, _why in verify_store(out, storage_options).corrupt:
        root["index/shards"][shard] = np.zeros(3, dtype=np.uint64)


def _run_in_process(
    req: BuildRequest, dataset: CocoDataset, pending: list[int], root, header: StoreHeader, report: BuildReport
) -> BuildReport:
    """``--workers 0``: the same shard writer in this process, no Ray (debugging, tiny sets, tests)."""
    import torch

    writer = ShardWriter(
        req.teacher,
        str(dataset.ann_file),
        str(dataset.image_dir),
        req.out,
        req.batch_size,
        torch.get_num_threads(),
        req.storage_options,
        req.skip_bad,
    )
    bar = tqdm(
        total=sum(len(header.shard_images(s)) for s in pending),
        unit="img",
        desc="mtpd-cache build",
        disable=not req.progress,
        dynamic_ncols=True,
    )
    try:
        for s in pending:
            try:
                shard, nbytes, checksum = writer.run(s)
            except OSError:
                raise  # build_store words it
            except Exception as e:  # noqa: BLE001 - the same one-line error as a Ray worker's
                raise BuildError(str(e)) from e
            mark_done(root, shard, nbytes, checksum)
            report.shards_written += 1
            report.bytes_written += nbytes
            bar.update(len(header.shard_images(shard)))
            if req.on_shard:
                req.on_shard(shard, nbytes)
    finally:
        bar.close()
    return report


def _dispatch(
    actors: list,
    pending: list[int],
    root,
    header: StoreHeader,
    report: BuildReport,
    progress: bool,
    on_shard: Callable[[int, int], None] | None = None,
) -> BuildReport:
    """Keep ``SHARDS_IN_FLIGHT`` shards in flight per actor; mark each done as it lands.

    After a worker error no new shard starts, but shards already in flight are
    finished and marked, so a rerun redoes as little as possible.
    """
    queue = list(pending)
    inflight: dict = {}
    for actor in actors:
        for _ in range(SHARDS_IN_FLIGHT):
            if queue:
                inflight[actor.run.remote(queue.pop(0))] = actor
    total_images = sum(len(header.shard_images(s)) for s in pending)
    bar = tqdm(total=total_images, unit="img", desc="mtpd-cache build", disable=not progress, dynamic_ncols=True)
    first_error: BaseException | None = None
    try:
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            actor = inflight.pop(ready[0])
            try:
                shard, nbytes, checksum = ray.get(ready[0])
            except Exception as e:  # noqa: BLE001 - any worker failure stops the build, below
                first_error = first_error or _root_cause(e)
                queue.clear()
                continue
            mark_done(root, shard, nbytes, checksum)
            report.shards_written += 1
            report.bytes_written += nbytes
            bar.update(len(header.shard_images(shard)))
            if on_shard is not None:
                on_shard(shard, nbytes)
            if queue:
                inflight[actor.run.remote(queue.pop(0))] = actor
    finally:
        bar.close()
        for actor in actors:
            ray.kill(actor)
    if isinstance(first_error, OSError):
        raise first_error  # build_store words it
    if first_error is not None:
        raise BuildError(str(first_error)) from first_error
    return report
