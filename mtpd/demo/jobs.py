"""Students trained side by side, each in its own process running the trainer's ``run_plan``.

A small student's training step cannot keep two CPU cores busy: trained one
after the other with 2 torch threads each, an earlier demo's two students (width 8)
used 15.9 CPU-min in 15.3 min wall on 2 cores. Trained side by side with one thread
each, that demo took 8.4–9.2 min instead of 15.2 (same recipes). Each
process keeps one thread count for its whole run: a count that followed what
else is running would make the weights depend on timing.

A child reports the trainer's structured events (``mtpd.trainer.events``) over
a queue; its text log goes to ``train.log`` for people to read.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mtpd.demo import steps
from mtpd.demo.steps import Log
from mtpd.errors import MtpdError


def _train_child(
    plan_path: str,
    stages: list[int],
    threads: int,
    events: mp.Queue,
    log_path: str,
    online: dict[int, tuple[str, str]] | None = None,
    device: str = "cpu",
) -> None:
    """Child process: train ``stages`` of the plan, events to the queue, all text to ``log_path``.

    ``online``: stage -> (teacher arch, checkpoint) runs that stage with the teacher inside every step
    (``mtpd-train --stage K --online-teacher ARCH=CKPT``) instead of reading its stores."""
    import sys
    import traceback

    # Everything this process prints (warnings, loader-worker tracebacks, native crashes) goes to the log.
    f = open(log_path, "w", encoding="utf-8", buffering=1)  # noqa: SIM115 - open for the life of the process
    os.dup2(f.fileno(), 1)
    os.dup2(f.fileno(), 2)
    sys.stdout = sys.stderr = f

    import torch

    from mtpd.errors import MtpdError, message
    from mtpd.trainer.plan import load_plan

    torch.set_num_threads(threads)
    if device.startswith("cuda:"):
        torch.cuda.set_device(device)  # the current device for synchronize, pinned memory and the student
    try:
        steps.run_stages(load_plan(plan_path), stages, online, log=print, on_event=events.put, device=device)
    except MtpdError as e:
        print(f"error: {message(e)}")
        events.put({"event": "error", "message": message(e)})
        sys.exit(2)
    except BaseException as e:  # noqa: BLE001 - anything else: the traceback goes to the log
        traceback.print_exc()
        events.put({"event": "error", "message": f"{type(e).__name__}: {e}"})
        sys.exit(1)


class JobError(MtpdError, RuntimeError):
    """A student's training process that failed; the message carries its own error and its log."""


@dataclass
class Job:
    """Training of the stages of ``plan`` that an earlier demo run did not finish, in a child process."""

    name: str
    plan: Path
    out_dir: Path
    log_path: Path
    proc: mp.process.BaseProcess | None  # None when an earlier demo run finished every stage
    events: mp.Queue | None = None
    done: set[int] = field(default_factory=set)  # stages finished (before or by this job)
    error: str | None = None

    def running(self) -> bool:
        return self.proc is not None and self.proc.is_alive()

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.exitcode

    def relay(self, log: Log, quiet: bool) -> None:
        """Take the child's new events: print them, note finished stages and errors."""
        if self.events is None:
            return
        show = steps.progress_printer(log, quiet, prefix=f"  [{self.name}] ")
        while True:
            try:
                ev = self.events.get_nowait()
            except queue.Empty:
                return
            if ev["event"] == "stage_end":
                self.done.add(ev["stage"])
            elif ev["event"] == "error":
                self.error = ev["message"]
            show(ev)

    def check(self) -> None:
        """Raise JobError when the child exited with an error: its own message and its log, in one line."""
        if self.proc is None or self.returncode in (None, 0):
            return
        raise JobError(
            f"training {self.name} failed (exit {self.returncode}): {self.error or 'no message'}; log: {self.log_path}"
        )

    def stage_done(self, k: int) -> bool:
        return k in self.done

    def stop(self) -> None:
        """Stop the child (on an error or Ctrl-C in the demo); a rerun retrains its unfinished stages."""
        if not self.running():
            return
        self.proc.terminate()
        self.proc.join(timeout=20)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


def start(
    name: str,
    plan_path: Path,
    log: Log,
    threads: int,
    online: dict[int, tuple[str, str]] | None = None,
    device: str = "cpu",
) -> Job:
    """Start training the stages of ``plan_path`` an earlier demo run did not finish, in a child process
    (``online``: stage -> (teacher arch, checkpoint) for stages trained with the teacher run live) on ``device``."""
    steps.show_train(log, plan_path, online)
    plan, todo = steps.stages_todo(plan_path, log)
    out = Path(plan.output_dir)
    done = set(range(1, len(plan.stages) + 1)) - set(todo)
    log_path = out / "train.log"
    if not todo:
        return Job(name, Path(plan_path), out, log_path, None, done=done)
    out.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")  # a fresh interpreter: no inherited torch threads or zarr event loop
    events = ctx.Queue()
    proc = ctx.Process(
        target=_train_child,
        args=(str(plan_path), todo, threads, events, str(log_path), online, device),
        name=f"mtpd-{name}",
    )
    # OpenMP reads its thread count when torch loads in the child: set it for the child's start only.
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        proc.start()
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    log(
        f"  training {name} in its own process ({threads} thread{'s' if threads > 1 else ''}, pid {proc.pid}; log: "
        f"{log_path})"
    )
    return Job(name, Path(plan_path), out, log_path, proc, events, done)


def wait(jobs: list[Job], log: Log, quiet: bool, until: Callable[[], bool] | None = None, poll_s: float = 1.0) -> None:
    """Relay the jobs' events until ``until()`` holds (default: every job has exited); raise if one fails."""
    done = until or (lambda: not any(j.running() for j in jobs))
    while True:
        for j in jobs:
            j.relay(log, quiet)
            j.check()
        if done():
            for j in jobs:  # what a child sent just before it exited
                j.relay(log, quiet)
                j.check()
            return
        if not any(j.running() for j in jobs):  # all exited cleanly, yet ``until`` never came
            raise JobError(
                "the students' training processes exited before the demo could go on; logs: "
                + ", ".join(str(j.log_path) for j in jobs)
            )
        time.sleep(poll_s)


def metrics(job: Job) -> list[dict]:
    """Every stage's metrics.json of a finished job."""
    from mtpd.trainer.plan import load_plan

    return steps.stage_metrics(load_plan(job.plan))
