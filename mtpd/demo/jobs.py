"""Students trained side by side, each in its own ``mtpd-train`` process.

A small student's training step cannot keep two CPU cores busy: trained one
after the other with 2 torch threads each, the demo's two students used 15.9
CPU-min in 15.3 min wall on 2 cores. Trained side by side with one thread each,
the whole demo takes 8.4–9.2 min instead of 15.2 (same recipes). Each
process keeps one thread count for its whole run: a count that followed what
else is running would make the weights depend on timing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mtpd.demo import steps
from mtpd.demo.steps import Log


@dataclass
class Job:
    """``mtpd-train --plan PLAN --stage ...`` in a child process; its output goes to ``log_path``."""

    name: str
    plan: Path
    out_dir: Path
    log_path: Path
    proc: subprocess.Popen | None  # None when an earlier demo run finished every stage
    _pos: int = 0
    _partial: str = field(default="", repr=False)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def relay(self, log: Log, quiet: bool) -> None:
        """Print the child's new log lines (end-of-epoch and end-of-stage lines only when ``quiet``)."""
        if self.proc is None or not self.log_path.is_file():
            return
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            f.seek(self._pos)
            chunk = f.read()
            self._pos = f.tell()
        lines = (self._partial + chunk).split("\n")
        self._partial = lines.pop()  # an incomplete last line waits for the rest
        for line in lines:
            if line.strip() and (not quiet or steps.epoch_line(line)):
                log(f"  [{self.name}] {line.rstrip()}")

    def check(self) -> None:
        """Raise when the child exited with an error, naming its log."""
        if self.proc is None or self.proc.poll() in (None, 0):
            return
        tail = self.log_path.read_text(errors="replace").strip().splitlines()[-5:] if self.log_path.is_file() else []
        raise RuntimeError(f"training {self.name} failed (mtpd-train exit {self.proc.returncode}); log: {self.log_path}\n"
                           + "\n".join(tail))

    def stage_done(self, k: int) -> bool:
        return steps.stage_done(self.out_dir, k, self.plan)

    def stop(self) -> None:
        """Stop the child (on an error or Ctrl-C in the demo); a rerun retrains its unfinished stages."""
        if not self.running():
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start(name: str, plan_path: Path, log: Log, threads: int) -> Job:
    """Start training the stages of ``plan_path`` an earlier demo run did not finish, in a child process."""
    steps.show(["mtpd-train", "--plan", plan_path, "--stage", "all"], log)
    plan, todo = steps.stages_todo(plan_path, log)
    out = Path(plan.output_dir)
    log_path = out / "train.log"
    if not todo:
        return Job(name, Path(plan_path), out, log_path, None)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "mtpd.cli.train", "--plan", str(plan_path), "--stage", ",".join(map(str, todo)), "--device", "cpu"]
    with open(log_path, "w", encoding="utf-8") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    log(f"  training {name} in its own process ({threads} thread{'s' if threads > 1 else ''}, pid {proc.pid}; log: {log_path})")
    return Job(name, Path(plan_path), out, log_path, proc)


def wait(jobs: list[Job], log: Log, quiet: bool, until: Callable[[], bool] | None = None, poll_s: float = 1.0) -> None:
    """Relay the jobs' logs until ``until()`` holds (default: every job has exited); raise if one fails."""
    done = until or (lambda: not any(j.running() for j in jobs))
    while True:
        for j in jobs:
            j.relay(log, quiet)
            j.check()
        if done():
            return
        if not any(j.running() for j in jobs):  # all exited cleanly, yet ``until`` never came
            raise RuntimeError("the students' training processes exited before the demo could go on; logs: "
                               + ", ".join(str(j.log_path) for j in jobs))
        time.sleep(poll_s)


def metrics(job: Job) -> list[dict]:
    """Every stage's metrics.json of a finished job."""
    from mtpd.trainer.plan import load_plan

    return steps.stage_metrics(load_plan(job.plan))
