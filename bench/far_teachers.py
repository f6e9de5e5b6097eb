"""Where progressive distillation pays: chains ending at a far teacher against that teacher alone.

    .venv/bin/python bench/far_teachers.py --split dev --write      # the dev study: seed 0
    .venv/bin/python bench/far_teachers.py --write --jobs 2         # the val rows, 5 seeds, paired (~4.5 h)
    .venv/bin/python bench/far_teachers.py --quick --out /tmp/far   # smoke test (CI)

MTPD's claim: a student learns a far teacher (much stronger, or another architecture) better through a
sequence of nearer teachers than directly. The benchmark's student (``retinanet_tiny``, from scratch) and
its near teachers (``weak.pt`` 20.3 AP, ``strong.pt`` 27.1 AP, both from-scratch conv nets) are joined by
two far ones, shipped in mtpd/demo/teachers:

    mbv2   mbv2_60ep.pt: ImageNet-initialised MobileNetV2 RetinaNet, 47.3 AP (far by strength and init)
    swin   swin.pt: the Swin Transformer RetinaNet, 30.8 AP (far by architecture: MTPD's headline case)

Fixed before any run: every distilled stage uses MGD with ``weight: auto`` (each teacher's features have
their own scale, so one fixed α would favour some teachers; the rule makes each stage's MGD start at the
size of its detection loss), λ = 0.65; lossless stores with both views. Equal total epochs, 18 per
student: one teacher twice (2 × 9, "direct"), two teachers (9 + 9), three (6 + 6 + 6); the baseline
trains 2 × 9 on detection alone.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/far_teachers.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bytes_vs_ap import Row, pairs_lines
from bench.study import STORE, Study
from bench.study import main as study_main

MGD = {"name": "mgd", "weight": "auto", "params": {"lambda_mask": 0.65}}
LOSS_SETS = {"none": [], "mgd": [MGD]}
TEACHERS = {"mbv2": ("retinanet_mobilenet_v2_fpn", "mbv2_60ep.pt"), "swin": ("retinanet_swin_tiny", "swin.pt")}


def chain(name: str, *teachers: str) -> Row:
    """MGD from ``teachers`` in order, one stage each; a single teacher is used twice (direct)."""
    ts = teachers if len(teachers) > 1 else teachers * 2
    return Row(name, tuple((f"{t}_{i}", t, STORE, "mgd") for i, t in enumerate(ts, 1)))


PLAIN = (("plain_1", None, "", "none"), ("plain_2", None, "", "none"))
DEV_ROWS: dict[str, Row] = {
    r.name: r
    for r in (
        Row("baseline", PLAIN),
        chain("direct_strong", "strong"),
        chain("direct_mbv2", "mbv2"),
        chain("direct_swin", "swin"),
        chain("strong_mbv2", "strong", "mbv2"),
        chain("strong_swin", "strong", "swin"),
        chain("weak_strong_mbv2", "weak", "strong", "mbv2"),
        chain("weak_strong_swin", "weak", "strong", "swin"),
        chain("mbv2_swin", "mbv2", "swin"),
    )
}
EPOCHS = {r: ([6, 6, 6] if len(row.stages) == 3 else [9, 9]) for r, row in DEV_ROWS.items()}
# Set from the dev study's table (bench/RESULTS.md "Far teachers ... dev split") and this machine's time before any
# val run. Ten rows (every dev row but mbv2 → swin, plus a 18 + 18 pair) would take ~8 h at ~0.9 min per student
# epoch with two side by side, twice the ~4 h the sweep may take, so rows were cut, not seeds or epochs:
#   - the three-teacher chains (weak → strong → far): on dev weak → strong → mbv2 lost 1.34 AP to strong → mbv2;
#   - the 18 + 18 pair (36 epochs a student, the cost of four rows). The whole-schedule comparison MTPD makes (each
#     stage trained as long as the direct student) is kept at the benchmark's 9-epoch schedule instead: mbv2 alone
#     for one stage of 9 epochs against strong → mbv2 at 9 + 9, the pair where the chain paid on dev (+4.95 AP).
# The conv → transformer chain is strong → swin. Six rows at 18 epochs and one at 9: ~4.5 h for 5 seeds.
VAL_ROWS: dict[str, Row] = {
    **{k: v for k, v in DEV_ROWS.items() if k not in ("mbv2_swin", "weak_strong_mbv2", "weak_strong_swin")},
    "once_mbv2": Row("once_mbv2", (("mbv2_1", "mbv2", STORE, "mgd"),)),
}
EPOCHS["once_mbv2"] = [9]


# The pairs the targets name, (chain, its comparison, what the pair tests); read from the same sweep.
PAIRS = (
    ("strong_mbv2", "direct_mbv2", "chain vs its final (far) teacher alone, equal epochs"),
    ("strong_swin", "direct_swin", "conv → transformer chain vs the transformer alone, equal epochs"),
    ("strong_mbv2", "once_mbv2", "chain vs its final teacher alone, a whole 9-epoch schedule per stage"),
    ("strong_swin", "direct_strong", "best chain vs best single teacher, equal epochs"),
    ("strong_swin", "strong_mbv2", "the two chains: transformer vs MobileNetV2 as the final stage"),
)


def extra_lines(paths, shown: dict) -> list[str]:
    """The targets' pairs with their per-seed differences (the spread is the noise floor), then the order."""
    return ["Paired differences, AP ×100:", "", *pairs_lines(shown, PAIRS), "", *order_lines(paths, shown)]


def order_lines(paths, shown: dict) -> list[str]:
    """What ``mtpd-plan order`` measures (the library's ``measure``: 1 − linear CKA of the baseline student's FPN
    maps against each teacher's stored ones, 64 train images), nearest first: the order it would pick."""
    import yaml

    from mtpd.data import CocoDataset
    from mtpd.trainer.student import load_student
    from mtpd.trainer.teacher_order import measure

    ckpt = paths.runs / "baseline_s0" / "stage_2" / "final.pt"
    stores = {t: next(iter(sorted(paths.stores.glob(f"*-{t}-{STORE}"))), None) for t in ("weak", "strong", *TEACHERS)}
    stores = {t: p for t, p in stores.items() if p is not None}
    if not ckpt.is_file() or len(stores) < 2:
        return ["(mtpd-plan order: needs the baseline row and the stores; not run yet)"]
    plan = yaml.safe_load((paths.runs / "baseline_s0" / "plan.resolved.yaml").read_text())
    data = CocoDataset(plan["data"]["train_ann"], plan["data"]["train_images"])
    res = measure(load_student(ckpt), [str(p) for p in stores.values()], data, 64)
    key = {str(p): t for t, p in stores.items()}
    lines = [
        "`mtpd-plan order` from the baseline student (seed 0), nearest first — distance = 1 − mean linear CKA over "
        "P3–P5:",
        "",
        "| teacher | distance | CKA P3 / P4 / P5 |",
        "|---|---:|---|",
    ]
    for r in res:
        lines.append(
            f"| {key[r.store]} | {r.distance:.3f} | {' / '.join(f'{r.cka[lv]:.3f}' for lv in sorted(r.cka))} |"
        )
    return lines


def plot(shown: dict, path: Path, split: str = "val") -> None:
    """AP of every row with its 90 % interval of the mean, grouped by the teacher the student ends at (the far
    teacher alone first in each group), the baseline as a line: where a chain lands against that teacher alone."""
    import math
    import statistics

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.bytes_vs_ap import t90

    rows_of = {**DEV_ROWS, **VAL_ROWS}
    groups: dict[str, list[str]] = {}
    for name, vals in shown.items():
        if vals and name != "baseline":
            last = rows_of[name].stages[-1][1]
            groups.setdefault(last, []).append(name)
    fig, ax = plt.subplots(figsize=(7.6, 4.2))
    x, ticks, labels = 0, [], []
    for g, names in groups.items():
        names.sort(key=lambda n: (len(rows_of[n].stages) > 1 and rows_of[n].stages[0][1] != rows_of[n].stages[1][1], n))
        for n in names:
            vals = [100 * v for v in shown[n].values()]
            m = statistics.mean(vals)
            half = t90(len(vals) - 1) * statistics.stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else 0.0
            direct = len({t for _, t, _, _ in rows_of[n].stages}) == 1
            ax.errorbar([x], [m], yerr=[half], fmt="s" if direct else "o", capsize=4, color="C7" if direct else "C0")
            ticks.append(x)
            label = " → ".join(t for _, t, _, _ in rows_of[n].stages) if not direct else f"{g.split()[0]} alone"
            labels.append(label + (f" ({sum(EPOCHS[n])} ep)" if sum(EPOCHS[n]) != 18 else ""))
            x += 1
        x += 0.6
    if shown.get("baseline"):
        ax.axhline(100 * statistics.mean(shown["baseline"].values()), color="C3", ls="--", lw=1, label="baseline")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xticks(ticks)
    ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=7)
    ax.set_ylabel("box AP (x100), mean and 90 % interval")
    ax.set_title(f"Progressive or direct: digits {split}; 18 epochs per student unless marked", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


STUDY = Study(
    prog="bench/far_teachers.py",
    title="Far teachers: progressive or direct (bench/far_teachers.py)",
    doc=__doc__ or "",
    rows={"dev": DEV_ROWS, "val": VAL_ROWS},
    loss_sets=LOSS_SETS,
    refs=("baseline", "direct_strong", "direct_mbv2", "direct_swin"),
    extra_teachers=TEACHERS,
    epochs=EPOCHS,
    extra_lines=extra_lines,
    setup=f"MGD (`weight: {MGD['weight']}`, λ = {MGD['params']['lambda_mask']}) in every distilled stage, `{STORE}` "
    "stores with both views; epochs per stage in the stages column",
    plot=plot,
)


def main(argv: list[str] | None = None) -> int:
    return study_main(STUDY, argv)


if __name__ == "__main__":
    raise SystemExit(main())
