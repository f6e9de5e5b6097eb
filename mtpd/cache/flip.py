"""One view instead of two: a store with the original view only serves flipped samples by mirroring
its maps. Conv features are not exactly mirror-symmetric, so the builder measures, once per such
store, how far mirrored maps are from the teacher's real flipped view, and records it.

The error is relative RMSE per output and level over ``FLIP_CALIBRATION`` images, split into the
border columns of each level (where padding and stride alignment break symmetry most) and the
inside, and stored in the root attribute ``flip_error``; the trainer reports it when a stage starts.
"""

from __future__ import annotations

import numpy as np
import torch

from mtpd.data import CocoDataset, grid_size, prepare_view
from mtpd.data.views import ViewSpec
from mtpd.output_spec import OutputSpec
from mtpd.teachers.base import run_teacher

FLIP_CALIBRATION = 4  # images (default): the error is a ratio of sums over all their cells


def mirror(m: np.ndarray, spec: OutputSpec) -> np.ndarray:
    """A [h, w, C] map of the original view as the flipped view's map: columns reversed, then the channels
    as the output's mirror rule says (``OutputSpec.mirror_channels``: RetinaNet/RPN deltas negate dx,
    FCOS/GFL distances swap l and r). Anchors are mirror-symmetric per cell, so class and objectness
    channels keep their meaning."""
    perm, sign = spec.mirror_channels()
    out = m[:, ::-1][..., perm] * np.asarray(sign, dtype=m.dtype)
    return np.ascontiguousarray(out)


@torch.inference_mode()
def measure_flip_error(
    teacher, dataset: CocoDataset, spec: ViewSpec, outputs: dict, n_images: int = FLIP_CALIBRATION
) -> dict:
    """{output: {"P3": {"border": rel. RMSE, "inside": rel. RMSE}, ...}} of mirrored maps against the
    teacher's flipped view, on the first ``n_images`` readable images. ``outputs``: the header's ``StoredOutput``s."""
    sums: dict[tuple[str, int, str], list[float]] = {}
    for _, img in dataset.readable_images(n_images):
        res = {}
        for view in ("orig", "hflip"):
            x, meta = prepare_view(img, spec, view)
            res[view] = run_teacher(teacher, x[None], list(outputs), [meta.size])
        for name, o in outputs.items():
            for lvl in o.levels:
                h, w = grid_size(meta.size, 2**lvl)
                key = f"{name}.p{lvl}"
                ref = res["hflip"][key][0, :, :h, :w].permute(1, 2, 0).float().cpu().numpy()
                got = mirror(res["orig"][key][0, :, :h, :w].permute(1, 2, 0).float().cpu().numpy(), o.spec)
                border = np.zeros((h, w), bool)
                border[:, [0, w - 1]] = True
                for part, cells in (("border", border), ("inside", ~border)):
                    acc = sums.setdefault((name, lvl, part), [0.0, 0.0])
                    acc[0] += float(((got - ref)[cells] ** 2).sum())
                    acc[1] += float((ref[cells] ** 2).sum())
    out: dict = {}
    for (name, lvl, part), (err, ref) in sums.items():
        out.setdefault(name, {}).setdefault(f"P{lvl}", {})[part] = (err / ref) ** 0.5 if ref > 0 else 0.0
    return out
