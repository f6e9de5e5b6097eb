"""The training engine: one step and one epoch loop that read top to bottom; hooks do the rest.

    for each epoch:                          hooks: before_epoch
        for each batch:                      hooks: before_step
            teacher targets  <- target source (stores, or online teachers)
            student forward  -> detection losses (torchvision's)
            + Σ weight · distillation loss (each loss declares what it needs)
            backward, clip, optimiser and schedule step
                                             hooks: after_step (logging, checkpoints, timing)
                                             hooks: after_epoch
                                             hooks: after_train (evaluation)

As in detectron2's ``SimpleTrainer`` the loop stays small: logging, checkpoints,
evaluation and timing are hooks (``mtpd.trainer.hooks``), and components (model,
loader, optimiser, losses, target source) come into the constructor built.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Protocol

import torch
from torch import Tensor, nn

from mtpd.errors import MtpdError
from mtpd.models import model_anchors, output_specs
from mtpd.models.detect import DetectorStep
from mtpd.trainer.losses import DistillBatch, DistillLoss
from mtpd.trainer.targets import Batch

PHASES = ("data", "teacher", "student", "distill", "backward")


# Mixed precision of the student's forward (convolutions, matmuls). What stays fp32, and why: the dense
# heads' outputs before the detection losses (the adapters cast them: focal and box losses sum over every
# anchor), the student's outputs before the distillation losses (MGD and MSE sum squares over every cell,
# KD/RM/CWD sum KL terms: bf16's 8 mantissa bits would lose the small terms), and the optimiser's state.
AMP_DTYPES: dict[str, torch.dtype | None] = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainError(MtpdError, RuntimeError):
    """A stage that stopped; the message says where and what was kept."""


def auto_weight(b: BoundLoss, detection: float, raw: float) -> float:
    """The weight that makes ``b``'s loss ``b.auto_ratio`` times the detection loss at this step."""
    if not (raw > 0 and detection > 0):
        raise TrainError(
            f"weight: auto for {b.name}: its first loss is {raw:.4g} and the detection loss {detection:.4g}; a ratio "
            "needs both positive: give the loss a number as its weight"
        )
    return float(b.auto_ratio) * detection / raw


def auto_weight_event(b: BoundLoss, weight: float, ratio: float) -> dict:
    """The ``auto_weight`` event; beyond 100x the loss's default weight either way it says how far (measured:
    RM's rule weight, 425x its default, broke training on the digits benchmark: bench/RESULTS.md)."""
    ev = {"event": "auto_weight", "loss": b.name, "weight": weight, "ratio": ratio}
    times = weight / b.loss.default_weight
    if not 0.01 <= times <= 100:
        ev.update(times_default=times, default=b.loss.default_weight)
    return ev


class NonFiniteLoss(TrainError):
    """The step's loss was NaN or infinite; the stage adds which checkpoint is kept."""


@dataclass
class BoundLoss:
    """A distillation loss with its weight, the store that feeds it and its key in the logs.

    ``auto_ratio`` (``weight: auto``): the weight is None until step ``auto_after`` (0: the first), which sets
    it once so that the weighted loss equals ``auto_ratio`` times that step's detection loss
    (``Engine.distill``); before it the loss is computed but contributes nothing.
    """

    loss: DistillLoss
    weight: float | None
    store: int
    name: str
    auto_ratio: float | None = None
    auto_after: int = 0


@dataclass(frozen=True)
class StudentInfo:
    """What every loss needs to know of the student, derived once: levels, anchors and classes per cell."""

    levels: tuple[int, ...]
    num_anchors: int
    num_classes: int

    @classmethod
    def of(cls, student: nn.Module) -> StudentInfo:
        specs = output_specs(student)
        cls_spec = specs.get("cls")
        return cls(
            tuple(specs["fpn"].levels), cls_spec.num_anchors if cls_spec else 1, cls_spec.num_classes if cls_spec else 0
        )


class TargetSource(Protocol):
    """Teacher targets of a batch: per store ``{"fpn.p3": [B, C, h, w], ...}`` on the batch grid, and the
    valid-cell masks (level -> [B, 1, h, w]). ``mtpd.trainer.sources`` has the two kinds."""

    def __call__(self, batch: Batch) -> tuple[list[dict[str, Tensor]], dict[int, Tensor]]: ...


@dataclass
class EngineState:
    """Where the loop is and what the last step measured; hooks read it."""

    epochs: int
    iters_per_epoch: int
    epoch: int = 0  # epochs finished
    iter: int = 0  # iterations finished in the current epoch
    step: int = 0  # optimiser steps taken in this stage
    total: float = float("nan")  # the last step's total loss
    losses: dict[str, float] = field(default_factory=dict)  # the last step's loss parts, weighted
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase of the last step
    train_seconds: float = 0.0  # wall time inside train(), set when it returns

    @property
    def epoch_done(self) -> bool:
        return self.iter == self.iters_per_epoch


class HookBase:
    """Override what you need; every method gets the engine (its ``state``, model, optimiser ...)."""

    def before_train(self, engine: Engine) -> None: ...
    def before_epoch(self, engine: Engine) -> None: ...
    def before_step(self, engine: Engine) -> None: ...
    def after_step(self, engine: Engine) -> None: ...
    def after_epoch(self, engine: Engine) -> None: ...
    def after_train(self, engine: Engine) -> None: ...


class Engine:
    """Trains ``student`` on ``loader`` with ``losses`` whose teacher maps come from ``targets``.

    ``model``: the module the step calls (``DetectorStep(student)``, or that wrapped in
    DistributedDataParallel). ``sync_phases``: synchronise the device at each phase boundary so
    that phase times are exact on a GPU (benchmarks; it costs overlap, so training leaves it off).
    """

    def __init__(
        self,
        student: nn.Module,
        loader: torch.utils.data.DataLoader,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        *,
        epochs: int,
        losses: list[BoundLoss] = (),
        targets: TargetSource | None = None,
        model: nn.Module | None = None,
        device: str | torch.device = "cpu",
        grad_clip: float | None = None,
        label_offset: int = 0,
        hooks: list[HookBase] = (),
        sync_phases: bool = False,
        amp: str = "off",
        channels_last: bool = False,
    ) -> None:
        self.student, self.loader, self.optimizer, self.scheduler = student, loader, optimizer, scheduler
        self.losses = list(losses)
        self.loss_modules = nn.ModuleList([b.loss for b in self.losses])
        self.targets = targets
        self.model = model if model is not None else DetectorStep(student)
        self.device = torch.device(device)
        self.grad_clip = grad_clip
        self.label_offset = label_offset
        self.hooks = list(hooks)
        self.info = StudentInfo.of(student)
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        # The student computes the outputs the losses compare (FPN maps alone when no loss reads more).
        self.student_outputs = sorted({n for b in self.losses for n in b.loss.needs}) or ["fpn"]
        self.needs_anchors = any(b.loss.needs_anchors for b in self.losses)
        self.state = EngineState(epochs, len(loader))
        self.sync = torch.cuda.synchronize if sync_phases and self.device.type == "cuda" else None
        self.batches: Iterator[Batch] | None = None  # the current epoch's loader iterator
        if amp not in AMP_DTYPES:
            raise ValueError(f"amp {amp!r} is not one of {', '.join(AMP_DTYPES)}")
        self.amp = amp
        self.channels_last = channels_last
        if channels_last:  # the weights' memory layout (values unchanged): conv kernels pick NHWC paths
            self.student.to(memory_format=torch.channels_last)
        # fp16's narrow range needs a loss scale; bf16 keeps fp32's range and needs none. Its state is in last.pt.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp == "fp16")

    # -- the loop ---------------------------------------------------------------------------
    def train(self) -> EngineState:
        """Epochs from ``state.epoch`` (iteration ``state.iter``) to ``state.epochs``."""
        t0 = time.perf_counter()
        self._call("before_train")
        while self.state.epoch < self.state.epochs:
            self.train_epoch()
        self.state.train_seconds = time.perf_counter() - t0
        self._call("after_train")
        return self.state

    def train_epoch(self) -> None:
        self._call("before_epoch")  # samplers and datasets learn the epoch here, before the loader starts
        self.student.train()
        self.loss_modules.train()
        self.batches = iter(self.loader)
        while self.state.iter < self.state.iters_per_epoch:
            self.step()
        self.batches = None  # the epoch's loader workers stop here, before evaluation or the next epoch
        self._call("after_epoch")
        self.state.epoch, self.state.iter = self.state.epoch + 1, 0

    def step(self, batch: Batch | None = None) -> None:
        """One step with its hooks, on ``batch`` or else the next of the current epoch's loader iterator."""
        if batch is None and self.batches is None:
            self.batches = iter(self.loader)
        self._call("before_step")
        self.run_step(batch)
        self.state.iter += 1
        self.state.step += 1
        self._call("after_step")

    # -- the step ---------------------------------------------------------------------------
    def run_step(self, batch: Batch | None = None) -> None:
        """Data, teacher targets, student forward, losses, backward and update; phases timed."""
        clock = _PhaseClock(self.sync)
        if batch is None:
            batch = next(self.batches, None)
            if batch is None:
                raise TrainError(
                    f"the loader ran out after {self.state.iter} of {self.state.iters_per_epoch} "
                    "iterations of this epoch; was data.batch_size changed before --resume?"
                )
        batch = batch.to(self.device)
        if self.channels_last:
            batch.images = batch.images.contiguous(memory_format=torch.channels_last)
        clock.lap("data")
        teacher, masks = self.targets(batch) if self.targets is not None else ([], batch.masks)
        clock.lap("teacher")
        with self.autocast():
            det_losses, outputs = self.model(
                batch.images, batch.image_sizes, self.ground_truth(batch), self.student_outputs
            )
        if self.amp != "off":
            # Distillation losses sum squares and KL terms over every cell: always in fp32 (AMP_DTYPES' note).
            outputs = {k: v.float() for k, v in outputs.items()}
            det_losses = {k: v.float() for k, v in det_losses.items()}
        parts = {f"det_{k}": v for k, v in det_losses.items()}
        clock.lap("student")
        detection = sum(parts.values()).detach() if parts else 0.0  # none: a batch of the pool alone
        parts.update(self.distill(batch, outputs, teacher, masks, detection))
        total = sum(parts.values())
        clock.lap("distill")
        if not torch.isfinite(total):
            self._non_finite(parts)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.scaler.step(self.optimizer)  # skipped (and the scale lowered) when fp16 gradients overflowed
        self.scaler.update()
        self.scheduler.step()
        clock.lap("backward")
        self.state.total = float(total.detach())
        self.state.losses = {n: float(v.detach()) for n, v in parts.items()}
        self.state.phases = clock.phases

    def autocast(self):
        """The student's forward under autocast (``amp``: bf16 or fp16), or a no-op context when off."""
        dtype = AMP_DTYPES[self.amp]
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def ground_truth(self, batch: Batch) -> list[dict[str, Tensor] | None] | None:
        """torchvision's training targets; R-CNN labels shift by one (class 0 is background). The batch's pool
        images (after its ``labelled`` ones) get None, so the detection loss leaves them out; a batch of the pool
        alone gets no targets, and no detection loss."""
        n = batch.labelled
        if n == 0:
            return None
        targets: list[dict[str, Tensor] | None] = [
            {"boxes": b, "labels": lb + self.label_offset} for b, lb in zip(batch.boxes[:n], batch.labels[:n])
        ]
        for t, m in zip(targets, batch.instance_masks or []):
            t["masks"] = m  # type: ignore[index]
        return targets + [None] * (len(batch.boxes) - n)

    def distill(
        self,
        batch: Batch,
        outputs: dict[str, Tensor],
        teacher: list[dict[str, Tensor]],
        masks: dict[int, Tensor],
        detection: Tensor | float = 0.0,
    ) -> dict[str, Tensor]:
        """Each bound loss on the student's outputs and its store's targets, weighted (an automatic weight
        is set here, once, from this step's ``detection`` loss)."""
        if not self.losses:
            return {}
        anchors = model_anchors(self.student, tuple(batch.images.shape[-2:])) if self.needs_anchors else None
        info = self.info
        out = {}
        for b in self.losses:
            db = DistillBatch(
                outputs,
                teacher[b.store],
                masks,
                batch.boxes,
                batch.labels,
                anchors,
                info.num_anchors,
                info.num_classes,
                info.levels,
            )
            raw = b.loss(db)
            if self.state.step < b.auto_after:
                # warm-up (before weight: auto measures, and in a rerun of the resolved plan with the weight it
                # chose): in the graph, adding nothing
                out[b.name] = raw * 0.0
                continue
            if b.weight is None:
                b.weight = auto_weight(b, float(detection), float(raw.detach()))
            out[b.name] = b.weight * raw
        return out

    # -- helpers ----------------------------------------------------------------------------
    def _non_finite(self, parts: dict[str, Tensor]) -> None:
        s = self.state
        comp = ", ".join(f"{n}={float(v.detach()):.4g}" for n, v in parts.items())
        raise NonFiniteLoss(
            f"non-finite loss at epoch {s.epoch + 1} iteration {s.iter + 1} (step {s.step + 1}): {comp}"
        )

    def _call(self, event: str) -> None:
        for h in self.hooks:
            getattr(h, event)(self)


class _PhaseClock:
    """Seconds between successive laps (synchronising the device first, when given a sync)."""

    def __init__(self, sync) -> None:
        self.sync = sync
        self.phases: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, phase: str) -> None:
        if self.sync is not None:
            self.sync()
        now = time.perf_counter()
        self.phases[phase] = now - self._t
        self._t = now
