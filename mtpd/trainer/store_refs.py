"""A stage's stores: the paths it lists, or the store of the teacher it names, found under the cache root."""

from __future__ import annotations

import functools
import shlex
from pathlib import Path

from mtpd.cache.catalog import cache_root, find_store, record_use, store_name, teacher_reference
from mtpd.cache.store import store_header
from mtpd.data import CocoDataset, ViewSpec
from mtpd.errors import MtpdError
from mtpd.trainer.plan import Plan, PlanError, StageConfig, TeacherRef


@functools.lru_cache(maxsize=8)
def _manifest(ann: str, images: str, stamp: int) -> tuple[str, str]:
    """The dataset's manifest hash and content probe, computed once per annotation file version (COCO's JSON is
    large)."""
    ds = CocoDataset(ann, images)
    return ds.manifest_hash(), ds.content_probe()


class MissingStore(PlanError):
    """A stage's teacher has no complete store yet for the plan's data and views (the message says how to
    build it); every other PlanError here is a plan to fix."""


def train_views(plan: Plan) -> ViewSpec:
    """The views students train on: the augment policy's (its bank, or fresh views ``aug``), else orig and, with
    data.flip, hflip."""
    d = plan.data
    if d.augment is not None:
        policy = d.augment.policy()
        views = policy.bank_views() if policy.bank else ("aug",)
        return ViewSpec(short=d.short, long=d.long, views=views, augment=policy.to_dict())
    return ViewSpec(short=d.short, long=d.long, views=("orig", "hflip") if d.flip else ("orig",))


def ref_views(plan: Plan, ref: TeacherRef) -> ViewSpec:
    """The views a stage's teacher store holds: the ref's own, else what the plan's students train on (fresh
    views resampled from stores: the plain views, orig and hflip)."""
    d = plan.data
    if ref.views and d.augment is None:
        return ViewSpec(short=d.short, long=d.long, views=tuple(ref.views))
    if d.augment is not None and d.augment.resample:
        return ViewSpec(short=d.short, long=d.long, views=("orig", "hflip"))
    return train_views(plan)


def stage_sets(stage: StageConfig) -> list[str]:
    """The image sets a stage trains on: ``train`` (the labelled set) and/or ``pool``, by its pool share."""
    return [name for name, used in (("train", stage.pool < 1), ("pool", stage.pool > 0)) if used]


def set_files(plan: Plan, which: str) -> tuple[str, str]:
    """(annotation file, image folder) of the plan's ``train`` or ``pool`` set."""
    d = plan.data
    if which == "pool":
        if d.pool_ann is None or d.pool_images is None:
            raise PlanError("data.pool_ann and data.pool_images: a stage draws from the pool; set both")
        return d.pool_ann, d.pool_images
    return d.train_ann, d.train_images


def stage_stores(plan: Plan, stage: StageConfig, which: str = "train") -> list[str]:
    """The stores of the stage's ``which`` set (``train`` or ``pool``): ``stage.stores`` / ``stage.pool_stores``,
    or the one complete store of ``stage.teacher`` for that set and the plan's views; PlanError with the exact
    ``mtpd-cache build`` command when there is none yet."""
    ref = stage.teacher
    if ref is None:
        return list(stage.pool_stores if which == "pool" else stage.stores)
    d = plan.data
    ann, images = set_files(plan, which)
    spec = ref_views(plan, ref)
    onnx = ref.name.startswith("onnx:")
    if not onnx and ref.weights not in ("none", "default") and not Path(ref.weights).is_file():
        raise PlanError(f"stage {stage.name}: teacher weights {ref.weights} not found; fix teacher.weights")
    if onnx and not Path(ref.name[len("onnx:") :]).expanduser().is_file():
        raise PlanError(f"stage {stage.name}: teacher {ref.name}: mapping file not found; fix teacher.name")
    try:
        name, weights, sha = teacher_reference(ref.name, ref.weights)
    except MtpdError as e:  # an unreadable mapping file
        raise PlanError(f"stage {stage.name}: teacher {ref.name}: {e}") from None
    manifest, content = _manifest(ann, images, Path(ann).stat().st_mtime_ns)
    root = cache_root(plan.cache_root)
    exact = ref.views is not None
    found = find_store(
        root, name, weights, sha, manifest, spec.to_dict(), ref.outputs, ref.precision, "off", exact, content
    )
    if found is not None:
        return [found]
    if onnx:
        _check_graph_fits(plan, stage, ref, CocoDataset(ann, images), spec)
    cmd = [
        "mtpd-cache",
        "build",
        "--teacher",
        ref.name,
        "--weights",
        ref.weights,
        "--ann",
        ann,
        "--images",
        images,
        "--views",
        ",".join(spec.views),
        "--short",
        str(d.short),
        "--long",
        str(d.long),
        "--outputs",
        ",".join(ref.outputs),
        "--precision",
        ref.precision,
        "--root",
        str(root),
    ]
    raise MissingStore(
        f"stage {stage.name}: no complete store of teacher {ref.name} (weights {ref.weights}) for this "
        f"plan's {'pool' if which == 'pool' else 'data'} and views under {root}; build it with: {shlex.join(cmd)}"
    )


def _check_graph_fits(plan: Plan, stage: StageConfig, ref: TeacherRef, ds: CocoDataset, spec: ViewSpec) -> None:
    """A graph with a fixed input takes views of its size and no larger: views that exceed it are the plan's to
    fix, said here rather than by the build a MissingStore would name."""
    from mtpd.onnx_mapping import MappingError, fixed_input_size

    try:
        fixed = fixed_input_size(ref.name[len("onnx:") :])
    except MappingError as e:  # a graph that does not parse
        raise PlanError(f"stage {stage.name}: teacher {ref.name}: {e}") from None
    if fixed is None or not ds.images:
        return
    padded = {spec.padded_size(im.height, im.width) for im in ds.images}
    h, w = max(p[0] for p in padded), max(p[1] for p in padded)
    if h > fixed[0] or w > fixed[1]:
        raise PlanError(
            f"stage {stage.name}: teacher {ref.name}: views up to {h}x{w} (data.short {plan.data.short}, data.long "
            f"{plan.data.long}) do not fit the graph's fixed input {fixed[0]}x{fixed[1]}; set data.short and "
            f"data.long within it (e.g. short: {min(fixed)}, long: {max(fixed)}), or leave both out to take it"
        )


def describe(path: str) -> dict:
    """What a stage records about a store it read (metrics.json): enough to find it again or tell it apart."""
    h = store_header(path)
    return {
        "path": path,
        "name": store_name(h),
        "teacher": h.teacher.get("name"),
        "weights": h.teacher.get("weights"),
        "weights_sha256": h.teacher.get("weights_sha256", ""),
        "dataset": h.manifest_sha256,
        "precision": h.precision,
        "outputs": sorted(h.outputs),
    }


def note_uses(paths: list[str], run: str, stage: int, stage_name: str) -> list[dict]:
    """Record in each store that this stage read it (for ``mtpd-cache ls``) and describe the stores."""
    for p in paths:
        record_use(p, run, stage, stage_name)
    return [describe(p) for p in paths]
