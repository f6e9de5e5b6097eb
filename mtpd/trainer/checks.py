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

from mtpd.cache.store import store_header
from mtpd.data import CocoDataset
from mtpd.models import output_specs
from mtpd.output_spec import OutputSpec
from mtpd.trainer.engine import BoundLoss
from mtpd.trainer.losses import build_loss, loss_defaults
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
    stores: dict[int, list[str]],
    online: list | None = None,
) -> None:
    """Check stages ``stages`` (1-based) of ``plan`` whole, before the first one trains: PlanError (or the
    store's own error) naming the stage and key. ``stores``: each stage's resolved store paths (cached
    stages); ``online``: the online baseline's teachers instead."""
    data = plan.data
    student = build_student(plan.student, CocoDataset(data.train_ann, data.train_images).num_classes)
    for k in stages:
        cfg = plan.stages[k - 1]
        where = f"stages[{k - 1}] ({cfg.name})"
        if online is not None:
            n_sources = 1 if cfg.teacher is not None else len(cfg.stores)
            if len(online) != n_sources:
                raise PlanError(
                    f"{where}: {len(online)} online teacher(s) for {n_sources} store(s); give one per store"
                )
            specs = [t.output_specs() for t in online]
            names, mirrored = [f"online teacher {i}" for i in range(len(online))], [""] * len(online)
        else:
            headers = [store_header(p) for p in stores[k]]  # the header alone: the stage opens the store
            specs = [{n: o.spec for n, o in h.outputs.items()} for h in headers]
            names = [f"store {p}" for p in stores[k]]
            flips = data.flip
            mirrored = [
                f"store {p}" if flips and "hflip" not in h.view_names else "" for p, h in zip(stores[k], headers)
            ]
        losses = build_losses(cfg, student, specs, names, where)
        check_mirrors(specs, loss_needs(losses, len(specs)), mirrored, where)
        if cfg.inherit is not None and not Path(cfg.inherit.weights).is_file():
            raise PlanError(f"{where}.inherit.weights: {cfg.inherit.weights} not found; pass the teacher's checkpoint")
