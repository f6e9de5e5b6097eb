"""The stage runner: one distillation stage of a plan, read top to bottom.

    for each epoch, for each batch:
        student forward -> detection losses (torchvision's) + Σ weight · distillation loss
        backward, clip, step, schedule
        checkpoint (model, losses' adapters, optimiser, scheduler, RNG, epoch, iteration)
    save the student, evaluate, write stage_K/metrics.json

Teacher outputs come from stores through ``DistillDataset``. The only other
source is ``online``: callables that compute targets inside the step, the
baseline that benchmarks and the equivalence test compare against.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from mtpd.cache.schema import StoreError
from mtpd.cache.store import StoreReader
from mtpd.data import CocoDataset, ViewSpec
from mtpd.models import arch_family, model_anchors, output_specs, unwrap
from mtpd.models.detect import DetectorStep
from mtpd.trainer.evaluate import evaluate
from mtpd.trainer.losses import DistillBatch, DistillLoss, build_loss, loss_defaults
from mtpd.trainer.plan import Plan, PlanError, StageConfig, save_plan
from mtpd.trainer.sampler import EpochSampler
from mtpd.trainer.student import CheckpointError, _atomic_save, build_student, inherit_from_teacher, label_offset, load_checkpoint
from mtpd.trainer.targets import Batch, DistillDataset, make_loader

# online[k](images [B,3,H,W] of one view each, names) -> {"fpn.p3": [B,C,h,w], ...}: stands in for store k.
OnlineTarget = Callable[[Tensor, list[str]], dict[str, Tensor]]


class TrainError(RuntimeError):
    """A stage that stopped; the message says where and what was kept."""


@dataclass
class BoundLoss:
    """A distillation loss with its weight and the store that feeds it."""

    loss: DistillLoss
    weight: float
    store: int
    name: str


@dataclass
class StageResult:
    stage: int
    checkpoint: Path
    metrics: dict = field(default_factory=dict)


def stage_dir(plan: Plan, k: int) -> Path:
    return Path(plan.output_dir) / f"stage_{k}"


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])


def build_losses(stage: StageConfig, student: nn.Module, readers: list[StoreReader], where: str) -> list[BoundLoss]:
    """Losses of a stage, checked against the student's and each store's levels, channels and classes."""
    specs = output_specs(student)
    levels = tuple(specs["fpn"].levels)
    out = []
    for j, lc in enumerate(stage.losses):
        try:
            defaults = loss_defaults(lc.name)
        except ValueError as e:
            raise PlanError(f"{where}.losses[{j}].name: {e}") from None
        h = readers[lc.store].header
        loc = readers[lc.store].location
        t_fpn = h.outputs.get("fpn")
        missing = [lvl for lvl in levels if t_fpn is None or lvl not in t_fpn["levels"]]
        if missing:
            raise PlanError(
                f"{where}.losses[{j}] ({lc.name}): the student has levels {['P%d' % x for x in levels]} but store {loc} lacks "
                f"{['P%d' % x for x in missing]}; no adapter bridges missing levels: use a teacher store with those levels or a student without them"
            )
        a = specs["cls"].num_anchors if "cls" in specs else 1
        k = specs["cls"].num_classes if "cls" in specs else 0
        cls_meta = h.outputs.get("cls")
        try:
            loss = build_loss(lc.name, levels=levels, student_channels=specs["fpn"].channels, teacher_channels=int(t_fpn["channels"]),
                              num_anchors=a, num_classes=k, **lc.params)
        except ValueError as e:
            raise PlanError(f"{where}.losses[{j}] ({lc.name}): {e}") from None
        for name in loss.needs:
            if name not in h.outputs:
                raise PlanError(f"{where}.losses[{j}] ({lc.name}) needs teacher output {name!r} but store {loc} has {list(h.outputs)}; "
                                f"rebuild it with --outputs {','.join(sorted(set(h.outputs) | {name}))}")
        if "cls" in loss.needs and cls_meta and (cls_meta["num_anchors"], cls_meta["num_classes"]) != (a, k):
            raise PlanError(f"{where}.losses[{j}] ({lc.name}): teacher has {cls_meta['num_anchors']} anchors x {cls_meta['num_classes']} classes "
                            f"per cell, the student {a} x {k}; class-output losses need the same anchors and classes")
        weight = defaults["weight"] if lc.weight is None else lc.weight
        out.append(BoundLoss(loss, float(weight), lc.store, lc.name))
    return out


def online_targets(fns: list[OnlineTarget], needs: list[list[str]], batch: Batch) -> list[dict[str, Tensor]]:
    """The online baseline: each teacher runs on each view padded on its own (as the store builder
    does, so results do not depend on batch padding), then its maps go on the batch grid like cached ones."""
    out = []
    made: set[int] = set()
    for fn, names in zip(fns, needs):
        maps: dict[str, Tensor] = {}
        for i, meta in enumerate(batch.metas):
            x = batch.images[i : i + 1, :, : meta.padded[0], : meta.padded[1]]
            with torch.no_grad():
                res = fn(x, names)
            for key, t in res.items():
                lvl = int(key.split(".p")[1])
                gh, gw = -(-batch.images.shape[-2] // 2**lvl), -(-batch.images.shape[-1] // 2**lvl)
                vh, vw = -(-meta.size[0] // 2**lvl), -(-meta.size[1] // 2**lvl)
                dst = maps.setdefault(key, torch.zeros(len(batch.metas), t.shape[1], gh, gw, device=t.device))
                dst[i, :, :vh, :vw] = t[0, :, :vh, :vw]
                if lvl not in batch.masks or lvl in made:
                    # Online runs read no store, so collate made no valid-cell masks: make them as it does.
                    made.add(lvl)
                    batch.masks.setdefault(lvl, torch.zeros(len(batch.metas), 1, gh, gw, device=t.device))[i, :, :vh, :vw] = 1
        out.append(maps)
    return out


def make_schedule(opt: torch.optim.Optimizer, stage: StageConfig, iters_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then steps at fractions of the stage (mmdet's 1x: epochs 8 and 11 of 12)."""
    sc = stage.schedule
    milestones = [int(round(f * stage.epochs)) * iters_per_epoch for f in sc.steps]

    def factor(it: int) -> float:
        f = sc.gamma ** sum(it >= m for m in milestones)
        if it < sc.warmup_iters:
            f *= sc.warmup_ratio + (1 - sc.warmup_ratio) * it / sc.warmup_iters
        return f

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def make_optimizer(stage: StageConfig, params: list[nn.Parameter], batch_size: int) -> torch.optim.Optimizer:
    o = stage.optimizer
    lr = o.lr * batch_size / o.base_batch  # linear scaling rule, as mmdet's auto_scale_lr
    if o.type == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay)


class StageRunner:
    """Runs stage ``k`` (1-based) of ``plan``."""

    def __init__(self, plan: Plan, k: int, device: str = "cpu", resume: bool = False, online: list[OnlineTarget] | None = None,
                 log: Callable[[str], None] = print) -> None:
        if not 1 <= k <= len(plan.stages):
            raise PlanError(f"--stage {k}: the plan has stages 1..{len(plan.stages)}")
        self.plan, self.k, self.stage = plan, k, plan.stages[k - 1]
        self.device = torch.device(device)
        self.resume = resume
        self.online = online
        self.log = log
        self.dir = stage_dir(plan, k)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1

    # -- set-up ---------------------------------------------------------------------
    def _init_student(self, num_classes: int) -> nn.Module:
        student = build_student(self.plan.student, num_classes)
        if self.k > 1:
            prev = stage_dir(self.plan, self.k - 1) / "final.pt"
            if not prev.is_file():
                raise CheckpointError(f"{prev}: stage {self.k - 1} checkpoint missing; run `mtpd-train --plan PLAN --stage {self.k - 1}` first")
            student.load_state_dict(load_checkpoint(prev)["model"])
        if self.stage.inherit is not None:
            copied = inherit_from_teacher(student, self.stage.inherit.weights, self.stage.inherit.parts)
            self.log(f"stage {self.k}: inherited {len(copied)} tensors ({', '.join(self.stage.inherit.parts)}) from {self.stage.inherit.weights}")
        return student.to(self.device)

    def run(self) -> StageResult:
        plan, stage = self.plan, self.stage
        where = f"stages[{self.k - 1}] ({stage.name})"
        _seed_all(plan.seed + self.k)
        train = CocoDataset(plan.data.train_ann, plan.data.train_images)
        spec = ViewSpec(short=plan.data.short, long=plan.data.long, views=("orig", "hflip") if plan.data.flip else ("orig",))
        student = self._init_student(train.num_classes)
        # Online runs read the stores' headers only: they say what each teacher outputs.
        readers = [StoreReader(p) for p in stage.stores]
        if self.online is not None and len(self.online) != len(readers):
            raise PlanError(f"{where}: {len(self.online)} online teacher(s) for {len(readers)} store(s); give one per store")
        losses = build_losses(stage, student, readers, where)
        needs = [sorted({n for b in losses if b.store == s for n in b.loss.needs}) for s in range(len(readers))]
        self._needs = needs
        ds = DistillDataset(train, spec, [] if self.online is not None else stage.stores, flip=plan.data.flip, seed=plan.seed, outputs=needs,
                            with_masks=arch_family(student) == "maskrcnn")
        sampler = EpochSampler(len(ds), plan.seed, self.rank, self.world)
        loader = make_loader(ds, plan.data.batch_size, shuffle=False, workers=plan.data.workers, seed=plan.seed, sampler=sampler)
        iters = len(loader)
        loss_mods = nn.ModuleList([b.loss for b in losses]).to(self.device)
        params = [p for p in list(student.parameters()) + list(loss_mods.parameters()) if p.requires_grad]
        opt = make_optimizer(stage, params, plan.data.batch_size * self.world)
        sched = make_schedule(opt, stage, iters)
        model: nn.Module = DetectorStep(student)
        if self.world > 1:
            # Unused: e.g. the box head of a student distilled on features only in some steps.
            model = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        epoch, it_in_epoch, step = 0, 0, 0
        last = self.dir / "last.pt"
        if self.resume and last.is_file():
            ck = load_checkpoint(last)
            student.load_state_dict(ck["model"])
            loss_mods.load_state_dict(ck["losses"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            _set_rng_state(ck["rng"])
            epoch, it_in_epoch, step = ck["epoch"], ck["iteration"], ck["step"]
            self.log(f"stage {self.k}: resumed from {last} at epoch {epoch + 1}, iteration {it_in_epoch}")
        elif self.resume:
            self.log(f"stage {self.k}: --resume but no {last}; starting the stage from the beginning")
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            save_plan(plan, self.dir / "plan.yaml")
        log_path = self.dir / "log.jsonl"
        offset = label_offset(student)
        t_start = time.perf_counter()
        while epoch < stage.epochs:
            ds.set_epoch(epoch)
            sampler.set_epoch(epoch, start=it_in_epoch * plan.data.batch_size)
            student.train()
            loss_mods.train()
            for batch in loader:
                batch = batch.to(self.device)
                parts = self._step(model, student, batch, losses, offset)
                total = sum(parts.values())
                if not torch.isfinite(total):
                    comp = ", ".join(f"{n}={float(v.detach()):.4g}" for n, v in parts.items())
                    kept = last if last.is_file() else "none yet"
                    raise TrainError(f"stage {self.k}: non-finite loss at epoch {epoch + 1} iteration {it_in_epoch + 1} (step {step + 1}): {comp}; "
                                     f"stopped, last good checkpoint: {kept}; lower the lr or the distillation weight")
                opt.zero_grad(set_to_none=True)
                total.backward()
                if stage.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, stage.grad_clip)
                opt.step()
                sched.step()
                it_in_epoch += 1
                step += 1
                if self.rank == 0 and (step % plan.log_every == 0 or it_in_epoch == iters):
                    rec = {"stage": self.k, "epoch": epoch + 1, "iter": it_in_epoch, "step": step, "lr": opt.param_groups[0]["lr"],
                           "loss": float(total.detach()), **{n: float(v.detach()) for n, v in parts.items()}, "time": time.perf_counter() - t_start}
                    with open(log_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                    self.log(f"stage {self.k} epoch {epoch + 1}/{stage.epochs} iter {it_in_epoch}/{iters} loss {float(total.detach()):.4f} "
                             + " ".join(f"{n}={float(v.detach()):.3f}" for n, v in parts.items()))
                if plan.checkpoint_every and step % plan.checkpoint_every == 0 and it_in_epoch < iters:
                    self._save(last, student, loss_mods, opt, sched, epoch, it_in_epoch, step)
            epoch, it_in_epoch = epoch + 1, 0
            self._save(last, student, loss_mods, opt, sched, epoch, 0, step)
        return self._finish(student, t_start)

    # -- the step -------------------------------------------------------------------
    def _step(self, model: nn.Module, student: nn.Module, batch: Batch, losses: list[BoundLoss], offset: int) -> dict[str, Tensor]:
        targets = [{"boxes": b, "labels": l + offset} for b, l in zip(batch.boxes, batch.labels)]
        if batch.instance_masks is not None:
            for t, m in zip(targets, batch.instance_masks):
                t["masks"] = m
        names = sorted({n for b in losses for n in b.loss.needs}) or ["fpn"]
        det_losses, outputs = model(batch.images, batch.image_sizes, targets, names)
        parts = {f"det_{k}": v for k, v in det_losses.items()}
        if not losses:
            return parts
        teacher = self.online_targets(batch) if self.online is not None else batch.teacher
        anchors = None
        if any(b.name == "rm" for b in losses):
            anchors = model_anchors(student, tuple(batch.images.shape[-2:]))
        specs = output_specs(student)
        a = specs["cls"].num_anchors if "cls" in specs else 1
        k = specs["cls"].num_classes if "cls" in specs else 0
        levels = tuple(specs["fpn"].levels)
        for b in losses:
            db = DistillBatch(outputs, teacher[b.store], batch.masks, batch.boxes, batch.labels, anchors, a, k, levels)
            parts[b.name if b.name not in parts else f"{b.name}_{b.store}"] = b.weight * b.loss(db)
        return parts

    def online_targets(self, batch: Batch) -> list[dict[str, Tensor]]:
        return online_targets(self.online, self._needs, batch)

    # -- checkpoints and the end of a stage ------------------------------------------
    def _save(self, path: Path, student: nn.Module, loss_mods: nn.Module, opt, sched, epoch: int, it: int, step: int) -> None:
        if self.rank != 0:
            return
        _atomic_save({"model": student.state_dict(), "losses": loss_mods.state_dict(), "optimizer": opt.state_dict(),
                      "scheduler": sched.state_dict(), "rng": _rng_state(), "epoch": epoch, "iteration": it, "step": step}, path)

    def _finish(self, student: nn.Module, t_start: float) -> StageResult:
        from mtpd.trainer.student import save_student

        final = self.dir / "final.pt"
        metrics: dict = {"stage": self.k, "name": self.stage.name, "train_seconds": time.perf_counter() - t_start}
        if self.rank == 0:
            save_student(student, final, stage=self.k, stage_name=self.stage.name)
            d = self.plan.data
            if self.stage.eval and d.val_ann and d.val_images:
                spec = ViewSpec(short=d.short, long=d.long)
                metrics.update(evaluate(unwrap(student), CocoDataset(d.val_ann, d.val_images), spec, d.val_batch_size, self.device))
            # metrics.json marks the stage done (other processes poll for it): write it whole or not at all.
            tmp = self.dir / "metrics.json.tmp"
            tmp.write_text(json.dumps(metrics, indent=2))
            os.replace(tmp, self.dir / "metrics.json")
            self.log(f"stage {self.k} ({self.stage.name}) done: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
        if self.world > 1:
            dist.barrier()  # the next stage on every rank starts from the checkpoint rank 0 just wrote
        return StageResult(self.k, final, metrics)


def run_plan(plan: Plan, stages: list[int], device: str = "cpu", resume: bool = False, online: list[OnlineTarget] | None = None,
             log: Callable[[str], None] = print) -> list[StageResult]:
    Path(plan.output_dir).mkdir(parents=True, exist_ok=True)
    save_plan(plan, Path(plan.output_dir) / "plan.resolved.yaml")
    results = []
    for k in stages:
        results.append(StageRunner(plan, k, device, resume, online, log).run())
    return results
