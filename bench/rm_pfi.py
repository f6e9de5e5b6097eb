"""RM + PFI on the digits benchmark: the form and weights chosen on the dev split, then the val rows.

    .venv/bin/python bench/rm_pfi.py --split dev --write      # the dev study: 12 variants, seed 0
    .venv/bin/python bench/rm_pfi.py --write                  # the val rows, 5 seeds, paired
    .venv/bin/python bench/rm_pfi.py --terms                  # RM's candidates per box, on the benchmark
    .venv/bin/python bench/rm_pfi.py --quick --out /tmp/rmpfi # smoke test (CI)

Everything else is the bytes-vs-AP benchmark's (``mtpd.demo.recipes``): the student, the two teachers
(weak 20.3 AP, strong 27.1 AP), 2 x 8 epochs, lossless stores with both views, students trained side by
side with one thread each, resumable (finished stages are kept under --out).

Dev rows (fixed before any run; "direct": the strong teacher in both stages, "chain": weak → strong):
RM, PFI and both in the paper's form (the defaults of ``rm``/``pfi``: RM with low-quality matches,
PFI on logits, not detached, norm reduction) at the paper's weights (4, 1.5) and at the weights the
README's rule gives (``weight: auto``; RM measured after one epoch, ``auto_after``), the earlier forms
(RM without low-quality matches; PFI detached, mean reduction, at the weight the rule gave it before),
PFI on probabilities, and RM + PFI in the chain; with the baseline and MGD beside them.

Val rows (after the dev study; see ``VAL_ROWS``): baseline, MGD, RM + PFI, RM + PFI + MGD and KD, each
paired by seed with the baseline and with MGD.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/rm_pfi.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bytes_vs_ap import Row, _build_stores, _lock, _plan, _split, paired, run_all
from bench.common import command_line, machine, write_section

TITLE = "RM + PFI (bench/rm_pfi.py)"
STORE = "lossless"  # bytes_vs_ap's store key: fpn, cls and box, both views

# Loss sets by key; "auto1" measures the rule's weight after one epoch (RM's first loss is near zero).
PAPER_RM = {"name": "rm"}  # the paper's form and weight (4): the loss's defaults
PAPER_PFI = {"name": "pfi"}  # ... (1.5)
AUTO_RM = {"name": "rm", "weight": "auto", "auto_after": "epoch"}
AUTO_PFI = {"name": "pfi", "weight": "auto"}
OURS_RM = {**AUTO_RM, "params": {"low_quality": False}}
OURS_PFI = {"name": "pfi", "weight": 0.13, "params": {"detach_pred": True, "reduction": "mean"}}
PROBS_PFI = {**AUTO_PFI, "params": {"pred": "probs"}}
MGD = {"name": "mgd", "weight": 1e-4, "params": {"lambda_mask": 0.65}}
KD = {"name": "kd", "weight": 10.0}
LOSS_SETS: dict[str, list[dict]] = {
    "none": [],
    "mgd": [MGD],
    "kd": [KD],
    "rm_paper": [PAPER_RM],
    "rm_auto": [AUTO_RM],
    "rm_ours": [OURS_RM],
    "pfi_paper": [PAPER_PFI],
    "pfi_auto": [AUTO_PFI],
    "pfi_ours": [OURS_PFI],
    "pfi_probs": [PROBS_PFI],
    "rmpfi_paper": [PAPER_RM, PAPER_PFI],
    "rmpfi_auto": [AUTO_RM, AUTO_PFI],
}

PLAIN = (("plain_1", None, "", "none"), ("plain_2", None, "", "none"))


def _direct(name: str, losses: str) -> Row:
    return Row(name, (("strong_1", "strong", STORE, losses), ("strong_2", "strong", STORE, losses)))


def _chain(name: str, losses: str) -> Row:
    return Row(name, (("weak", "weak", STORE, losses), ("strong", "strong", STORE, losses)))


DEV_ROWS: dict[str, Row] = {
    r.name: r
    for r in (
        Row("baseline", PLAIN),
        _direct("mgd", "mgd"),
        *(_direct(k, k) for k in ("rm_paper", "rm_auto", "rm_ours", "pfi_paper", "pfi_auto", "pfi_ours")),
        _direct("pfi_probs", "pfi_probs"),
        _direct("rmpfi_paper", "rmpfi_paper"),
        _direct("rmpfi_auto", "rmpfi_auto"),
        _chain("rmpfi_auto_chain", "rmpfi_auto"),
    )
}
# The val rows are set from the dev study's table (bench/RESULTS.md "RM + PFI ... dev split") before any val run.
VAL_ROWS: dict[str, Row] = {}


def _losses(key: str, iters_per_epoch: int) -> list[dict]:
    out = []
    for lc in LOSS_SETS[key]:
        lc = json.loads(json.dumps(lc))  # a copy: plans are written from it
        if lc.get("auto_after") == "epoch":
            lc["auto_after"] = iters_per_epoch
        out.append(lc)
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench/rm_pfi.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="bench_out/rm_pfi", help="working folder (data, stores, runs); %(default)s")
    p.add_argument("--split", choices=("val", "dev"), default="val", help="evaluate on val or on the dev split")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: 0 on dev, 0,1,2,3,4 on val)")
    p.add_argument("--rows", default=None, help="comma-separated rows (default: every row of the split)")
    p.add_argument("--jobs", type=int, default=1, help="students trained side by side, one thread each")
    p.add_argument("--quick", action="store_true", help="a few images, one epoch per stage: checks the script")
    p.add_argument("--write", action="store_true", help="write the table into bench/RESULTS.md")
    p.add_argument("--report", action="store_true", help="the table of what has finished, training nothing")
    p.add_argument("--terms", action="store_true", help="RM's candidates per box on the train split, then stop")
    return p


def terms(ann: Path, size: int) -> list[str]:
    """How many ground-truth boxes RM can use: per box, the student's anchors at IoU >= 0.5, with and without
    the low-quality rule (``mtpd.trainer.losses.rm.assign``), on every image of ``ann`` (views of ``size`` px)."""
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
    counts = {False: [], True: []}
    best = []
    valid = torch.ones(anchors.shape[0], dtype=torch.bool)
    for image_id, boxes in by_image.items():
        if sizes[image_id] != (size, size):
            raise SystemExit(f"--terms reads boxes at {size} px; image {image_id} is {sizes[image_id]}")
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
    a = _parser().parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see mtpd.cli.demo: spinning threads stall on shared CPUs
    from mtpd.demo import jobs, recipes, steps

    if a.terms:
        scale = recipes.QUICK if a.quick else recipes.FULL
        paths = steps.Paths(Path(a.out) / (f"quick-{a.split}" if a.quick else a.split))
        steps.ensure_data(paths, scale, lambda s: None)
        print("\n".join(terms(paths.ann("train"), recipes.SIZE)))
        return 0
    table_rows = DEV_ROWS if a.split == "dev" else VAL_ROWS
    if not table_rows:
        raise SystemExit("no val rows yet: run the dev study (--split dev) and set VAL_ROWS from its table first")
    rows = [r.strip() for r in (a.rows or ",".join(table_rows)).split(",") if r.strip()]
    unknown = [r for r in rows if r not in table_rows]
    if unknown:
        raise SystemExit(f"unknown row {unknown[0]!r} for --split {a.split}; choose from {', '.join(table_rows)}")
    seeds = [int(s) for s in (a.seeds or ("0" if a.split == "dev" else "0,1,2,3,4")).split(",")]
    if a.quick and a.write:
        raise SystemExit("--quick checks the script; its numbers are not results: drop --write")
    scale = recipes.QUICK if a.quick else recipes.FULL
    paths = steps.Paths(Path(a.out) / (f"quick-{a.split}" if a.quick else a.split))
    log = lambda s: print(s, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    if not a.report:
        steps.ensure_data(paths, scale, log)
        lock = _lock(paths.root, "rm_pfi.py")  # noqa: F841 - held until the process ends
    split = _split(paths, a.split, scale)
    teachers = steps.ensure_teachers(paths, scale, False, log)
    stores = {} if a.report else _build_stores(paths, split, teachers, [STORE], log)
    res_path = paths.root / "results.json"
    results: dict[str, dict[int, float]] = {}
    if res_path.is_file():
        results = {r: {int(s): v for s, v in d.items()} for r, d in json.loads(res_path.read_text()).items()}

    def on_done(row: str, seed: int, job) -> None:
        metrics = jobs.metrics(job)
        results.setdefault(row, {})[seed] = metrics[-1]["AP"]
        stage_aps = [round(100 * m["AP"], 2) for m in metrics]
        log(f"   {row} seed {seed}: AP {100 * metrics[-1]['AP']:.2f} (stages {stage_aps})")
        tmp = res_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=2))
        os.replace(tmp, res_path)

    tasks = []
    for seed in [] if a.report else seeds:  # seed-major: a stopped run still has paired rows
        for r in rows:
            plan = _plan(table_rows[r], seed, paths, split, scale, stores, _losses)
            if steps.stages_todo(plan, lambda s: None)[1] or seed not in results.get(r, {}):
                tasks.append((r, seed, plan, None))
    log("--report: nothing trains" if a.report else f"{len(tasks)} student runs to train, {a.jobs} side by side")
    run_all(tasks, a.jobs, log, on_done)

    lines = _table(rows, seeds, results, paths)
    print("\n".join(["", *lines]))
    if a.write:
        body = "\n".join(
            [
                f"Command: `{command_line('rm_pfi.py', argv if argv is not None else sys.argv[1:])}`  ",
                f"Date: {time.strftime('%Y-%m-%d')}; machine: {machine()}; wall time of this invocation "
                f"{(time.perf_counter() - t0) / 3600:.1f} h  ",
                f"Setup: {recipes.describe(split.train_count, split.val_count)}; split {a.split}; seeds {seeds}. "
                "AP is COCO box AP (×100) after the last stage. Weights: as given, or `auto` → the value the rule "
                "chose (stage 1 / stage 2, from each run's resolved plan).",
                "",
                *lines,
            ]
        )
        write_section(TITLE + (" — dev split" if a.split == "dev" else ""), body)
        print("wrote its section of bench/RESULTS.md")
    return 0


def _weights(paths, run: str) -> str:
    """The losses' weights per stage as the run resolved them (auto → chosen; "auto" when the stage ended
    before its warm-up did)."""
    import yaml

    def one(x: dict) -> str:
        w = x.get("weight")
        return x["name"] if w is None else f"{x['name']} {w:.3g}" if isinstance(w, (int, float)) else f"{x['name']} {w}"

    out = []
    for k in (1, 2):
        f = paths.runs / run / f"stage_{k}" / "plan.yaml"
        if not f.is_file():
            return "-"
        out.append(", ".join(one(x) for x in yaml.safe_load(f.read_text())["stages"][k - 1]["losses"]))
    return " / ".join(out) if any(out) else "-"


def _table(rows: list[str], seeds: list[int], results: dict, paths) -> list[str]:
    shown = {r: {s: results[r][s] for s in seeds if s in results.get(r, {})} for r in rows}
    lines = ["| row | losses (weights per stage) | AP | vs baseline | vs MGD |", "|---|---|---:|---:|---:|"]
    for r in rows:
        if not shown[r]:
            continue
        aps = [100 * v for v in shown[r].values()]
        mean = sum(aps) / len(aps)
        ap = (
            f"{mean:.2f}"
            if len(aps) == 1
            else f"{mean:.2f} ± {(sum((x - mean) ** 2 for x in aps) / (len(aps) - 1)) ** 0.5:.2f}"
        )
        cells = []
        for ref in ("baseline", "mgd"):
            d = paired(shown, r, ref) if r != ref else None
            if d is None:
                cells.append("-")
            elif d["n"] == 1:
                cells.append(f"{d['mean']:+.2f}")
            else:
                cells.append(f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]")
        lines.append(f"| {r} | {_weights(paths, f'{r}_s{min(shown[r])}')} | {ap} | {cells[0]} | {cells[1]} |")
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
