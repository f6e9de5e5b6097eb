"""The engine and its hooks, used directly: custom hooks see every moment, events describe a run,
and TensorBoard gets the logged numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_trainer import write_plan

from mtpd.data import CocoDataset, ViewSpec
from mtpd.trainer.engine import Engine, HookBase
from mtpd.trainer.hooks import StepTimer
from mtpd.trainer.targets import DistillDataset, make_loader


class Recorder(HookBase):
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []

    def _note(self, what: str, e: Engine) -> None:
        self.calls.append((what, e.state.epoch, e.state.iter))

    def before_train(self, e: Engine) -> None:
        self._note("before_train", e)

    def before_epoch(self, e: Engine) -> None:
        self._note("before_epoch", e)

    def after_step(self, e: Engine) -> None:
        self._note("after_step", e)

    def after_epoch(self, e: Engine) -> None:
        self._note("after_epoch", e)

    def after_train(self, e: Engine) -> None:
        self._note("after_train", e)


def test_engine_calls_hooks_in_order_and_times_every_phase(digits) -> None:
    from mtpd.models import build_arch

    torch.manual_seed(0)
    student = build_arch("retinanet_tiny", num_classes=10, fpn_channels=32, width=8)
    ds = DistillDataset(CocoDataset(digits["train"]["ann"], digits["train"]["images"]), ViewSpec(short=64, long=64))
    loader = make_loader(ds, 4, shuffle=False, workers=0, seed=0)
    opt = torch.optim.SGD(student.parameters(), lr=0.001)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0)
    rec, timer = Recorder(), StepTimer()
    before = [p.detach().clone() for p in student.parameters()]
    state = Engine(student, loader, opt, sched, epochs=2, hooks=[rec, timer]).train()
    iters = len(loader)  # 10 images, batch 4
    assert iters == 3 and state.step == 2 * iters and state.epoch == 2
    expected = [("before_train", 0, 0)]
    for ep in range(2):
        expected += [("before_epoch", ep, 0)] + [("after_step", ep, i) for i in range(1, iters + 1)]
        expected += [("after_epoch", ep, iters)]
    assert rec.calls == expected + [("after_train", 2, 0)]
    assert len(timer.steps) == 2 * iters
    for t in timer.steps:
        assert set(t) == {"data", "teacher", "student", "distill", "backward", "total", "cpu"}
        assert t["student"] > 0 and t["backward"] > 0 and t["total"] >= t["student"]
    assert state.losses and all(k.startswith("det_") for k in state.losses)
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))


def test_events_and_tensorboard_describe_a_run(tmp_path, digits, tiny_store) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mtpd.trainer.events import format_event
    from mtpd.trainer.plan import load_plan
    from mtpd.trainer.stage import run_plan

    plan = load_plan(write_plan(tmp_path, digits, [tiny_store]))
    events: list[dict] = []
    run_plan(plan, [1], log=None, on_event=events.append)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "stage_start" and kinds[-1] == "stage_end" and kinds.count("step") == 3
    steps = [e for e in events if e["event"] == "step"]
    assert [e["epoch_end"] for e in steps] == [False, False, True]
    assert {"mgd", "pfi", "loss", "lr"} <= set(steps[0])
    end = events[-1]
    assert end["stage"] == 1 and end["name"] == "weak" and "AP" in end["metrics"]
    assert Path(end["checkpoint"]).is_file()
    assert format_event(end).startswith("stage 1 (weak) done: ")
    # The same numbers reach TensorBoard, by step.
    acc = EventAccumulator(str(tmp_path / "run" / "stage_1" / "tb"))
    acc.Reload()
    mgd = acc.Scalars("train/mgd")
    assert [s.step for s in mgd] == [1, 2, 3]
    assert mgd[-1].value == pytest.approx(steps[-1]["mgd"], rel=1e-6)
    logged = [json.loads(x) for x in (tmp_path / "run" / "stage_1" / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in logged] == [e["loss"] for e in steps]
