"""`mtpd-train`: run the stages of a plan; students train from stores, no teacher in memory.

Single process:   mtpd-train --plan plan.yaml --stage all
Several GPUs:     torchrun --nproc-per-node 4 -m mtpd.cli.train --plan plan.yaml --stage 1 --device cuda
"""

from __future__ import annotations

import argparse
import os
import sys

from mtpd.cli import add_trust_flag, apply_trust_flag

EPILOG = """examples:
  mtpd-train --plan plans/mtpd_r50.yaml --stage 1
  mtpd-train --plan plans/mtpd_r50.yaml --stage all
  mtpd-train --plan plans/mtpd_r50.yaml --stage 2 --resume      # continue an interrupted stage
  mtpd-train --plan plans/mtpd_r50.yaml --stage 2 --overwrite   # train a finished stage again (refused otherwise)
  mtpd-train --plan plans/mtpd_r50.yaml --stage all --set stages.*.epochs=1 --set output_dir=../runs/try
                                                                # a one-epoch dry run, into another folder

Stage K starts from stage K-1's final checkpoint (OUTPUT_DIR/stage_{K-1}/final.pt).
Each stage writes OUTPUT_DIR/stage_K/{final.pt,last.pt,metrics.json,log.jsonl,plan.yaml}
(and TensorBoard event files in stage_K/tb/ when tensorboard is installed).
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mtpd-train",
        description="Distill a student stage by stage from cached teacher stores.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--plan", required=True, help="YAML plan file (see docs/training.md and docs/reference/plan.md)")
    p.add_argument("--stage", required=True, help="stage number (1-based), a comma list, or 'all'")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the stage from its last checkpoint (model, optimiser, scheduler, RNG, position)",
    )
    p.add_argument("--overwrite", action="store_true", help="train a finished stage again from its start")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change the plan by path before it is checked (repeatable): stages.*.epochs=1, data.batch_size=4, "
        "stages.0.losses=[]; VALUE is YAML, and a path in it, like the plan's own, is relative to the plan file; "
        "the stage's saved plan.yaml records the result",
    )
    add_trust_flag(p)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--online-teacher",
        action="append",
        default=None,
        metavar="NAME[=WEIGHTS]",
        help="baseline only: run this teacher inside every step instead of reading its store (one per store, in order)",
    )
    return p


def _stages(arg: str, n: int) -> list[int]:
    from mtpd.trainer.plan import PlanError

    if arg == "all":
        return list(range(1, n + 1))
    try:
        ks = [int(x) for x in arg.split(",")]
    except ValueError:
        raise PlanError(f"--stage {arg!r}: give a stage number, a comma list, or 'all'") from None
    for k in ks:
        if not 1 <= k <= n:
            raise PlanError(f"--stage {k}: the plan has stages 1..{n}")
    return ks


def _refuse_finished(plan, stages: list[int]) -> None:
    """A finished stage is never trained over by accident: its checkpoint and metrics would be replaced."""
    from mtpd.trainer.plan import PlanError
    from mtpd.trainer.stage import stage_dir

    for k in stages:
        done = stage_dir(plan, k) / "metrics.json"
        if done.is_file():
            raise PlanError(
                f"stage {k} ({plan.stages[k - 1].name}) has finished already ({done}); pass --overwrite to train it "
                "again from its start, or --resume to continue it from its last checkpoint"
            )


def _online(specs: list[str], device: str):
    # The one place a training command constructs teachers: the online baseline.
    from mtpd.teachers.registry import build_teacher

    teachers = []
    for s in specs:
        name, _, weights = s.partition("=")
        teachers.append(build_teacher(name, weights=weights or "none", device=device))
    return teachers


def _init_distributed(device: str) -> None:
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend)
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    import torch

    from mtpd.errors import MtpdError, message
    from mtpd.trainer.overlay import parse_sets
    from mtpd.trainer.plan import load_plan
    from mtpd.trainer.stage import run_plan

    apply_trust_flag(a)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        plan = load_plan(a.plan, parse_sets(a.set))
        stages = _stages(a.stage, len(plan.stages))
        if not (a.resume or a.overwrite):
            _refuse_finished(plan, stages)
        _init_distributed(device)
        if device.startswith("cuda") and torch.distributed.is_initialized():
            device = f"cuda:{torch.cuda.current_device()}"
        online = _online(a.online_teacher, device) if a.online_teacher else None
        results = run_plan(plan, stages, device=device, resume=a.resume, online=online)
    except MtpdError as e:
        print(f"mtpd-train: error: {message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mtpd-train: interrupted; rerun with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130
    for r in results:
        ap = r.metrics.get("AP")
        print(f"stage {r.stage}: {r.checkpoint}" + (f"  AP={ap:.4f}" if ap is not None else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
