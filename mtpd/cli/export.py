"""`mtpd-export`: a student checkpoint as a student-only ONNX (or TorchScript) file for deployment."""

from __future__ import annotations

import argparse
import json
import sys

from mtpd.cli import HelpFormatter, add_trust_flag, apply_trust_flag


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mtpd-export",
        description="Write the student alone (no loss adapters), post-processing included: one prepared view in, "
        "boxes, scores and labels after NMS out; the view recipe goes into the file's metadata. Check it with "
        "`mtpd-eval --onnx FILE --checkpoint CKPT`, which reports both APs and their parity.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="student checkpoint written by mtpd-train (stage_K/final.pt)")
    p.add_argument("--out", required=True, help="file to write (e.g. student.onnx)")
    p.add_argument("--format", default="onnx", choices=["onnx", "torchscript"], help="artifact format")
    p.add_argument("--size", default=None, help="fix the input to HxW (views zero-padded to it); default: dynamic")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17)")
    p.add_argument(
        "--short",
        type=int,
        default=None,
        help="view short side (default: the plan's, saved beside the checkpoint, else 800)",
    )
    p.add_argument("--long", type=int, default=None, help="view long side bound (default: the plan's, else 1333)")
    p.add_argument("--json", action="store_true", help="print the written metadata as JSON")
    add_trust_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    apply_trust_flag(a)

    from mtpd.cli.options import checkpoint_views
    from mtpd.data import ViewSpec
    from mtpd.errors import MtpdError, message
    from mtpd.export import DEFAULT_OPSET, ExportError, export_model, parse_size
    from mtpd.trainer.student import load_student

    try:
        if a.format != "onnx" and a.opset is not None:
            raise ExportError("--opset applies to --format onnx only; leave it out for torchscript")
        short, long = checkpoint_views(a.checkpoint, a.short, a.long)
        model = load_student(a.checkpoint)
        result = export_model(
            model,
            a.out,
            ViewSpec(short=short, long=long),
            format=a.format,
            size=parse_size(a.size),
            opset=a.opset or DEFAULT_OPSET,
            source=a.checkpoint,
        )
    except MtpdError as e:
        print(f"mtpd-export: error: {message(e)}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(result.metadata, indent=2))
    else:
        info = json.loads(result.metadata["mtpd.model"])
        print(
            f"wrote {result.path} ({result.format}; {info['name']}, {info['num_classes']} classes; input "
            f"{result.metadata['mtpd.input_size']}; views short {short}, long {long})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
