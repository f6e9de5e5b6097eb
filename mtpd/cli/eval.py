"""`mtpd-eval`: COCO box AP of a student checkpoint on a COCO-format set."""

from __future__ import annotations

import argparse
import json
import sys

from mtpd.cli import HelpFormatter, add_trust_flag, apply_trust_flag


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="mtpd-eval",
        description="COCO box AP, AP50, AP75, APs/m/l of a checkpoint (faster-coco-eval where installed, else "
        "pycocotools).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="student checkpoint written by mtpd-train (stage_K/final.pt)")
    p.add_argument("--ann", required=True, help="COCO instances JSON")
    p.add_argument("--images", required=True, help="image folder")
    p.add_argument(
        "--short",
        type=int,
        default=None,
        help="view short side (default: the plan's, saved beside the checkpoint, else 800)",
    )
    p.add_argument("--long", type=int, default=None, help="view long side bound (default: the plan's, else 1333)")
    p.add_argument("--batch-size", type=int, default=8, help="views per forward")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    add_trust_flag(p)
    a = p.parse_args(argv)
    apply_trust_flag(a)

    from mtpd.data import CocoDataset, ViewSpec
    from mtpd.errors import MtpdError
    from mtpd.trainer.evaluate import evaluate
    from mtpd.trainer.student import load_student

    try:
        short, long = _view_sizes(a.checkpoint, a.short, a.long)
        model = load_student(a.checkpoint, a.device)
        stats = evaluate(
            model,
            CocoDataset(a.ann, a.images),
            ViewSpec(short=short, long=long),
            a.batch_size,
            a.device,
            progress=sys.stderr.isatty(),
        )
    except MtpdError as e:
        print(f"mtpd-eval: error: {e}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(stats, indent=2))
    else:
        print(
            "  ".join(f"{k} {stats[k] * 100:.1f}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl"))
            + f"  ({stats['backend']})"
        )
    return 0


def _view_sizes(checkpoint: str, short: int | None, long: int | None) -> tuple[int, int]:
    """A stage's plan.yaml sits beside its checkpoint: evaluate at the views it trained on."""
    from pathlib import Path

    import yaml

    plan = Path(checkpoint).with_name("plan.yaml")
    if (short is None or long is None) and plan.is_file():
        data = yaml.safe_load(plan.read_text()).get("data", {})
        short = short or data.get("short")
        long = long or data.get("long")
    return short or 800, long or 1333


if __name__ == "__main__":
    raise SystemExit(main())
