"""Hooks: everything a stage does around the engine's step (data epochs, logging, checkpoints,
evaluation, timing). Each is small and optional; a stage is the engine plus a list of them.

A new hook subclasses ``HookBase`` and overrides the moments it needs
(``before_train``, ``before_epoch``, ``before_step``, ``after_step``,
``after_epoch``, ``after_train``); it reads ``engine.state`` and the engine's parts.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from mtpd import checkpoint
from mtpd.trainer.engine import PHASES, Engine, HookBase

# A step record: {"stage", "epoch", "iter", "step", "lr", "loss", <loss parts>, "time", "epoch_end"}.
Record = dict
Sink = Callable[[Record], None]


class EpochData(HookBase):
    """Tells the dataset (flip choice) and sampler (order, resume offset) which epoch starts."""

    def __init__(self, dataset, sampler, batch_size: int) -> None:
        self.dataset, self.sampler, self.batch_size = dataset, sampler, batch_size

    def before_epoch(self, engine: Engine) -> None:
        self.dataset.set_epoch(engine.state.epoch)
        self.sampler.set_epoch(engine.state.epoch, start=engine.state.iter * self.batch_size)


class MetricsLogger(HookBase):
    """Every ``every`` steps and at each epoch's end, one record of the step's losses to every sink."""

    def __init__(self, stage: int, every: int, sinks: list[Sink]) -> None:
        self.stage, self.every, self.sinks = stage, every, sinks
        self._t0 = 0.0

    def before_train(self, engine: Engine) -> None:
        self._t0 = time.perf_counter()

    def after_step(self, engine: Engine) -> None:
        s = engine.state
        if s.step % self.every and not s.epoch_done and s.step != 1:  # the first step is always logged
            return
        rec = {
            "stage": self.stage,
            "epoch": s.epoch + 1,
            "iter": s.iter,
            "step": s.step,
            "lr": engine.optimizer.param_groups[0]["lr"],
            "loss": s.total,
            **s.losses,
            "time": time.perf_counter() - self._t0,
        }
        for sink in self.sinks:
            sink(rec)

    def after_train(self, engine: Engine) -> None:
        for sink in self.sinks:
            close = getattr(sink, "close", None)
            if close is not None:
                close()


class JsonLines:
    """A sink appending each record as one JSON line (``stage_K/log.jsonl``)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __call__(self, rec: Record) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")


class TensorBoard:
    """A sink writing each record's numbers as TensorBoard scalars (``train/<name>``) by step."""

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.writer = SummaryWriter(log_dir=str(log_dir))

    @staticmethod
    def available() -> bool:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            return False
        return True

    def __call__(self, rec: Record) -> None:
        for k, v in rec.items():
            if k not in ("stage", "epoch", "iter", "step") and isinstance(v, float):
                self.writer.add_scalar(f"train/{k}", v, rec["step"])

    def close(self) -> None:
        self.writer.close()


class Checkpointer(HookBase):
    """``last.pt`` every ``every`` steps (0: never mid-epoch) and at each epoch's end; ``final`` after training.

    ``last.pt`` holds what a resume needs (model, losses' adapters, optimiser, scheduler,
    RNG, position); after training ``save_final(student)`` writes the student alone (``final.pt``).
    """

    def __init__(self, last: Path, every: int, save_final: Callable[[nn.Module], None] | None = None) -> None:
        self.last, self.every, self.save_final = Path(last), every, save_final

    def after_step(self, engine: Engine) -> None:
        s = engine.state
        if self.every and s.step % self.every == 0 and not s.epoch_done:
            self.save(engine, s.epoch, s.iter)

    def after_epoch(self, engine: Engine) -> None:
        self.save(engine, engine.state.epoch + 1, 0)

    def after_train(self, engine: Engine) -> None:
        if self.save_final is not None:
            self.save_final(engine.student)

    def save(self, engine: Engine, epoch: int, it: int) -> None:
        checkpoint.save(
            {
                "model": engine.student.state_dict(),
                "losses": engine.loss_modules.state_dict(),
                "optimizer": engine.optimizer.state_dict(),
                "scheduler": engine.scheduler.state_dict(),
                "rng": rng_state(),
                "epoch": epoch,
                "iteration": it,
                "step": engine.state.step,
                # weight: auto values, set at the stage's first step: a resume keeps them
                "auto_weights": {b.name: b.weight for b in engine.losses if b.auto_ratio is not None},
                # fp16's loss scale: a resume continues with the scale the run had reached
                **({"scaler": engine.scaler.state_dict()} if engine.scaler.is_enabled() else {}),
            },
            self.last,
        )

    def restore(self, engine: Engine) -> None:
        """Load ``last.pt`` into the engine: weights, optimiser, schedule, RNG and position."""
        ck = checkpoint.load(self.last)
        engine.student.load_state_dict(ck["model"])
        engine.loss_modules.load_state_dict(ck["losses"])
        engine.optimizer.load_state_dict(ck["optimizer"])
        engine.scheduler.load_state_dict(ck["scheduler"])
        set_rng_state(ck["rng"])
        engine.state.epoch, engine.state.iter, engine.state.step = ck["epoch"], ck["iteration"], ck["step"]
        if engine.scaler.is_enabled() and "scaler" in ck:
            engine.scaler.load_state_dict(ck["scaler"])
        for b in engine.losses:
            if b.auto_ratio is not None and (ck.get("auto_weights") or {}).get(b.name) is not None:
                b.weight = float(ck["auto_weights"][b.name])


class AutoWeights(HookBase):
    """Reports each ``weight: auto`` value once the first step has set it: ``report(loss name, weight)``."""

    def __init__(self, report: Callable[[str, float], None]) -> None:
        self.report = report
        self._done: set[str] = set()

    def after_step(self, engine: Engine) -> None:
        for b in engine.losses:
            if b.auto_ratio is not None and b.weight is not None and b.name not in self._done:
                self._done.add(b.name)
                self.report(b.name, b.weight)


class Evaluator(HookBase):
    """After training: ``evaluate(student)`` into ``self.metrics`` (COCO AP on the val split)."""

    def __init__(self, evaluate: Callable[[nn.Module], dict]) -> None:
        self.evaluate = evaluate
        self.metrics: dict = {}

    def after_train(self, engine: Engine) -> None:
        self.metrics = self.evaluate(engine.student)


class StepTimer(HookBase):
    """Per step: the engine's phase times (seconds), their sum, and this process's CPU-seconds."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self._cpu0 = 0.0

    def before_step(self, engine: Engine) -> None:
        self._cpu0 = time.process_time()

    def after_step(self, engine: Engine) -> None:
        phases = {p: engine.state.phases.get(p, 0.0) for p in PHASES}
        self.steps.append({**phases, "total": sum(phases.values()), "cpu": time.process_time() - self._cpu0})


def rng_state() -> dict:
    """Python, NumPy and torch RNG states as tensors and plain values (safe to load with weights_only)."""
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
    }


def set_rng_state(s: dict) -> None:
    n = s["numpy"]
    random.setstate(s["python"])
    if isinstance(n, tuple):  # last.pt of an older mtpd: numpy's legacy tuple (its array loads as data)
        np.random.set_state(n)
    else:
        key = n["key"].numpy().astype(np.uint32)
        np.random.set_state(
            {
                "bit_generator": "MT19937",
                "state": {"key": key, "pos": n["pos"]},
                "has_gauss": n["has_gauss"],
                "gauss": n["gauss"],
            }
        )
    torch.set_rng_state(s["torch"])
