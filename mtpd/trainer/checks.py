"""Plans checked whole before anything trains: every stage's losses against the student and its teachers.

``check_plan`` builds the student once and reads each stage's store headers (or asks the online
teachers), then runs the same ``build_losses`` the stage itself runs: loss names and parameters,
levels, channels, anchors and classes, the teacher outputs each loss needs, mirror rules where a
store serves flips from one view, and inheritance files. An error in the last stage is one line,
within seconds, instead of after the first stages have trained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from torch import nn

from mtpd.cache.schema import StoreError
from mtpd.cache.store import store_header
from mtpd.data import CocoDataset
from mtpd.models import ADAPTERS, adapter_for, output_specs
from mtpd.output_spec import OutputSpec
from mtpd.trainer.engine import BoundLoss
from mtpd.trainer.losses import LOSSES, build_loss, loss_defaults
from mtpd.trainer.plan import Plan, PlanError, StageConfig
from mtpd.trainer.student import build_student


def build_losses(
    stage: StageConfig,
    student: nn.Module,
    teachers: list[dict[str, OutputSpec]],
    sources: list[str],
    where: str,
    on_skip: Callable[[dict], None] | None = None,
) -> list[BoundLoss]:
    """Losses of a stage, checked against the student's and each teacher's levels, channels and classes.

    A feature loss distills the levels the student and its store share and reports the others through
    ``on_skip``; losses over anchors (RM) need every student level in the store."""
    specs = output_specs(student)
    student_levels = tuple(specs["fpn"].levels)
    a = specs["cls"].num_anchors if "cls" in specs else 1
    k = specs["cls"].num_classes if "cls" in specs else 0
    out: list[BoundLoss] = []
    for j, lc in enumerate(stage.losses):
        at = f"{where}.losses[{j}] ({lc.name})"
        try:
            defaults = loss_defaults(lc.name)
        except ValueError as e:
            raise PlanError(f"{where}.losses[{j}].name: {e}") from None
        have, src = teachers[lc.store], sources[lc.store]
        t_fpn = have.get("fpn")
        levels = tuple(lvl for lvl in student_levels if t_fpn is not None and lvl in t_fpn.levels)
        missing = [f"P{x}" for x in student_levels if x not in levels]
        lacks = f"{at}: the student has levels {['P%d' % x for x in student_levels]} but {src} lacks {missing}"
        if not levels:
            raise PlanError(f"{lacks}; use a teacher with those levels or a student without them")
        try:
            loss = build_loss(
                lc.name,
                levels=levels,
                student_channels=specs["fpn"].channels,
                teacher_channels=t_fpn.channels,
                num_anchors=a,
                num_classes=k,
                **lc.params,
            )
        except ValueError as e:
            raise PlanError(f"{at}: {e}") from None
        if missing and loss.needs_anchors:
            raise PlanError(f"{lacks}; {lc.name} ranks the anchors of every level: use a teacher with all of them")
        if missing and on_skip is not None:
            on_skip({"event": "levels_skipped", "loss": lc.name, "store": src, "levels": [f"P{x}" for x in levels],
                     "skipped": missing})  # fmt: skip
        _check_outputs(loss, have, src, at, (a, k))
        key = lc.name if all(b.name != lc.name for b in out) else f"{lc.name}_{lc.store}"
        if lc.weight == "auto":
            out.append(BoundLoss(loss, None, lc.store, key, auto_ratio=lc.ratio, auto_after=lc.auto_after))
        else:
            weight = float(defaults["weight"] if lc.weight is None else lc.weight)
            out.append(BoundLoss(loss, weight, lc.store, key, auto_after=lc.auto_after))
    return out


def _check_outputs(loss, have: dict[str, OutputSpec], src: str, at: str, anchors_classes: tuple[int, int]) -> None:
    """The teacher outputs ``loss`` needs are in its store, with the student's anchors and classes."""
    for name in loss.needs:
        if name not in have:
            raise PlanError(
                f"{at} needs teacher output {name!r} but {src} has {list(have)}; "
                f"rebuild it with --outputs {','.join(sorted(set(have) | {name}))}"
            )
    t_cls = have.get("cls")
    if "cls" in loss.needs and t_cls and (t_cls.num_anchors, t_cls.num_classes) != anchors_classes:
        a, k = anchors_classes
        raise PlanError(
            f"{at}: teacher has {t_cls.num_anchors} anchors x {t_cls.num_classes} classes per cell, the "
            f"student {a} x {k}; class-output losses need the same anchors and classes"
        )


def check_mirrors(
    specs: list[dict[str, OutputSpec]], needs: list[list[str]], mirrored: Sequence[str], where: str
) -> None:
    """Every output a store with the original view only must mirror (``mirrored``: those stores' names) has a
    mirror rule; an output without one (an unknown box code) needs a store with both views."""
    for have, names, src in zip(specs, needs, mirrored):
        if not src:
            continue
        for n in names:
            try:
                have[n].mirror_channels()
            except ValueError as e:
                raise PlanError(f"{where}: {src} has the original view only: {e}") from None


def loss_needs(losses: list[BoundLoss], n_sources: int) -> list[list[str]]:
    """Per source: the teacher outputs the stage's losses read."""
    return [sorted({n for b in losses if b.store == s for n in b.loss.needs}) for s in range(n_sources)]


def check_plan(
    plan: Plan,
    stages: Sequence[int],
    stores: dict[int, dict[str, list[str]]],
    online: list | None = None,
) -> None:
    """Check stages ``stages`` (1-based) of ``plan`` whole, before the first one trains: PlanError (or the
    store's own error) naming the stage and key. ``stores``: each stage's resolved store paths by set (``train``,
    ``pool``; cached stages); ``online``: the online baseline's teachers instead."""
    data = plan.data
    student = build_student(plan.student, CocoDataset(data.train_ann, data.train_images).num_classes)
    for k in stages:
        cfg = plan.stages[k - 1]
        where = f"stages[{k - 1}] ({cfg.name})"
        if online is not None:
            n_sources = 1 if cfg.teacher is not None else len(cfg.stores or cfg.pool_stores)
            if len(online) != n_sources:
                raise PlanError(
                    f"{where}: {len(online)} online teacher(s) for {n_sources} store(s); give one per store"
                )
            specs = [t.output_specs() for t in online]
            names, mirrored = [f"online teacher {i}" for i in range(len(online))], [""] * len(online)
        else:
            by_set = stores[k]
            paths = by_set.get("train") or by_set.get("pool", [])  # the pool's stores are checked against these below
            headers = [store_header(p) for p in paths]  # the header alone: the stage opens the store
            specs = [{n: o.spec for n, o in h.outputs.items()} for h in headers]
            names = [f"store {p}" for p in paths]
            per_source = [[ps[j] for ps in by_set.values()] for j in range(len(paths))]
            mirrored = [", ".join(mirrored_stores(ps, data.flip and data.augment is None)) for ps in per_source]
            if "train" in by_set and "pool" in by_set:
                check_pool_stores(*([(p, store_header(p)) for p in by_set[w]] for w in ("train", "pool")))
        if cfg.pool > 0:
            check_pool_stage(cfg, student, where)
        losses = build_losses(cfg, student, specs, names, where)
        check_mirrors(specs, loss_needs(losses, len(specs)), mirrored, where)
        if cfg.inherit is not None and not Path(cfg.inherit.weights).is_file():
            raise PlanError(f"{where}.inherit.weights: {cfg.inherit.weights} not found; pass the teacher's checkpoint")


def mirrored_stores(paths: Sequence[str], flips: bool) -> list[str]:
    """``store PATH`` for each of ``paths`` that would serve flipped samples by mirroring (no 'hflip' view)."""
    return [f"store {p}" for p in paths if flips and "hflip" not in store_header(p).view_names]


def pool_families() -> str:
    """The families whose students may train on unlabelled images, for messages."""
    return ", ".join(a.display for a in ADAPTERS if a.unlabelled_images)


def check_pool_stage(cfg: StageConfig, student: nn.Module, where: str) -> None:
    """A stage drawing from the unlabelled pool: a one-stage student (the detection loss is cut to the batch's
    labelled images), and on the pool alone no loss that reads ground truth."""
    adapter = adapter_for(student)
    if not adapter.unlabelled_images:
        raise PlanError(
            f"{where}.pool: a two-stage student ({adapter.display}) samples its RoIs from ground truth in every "
            f"image, so it cannot train on unlabelled images; use a student that can ({pool_families()}) or pool: 0"
        )
    if cfg.pool == 1 and not cfg.losses:
        raise PlanError(f"{where}.losses: a stage on the pool alone (pool: 1) learns from its losses only; add one")
    if cfg.pool == 1:
        labelled = [lc.name for lc in cfg.losses if LOSSES[lc.name].needs_labels]
        if labelled:
            raise PlanError(
                f"{where}.losses: {', '.join(labelled)} read(s) ground-truth boxes, and a stage on the pool alone "
                "(pool: 1) has none; use losses that need no labels (mgd, mse, pkd, cwd, kd, pfi), or mix labelled "
                "images in (pool below 1)"
            )


def check_pool_stores(labelled: Sequence[tuple[str, object]], pool: Sequence[tuple[str, object]]) -> None:
    """Each pool store (location, header) holds what the labelled set's store beside it holds: the same outputs,
    levels and shapes (their codings may differ: each part of a batch decodes with its own store's header)."""
    for (loc_a, h_a), (loc_b, h_b) in zip(labelled, pool):
        a = {n: o.spec for n, o in h_a.outputs.items()}  # type: ignore[attr-defined]
        b = {n: o.spec for n, o in h_b.outputs.items()}  # type: ignore[attr-defined]
        if a != b:
            raise StoreError(
                f"{loc_b}: the pool's store holds {', '.join(sorted(b))} but {loc_a} beside it holds "
                f"{', '.join(sorted(a))} (or other levels or shapes); build the pool's store with the same teacher "
                "and --outputs"
            )


def check_fresh_views(plan: Plan, stages: Sequence[int]) -> None:
    """Cached stages under ``data.augment`` with ``bank: 0`` (a fresh view every epoch): no store holds such
    views, so refuse before any store is looked for."""
    aug = plan.data.augment
    if aug is None or aug.bank or aug.resample:
        return
    for k in stages:
        cfg = plan.stages[k - 1]
        if cfg.losses and (cfg.stores or cfg.pool_stores or cfg.teacher is not None):
            raise PlanError(
                f"stages[{k - 1}] ({cfg.name}): data.augment.bank is 0, so every epoch draws fresh views, which no "
                "store holds; set data.augment.bank: K (K views per image, built once into each teacher's store), "
                "data.augment.resample: true (features warped from the plain views' stores, an approximation) or "
                "run the teachers live (mtpd-train --online-teacher)"
            )


def check_resampled(stage: str, outputs: Sequence[dict[str, OutputSpec]], needs: Sequence[Sequence[str]]) -> None:
    """A stage whose fresh views are resampled from stores reads feature maps only: class logits and box deltas
    belong to anchors of fixed pixel sizes, which a rescaled map would give to objects of other sizes.
    ``outputs``: per store, its outputs' specs; ``needs``: per store, the names the stage's losses read."""
    from mtpd.data.resample import RESAMPLABLE

    for specs, names in zip(outputs, needs):
        for name in names:
            kind = specs[name].kind
            if kind not in RESAMPLABLE:
                raise PlanError(
                    f"{stage}: a loss reads {name!r} ({kind}), which data.augment.resample cannot serve (it warps "
                    f"{', '.join(RESAMPLABLE)} maps only: {kind} belong to anchors of fixed size); use feature "
                    "losses (mgd, mse, pfi), or a bank of exact views (data.augment.bank: K, resample: false)"
                )
