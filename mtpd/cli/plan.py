"""`mtpd-plan`: plan utilities. `mtpd-plan order` ranks cached teachers by their distance to a student."""

from __future__ import annotations

import argparse
import json
import sys

from mtpd.cli import HelpFormatter, add_trust_flag, apply_trust_flag


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtpd-plan", description="Plan utilities.")
    sub = p.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser(
        "order",
        help="order teacher stores nearest-first by feature distance to a student (1 - linear CKA)",
        formatter_class=HelpFormatter,
        description="Measures, on a calibration subset, how far the student's FPN features are from each cached "
        "teacher's "
        "(1 - linear CKA per level, averaged) and prints the stores nearest first. With --plan and --write, "
        "reorders that plan's single-store stages to match.",
    )
    o.add_argument("--student", required=True, help="student checkpoint (e.g. a baseline's stage_K/final.pt)")
    o.add_argument("--stores", nargs="+", required=True, help="teacher stores to rank")
    o.add_argument("--images", type=int, default=64, help="calibration images (the first N of the dataset)")
    o.add_argument("--ann", default=None, help="COCO JSON the stores were built on (default: the plan's train_ann)")
    o.add_argument("--image-dir", default=None, help="image folder (default: the plan's train_images)")
    o.add_argument("--plan", default=None, help="plan whose data to use, and to rewrite with --write")
    o.add_argument(
        "--write", default=None, metavar="OUT_PLAN", help="write the plan with its stages in the measured order here"
    )
    o.add_argument("--device", default="cpu", help="cpu or cuda")
    add_trust_flag(o)
    o.add_argument("--json", action="store_true", help="print JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    apply_trust_flag(a)
    from pathlib import Path

    from mtpd.data import CocoDataset
    from mtpd.errors import MtpdError, message
    from mtpd.trainer.plan import PlanError, load_plan, save_plan
    from mtpd.trainer.student import load_student
    from mtpd.trainer.teacher_order import measure, reorder_plan

    try:
        plan = load_plan(a.plan) if a.plan else None
        ann = a.ann or (plan.data.train_ann if plan else None)
        images = a.image_dir or (plan.data.train_images if plan else None)
        if not ann or not images:
            raise PlanError("give --ann and --image-dir, or --plan to take them from its data section")
        stores = [str(Path(s).resolve()) if "://" not in s else s for s in a.stores]
        res = measure(load_student(a.student, a.device), stores, CocoDataset(ann, images), a.images, device=a.device)
        if a.write:
            if plan is None:
                raise PlanError("--write needs --plan")
            save_plan(reorder_plan(plan, [r.store for r in res]), a.write)
    except MtpdError as e:
        print(f"mtpd-plan: error: {message(e)}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps([r.__dict__ for r in res], indent=2))
    else:
        print(f"{'rank':<5}{'distance':>10}  {'CKA per level':<36} store (teacher)")
        for i, r in enumerate(res, 1):
            per = " ".join(f"P{k}={v:.3f}" for k, v in sorted(r.cka.items()))
            print(f"{i:<5}{r.distance:>10.4f}  {per:<36} {r.store} ({r.teacher}, weights {r.weights})")
        if a.write:
            print(f"wrote {a.write} with stages in this order")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
