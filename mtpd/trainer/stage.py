"""A distillation stage of a plan: the engine plus its hooks and a target source.

    Stage(plan, k).run()                        # stage k (1-based), from stores
    run_plan(plan, [1, 2], on_event=print)      # several stages; structured progress

The stage builds the parts from the plan (student, losses checked against the
teachers' outputs, loader, optimiser, schedule), hands them to ``Engine``, and
adds hooks: data epochs, logging (``log.jsonl``; TensorBoard event files when
``tensorboard`` is installed), checkpoints, evaluation. Teacher targets come
from stores, or with ``online`` from teachers run inside each step (the baseline
benchmarks compare against); no teacher module is ever built here.
"""

from __future__ import annotations

import json
import os
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from mtpd.cache.resample_record import recorded_resample_error
from mtpd.cache.schema import StoreError
from mtpd.cache.store import StoreReader
from mtpd.checkpoint import CheckpointError
from mtpd.data import CocoDataset, ViewSpec
from mtpd.eval import evaluate
from mtpd.models import adapter_for, unwrap
from mtpd.trainer import hooks
from mtpd.trainer.checks import (
    build_losses,
    check_fresh_views,
    check_mirrors,
    check_plan,
    check_resampled,
    loss_needs,
)
from mtpd.trainer.engine import BoundLoss, Engine, NonFiniteLoss, TrainError, auto_weight_event
from mtpd.trainer.events import Event, OnEvent, format_event
from mtpd.trainer.optim import make_optimizer, make_schedule
from mtpd.trainer.plan import Plan, PlanError, load_plan, same_plan, save_plan
from mtpd.trainer.sampler import EpochSampler, MixSampler
from mtpd.trainer.sources import OnlineTargets, OnlineTeacher, StoreTargets
from mtpd.trainer.store_refs import note_uses, stage_sets, stage_stores, train_views
from mtpd.trainer.student import build_student, inherit_from_teacher, load_checkpoint, save_student
from mtpd.trainer.targets import DistillDataset, MixedDataset, make_loader


@dataclass
class StageResult:
    stage: int
    checkpoint: Path
    metrics: dict = field(default_factory=dict)


def stage_dir(plan: Plan, k: int) -> Path:
    return Path(plan.output_dir) / f"stage_{k}"


def stage_done(plan: Plan, k: int) -> bool:
    """Stage ``k`` finished (metrics and final checkpoint written) with exactly this plan."""
    d = stage_dir(plan, k)
    if not all((d / f).is_file() for f in ("metrics.json", "final.pt", "plan.yaml")):
        return False
    # Saved plans hold absolute paths (equal plans compare equal); metrics.json says what `auto` chose.
    done = [stage_dir(plan, j) / "metrics.json" for j in range(1, len(plan.stages) + 1)]
    chosen = [json.loads(m.read_text()).get("auto_weights") if m.is_file() else None for m in done]
    return same_plan(load_plan(d / "plan.yaml"), plan, chosen)


class Stage:
    """Stage ``k`` (1-based) of ``plan``. ``online``: teachers (one per store) run inside each step instead.
    ``stores``: the stage's stores by set (``train``, ``pool``) when the caller already resolved them (``run_plan``)."""

    def __init__(
        self,
        plan: Plan,
        k: int,
        device: str = "cpu",
        resume: bool = False,
        online: list[OnlineTeacher] | None = None,
        log: Callable[[str], None] | None = print,
        on_event: OnEvent | None = None,
        stores: dict[str, list[str]] | None = None,
    ) -> None:
        if not 1 <= k <= len(plan.stages):
            raise PlanError(f"--stage {k}: the plan has stages 1..{len(plan.stages)}")
        self.plan, self.k, self.cfg = plan, k, plan.stages[k - 1]
        self.device = torch.device(device)
        self.resume, self.online = resume, online
        self.log, self.on_event = log, on_event
        self.dir = stage_dir(plan, k)
        self.n_sources = 1 if self.cfg.teacher is not None else len(self.cfg.stores or self.cfg.pool_stores)
        self.given_stores = stores
        self.stores: list[str] = []  # resolved in target_source (a cached stage only): the labelled set's
        self.pool_stores: list[str] = []  # ... and the pool's
        self.readers: list[StoreReader] = []  # ... opened there, once in this process
        self.pool_readers: list[StoreReader] = []
        self.mirrored: dict[str, dict | None] = {}  # stores serving flips by mirroring: their measured error
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1

    @property
    def all_stores(self) -> list[str]:
        return self.stores + self.pool_stores

    def emit(self, ev: Event) -> None:
        ev = {"event": ev.pop("event"), "stage": self.k, **ev}
        if self.on_event is not None:
            self.on_event(ev)
        line = format_event(ev)
        if self.log is not None and line is not None:
            self.log(line)

    def run(self) -> StageResult:
        _seed_all(self.plan.seed + self.k)
        engine, checkpointer, evaluator = self.build()
        if self.resume:
            found = checkpointer.last.is_file()
            if found:
                checkpointer.restore(engine)
            s = engine.state
            self.emit(
                {
                    "event": "resumed",
                    "checkpoint": str(checkpointer.last) if found else None,
                    "wanted": str(checkpointer.last),
                    "epoch": s.epoch,
                    "iter": s.iter,
                }
            )
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            # A run stopped after this must not leave old results beside the new plan (stage_done: finished).
            for name in ("metrics.json", "final.pt"):
                (self.dir / name).unlink(missing_ok=True)
            save_plan(self.plan, self.dir / "plan.yaml")
            note_uses(self.all_stores, str(self.plan.output_dir), self.k, self.cfg.name)  # the use, as it starts
        self.emit(
            {
                "event": "stage_start",
                "name": self.cfg.name,
                "epochs": self.cfg.epochs,
                "iters_per_epoch": engine.state.iters_per_epoch,
            }
        )
        try:
            engine.train()
        except NonFiniteLoss as e:
            kept = checkpointer.last if checkpointer.last.is_file() else "none yet"
            raise TrainError(
                f"stage {self.k}: {e}; stopped, last good checkpoint: {kept}; lower the lr or the distillation weight"
            ) from None
        return self.finish(engine, evaluator)

    # -- building the parts --------------------------------------------------------------
    def build(self) -> tuple[Engine, hooks.Checkpointer, hooks.Evaluator]:
        """The stage's parts, one build step each (as detectron2's ``DefaultTrainer.build_*``): student,
        target source and losses, data, optimiser and schedule, hooks; then the engine over them."""
        data = self.plan.data
        train = CocoDataset(data.train_ann, data.train_images)
        student = self.init_student(train.num_classes)
        source, losses, needs = self.build_losses(student)
        ds, sampler, loader = self.build_data(train, student, needs)
        opt, sched = self.build_optimizer(student, losses, len(loader))
        checkpointer = hooks.Checkpointer(self.dir / "last.pt", self.plan.checkpoint_every, self.save_final)
        evaluator = hooks.Evaluator(self.evaluate)
        stage_hooks = [hooks.EpochData(ds, sampler, data.batch_size), hooks.AutoWeights(self.auto_weight_set)]
        stage_hooks += self.logging(len(loader)) + ([checkpointer, evaluator] if self.rank == 0 else [])
        adapter = adapter_for(student)
        engine = Engine(
            student,
            loader,
            opt,
            sched,
            epochs=self.cfg.epochs,
            losses=losses,
            targets=source,
            model=self.wrap(student),
            device=self.device,
            grad_clip=self.cfg.grad_clip,
            label_offset=adapter.label_offset,
            hooks=stage_hooks,
            amp=self.cfg.amp or self.plan.amp,
            channels_last=self.plan.channels_last,
        )
        return engine, checkpointer, evaluator

    def build_losses(self, student: nn.Module) -> tuple[StoreTargets | OnlineTargets, list[BoundLoss], list[list[str]]]:
        """The target source, the losses checked against it, and what each source must give."""
        where = f"stages[{self.k - 1}] ({self.cfg.name})"
        source = self.target_source(where)
        losses = self.losses = build_losses(self.cfg, student, source.outputs(), source.names(), where, self.emit)
        needs = loss_needs(losses, self.n_sources)
        if isinstance(source, OnlineTargets):
            source.needs = needs
        else:
            parts = [p for p in (self.stores, self.pool_stores) if p]
            mirrored = [", ".join(f"store {p[j]}" for p in parts if p[j] in self.mirrored) for j in range(len(needs))]
            check_mirrors(source.outputs(), needs, mirrored, where)
            if self.plan.data.augment is not None and self.plan.data.augment.resample:
                check_resampled(where, source.outputs(), needs)
        return source, losses, needs

    def build_data(
        self, train: CocoDataset, student: nn.Module, needs: list[list[str]]
    ) -> tuple[DistillDataset | MixedDataset, EpochSampler | MixSampler, DataLoader]:
        data, seed, share = self.plan.data, self.plan.seed, self.cfg.pool
        spec = train_views(self.plan)
        with_masks = adapter_for(student).needs_masks
        rs = dict(resample=bool(data.augment and data.augment.resample))  # fresh views warped from plain stores
        ds: DistillDataset | MixedDataset
        sampler: EpochSampler | MixSampler
        if share == 0:
            ds = DistillDataset(train, spec, self.readers, data.flip, seed, needs, with_masks, **rs)
            sampler = EpochSampler(len(ds), seed, self.rank, self.world)
        else:
            lab = DistillDataset(train, spec, self.readers, data.flip, seed, needs, **rs) if share < 1 else None
            pool_set = CocoDataset(data.pool_ann, data.pool_images)  # type: ignore[arg-type]  (checked by the plan)
            pool = DistillDataset(pool_set, spec, self.pool_readers, data.flip, seed + 1, needs, **rs)
            ds = MixedDataset(lab, pool)
            per_pool = data.batch_size if share == 1 else round(share * data.batch_size)
            n_lab = ds.n_labelled
            sampler = MixSampler(n_lab, ds.n_pool, data.batch_size - per_pool, per_pool, seed, self.rank, self.world)
        pin = self.device.type == "cuda"  # page-locked batches: the copy to the GPU overlaps its work
        loader = make_loader(
            ds, data.batch_size, shuffle=False, workers=data.workers, seed=seed, sampler=sampler, pin_memory=pin
        )
        return ds, sampler, loader

    def build_optimizer(self, student: nn.Module, losses: list[BoundLoss], iters_per_epoch: int) -> tuple:
        """The optimiser over the student's and the losses' trainable parameters (generators, adapters), and
        its schedule."""
        loss_mods = nn.ModuleList([b.loss for b in losses]).to(self.device)
        params = [p for p in list(student.parameters()) + list(loss_mods.parameters()) if p.requires_grad]
        opt = make_optimizer(self.cfg, params, self.plan.data.batch_size * self.world)
        return opt, make_schedule(opt, self.cfg, iters_per_epoch)

    def init_student(self, num_classes: int) -> nn.Module:
        student = build_student(self.plan.student, num_classes)
        if self.k > 1:
            prev = stage_dir(self.plan, self.k - 1) / "final.pt"
            if not prev.is_file():
                raise CheckpointError(
                    f"{prev}: stage {self.k - 1} checkpoint missing; "
                    f"run `mtpd-train --plan PLAN --stage {self.k - 1}` first"
                )
            student.load_state_dict(load_checkpoint(prev)["model"])
        inherit = self.cfg.inherit
        if inherit is not None:
            copied = inherit_from_teacher(student, inherit.weights, inherit.parts)
            self.emit(
                {"event": "inherited", "tensors": len(copied), "parts": list(inherit.parts), "weights": inherit.weights}
            )
        return student.to(self.device)

    def target_source(self, where: str) -> StoreTargets | OnlineTargets:
        """Stores (opened for their headers; the loader reads them), or the online teachers."""
        if self.online is None:
            # A named teacher's store is found under the cache root (once: run_plan hands it over).
            given = self.given_stores or {}
            found = {w: given[w] if w in given else stage_stores(self.plan, self.cfg, w) for w in stage_sets(self.cfg)}
            self.stores, self.pool_stores = found.get("train", []), found.get("pool", [])
            self.readers = [StoreReader(p) for p in self.stores]  # opened once: the loader reads these
            self.pool_readers = [StoreReader(p) for p in self.pool_stores]
            for r in self.readers + self.pool_readers:
                if self.plan.data.flip and self.plan.data.augment is None and "hflip" not in r.header.view_names:
                    self.mirrored[r.location] = r.root.attrs.get("flip_error")
                    self.emit({"event": "mirrored", "store": r.location, "flip_error": self.mirrored[r.location]})
            aug = self.plan.data.augment
            for r in self.readers + self.pool_readers if aug is not None and aug.resample else []:
                err = recorded_resample_error(r.root.attrs, aug.policy())  # type: ignore[union-attr]
                self.emit({"event": "resampled", "store": r.location, "resample_error": err})
            return StoreTargets(self.readers, self.pool_readers)
        if len(self.online) != self.n_sources:
            raise PlanError(
                f"{where}: {len(self.online)} online teacher(s) for {self.n_sources} store(s); give one per store"
            )
        return OnlineTargets(self.online)

    def wrap(self, student: nn.Module) -> nn.Module:
        from mtpd.models.detect import DetectorStep

        model: nn.Module = DetectorStep(student)
        if self.world > 1:
            # Unused: e.g. the box head of a student distilled on features only in some steps.
            model = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        return model

    def logging(self, iters: int) -> list[hooks.HookBase]:
        """Rank 0 logs each record to log.jsonl, TensorBoard (when installed) and the events."""
        if self.rank != 0:
            return []
        self.dir.mkdir(parents=True, exist_ok=True)
        sinks: list[hooks.Sink] = [hooks.JsonLines(self.dir / "log.jsonl")]
        if hooks.TensorBoard.available():
            try:
                sinks.append(hooks.TensorBoard(self.dir / "tb"))
            except Exception as e:  # noqa: BLE001 - an optional logger never stops training
                warnings.warn(f"TensorBoard logging is off: {type(e).__name__}: {e}", stacklevel=2)
        epochs = self.cfg.epochs
        sinks.append(
            lambda rec: self.emit(
                {"event": "step", **rec, "epochs": epochs, "iters": iters, "epoch_end": rec["iter"] == iters}
            )
        )
        return [hooks.MetricsLogger(self.k, self.plan.log_every, sinks)]

    def auto_weight_set(self, name: str, weight: float) -> None:
        """A ``weight: auto`` value, once chosen: logged, and written into the stage's plan and the resolved plan,
        so that a rerun of either reproduces the run with a fixed weight."""
        for b, lc in zip(self.losses, self.cfg.losses):
            if b.name == name:
                lc.weight = weight
                self.emit(auto_weight_event(b, weight, lc.ratio))
        if self.rank == 0:
            save_plan(self.plan, self.dir / "plan.yaml")
            save_plan(self.plan, Path(self.plan.output_dir) / "plan.resolved.yaml")

    # -- the end of a stage --------------------------------------------------------------
    def save_final(self, student: nn.Module) -> None:
        save_student(student, self.dir / "final.pt", stage=self.k, stage_name=self.cfg.name)

    def evaluate(self, student: nn.Module) -> dict:
        d = self.plan.data
        if not (self.cfg.eval and d.val_ann and d.val_images):
            return {}
        spec = ViewSpec(short=d.short, long=d.long)
        return evaluate(unwrap(student), CocoDataset(d.val_ann, d.val_images), spec, d.val_batch_size, self.device)

    def finish(self, engine: Engine, evaluator: hooks.Evaluator) -> StageResult:
        final = self.dir / "final.pt"
        metrics: dict = {"stage": self.k, "name": self.cfg.name, "train_seconds": engine.state.train_seconds}
        if self.rank == 0:
            metrics.update(evaluator.metrics)
            if self.all_stores:  # which stores this stage read, and a use record in each (mtpd-cache ls)
                metrics["stores"] = note_uses(self.all_stores, str(self.plan.output_dir), self.k, self.cfg.name)
            if self.mirrored:  # flipped samples mirrored from orig-only stores, with the error measured at build
                metrics["mirrored_flips"] = self.mirrored
            if auto := {b.name: b.weight for b in engine.losses if b.auto_ratio is not None}:
                metrics["auto_weights"] = auto  # which saved weights auto chose (stage_done tells them apart)
            # metrics.json marks the stage done (stage_done): write it whole or not at all.
            tmp = self.dir / "metrics.json.tmp"
            tmp.write_text(json.dumps(metrics, indent=2))
            os.replace(tmp, self.dir / "metrics.json")
            self.emit({"event": "stage_end", "name": self.cfg.name, "checkpoint": str(final), "metrics": metrics})
        if self.world > 1:
            dist.barrier()  # the next stage on every rank starts from the checkpoint rank 0 just wrote
        return StageResult(self.k, final, metrics)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_plan(
    plan: Plan,
    stages: list[int],
    device: str = "cpu",
    resume: bool = False,
    online: list[OnlineTeacher] | None = None,
    log: Callable[[str], None] | None = print,
    on_event: OnEvent | None = None,
) -> list[StageResult]:
    """Run ``stages`` of ``plan`` in order; progress goes to ``on_event`` (dicts) and ``log`` (lines)."""
    # Every named teacher's store is found, and every stage checked whole, before the first stage trains.
    bad = [k for k in stages if not 1 <= k <= len(plan.stages)]
    if bad:
        raise PlanError(f"--stage {bad[0]}: the plan has stages 1..{len(plan.stages)}")
    if online is None:
        check_fresh_views(plan, stages)
    stores = {
        k: {w: stage_stores(plan, plan.stages[k - 1], w) for w in stage_sets(plan.stages[k - 1])}
        for k in stages
        if online is None
    }
    check_plan(plan, stages, stores, online)
    Path(plan.output_dir).mkdir(parents=True, exist_ok=True)
    save_plan(plan, Path(plan.output_dir) / "plan.resolved.yaml")
    return [Stage(plan, k, device, resume, online, log, on_event, stores.get(k)).run() for k in stages]


__all__ = ["Stage", "StageResult", "StoreError", "TrainError", "build_losses", "run_plan", "stage_dir", "stage_done"]
