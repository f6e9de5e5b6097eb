"""A study's report: AP per row with its paired differences, the pairs' per-seed values, the noise floor, the
rules' verdicts, and a plot of AP against store bytes or training time.

The report is Markdown: printed, and with ``--write FILE`` put into FILE as the section ``## <title>``,
replacing that section and keeping every other byte of the file (a results log many studies write into).
"""

from __future__ import annotations

import math
import os
import platform
import re
import statistics
import time
from pathlib import Path

from mtpd.study.spec import Study
from mtpd.study.stats import Results, mean_std, noise_floor, paired, verdict


def _kib(b: float | None) -> str:
    return "-" if b is None else f"{b / 1024:.1f}"


def table(study: Study, out: dict) -> list[str]:
    """One line per row with runs: seeds, AP mean ± std, the paired difference to each ref, bytes, minutes."""
    results: Results = out["results"]
    refs = [r for r in study.refs if r in out["rows"]]
    weights = out.get("weights") or {}
    show_w = any(weights.values())
    # columns nothing fills are left out (e.g. sizes of stores not on this machine, times of imported records)
    show_b = any(out["bytes"].get(r) is not None for r in out["rows"])
    show_t = any(out["seconds"].get(r) for r in out["rows"])
    head = "| row | " + ("losses (weights per stage) | " if show_w else "") + "seeds | AP | "
    head += "".join(f"vs {r} [90 % CI] | " for r in refs)
    head += ("store KiB/image | " if show_b else "") + ("train min |" if show_t else "")
    align = "|---|" + ("---|" if show_w else "") + "---:|---:|" + "---|" * len(refs) + "---:|" * (show_b + show_t)
    lines = [head.rstrip(" "), align]
    for r in out["rows"]:
        runs = results.get(r, {})
        if not runs:
            continue
        cells = []
        for ref in refs:
            d = paired(results, r, ref) if r != ref else None
            cells.append("-" if d is None else d.cell())
        secs = out["seconds"].get(r) or []
        minutes = f"{statistics.mean(secs) / 60:.1f}" if secs else "-"
        name = f"{r} ({study.rows[r].note})" if study.rows[r].note else r
        seeds = ",".join(map(str, sorted(runs)))
        w = f"{weights.get(r) or '-'} | " if show_w else ""
        line = f"| {name} | {w}{seeds} | {mean_std(list(runs.values()))} | " + "".join(c + " | " for c in cells)
        line += (f"{_kib(out['bytes'].get(r))} | " if show_b else "") + (f"{minutes} |" if show_t else "")
        lines.append(line.rstrip(" "))
    return lines


def pairs_table(study: Study, results: Results) -> list[str]:
    """The study's pairs: mean, std and 90 % interval of the per-seed differences, and each seed's value."""
    lines = ["| pair | seeds | mean | std | 90 % interval | per seed |", "|---|---:|---:|---:|---|---|"]
    for a, b, *what in study.pairs:
        d = paired(results, a, b)
        if d is None:
            continue
        per = ", ".join(f"{s}: {x:+.2f}" for s, x in sorted(d.per_seed.items()))
        ci = f"[{d.low:+.2f}, {d.high:+.2f}]" if d.n > 1 else "-"
        sd = f"{d.std:.2f}" if d.n > 1 else "-"
        name = f"{a} − {b}" + (f" ({what[0]})" if what else "")
        lines.append(f"| {name} | {d.n} | {d.mean:+.2f} | {sd} | {ci} | {per} |")
    return lines if len(lines) > 2 else []


def noise_lines(results: Results) -> list[str]:
    floor = noise_floor(results)
    if not floor:
        return ["Noise floor: one seed per row; a difference under about 1–2 AP can be seeds alone."]
    pooled = floor.pop("pooled")
    per_row = ", ".join(f"{r} {s:.2f}" for r, s in floor.items())
    return [
        f"Noise floor: std of single runs across seeds (AP) {per_row}; pooled {pooled:.2f}, so one seed of two rows "
        f"differs by about ±{pooled * math.sqrt(2):.2f} on seeds alone."
    ]


def verdict_lines(study: Study, out: dict) -> list[str]:
    lines = []
    for rule in study.rules:
        v = verdict(rule, out["results"], {r: b for r, b in out["bytes"].items() if b is not None})
        why = []
        for r, d in v.checked.items():
            if d is None:
                why.append(f"{r} no runs")
            elif d.n < 2:
                why.append(f"{r} {d.mean:+.2f} (one seed: no interval)")
            else:
                why.append(f"{r} {d.cell()}{' passes' if r in v.passed else ''}")
        test = (
            f"paired mean ≥ {rule.mean_at_least:+.2f} AP and 90 % interval above {rule.low_above:+.2f} AP vs {rule.ref}"
        )
        pick = ", ".join(v.chosen) + ("" if v.passed else f" (no row passes: {rule.ref})")
        lines.append(f"**{rule.name}** ({test}; pick {rule.pick}): **{pick}**. " + "; ".join(why) + ".")
    return lines


def report(study: Study, out: dict, quick: bool = False) -> list[str]:
    """The whole report, as Markdown lines."""
    lines = table(study, out)
    if len(lines) == 2:
        return ["No run has finished yet."]
    for part in (pairs_table(study, out["results"]), noise_lines(out["results"]), verdict_lines(study, out)):
        if part:
            lines += ["", *part]
    if quick:
        lines += ["", "--quick: a few images and one epoch per stage; these numbers check the study, not a choice."]
    return lines


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, {gpu}"


def write_section(path: Path, title: str, body: str, key: str | None = None) -> None:
    """Replace section ``## title`` of the Markdown file ``path`` (or its ``### key`` block) and nothing else.

    Other sections, including ones other people maintain, are kept byte for byte; a missing section is appended,
    a missing block is appended to its section."""
    text = path.read_text() if path.exists() else f"# {title}\n"
    sections = re.split(r"(?m)^(?=## )", text)
    head = f"## {title}"
    idx = next((i for i, s in enumerate(sections) if s.splitlines()[0:1] == [head]), None)
    if key is None:
        new = f"{head}\n\n{body.strip()}\n\n"
    else:
        blocks = re.split(r"(?m)^(?=### )", sections[idx] if idx is not None else f"{head}\n\n")
        bhead, block = f"### {key}", f"### {key}\n\n{body.strip()}\n\n"
        bidx = next((i for i, b in enumerate(blocks) if b.splitlines()[0:1] == [bhead]), None)
        if bidx is None:
            blocks.append(block)
        else:
            blocks[bidx] = block
        new = "".join(blocks)
    if idx is None:
        if sections and not sections[-1].endswith("\n\n"):
            sections[-1] = sections[-1].rstrip("\n") + "\n\n"
        sections.append(new)
    else:
        sections[idx] = new
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(sections).rstrip("\n") + "\n")


def section(study: Study, out: dict, command: str, quick: bool = False) -> str:
    """The report with what made it: the command, date, machine, split and seeds."""
    head = [
        f"Command: `{command}`  ",
        f"Date: {time.strftime('%Y-%m-%d')}; machine: {machine()}; split {out['split']}; seeds {out['seeds']}.  ",
        "AP is COCO box AP (×100) after the last stage; differences are paired by seed, with 90 % t-intervals "
        f"where there are several. Runs: {os.path.relpath(out['record_path'])}.",
        "",
    ]
    return "\n".join(head + report(study, out, quick))


def plot(study: Study, out: dict, path: Path, x: str = "bytes") -> None:
    """AP (mean, with the seeds' std as error bars) against store KiB per image or training minutes; or
    (``x="rows"``) one bar per row, its seeds as dots, which shows the rows that read no store too."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if x == "rows":
        fig = _row_bars(plt, study, out)
    else:
        fig = _scatter(plt, study, out, x)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _scatter(plt, study: Study, out: dict, x: str):
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for r in out["rows"]:
        aps = [100 * v for v in out["results"].get(r, {}).values()]
        if x == "bytes":
            xv = None if out["bytes"].get(r) is None else out["bytes"][r] / 1024
        else:
            secs = out["seconds"].get(r) or []
            xv = statistics.mean(secs) / 60 if secs else None
        if not aps or xv is None:
            continue
        err = statistics.stdev(aps) if len(aps) > 1 else 0.0
        ax.errorbar([xv], [statistics.mean(aps)], yerr=[err], fmt="o", capsize=3)
        ax.annotate(r, (xv, statistics.mean(aps)), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if x == "bytes":
        ax.set_xscale("log")
    ax.set_xlabel("store KiB per image (log)" if x == "bytes" else "training minutes per run")
    ax.set_ylabel("AP (mean ± std over seeds)")
    ax.set_title(study.name)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _row_bars(plt, study: Study, out: dict):
    rows = [r for r in out["rows"] if out["results"].get(r)]
    fig, ax = plt.subplots(figsize=(7, 0.9 + 0.45 * len(rows)), dpi=120)
    top = 0.0
    for i, r in enumerate(rows):
        aps = [100 * v for v in out["results"][r].values()]
        mean = statistics.mean(aps)
        err = statistics.stdev(aps) if len(aps) > 1 else 0.0
        stored = out["bytes"].get(r)
        ax.barh(i, mean, xerr=err, capsize=3, color="#9ab" if stored is None else "#48a")
        ax.plot(aps, [i] * len(aps), "k.", ms=4)
        label = f"{mean:.1f}" + (f"  ({stored / 1024:,.0f} KiB/img)" if stored is not None else "")
        right = max(mean + err, *aps)
        top = max(top, right)
        ax.annotate(label, (right, i), textcoords="offset points", xytext=(5, -3), fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"AP (mean ± std over seeds, dots: seeds; dark: store bytes found); split {out['split']}")
    ax.set_title(study.name, fontsize=9)
    ax.set_xlim(0, 1.3 * top or 1.0)  # room for the labels right of the longest bar
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig
