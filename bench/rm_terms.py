"""RM's candidates per box on the digits benchmark: how many ground-truth boxes Rank Mimicking can use.

    .venv/bin/mtpd-data digits --out bench_out/digits
    .venv/bin/python bench/rm_terms.py --ann bench_out/digits/annotations/instances_train.json

Per box, the student's anchors at IoU >= 0.5 (``mtpd.trainer.losses.rm.assign``), with and without the
low-quality rule (each box's best anchors); RM needs two or more candidates to have a rank to mimic.
bench/studies/rm_pfi.yaml is the study of the losses themselves.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def terms(ann: Path, size: int) -> list[str]:
    """The table of candidates per box over every image of ``ann`` (square views of ``size`` px)."""
    import torch
    from torchvision.ops import box_iou

    from mtpd.demo import recipes
    from mtpd.models import build_arch, model_anchors
    from mtpd.trainer.losses.rm import assign

    data = json.loads(ann.read_text())
    student = build_arch(recipes.STUDENT["arch"], len(data["categories"]), **recipes.STUDENT["options"])
    anchors = model_anchors(student, (size, size))
    sizes = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
    by_image: dict[int, list[list[float]]] = {}
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        by_image.setdefault(a["image_id"], []).append([x, y, x + w, y + h])
    counts: dict[bool, list[int]] = {False: [], True: []}
    best: list[float] = []
    valid = torch.ones(anchors.shape[0], dtype=torch.bool)
    for image_id, boxes in by_image.items():
        if sizes[image_id] != (size, size):
            raise SystemExit(f"{ann}: image {image_id} is {sizes[image_id]}, not {size} px square: pass --size")
        b = torch.tensor(boxes)
        best += box_iou(b, anchors).max(dim=1).values.tolist()
        for low in (False, True):
            owner = assign(b, anchors, valid, 0.5, low)
            counts[low] += [(owner == m).sum().item() for m in range(len(boxes))]
    n = len(best)
    lines = [
        "| assignment | boxes with candidates | with ≥ 2 (a rank to mimic) | candidates per box (mean, when any) |",
        "|---|---:|---:|---:|",
    ]
    for low, label in ((False, "IoU ≥ 0.5 only"), (True, "IoU ≥ 0.5 + each box's best anchors (low-quality)")):
        have = [c for c in counts[low] if c > 0]
        two = sum(c > 1 for c in have) / n
        lines.append(f"| {label} | {len(have) / n:.1%} of {n} | {two:.1%} | {sum(have) / max(1, len(have)):.1f} |")
    below = sum(x < 0.5 for x in best) / n
    lines.append(f"\nBest anchor IoU per box: median {sorted(best)[n // 2]:.2f}, share below 0.5 {below:.1%}")
    return lines


def main(argv: list[str] | None = None) -> int:
    from mtpd.demo import recipes

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ann", default="bench_out/digits/annotations/instances_train.json", help="COCO annotations")
    p.add_argument("--size", type=int, default=recipes.SIZE, help="the views' side in pixels")
    a = p.parse_args(argv)
    print("\n".join(terms(Path(a.ann), a.size)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
