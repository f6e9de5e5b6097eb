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
from typing import Any, Callable

import numpy as np
import ray

from mtpd.cache.calibrate import calibrate_store
from mtpd.cache.catalog import cache_root, store_path
from mtpd.cache.compute import Layout, plan_layout
from mtpd.cache.dispatch import BuildError, Run, dispatch, run_in_process, start_actors
from mtpd.cache.lock import WriterLock
from mtpd.cache.ray_local import ensure_ray
from mtpd.cache.request import BuildReport, BuildRequest
from mtpd.cache.schema import StoreError, StoreHeader, describe_differences, get_precision
from mtpd.cache.store import create_store, is_url, open_root, read_header, shard_status
from mtpd.data import CocoDataset, ViewSpec
from mtpd.defaults import DEFAULT_PRECISION
from mtpd.teachers.base import check_outputs
from mtpd.teachers.registry import TeacherSpec


def _default_outputs(names: list[str]) -> list[str]:
    # RPN outputs are written only on request: MTPD distills two-stage teachers from FPN alone.
    return [n for n in names if not n.startswith("rpn_")]


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
    fixed = getattr(model, "input_size", None)  # a graph with a fixed input (ONNX): every view must fit it
    del model
    plans = [
        (plan_layout(dataset, req.views, specs, outputs, prec, req.images_per_shard, identity), dataset)
        for prec in precisions
    ]
    if fixed is not None:
        _check_fits(plans[0][0].view_sizes, req.views.pad, tuple(fixed), req.teacher.name)
    return plans


def _check_fits(view_sizes: np.ndarray, pad: int, fixed: tuple[int, int], teacher: str) -> None:
    """Refuse, before any image is read, views whose padded size exceeds a fixed graph input."""
    padded = -(-view_sizes // pad) * pad
    h, w = (int(x) for x in padded.max(axis=0))
    if h > fixed[0] or w > fixed[1]:
        raise StoreError(
            f"{teacher}: views up to {h}x{w} (padded to {pad}) do not fit the graph's fixed input "
            f"{fixed[0]}x{fixed[1]}; build with --short/--long within it "
            f"(e.g. --short {min(fixed)} --long {max(fixed)})"
        )


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
    run = Run(reqs)
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
        run_in_process(req, dataset, stores, jobs, run)
    elif jobs:
        if req.on_raw is not None:
            raise BuildError("on_raw sees the maps in this process only: build with workers=0")
        started_ray = ensure_ray(req.address, req.workers, req.verbose)
        try:
            actors, respawn = start_actors(req, dataset, stores, len(jobs))
            try:
                dispatch(actors, jobs, run, req.progress, respawn)
            finally:
                if run.retries:  # the store's own record of what its builds survived
                    for root in run.roots:
                        root.attrs["build_retries"] = int(root.attrs.get("build_retries", 0)) + run.retries
        finally:
            if started_ray:
                ray.shutdown()
    for rep in run.reports:
        rep.seconds = time.perf_counter() - t0
    return run.reports


def _unmark_damaged(out: str, root, storage_options: dict | None) -> None:
    """``--repair``: shards that fail their checksum (or cannot be read) count as not written."""
    from mtpd.cache.inspect import verify_store

    for shard, _why in verify_store(out, storage_options).corrupt:
        root["index/shards"][shard] = np.zeros(3, dtype=np.uint64)
