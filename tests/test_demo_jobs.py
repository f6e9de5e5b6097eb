"""The demo's students train in child processes: same weights as training in-process, failures name their log."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from mtpd.demo import jobs, steps


def _plan(tmp_path: Path, digits: dict, name: str, stages: int = 2, train_ann: str | None = None) -> Path:
    plan = {
        "output_dir": str(tmp_path / name),
        "seed": 0,
        "log_every": 1,
        "student": {"arch": "retinanet_tiny", "options": {"fpn_channels": 32, "width": 8}},
        "data": {
            "train_ann": train_ann or digits["train"]["ann"],
            "train_images": digits["train"]["images"],
            "short": 64,
            "long": 64,
            "flip": True,
            "batch_size": 4,
            "workers": 0,
        },
        "stages": [
            {
                "name": f"plain_{k}",
                "epochs": 1,
                "optimizer": {"type": "adamw", "lr": 0.002},
                "schedule": {"warmup_iters": 2},
            }
            for k in range(1, stages + 1)
        ],
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


def test_child_process_training_equals_in_process_training(tmp_path: Path, digits: dict) -> None:
    lines: list[str] = []
    job = jobs.start("child", _plan(tmp_path, digits, "child"), lines.append, threads=1)
    assert job.proc is not None
    jobs.wait([job], lines.append, quiet=True, poll_s=0.2)
    # The child's end-of-epoch and end-of-stage lines reach the demo's console, tagged with its name.
    assert any(x.startswith("  [child] stage 2 (plain_2) done:") for x in lines), lines
    assert [m["stage"] for m in jobs.metrics(job)] == [1, 2]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the child's thread count: CPU kernels may round differently with more threads
    try:
        steps.train(_plan(tmp_path, digits, "inproc"), lines.append, quiet=True)
    finally:
        torch.set_num_threads(threads)
    child = torch.load(tmp_path / "child" / "stage_2" / "final.pt", weights_only=False)["model"]
    inproc = torch.load(tmp_path / "inproc" / "stage_2" / "final.pt", weights_only=False)["model"]
    assert child.keys() == inproc.keys()
    for k in child:
        assert torch.equal(child[k], inproc[k]), k

    # Started again on the finished plan: nothing to train, no process.
    again = jobs.start("child", tmp_path / "child.yaml", lines.append, threads=1)
    assert again.proc is None and "reusing stage(s) [1, 2]" in lines[-1]


def test_failed_child_names_its_log_and_error(tmp_path: Path, digits: dict) -> None:
    missing = str(tmp_path / "nowhere" / "instances_train.json")
    job = jobs.start("broken", _plan(tmp_path, digits, "broken", train_ann=missing), lambda s: None, threads=1)
    # Waiting for a stage that will never finish ends with the child's error, not a hang.
    with pytest.raises(RuntimeError) as e:
        jobs.wait([job], lambda s: None, quiet=True, until=lambda: job.stage_done(1), poll_s=0.2)
    msg = str(e.value)
    assert "training broken failed (exit 2)" in msg and str(job.log_path) in msg
    assert "nowhere" in msg  # the child's own one-line error, naming the missing file


def test_stop_ends_a_running_child(tmp_path: Path, digits: dict) -> None:
    job = jobs.start("long", _plan(tmp_path, digits, "long", stages=3), lambda s: None, threads=1)
    assert job.running()
    job.stop()
    assert not job.running() and job.returncode != 0
    assert not (tmp_path / "long" / "stage_3" / "metrics.json").exists()
