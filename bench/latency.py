"""Accuracy against latency: parameters, FLOPs and CPU ms per image of the demo's models, PyTorch against ONNX Runtime.

    .venv/bin/python bench/latency.py --demo demo_out/full   # the demo's teachers and students (minutes)
    .venv/bin/python bench/latency.py --quick                # smoke test (seconds)

Every model is timed as it is deployed: ``mtpd.export.DeployableDetector`` (the student alone, with
post-processing) in PyTorch eager mode, and the file ``mtpd.export.export_model`` writes, run by
``mtpd.export.OnnxDetector`` (ONNX Runtime, CPU). Batch 1, one prepared 128x128 digits view, with 1
thread and with all of this machine's threads; each figure is the median of per-round medians over
interleaved rounds (every model and runtime once per round, order rotated). FLOPs: torch's flop
counter on one deployed forward. AP: the demo's val AP (its ``metrics.json``) and the shipped
teachers' manifest; models without one (``--quick``, or no demo run) are timed all the same.
The plot (AP against ONNX Runtime ms, one thread) goes to docs/ap_vs_latency.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/latency.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import interleave, report, table

TITLE = "Latency (bench/latency.py)"
PLOT = Path(__file__).resolve().parents[1] / "docs" / "ap_vs_latency.png"


def demo_models(demo: Path | None, quick: bool) -> list[dict]:
    """(name, checkpoint or None, arch for a fresh model, AP or None) of every model to time."""
    from mtpd.demo.recipes import STUDENT
    from mtpd.demo.steps import shipped_teachers

    folder = shipped_teachers()
    manifest = json.loads((folder / "manifest.json").read_text())
    models = [
        {"name": f"teacher {k}", "ckpt": folder / f"{k}.pt", "ap": m.get("val_AP")}
        for k, m in manifest.items()
        if (folder / f"{k}.pt").is_file()
    ]
    rows = json.loads((demo / "metrics.json").read_text())["rows"] if demo and (demo / "metrics.json").is_file() else []
    students = [r for r in rows if r.get("run_dir")]
    models += [
        {"name": r["model"], "ckpt": Path(r["run_dir"]) / "stage_2" / "final.pt", "ap": r["metrics"]["AP"]}
        for r in students
    ]
    if not students:
        models.append({"name": "student (fresh init)", "ckpt": None, "arch": STUDENT, "ap": None})
    return models[:1] + models[-1:] if quick else models


def load(entry: dict):
    from mtpd.models import build_arch
    from mtpd.trainer.student import load_student

    if entry["ckpt"] is not None:
        return load_student(entry["ckpt"]).eval()
    return build_arch(entry["arch"]["arch"], 10, **entry["arch"]["options"]).eval()


def digits_view(size: int):
    """One prepared digits view (the demo's views are 128x128)."""
    from mtpd.data import CocoDataset, ViewSpec, prepare_view
    from mtpd.data.digits import make_digits

    with tempfile.TemporaryDirectory(prefix="mtpd-bench-latency-") as tmp:
        out = make_digits(Path(tmp), train=1, val=1, size=size, seed=0)
        ds = CocoDataset(out["val"]["ann"], out["val"]["images"])
        spec = ViewSpec(short=size, long=size)
        view, meta = prepare_view(ds.load_image(0), spec)
    return spec, view, meta.size


def prepare(models: list[dict], spec, view, size, work: Path) -> dict[str, dict]:
    """Load, count and export each model; returns name -> its measurements so far and its runners."""
    from mtpd.export import export_model
    from mtpd.export.latency import count_flops, eager_runner

    out = {}
    for m in models:
        model = load(m)
        path = export_model(model, work / f"{len(out)}.onnx", spec).path
        out[m["name"]] = {
            "ap": m["ap"],
            "params": sum(p.numel() for p in model.parameters()),
            "flops": count_flops(model, view, size),
            "eager": eager_runner(model, view, size),
            "onnx_path": path,
        }
    return out


def measure(prepared: dict, view, size, threads: int, rounds: int, repeats: int) -> dict[str, float]:
    """'<model> | <runtime>' -> median ms per image with ``threads`` threads, rounds interleaved."""
    import torch

    from mtpd.export import OnnxDetector
    from mtpd.export.latency import median_ms

    torch.set_num_threads(threads)
    runs = {}
    for name, p in prepared.items():
        ort = OnnxDetector(p["onnx_path"], threads=threads)
        runs[f"{name} | eager"] = lambda p=p: median_ms(p["eager"], repeats) / 1000
        runs[f"{name} | onnxruntime"] = lambda ort=ort: median_ms(lambda: ort(view, size), repeats) / 1000
    times = interleave(runs, rounds, log=lambda s: print(s[:200], flush=True))
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def plot(prepared: dict, ms: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, p in prepared.items():
        if p["ap"] is None:
            continue
        x = ms[f"{name} | onnxruntime"]
        ax.scatter([x], [100 * p["ap"]], color="C1" if name.startswith("teacher") else "C0")
        ax.annotate(name, (x, 100 * p["ap"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("CPU ms / image (ONNX Runtime, 1 thread, batch 1, 128x128)")
    ax.set_ylabel("val AP (digits)")
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    PLOT.parent.mkdir(exist_ok=True)
    fig.savefig(PLOT, dpi=120)


def render(prepared: dict, ms1: dict, msn: dict, threads: int, rounds: int, repeats: int) -> str:
    rows = []
    for name, p in prepared.items():
        e1, o1 = ms1[f"{name} | eager"], ms1[f"{name} | onnxruntime"]
        en, on = msn[f"{name} | eager"], msn[f"{name} | onnxruntime"]
        ap = "–" if p["ap"] is None else f"{100 * p['ap']:.1f}"
        rows.append(
            [name, f"{p['params'] / 1e6:.2f}M", f"{p['flops'] / 1e9:.3f}", ap, e1, o1, f"{e1 / o1:.2f}x", en, on]
        )
    head = [
        "model",
        "params",
        "GFLOPs",
        "AP",
        "eager ms (1 thread)",
        "ONNX Runtime ms (1 thread)",
        "ORT speed-up",
        f"eager ms ({threads} threads)",
        f"ONNX Runtime ms ({threads} threads)",
    ]
    return "\n".join(
        [
            f"Batch 1, one 128x128 digits view, post-processing (NMS) included; medians over {rounds} interleaved "
            f"round(s) of {repeats} timed calls each. Models as deployed: `DeployableDetector` (PyTorch eager) and "
            "its ONNX export run by `OnnxDetector` (CPU execution provider).",
            "",
            table(head, rows),
            "",
        ]
    )


def main(argv: list[str] | None = None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--demo", default="demo_out/full", help="a demo run's OUT/full folder (its students and their AP)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20, help="timed calls per model, runtime and round")
    p.add_argument("--work-dir", default=None, help="folder for the ONNX exports (default: a temporary one)")
    p.add_argument("--no-write", action="store_true", help="print only: leave RESULTS.md and the plot alone")
    p.add_argument("--quick", action="store_true", help="two models, one round, few calls: a smoke test")
    a = p.parse_args(argv)
    if a.quick:
        a.rounds, a.repeats = 1, 2
    import torch

    threads = os.cpu_count() or 1
    start = time.monotonic()
    spec, view, size = digits_view(128)
    with tempfile.TemporaryDirectory(prefix="mtpd-bench-latency-") as tmp:
        prepared = prepare(demo_models(Path(a.demo), a.quick), spec, view, size, Path(a.work_dir or tmp))
        ms1 = measure(prepared, view, size, 1, a.rounds, a.repeats)
        msn = measure(prepared, view, size, threads, a.rounds, a.repeats)
        torch.set_num_threads(threads)
    if not a.no_write:
        plot(prepared, ms1)
    body = render(prepared, ms1, msn, threads, a.rounds, a.repeats)
    print(f"({time.monotonic() - start:.0f} s)")
    return report(TITLE, "quick" if a.quick else "demo models, 128x128", "latency.py", argv, body, write=not a.no_write)


if __name__ == "__main__":
    main()
