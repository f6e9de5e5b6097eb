"""Class-score codes: per-anchor top-k and product quantisation against per-cell top-8 (``tiny``'s) and uint8
log-probabilities (``small``'s).

    .venv/bin/python bench/cls_codes.py --write            # the shipped strong and swin teachers, digits, 128 px
    .venv/bin/python bench/cls_codes.py --quick            # 24 images: checks the script

``tiny`` keeps the 8 largest of a *cell's* A·K scores (9 anchors × 10 classes here: most anchors keep none);
the per-anchor form keeps the k largest of each anchor's K (``TopK(k, groups=A)``), which a preset can choose
now that precision rules see the whole output spec. For each code this builds a ``cls`` store of the teacher
(the product's ``build_store``, in this process) and reports its bytes per image (both views) against fp32 and
against ``logprob-u8``, and how far KD's targets move: the KD loss (the trainer's ``KDLoss``, τ = 2) between the
lossless logits and the decoded code, per entry, as bench/kd_targets.py measures it. ``pqM-anchor``: each
anchor's K logits cut into M sub-vectors, each stored as one byte, the index of its nearest codeword in a
per-store codebook (``mtpd.cache.pq``, fitted at calibration). What KD's AP does with each code is a training
question (bench/studies/store_codes.yaml's kd rows); this is the part that needs no training.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/cls_codes.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import command_line, machine, table, write_section

TEACHERS = {"strong": ("retinanet_tiny_wide", "strong.pt"), "swin": ("retinanet_swin_tiny", "swin.pt")}
# name -> class-score rule (the whole spec: anchors and classes); features and boxes stay fp16 (not measured here)
CODES = ("lossless", "logprob-u8", "top8-cell", "top1-anchor", "top2-anchor", "top3-anchor", "pq1-anchor", "pq2-anchor")


@contextlib.contextmanager
def _variants():
    """The codes as presets, registered while this runs (stores record their encodings; the library's presets
    are left as they are)."""
    from mtpd.cache.codes import Fp16, LogProbU8, TopK
    from mtpd.cache.pq import ProductQuantizer
    from mtpd.cache.schema import PRECISIONS, Precision

    def preset(name: str, rule) -> Precision:
        return Precision(name, lambda s: Fp16(), rule, lambda s: Fp16(), name)

    added = {
        "logprob-u8": preset("logprob-u8", lambda s: LogProbU8()),
        "top8-cell": preset("top8-cell", lambda s: TopK(k=min(8, s.channels), channels=s.channels)),
        **{
            f"top{k}-anchor": preset(
                f"top{k}-anchor",
                lambda s, k=k: TopK(k=min(k, s.num_classes), channels=s.channels, groups=s.num_anchors),
            )
            for k in (1, 2, 3)
        },
        # each anchor's K logits as one (or two) sub-vectors of a product quantiser: one byte per anchor (or two)
        **{
            f"pq{m}-anchor": preset(
                f"pq{m}-anchor", lambda s, m=m: ProductQuantizer(8 * m * s.num_anchors / s.channels, rotate=False)
            )
            for m in (1, 2)
        },
    }
    PRECISIONS.update(added)
    try:
        yield
    finally:
        for name in added:
            PRECISIONS.pop(name, None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out/cls_codes", help="working folder (data, stores)")
    p.add_argument("--images", type=int, default=200, help="digits train images the stores hold")
    p.add_argument("--samples", type=int, default=32, help="samples compared per store")
    p.add_argument("--quick", action="store_true", help="24 images, 4 samples: checks the script")
    p.add_argument("--write", action="store_true", help="record the table in bench/RESULTS.md")
    a = p.parse_args(argv)
    if a.quick and a.write:
        raise SystemExit("--quick checks the script; its numbers are not results: drop --write")
    with _variants():
        rows = run(a)
    header = ["teacher", "code", "cls bytes / image", "of fp32", "of logprob-u8", "KD loss vs lossless logits"]
    text = table(header, rows)
    print(text)
    if a.write:
        body = "\n".join(
            [
                f"Command: `{command_line('cls_codes.py', argv)}`  ",
                f"Date: {time.strftime('%Y-%m-%d')}; machine: {machine()}; {a.images} digits train images at 128 px, "
                f"both views; KD loss (τ = 2) per entry over {a.samples} samples spread over each store, the lossless "
                "logits as the student and the code's decoded logits as the teacher (0 = the targets are unmoved; "
                "the bytes-vs-AP students end training at a KD loss of ~0.007).",
                "",
                text,
            ]
        )
        write_section("Class-score codes per anchor (bench/cls_codes.py)", body)
    return 0


def run(a) -> list[list[str]]:
    import numpy as np
    import torch

    from mtpd.cache.build import build_store
    from mtpd.cache.inspect import store_info
    from mtpd.cache.store import open_store
    from mtpd.data import ViewSpec
    from mtpd.data.digits import make_digits
    from mtpd.demo import steps
    from mtpd.teachers.registry import TeacherSpec
    from mtpd.trainer.losses.base import DistillBatch
    from mtpd.trainer.losses.kd import KDLoss

    n_images, n_samples = (24, 4) if a.quick else (a.images, a.samples)
    out = Path(a.out) / ("quick" if a.quick else "full")
    data = out / "digits"
    if not (data / "annotations" / "instances_train.json").is_file():
        make_digits(data, train=n_images, val=4, size=128, seed=0)
    ann, images = data / "annotations" / "instances_train.json", data / "images" / "train"
    rows = []
    for key, (arch, file) in TEACHERS.items():
        stores = {}
        for code in CODES:
            path = out / f"{key}-{code}"
            build_store(
                TeacherSpec(arch, str(steps.shipped_teachers() / file)),
                str(ann),
                str(images),
                str(path),
                views=ViewSpec(short=128, long=128, views=("orig", "hflip")),
                outputs=["cls"],
                precision=code,
                workers=0,
                batch_size=8,
                images_per_shard=32,
                progress=False,
            )
            stores[code] = open_store(str(path))
        ref = stores["lossless"]
        levels = tuple(ref.header.outputs["cls"].levels)
        kd = KDLoss(levels=levels, tau=2.0)
        picks = np.linspace(0, ref.num_samples - 1, n_samples).round().astype(int)
        info = {c: store_info(str(out / f"{key}-{c}"))["outputs"]["cls"] for c in CODES}
        for code in CODES:
            losses = []
            for i in picks:
                s_maps = ref.read(int(i), ["cls"])["cls"]
                t_maps = stores[code].read(int(i), ["cls"])["cls"]
                student = {f"cls.p{lv}": torch.from_numpy(x)[None] for lv, x in zip(levels, s_maps)}
                teacher = {f"cls.p{lv}": torch.from_numpy(x)[None] for lv, x in zip(levels, t_maps)}
                masks = {lv: torch.ones(1, 1, *x.shape[-2:]) for lv, x in zip(levels, s_maps)}
                losses.append(float(kd(DistillBatch(student, teacher, masks, [], [], None, 0, 0, levels))))
            stored, raw = info[code]["stored_bytes"], info[code]["raw_fp32_bytes"]
            per_image = stored / ref.header.num_images
            rows.append(
                [
                    key,
                    code,
                    f"{per_image / 1024:.2f} KiB",
                    f"1/{raw / stored:.1f}",
                    f"{stored / info['logprob-u8']['stored_bytes']:.2f}",
                    f"{np.mean(losses):.4f}",
                ]
            )
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
