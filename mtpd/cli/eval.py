"""`mtpd-eval`: COCO box AP of a student checkpoint, or of its ONNX export, on a COCO-format set.

Any checkpoint mtpd can rebuild: its own (the arch travels in the file), or a plain torchvision
state dict given ``--arch NAME_OR_PACKAGE.MODULE:FACTORY [--num-classes K] [--options JSON]``.
"""

from __future__ import annotations

import argparse
import json
import sys

from mtpd.cli import HelpFormatter, add_trust_flag, apply_trust_flag

STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mtpd-eval",
        description="COCO box AP, AP50, AP75, APs/m/l of a checkpoint or an ONNX export (faster-coco-eval where "
        "installed, else pycocotools). Given both --onnx and --checkpoint, evaluates both on the export's views and "
        "reports their parity image by image.",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        help="student checkpoint written by mtpd-train (stage_K/final.pt), or a plain state dict with --arch",
    )
    p.add_argument(
        "--arch",
        default=None,
        help="what the checkpoint was saved from: a registered arch or package.module:factory (needed for a plain "
        "torchvision state dict; the current directory is importable)",
    )
    p.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="classes the model was built with, as torchvision counts them (R-CNNs include the background); "
        "default: read off the checkpoint",
    )
    p.add_argument(
        "--options",
        type=_json_object,
        default=None,
        help="the arch's options as a JSON object, e.g. '{\"width\": 8}' (default: the checkpoint's, else none)",
    )
    p.add_argument("--onnx", default=None, help="ONNX file written by mtpd-export (run with ONNX Runtime)")
    p.add_argument("--ann", required=True, help="COCO instances JSON")
    p.add_argument("--images", required=True, help="image folder")
    p.add_argument(
        "--short",
        type=int,
        default=None,
        help="view short side (default: the ONNX file's recipe, else the plan's saved beside the checkpoint, else 800)",
    )
    p.add_argument("--long", type=int, default=None, help="view long side bound (default: as --short, else 1333)")
    p.add_argument("--batch-size", type=int, default=8, help="views per forward (PyTorch)")
    p.add_argument(
        "--device", default="cpu", help="cpu or cuda (a checkpoint alone; next to --onnx it runs on the cpu)"
    )
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    add_trust_flag(p)
    return p


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg} at column {e.colno}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"width\": 8}}', got {text!r}")
    return value


def _load(a: argparse.Namespace, device: str):
    from mtpd.trainer.student import load_student

    return load_student(a.checkpoint, device, arch=a.arch, num_classes=a.num_classes, options=a.options)


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    a = p.parse_args(argv)
    if not (a.checkpoint or a.onnx):
        p.error("give --checkpoint, --onnx, or both")
    if not a.checkpoint and (a.arch or a.num_classes or a.options is not None):
        p.error("--arch, --num-classes and --options describe a --checkpoint; give one")
    apply_trust_flag(a)

    from mtpd.cli.options import checkpoint_views
    from mtpd.data import CocoDataset, ViewSpec
    from mtpd.errors import MtpdError, message
    from mtpd.eval import evaluate

    progress = sys.stderr.isatty()
    try:
        dataset = CocoDataset(a.ann, a.images)
        if a.onnx:
            stats = _eval_onnx(a, dataset, progress)
        else:
            short, long = checkpoint_views(a.checkpoint, a.short, a.long)
            model = _load(a, a.device)
            stats = evaluate(
                model, dataset, ViewSpec(short=short, long=long), a.batch_size, a.device, progress=progress
            )
    except MtpdError as e:
        print(f"mtpd-eval: error: {message(e)}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(stats, indent=2))
        return 0
    print("  ".join(f"{k} {stats[k] * 100:.1f}" for k in STATS) + f"  ({stats['backend']})")
    if "pytorch" in stats:
        torch_stats, parity = stats["pytorch"], stats["parity"]
        print("  ".join(f"{k} {torch_stats[k] * 100:.1f}" for k in STATS) + "  (PyTorch checkpoint)")
        print(f"AP difference {(stats['AP'] - torch_stats['AP']) * 100:+.2f}; {parity['line']}")
        if stats.get("input_size") and abs(stats["AP"] - torch_stats["AP"]) > 0.002:
            print(
                f"note: the export's fixed {stats['input_size']} input pads views beyond their own padding, which "
                "changes detections (parity compares both on the same padded views); export at the views' own "
                "padded size or without --size"
            )
    return 0


def _eval_onnx(a: argparse.Namespace, dataset, progress: bool) -> dict:
    """The export's stats; with a checkpoint too, the checkpoint's stats and parity on the same views."""
    from dataclasses import asdict, replace

    from mtpd.eval import evaluate
    from mtpd.export import OnnxDetector, compare, evaluate_onnx

    detector = OnnxDetector(a.onnx)
    spec = detector.spec
    if a.short or a.long:
        spec = replace(spec, short=a.short or spec.short, long=a.long or max(spec.long, a.short or 0))
    stats = evaluate_onnx(detector, dataset, spec, progress)
    if detector.input_size:
        stats["input_size"] = "x".join(map(str, detector.input_size))
    if a.checkpoint:
        model = _load(a, "cpu")
        # batch size 1: each view padded on its own, as the export sees it
        stats["pytorch"] = evaluate(model, dataset, spec, 1, "cpu", progress=progress)
        report = compare(model, detector, dataset, spec)
        stats["parity"] = asdict(report) | {"fraction": report.fraction, "line": report.line()}
    return stats


if __name__ == "__main__":
    raise SystemExit(main())
