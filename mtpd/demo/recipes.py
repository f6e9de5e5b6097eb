"""What the demo and the bytes-vs-AP benchmark train: models, schedules and plans, fixed before any run.

Every number here was decided on a dev split (400 images carved from the train split) by the runs
of ``bench/studies/choose_benchmark.yaml``, never on val; bench/RESULTS.md "Benchmark choice on the dev split"
has them. The student is ``retinanet_tiny`` at its default width (0.59M parameters): the weak
teacher's own architecture, which the weak teacher (trained 20 epochs, 20.3 AP) is ahead of by
training, and ``retinanet_tiny_wide`` (2.24M, 27.1 AP) by size too; both teachers trained from
scratch and are shipped in mtpd/demo/teachers. (Width 12 gained +4.9 AP from its teachers, width 16
+7.9, from a higher baseline: the wider student makes the sharper benchmark.) All models train
with the same AdamW recipe; the learning-rate schedule restarts in every stage (as MTPD's per-stage
schedules do).

Why these teachers and not the stronger ImageNet-initialised MobileNetV2 one (``mbv2_60ep.pt``,
47.3 AP): on the dev split its features do not carry over to a student trained from scratch
(MGD from it: +1.3 AP over the baseline, from ``retinanet_tiny_wide``: +8.3 AP, same student and
epochs), so a benchmark built on it could not tell a good store from a bad one.
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


# 2 x 8 epochs per student: the longest schedule with which the bytes-vs-AP sweep (12 rows x 5 seeds,
# two students side by side) fits its 3 hours on 2 CPU cores.
FULL = Scale(train=2000, val=400, stage_epochs=8, teacher_epochs={"weak": 20, "strong": 20})
QUICK = Scale(train=192, val=64, stage_epochs=1, teacher_epochs={"weak": 1, "strong": 1})

STUDENT = {"arch": "retinanet_tiny", "options": {"width": 16, "fpn_channels": 64}}
# "file": the checkpoint's name in mtpd/demo/teachers (and its key in manifest.json).
TEACHERS = {
    "weak": {"arch": "retinanet_tiny", "options": {}, "file": "weak"},
    "strong": {"arch": "retinanet_tiny_wide", "options": {}, "file": "strong"},
}

# Loss weights, by the rule of docs/losses.md (weight: auto): each weighted loss starts at the size of the
# detection loss.
# `weight: auto` applied that rule at the first step of the dev runs (bench/RESULTS.md): MGD
# 1.5e-4 (weak teacher) and 1.1e-4 (strong), KD 12.6 and 10.0, RM 1.7e3 and PFI 0.13 (weak).
# One number per loss for both stages, rounded, as the rule reads at the student's first step;
# in the second stage the trained student's detection loss is smaller, so the same weight starts
# MGD at about 3x it and KD at about 0.3x (the rule's stage-2 values were 3.5e-5 and 33).
# (The MGD paper's 2e-5 is for 256-channel FPNs at COCO sizes; RM's raw loss is tiny at the start,
# when a fresh student ranks every anchor alike.)
MGD_WEIGHT = 1e-4
MGD_LAMBDA = 0.65
KD_WEIGHT = 10.0
RM_WEIGHT = 1.7e3
PFI_WEIGHT = 0.13


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


def kd_loss() -> dict:
    return {"name": "kd", "weight": KD_WEIGHT}


def rm_pfi_losses() -> list[dict]:
    # The forms these weights were chosen for and the bytes-vs-AP sweep measured (the losses' defaults have
    # since moved to the public reimplementation's: bench/studies/rm_pfi.yaml studies those).
    return [
        {"name": "rm", "weight": RM_WEIGHT, "params": {"low_quality": False}},
        {"name": "pfi", "weight": PFI_WEIGHT, "params": {"detach_pred": True, "reduction": "mean"}},
    ]


def describe(train: int = FULL.train, val: int = FULL.val, recipe: bool = True) -> str:
    """The benchmark in one line, for result tables (``train``/``val``: the images the runs used).

    ``recipe=False`` leaves out the default schedule and loss weights, for studies whose rows set their own.
    """
    opts = ", ".join(f"{k}={v}" for k, v in STUDENT["options"].items())
    data = (
        f"digits {train} train / {val} evaluation images at {SIZE} px; student {STUDENT['arch']}({opts}); teachers "
        f"{TEACHERS['weak']['arch']} (weak) and {TEACHERS['strong']['arch']} (strong), shipped in "
        "mtpd/demo/teachers"
    )
    if not recipe:
        return data
    return (
        f"{data}; two stages of {FULL.stage_epochs} epochs per student; MGD α={MGD_WEIGHT}, "
        f"λ={MGD_LAMBDA}; KD {KD_WEIGHT}; RM {RM_WEIGHT}, PFI {PFI_WEIGHT}"
    )


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
    model = {k: v for k, v in TEACHERS[which].items() if k != "file"}
    return plan(model, data_root, out_dir, [stage(f"teacher_{which}", scale.teacher_epochs[which], ipe)], ipe)
