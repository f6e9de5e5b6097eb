"""How far a teacher's AMP forward (``mtpd-cache build --amp``) moves its maps, next to each preset's own error.

    .venv/bin/python bench/amp_error.py                          # the shipped teachers, digits at 128 px, bf16
    .venv/bin/python bench/amp_error.py --amp fp16 --device cuda # on a GPU

The teacher is built by the product's own path (``TeacherSpec(..., amp=...).build()``, the wrapper a build
uses) and run on prepared views of the digits train split; its outputs are compared with the same teacher's
fp32 forward (relative RMSE over each output's cells, all levels). Beside it: the relative RMSE each precision
preset's encoding adds to the fp32 maps (encode then decode, as a store does), so the two errors can be read
together: an AMP error well inside a preset's is a build that costs nothing that preset did not already cost.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/amp_error.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import command_line, machine, table, write_section

TEACHERS = {
    "strong": ("retinanet_tiny_wide", "strong.pt"),
    "mbv2": ("retinanet_mobilenet_v2_fpn", "mbv2_60ep.pt"),
    "swin": ("retinanet_swin_tiny", "swin.pt"),
}


def _add_code_error(layouts: dict, enc_err: dict, name: str, j: int, rows) -> None:
    """Each preset's encode-then-decode error on ``rows`` [cells, C] of level index ``j``, summed into ``enc_err``."""
    for pn, header in layouts.items():
        enc = header.outputs[name].encoding
        codes, side = enc.encode(rows, j)
        dec = enc.decode(codes[None], None if side is None else side[None], j)[0]
        enc_err[(pn, name)][0] += float((dec - rows).pow(2).sum())
        enc_err[(pn, name)][1] += float(rows.pow(2).sum())


def main(argv: list[str] | None = None) -> int:

    from mtpd.cache.calibrate import fit_encodings
    from mtpd.cache.compute import plan_layout
    from mtpd.cache.schema import PRECISIONS
    from mtpd.data import CocoDataset, ViewSpec, prepare_view
    from mtpd.demo import recipes, steps
    from mtpd.teachers.registry import TeacherSpec

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--amp", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=16, help="digits train images (default: %(default)s)")
    p.add_argument("--out", default="bench_out/amp_error", help="where the digits set is made")
    p.add_argument("--write", action="store_true", help="record the table in bench/RESULTS.md")
    a = p.parse_args(argv)
    paths = steps.Paths(Path(a.out))
    steps.ensure_data(paths, recipes.FULL, lambda s: None)
    data = CocoDataset(paths.ann("train"), paths.images("train"))
    view = ViewSpec(short=recipes.SIZE, long=recipes.SIZE)
    rows = []
    for key, (arch, file) in TEACHERS.items():
        ckpt = str(steps.shipped_teachers() / file)
        ref_t = TeacherSpec(arch, ckpt, device=a.device).build()
        amp_t = TeacherSpec(arch, ckpt, device=a.device, amp=a.amp).build()
        names = ["fpn", "cls", "box"]
        # One layout per preset, its encodings fitted (PCA bases) as a build fits them.
        layouts = {}
        for prec in PRECISIONS.values():
            header = plan_layout(data, view, ref_t.output_specs(), names, prec, 16, ref_t.identity.to_dict()).header
            state, _ = fit_encodings(ref_t, data, header)
            for n, st in state.items():  # the fitted PCA bases, attached as a store attaches them
                header.outputs[n] = dataclasses.replace(
                    header.outputs[n], encoding=header.outputs[n].encoding.with_state(st)
                )
            layouts[prec.name] = header
        err = {n: [0.0, 0.0] for n in names}
        enc_err = {(pn, n): [0.0, 0.0] for pn in layouts for n in names}
        for i in range(a.images):
            x, _ = prepare_view(data.load_image(i), view)
            ref = ref_t(x[None].to(a.device), names)
            got = amp_t(x[None].to(a.device), names)
            for name in names:
                for j, lvl in enumerate(ref_t.output_specs()[name].levels):
                    key_ = f"{name}.p{lvl}"
                    rows_ = ref[key_][0].flatten(1).T.float().cpu()  # [cells, C], as the builder encodes a level
                    err[name][0] += float((got[key_][0].flatten(1).T.float().cpu() - rows_).pow(2).sum())
                    err[name][1] += float(rows_.pow(2).sum())
                    _add_code_error(layouts, enc_err, name, j, rows_)
        for name in names:
            rel = (err[name][0] / err[name][1]) ** 0.5
            presets = [f"{100 * (enc_err[(pn, name)][0] / enc_err[(pn, name)][1]) ** 0.5:.2f}" for pn in layouts]
            rows.append([key, name, f"{100 * rel:.3f}", *presets])
    header = ["teacher", "output", f"{a.amp} forward, rel. RMSE %", *(f"{pn} code %" for pn in PRECISIONS)]
    text = table(header, rows)
    print(text)
    if a.write:
        body = "\n".join(
            [
                f"Command: `{command_line('amp_error.py', argv)}`  ",
                f"Date: {time.strftime('%Y-%m-%d')}; machine: {machine()}; device {a.device}; {a.images} digits train "
                f"images at {recipes.SIZE} px; the shipped teachers strong.pt, mbv2_60ep.pt, swin.pt. Relative RMSE "
                "over all cells and levels against the teacher's fp32 forward; the code columns are each preset's "
                "encode-then-decode error on the fp32 maps (cls in logit units: the uint8 log-probability code clips "
                "logits below p = 1e-4, which dominates its logit error and costs no probability mass).",
                "",
                text,
            ]
        )
        write_section(f"AMP forward error ({a.amp}, bench/amp_error.py)", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
