"""How far a store's class-score code moves KD's targets: the KD loss between fp16 logits and decoded codes.

    .venv/bin/python bench/kd_targets.py                       # the bytes-vs-AP sweep's val stores (strong teacher)
    .venv/bin/python bench/kd_targets.py --stores DIR --teacher weak --samples 32

For each preset's store of the same teacher and images, it decodes ``cls`` with ``open_store(...).read`` and
reports the loss KD (``mtpd.trainer.losses.kd``, τ as its default) would give if the student reproduced the
`lossless` logits exactly while the targets came from the preset: a target error of zero costs nothing; one of
the size of the training KD loss moves what the student learns. It also reports how many teacher scores lie below
the uint8 log-probability code's floor (p = 1e-4), where that code and top-k both clip.

RM reads the same scores another way: it mimics how the teacher *ranks* the anchors of an object, so the script
also reports, per sample, the rank correlation (Spearman, ties at their mean rank) of each anchor's top score
between `lossless` and the preset over the anchors the teacher gives p >= ``--candidate`` (a proxy for the
positive anchors whose class scores RM compares), and the share of those anchors whose decoded score ties with
another's (a vector code maps many anchors to one codeword).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/kd_targets.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    import torch

    from mtpd.cache.codes import logprob_logits
    from mtpd.cache.store import open_store
    from mtpd.trainer.losses.base import DistillBatch
    from mtpd.trainer.losses.kd import KDLoss

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--stores",
        default="bench_out/bytes_vs_ap/val/stores",
        help="a folder of stores named as the retired bench/bytes_vs_ap.py named them",
    )
    p.add_argument(
        "--store",
        action="append",
        default=[],
        metavar="PRESET=PATH",
        help="a store by path instead (repeat; lossless=PATH is the reference), e.g. from `mtpd-cache ls`",
    )
    p.add_argument("--teacher", default="strong", help="weak or strong (default: %(default)s)")
    p.add_argument("--presets", default="small,tiny", help="presets to compare with lossless (default: %(default)s)")
    p.add_argument("--samples", type=int, default=16, help="samples read, spread over the store (default: %(default)s)")
    p.add_argument("--tau", type=float, default=2.0, help="KD temperature (default: the kd loss's, %(default)s)")
    p.add_argument(
        "--candidate", type=float, default=0.05, help="p of the anchors whose ranks are compared (default: %(default)s)"
    )
    a = p.parse_args(argv)

    given = dict(x.split("=", 1) for x in a.store)

    def store(preset: str):
        path = Path(given[preset]) if preset in given else Path(a.stores) / f"instances_train-{a.teacher}-{preset}"
        if not path.exists():
            raise SystemExit(f"no store {path}: pass --store {preset}=PATH (mtpd-cache ls lists the catalog's)")
        return open_store(path)

    ref = store("lossless")
    presets = a.presets.split(",")
    others = {k: store(k) for k in presets}
    levels = tuple(ref.header.outputs["cls"].levels)
    kd = KDLoss(levels=levels, tau=a.tau)  # the trainer's own loss: lossless logits as student, preset as teacher
    floor = float(logprob_logits(np.zeros(1, np.uint8))[0])
    samples = np.linspace(0, ref.num_samples - 1, a.samples).round().astype(int)
    anchors = ref.header.outputs["cls"].spec.num_anchors
    loss = {k: [] for k in presets}
    ranks = {k: [] for k in presets}
    below = []
    for i in samples:
        t_levels = ref.read(int(i), ["cls"])["cls"]
        below += [float((lv <= floor).mean()) for lv in t_levels]
        student = {f"cls.p{lv}": torch.from_numpy(x)[None] for lv, x in zip(levels, t_levels)}
        masks = {lv: torch.ones(1, 1, *x.shape[-2:]) for lv, x in zip(levels, t_levels)}
        for k, st in others.items():
            p_levels = st.read(int(i), ["cls"])["cls"]
            teacher = {f"cls.p{lv}": torch.from_numpy(x)[None] for lv, x in zip(levels, p_levels)}
            batch = DistillBatch(student, teacher, masks, [], [], None, 0, 0, levels)
            loss[k].append(float(kd(batch)))
            ranks[k].append(rank_agreement(t_levels, p_levels, anchors, a.candidate))
    print(f"teacher {a.teacher}, {len(samples)} samples, tau {a.tau}")
    print(f"teacher class scores below p = 1e-4 (the uint8 code's floor): {100 * np.mean(below):.1f} %")
    for k in presets:
        print(f"KD loss, {k}'s decoded targets against lossless logits, per entry: {np.mean(loss[k]):.4f}")
    for k in presets:
        got = [r for r in ranks[k] if r is not None]
        if got:
            rho, tied = np.array(got).T
            print(
                f"RM's view, {k}: anchors' top-score rank correlation with lossless over anchors at p >= "
                f"{a.candidate}: {np.mean(rho):.3f} (min {np.min(rho):.3f}); tied scores {100 * np.mean(tied):.1f} %"
            )
    return 0


def rank_agreement(ref: list, got: list, anchors: int, candidate: float) -> tuple[float, float] | None:
    """Spearman correlation of each anchor's top score, ``got`` against ``ref`` (per-level logits [A*K, h, w],
    anchor-major as the heads lay them out), over the anchors ``ref`` scores at p >= ``candidate``, tied values
    ranked by their mean rank; and the share of those anchors whose ``got`` score equals another's. None with
    fewer than 5 such anchors, or when either side scores them all alike."""
    import numpy as np

    def top(levels: list) -> np.ndarray:  # logits, not sigmoids: saturated probabilities would tie
        return np.concatenate([x.reshape(anchors, -1, *x.shape[-2:]).max(1).ravel() for x in levels]).astype(np.float64)

    def ranks(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
        return (np.cumsum(counts) - (counts + 1) / 2)[inverse], counts

    r, g = top(ref), top(got)
    keep = r >= np.log(candidate / (1 - candidate)) if 0 < candidate < 1 else np.full(r.shape, candidate <= 0)
    if int(keep.sum()) < 5:
        return None
    (rr, _), (rg, counts) = ranks(r[keep]), ranks(g[keep])
    if rr.std() == 0 or rg.std() == 0:
        return None
    return float(np.corrcoef(rr, rg)[0, 1]), float(counts[counts > 1].sum() / keep.sum())


if __name__ == "__main__":
    raise SystemExit(main())
