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
    shard_bytes: dict[int, int] = field(default_factory=dict, repr=False)  # shards this build wrote: bytes each
    shard_done_at: dict[int, float] = field(default_factory=dict, repr=False)  # ... and when (perf_counter)
    # In-process builds (workers 0) only: the teacher's wall seconds (shared by every store of one pass) and this
    # store's encode + write CPU seconds.
    teacher_seconds: float = 0.0
    encode_cpu_seconds: float = 0.0


def _default_outputs(names: list[str]) -> list[str]:
    # RPN outputs are written only on request: MTPD distills two-stage teachers from FPN alone.
    return [n for n in names if not n.startswith("rpn_")]


# Calls per actor at once: one in the teacher, the others encoding and writing. Each holds a
# shard's outputs in memory (float32 before encoding), so memory grows with this number.
SHARDS_IN_FLIGHT = 3


def plan_store(req: BuildRequest) -> tuple[Layout, CocoDataset]:
    """Validate the inputs and lay the store out (the teacher is built once, on the CPU, for its output specs)."""
    return plan_stores([req])[0]


def plan_stores(reqs: list[BuildRequest]) -> list[tuple[Layout, CocoDataset]]:
    """``plan_store`` of requests that differ in precision (and where they go) only: one teacher build."""
    req = reqs[0]
    precisions = [get_precision(r.precision) for r in reqs]
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
    return [
        (plan_layout(dataset, req.views, specs, outputs, prec, req.images_per_shard, identity), dataset)
        for prec in precisions
    ]


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


def _start_actors(req: BuildRequest, dataset: CocoDataset, stores: str | list[str], n_pending: int) -> list:
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
    # workers 0 only: called with (shard, the teacher's maps of its samples) before they are encoded (benchmarks
    # that compare codes with the float32 maps)
    on_raw: Callable[[int, list], None] | None = None


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
    precision = options.pop("precision", DEFAULT_PRECISION)
    return build_stores(teacher, ann, images, [precision], [out], views, root, **options)[0]


def build_stores(
    teacher: TeacherSpec,
    ann: str,
    images: str,
    precisions: list[str],
    outs: list[str | None] | None = None,
    views: ViewSpec | None = None,
    root: str | None = None,
    **options: Any,
) -> list[BuildReport]:
    """``build_store`` of one store per precision (``outs[i]``, or under the cache root), from one teacher pass:
    each shard's forward runs once and every store encodes its own codes from the same maps. Complete stores
    are reused, partial ones resumed (a shard is computed once for every store that lacks it); each store's
    report, in ``precisions`` order."""
    outs = list(outs) if outs is not None else [None] * len(precisions)
    if not precisions or len(outs) != len(precisions) or len(set(precisions)) != len(precisions):
        raise StoreError(f"precisions {precisions}: give each once, with one output path each (or none)")
    base = BuildRequest(teacher, str(ann), str(images), "", views or ViewSpec(), **options)
    reqs = [dataclasses.replace(base, precision=p, out="" if o is None else str(o)) for p, o in zip(precisions, outs)]
    plans = plan_stores(reqs)
    for req, (layout, _) in zip(reqs, plans):
        if not req.out:
            req.out = str(store_path(cache_root(root), layout.header))
    if len({r.out for r in reqs}) != len(reqs):
        raise StoreError("two precisions resolve to one store path: give each precision its own output")
    reports = [_complete_already(req, layout) for req, (layout, _) in zip(reqs, plans)]
    todo = [i for i, rep in enumerate(reports) if rep is None]  # complete ones need no lock: read-only roots work
    if not todo:
        return reports  # type: ignore[return-value]
    req = reqs[todo[0]]
    try:
        with contextlib.ExitStack() as locks:
            for i in todo:
                req = reqs[i]
                if not is_url(req.out):
                    lock = locks.enter_context(WriterLock(req.out))
                    req.on_shard = _checking(lock, req.on_shard)
            built = _build([reqs[i] for i in todo], [plans[i][0] for i in todo], plans[0][1])
    except OSError as e:
        # the store (or its lock beside it) the error names, else the last one touched
        req = next((reqs[i] for i in todo if e.filename and str(e.filename).startswith(reqs[i].out)), req)
        ours = e.filename is None or str(e.filename).startswith(req.out)
        if e.errno not in _WRITE_ERRNOS or not ours:
            raise BuildError(f"{req.out}: {e}") from None  # not a failure to write the store: say what happened
        raise _io_error(req.out, e) from None
    for i, rep in zip(todo, built):
        reports[i] = rep
    return reports  # type: ignore[return-value]


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


def _build(reqs: list[BuildRequest], layouts: list[Layout], dataset: CocoDataset) -> list[BuildReport]:
    """Create (or open) each store, then write every shard some store lacks, each from one teacher forward."""
    t0 = time.perf_counter()
    run = _Run(reqs)
    work: dict[int, list[int]] = {}  # shard -> the stores (indices) that lack it
    for k, (req, layout) in enumerate(zip(reqs, layouts)):
        header = open_or_create(req.out, layout, dataset, req.storage_options, req.teacher, req.flip_calibration)
        root = open_root(req.out, "r+", req.storage_options)
        if req.repair:
            _unmark_damaged(req.out, root, req.storage_options)
        done = shard_status(root).done
        pending = [s for s in range(header.num_shards) if not done[s]]
        run.add(
            root,
            header,
            BuildReport(req.out, header.num_shards, 0, header.num_shards - len(pending), len(dataset), 0.0, 0, header),
        )
        for s in pending:
            work.setdefault(s, []).append(k)
    jobs = sorted(work.items())
    req = reqs[0]
    stores: str | list[str] = req.out if len(reqs) == 1 else [r.out for r in reqs]
    if jobs and req.workers == 0 and not req.address:
        _run_in_process(req, dataset, stores, jobs, run)
    elif jobs:
        if req.on_raw is not None:
            raise BuildError("on_raw sees the maps in this process only: build with workers=0")
        started_ray = ensure_ray(req.address, req.workers, req.verbose)
        try:
            actors = _start_actors(req, dataset, stores, len(jobs))
            _dispatch(actors, jobs, run, req.progress)
        finally:
            if started_ray:
                ray.shutdown()
    for rep in run.reports:
        rep.seconds = time.perf_counter() - t0
    return run.reports


class _Run:
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


def _unmark_damaged(out: str, root, storage_options: dict | None) -> None:
    """``--repair``: shards that fail their checksum (or cannot be read) count as not written."""
    from mtpd.cache.inspect import verify_store

    for shard, _why in verify_store(out, storage_options).corrupt:
        root["index/shards"][shard] = np.zeros(3, dtype=np.uint64)


def _run_in_process(
    req: BuildRequest, dataset: CocoDataset, stores: str | list[str], jobs: list[tuple[int, list[int]]], run: _Run
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


def _dispatch(actors: list, jobs: list[tuple[int, list[int]]], run: _Run, progress: bool) -> None:
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
