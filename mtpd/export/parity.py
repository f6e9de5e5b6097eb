"""Parity of an export with its PyTorch student, image by image.

Both run on the very same prepared view. An image matches exactly when both keep the
same number of detections and they pair up one to one: same label, every box
coordinate within ``box_tol`` pixels, score within ``score_tol``. A detection whose
score sits at the threshold, or two boxes tied at NMS, can tip one way in float32
on one runtime and the other way on the other; such an image is counted, not hidden.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mtpd.data import CocoDataset, ViewSpec
from mtpd.eval import ViewDataset
from mtpd.export.graph import reference_detections

BOX_TOL = 0.5  # pixels
SCORE_TOL = 1e-3

Runner = Callable[[torch.Tensor, tuple[int, int]], dict[str, np.ndarray]]


@dataclass
class ParityReport:
    images: int = 0
    same_count: int = 0  # images where both keep the same number of detections
    exact: int = 0  # images whose detections pair up within the tolerances
    detections: int = 0  # PyTorch's detections over all images
    max_box_diff: float = 0.0  # pixels, over paired detections
    max_score_diff: float = 0.0
    mismatched: list[int] = field(default_factory=list)  # image ids that do not match exactly
    box_tol: float = BOX_TOL
    score_tol: float = SCORE_TOL

    @property
    def fraction(self) -> float:
        """Fraction of images whose detections match exactly."""
        return self.exact / self.images if self.images else 1.0

    def line(self) -> str:
        return (
            f"parity: {self.exact}/{self.images} images match exactly ({self.fraction:.1%}; boxes within "
            f"{self.box_tol} px, scores within {self.score_tol:g}); max box diff {self.max_box_diff:.2e} px, max score "
            f"diff {self.max_score_diff:.2e} over {self.detections} detections"
        )


def pair_detections(
    ref: dict[str, np.ndarray], got: dict[str, np.ndarray], box_tol: float = BOX_TOL, score_tol: float = SCORE_TOL
) -> tuple[int, float, float]:
    """(pairs, max box diff, max score diff): each reference detection, best score first, takes the unpaired
    detection of ``got`` with its label, its score within ``score_tol`` and the closest box within ``box_tol``."""
    rb, rs, rl = (np.asarray(ref[k], np.float64) for k in ("boxes", "scores", "labels"))
    gb, gs, gl = (np.asarray(got[k], np.float64) for k in ("boxes", "scores", "labels"))
    if not len(rb) or not len(gb):
        return 0, 0.0, 0.0
    box = np.abs(rb.reshape(-1, 1, 4) - gb.reshape(1, -1, 4)).max(-1)
    score = np.abs(rs[:, None] - gs[None, :])
    ok = (rl[:, None] == gl[None, :]) & (score <= score_tol) & (box <= box_tol)
    used = np.zeros(len(gb), bool)
    pairs, max_box, max_score = 0, 0.0, 0.0
    for i in np.argsort(-rs, kind="stable"):
        cand = np.flatnonzero(ok[i] & ~used)
        if not len(cand):
            continue
        j = cand[np.argmin(box[i, cand])]
        used[j] = True
        pairs += 1
        max_box, max_score = max(max_box, float(box[i, j])), max(max_score, float(score[i, j]))
    return pairs, max_box, max_score


def compare(
    model: nn.Module,
    runner: Runner,
    dataset: CocoDataset,
    spec: ViewSpec,
    box_tol: float = BOX_TOL,
    score_tol: float = SCORE_TOL,
) -> ParityReport:
    """Run the PyTorch ``model`` and an export (``runner(view, (h, w))``, e.g. an ``OnnxDetector``) on every
    view of ``dataset`` and pair their detections. A runner with a fixed ``input_size`` gets views padded to
    it; the model then sees the same padded view."""
    report = ParityReport(box_tol=box_tol, score_tol=score_tol)
    fixed = getattr(runner, "input_size", None)
    ds = ViewDataset(dataset, spec)
    for i in range(len(ds)):
        sample = ds[i]
        view = sample.image
        if fixed is not None and tuple(view.shape[-2:]) != tuple(fixed):
            view = F.pad(view, (0, fixed[1] - view.shape[-1], 0, fixed[0] - view.shape[-2]))
        ref = {k: v.numpy() for k, v in reference_detections(model, view, sample.meta.size).items()}
        got = runner(view, sample.meta.size)
        pairs, max_box, max_score = pair_detections(ref, got, box_tol, score_tol)
        n, m = len(ref["boxes"]), len(got["boxes"])
        report.images += 1
        report.detections += n
        report.same_count += int(n == m)
        if n == m == pairs:
            report.exact += 1
        else:
            report.mismatched.append(sample.image_id)
        report.max_box_diff = max(report.max_box_diff, max_box)
        report.max_score_diff = max(report.max_score_diff, max_score)
    return report
