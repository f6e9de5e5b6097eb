"""The demo's table, report.md and plots (AP per stage; loss curves per stage)."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

from mtpd.demo.run import DemoResult, Row

COLUMNS = ("model", "arch", "params", "AP", "AP50", "AP75", "CPU ms/img", "train time", "store")


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.1f} min"


def _cells(r: Row) -> list[str]:
    m = r.metrics
    return [
        r.model,
        r.arch,
        f"{r.params / 1e6:.2f}M",
        f"{100 * m['AP']:.1f}",
        f"{100 * m['AP50']:.1f}",
        f"{100 * m['AP75']:.1f}",
        "-" if r.cpu_ms is None else f"{r.cpu_ms:.1f}",
        _fmt_time(r.train_seconds),
        f"{r.store_bytes / 2**20:.1f} MiB" if r.store_bytes else "-",
    ]


def table(rows: list[Row], markdown: bool = False) -> str:
    """The demo table as aligned text, or as a Markdown table."""
    body = [_cells(r) for r in rows]
    if markdown:
        lines = [
            "| " + " | ".join(COLUMNS) + " |",
            "|" + "|".join("---" if i < 2 else "---:" for i in range(len(COLUMNS))) + "|",
        ]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in body])
    widths = [max(len(x) for x in col) for col in zip(COLUMNS, *body)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([fmt(list(COLUMNS)), fmt(["-" * w for w in widths])] + [fmt(c) for c in body])


# What the demo's two students score over five seeds on the same benchmark and recipe (AP mean, std): the val
# rows "baseline" and "small" of bench/studies/bytes_vs_ap.yaml (bench/RESULTS.md, "Bytes vs AP"). One seed's AP
# moves by 1-2 AP with the seed and the CPU's float kernels alone, so a single run is read against these.
FIVE_SEEDS = {"baseline": (16.13, 1.06), "progressive": (23.49, 0.32)}


def gains(result: DemoResult) -> list[str]:
    """One line per distilled student: AP over the baseline trained for the same epochs; and, at the full
    scale, how the run's students compare with the five-seed figures."""
    students = {r.run_dir and Path(r.run_dir).name: r for r in result.rows if r.run_dir}
    base = students.get("baseline")
    out = []
    for name in ("direct", "progressive"):
        r = students.get(name)
        if base and r:
            out.append(
                f"{r.model}: {100 * (r.metrics['AP'] - base.metrics['AP']):+.1f} AP over the baseline (same epochs)"
            )
    if result.scale.get("quick"):
        return out
    for name, (mean, std) in FIVE_SEEDS.items():
        r = students.get(name)
        if r:
            ap = 100 * r.metrics["AP"]
            out.append(
                f"{r.model}: {ap:.1f} AP in this run; over five seeds {mean:.1f} ± {std:.1f} "
                f"({(ap - mean) / std:+.1f} std: single runs move by 1-2 AP with the seed and the CPU)"
            )
    return out


def plot_ap_per_stage(result: DemoResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on CI machines
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    teacher_styles = iter([":", "--", "-."])
    for r in result.rows:
        if r.stage_metrics:
            ks = list(range(1, len(r.stage_metrics) + 1))
            ax.plot(ks, [100 * m["AP"] for m in r.stage_metrics], marker="o", label=r.model)
        else:
            ax.axhline(
                100 * r.metrics["AP"], ls=next(teacher_styles, ":"), lw=1.2, color="grey", label=f"{r.model} ({r.arch})"
            )
    ax.set_xlabel(f"stage ({result.scale['stage_epochs']} epochs each)")
    ax.set_ylabel("val AP")
    ax.set_xticks([1, 2])
    ax.set_title("AP after each stage")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _read_log(run_dir: Path, k: int) -> list[dict]:
    p = run_dir / f"stage_{k}" / "log.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.is_file() else []


def plot_losses(result: DemoResult, path: Path) -> None:
    """Per stage: the detection loss (solid) and the weighted distillation loss (dashed) of each student."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    students = [r for r in result.rows if r.run_dir]
    n_stages = max(len(r.stage_metrics) for r in students)
    fig, axes = plt.subplots(1, n_stages, figsize=(5 * n_stages, 3.8), squeeze=False)
    for k in range(1, n_stages + 1):
        ax = axes[0][k - 1]
        for i, r in enumerate(students):
            recs = _read_log(Path(r.run_dir), k)
            if not recs:
                continue
            color = f"C{i}"
            x = [rec["step"] for rec in recs]
            det = [sum(v for n, v in rec.items() if n.startswith("det_")) for rec in recs]
            ax.plot(x, det, color=color, marker="." if len(x) < 20 else None, label=f"{r.model}: detection")
            distill = [rec["loss"] - d for rec, d in zip(recs, det)]
            if any(abs(v) > 1e-4 for v in distill):  # float rounding leaves ~1e-7 without a distillation loss
                ax.plot(
                    x,
                    distill,
                    color=color,
                    ls="--",
                    marker="." if len(x) < 20 else None,
                    label=f"{r.model}: distillation (weighted)",
                )
        ax.set_title(f"stage {k}")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(result: DemoResult, root: Path, command: str) -> Path:
    """report.md with the table, the gains, per-stage AP, timings and the two plots."""
    plots = root / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    plot_ap_per_stage(result, plots / "ap_per_stage.png")
    plot_losses(result, plots / "loss_curves.png")
    s = result.scale
    per_stage = ["| student | " + " | ".join(f"stage {k} AP" for k in (1, 2)) + " |", "|---|---:|---:|"]
    for r in result.rows:
        if r.stage_metrics:
            names = ", ".join(m.get("name", "?") for m in r.stage_metrics)
            per_stage.append(
                f"| {r.model} ({names}) | " + " | ".join(f"{100 * m['AP']:.1f}" for m in r.stage_metrics) + " |"
            )
    lines = [
        "# mtpd demo: progressive distillation on the digits benchmark",
        "",
        f"Command: `{command}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M')}; machine: {platform.machine()}, {_cpu_count()} CPU cores, "
        f"{platform.system()}  ",
        f"Data: digits, {s['train']} train / {s['val']} val images at 128 px (seed 0); "
        f"students train {2 * s['stage_epochs']} epochs in 2 stages of {s['stage_epochs']}; "
        f"stores: {s['precision']}.  ",
        f"Total demo time: {result.seconds / 60:.1f} min ("
        + ", ".join(f"{k} {v:.0f}s" for k, v in result.steps_seconds.items())
        + "; steps an earlier run finished are reused and take ~0s). Train times are those of the runs that trained "
        "each model; "
        + f"the students trained side by side, {s.get('threads_per_student', '?')} torch thread(s) each.",
        "",
        table(result.rows, markdown=True),
        "",
        *[f"- {g}" for g in gains(result)],
        "- teacher order measured by `mtpd-plan order` (1 - CKA to the baseline student after its first stage): "
        f"{' -> '.join(result.order)}",
        "",
        "## AP per stage",
        "",
        *per_stage,
        "",
        "![AP per stage](plots/ap_per_stage.png)",
        "",
        "## Loss curves per stage",
        "",
        "![loss curves](plots/loss_curves.png)",
        "",
    ]
    if s["quick"]:
        lines.insert(2, "*Quick mode: a smoke test of the pipeline on a few images; its APs mean nothing.*\n")
    path = root / "report.md"
    path.write_text("\n".join(lines))
    return path


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
