"""What the demo trains: the models, the schedules and the plans, fixed before any run.

Every number here was decided before the runs it feeds (no tuning on val):
the student is ``retinanet_tiny`` at half the backbone width and half the
FPN/head width (0.17M parameters), so both teachers (the default
``retinanet_tiny``, 0.59M, and the 2.5x wider ``retinanet_tiny_wide``, 2.24M)
have a real capacity gap over it. All models train with the same AdamW
recipe, which trains these plain conv nets from scratch; the learning-rate
schedule restarts in every stage (as MTPD's per-stage 1x schedules do).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# The digits set: sizes and seed of the benchmark (quick mode takes the first images of the same streams).
SIZE = 128
SEED = 0


@dataclass(frozen=True)
class Scale:
    """How much data and how many epochs one run of the demo uses."""

    train: int
    val: int
    stage_epochs: int  # epochs per distillation stage; baseline and direct get the same total
    teacher_epochs: dict[str, int] = field(default_factory=dict)


# 2 x 6 epochs per student (12, the length of a 1x schedule) keeps the demo (baseline and
# progressive student trained side by side) within its 15-minute budget on 2 CPU cores
# (measured: 8.4 min). Teachers train longer, once.
FULL = Scale(train=2000, val=400, stage_epochs=6, teacher_epochs={"weak": 20, "strong": 20})
QUICK = Scale(train=192, val=64, stage_epochs=1, teacher_epochs={"weak": 1, "strong": 1})

STUDENT = {"arch": "retinanet_tiny", "options": {"width": 8, "fpn_channels": 32}}
TEACHERS = {
    "weak": {"arch": "retinanet_tiny", "options": {}},
    "strong": {"arch": "retinanet_tiny_wide", "options": {}},
}

# MGD's α must be rescaled to the feature size (the paper's 2e-5 is for 256-channel
# FPNs at COCO sizes). Measured once, before any student run: with a trained
# retinanet_tiny teacher (FPN rms ≈ 0.8) and a freshly initialised student, the
# unweighted MGD loss is ≈ 1.5e4 per image (64 channels x 336 cells on P3-P5)
# against a detection loss of ≈ 1.9. α = 1e-4 makes the two start at the same
# size (weighted MGD ≈ 1.3 in the first logged steps), as the paper's α does on COCO.
MGD_WEIGHT = 1e-4
MGD_LAMBDA = 0.65


def optimizer() -> dict:
    return {"type": "adamw", "lr": 1e-3, "weight_decay": 0.05, "base_batch": 16}


def schedule(iters_per_epoch: int) -> dict:
    # Warm up over about one epoch, then mmdet's 1x steps at 8/12 and 11/12 of the stage.
    return {"warmup_iters": max(1, iters_per_epoch), "warmup_ratio": 0.001, "steps": [8 / 12, 11 / 12], "gamma": 0.1}


def data_section(root: Path, batch_size: int = 16) -> dict:
    return {
        "train_ann": str(root / "annotations" / "instances_train.json"),
        "train_images": str(root / "images" / "train"),
        "val_ann": str(root / "annotations" / "instances_val.json"),
        "val_images": str(root / "images" / "val"),
        "short": SIZE,
        "long": SIZE,
        "flip": True,
        "batch_size": batch_size,
        "workers": 0,
        "val_batch_size": 32,
    }


def stage(
    name: str,
    epochs: int,
    iters_per_epoch: int,
    stores: list[str] | None = None,
    losses: list[dict] | None = None,
    teacher: dict | None = None,
) -> dict:
    """A stage that reads ``stores``, or the store of ``teacher`` (a plan's ``teacher:`` entry)."""
    return {
        "name": name,
        "epochs": epochs,
        **({"teacher": teacher} if teacher else {"stores": list(stores or [])}),
        "losses": list(losses or []),
        "optimizer": optimizer(),
        "schedule": schedule(iters_per_epoch),
        "grad_clip": 35.0,
    }


def mgd_loss() -> dict:
    return {"name": "mgd", "weight": MGD_WEIGHT, "params": {"lambda_mask": MGD_LAMBDA}}


def plan(
    model: dict, data_root: Path, out_dir: Path, stages: list[dict], iters_per_epoch: int, seed: int = SEED
) -> dict:
    """A plan dict ready for ``mtpd.trainer.plan.from_dict(Plan, ...)`` or ``yaml.safe_dump``."""
    # About five loss records per epoch: enough points for the loss curves.
    return {
        "student": {"arch": model["arch"], "options": dict(model["options"])},
        "data": data_section(data_root),
        "stages": stages,
        "output_dir": str(out_dir),
        "seed": seed,
        "log_every": max(1, iters_per_epoch // 5),
    }


def teacher_plan(which: str, data_root: Path, out_dir: Path, scale: Scale, train_images: int) -> dict:
    ipe = -(-train_images // 16)
    return plan(TEACHERS[which], data_root, out_dir, [stage(f"teacher_{which}", scale.teacher_epochs[which], ipe)], ipe)
