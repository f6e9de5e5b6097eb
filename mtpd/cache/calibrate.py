"""Per-store state of encodings (a PCA basis per level), fitted before any shard is written.

The builder's driver runs the teacher (on the CPU: a rebuild on the same machine and thread count
computes the same numbers; elsewhere float sums may differ in their last bits, and so may the basis,
which is why it is stored rather than refitted) over
the original view of ``CALIBRATION_IMAGES`` images spread evenly over the dataset, keeps at most
``MAX_ROWS`` cells per level (every k-th, deterministically) and hands them to each encoding's
``fit``. The result goes into the store (``calib/``) before its attributes, so a store that has
attributes always has its state.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from mtpd.cache.flip import measure_flip_error
from mtpd.cache.rows import flatten
from mtpd.cache.schema import StoreError, StoreHeader
from mtpd.data import CocoDataset, DatasetError, grid_size, prepare_view
from mtpd.data.views import ViewSpec
from mtpd.teachers.base import run_teacher

CALIBRATION_IMAGES = 8
MAX_ROWS = 32768  # cells per level handed to ``fit``


def calibrate_store(teacher, dataset: CocoDataset, header: StoreHeader, flip_images: int) -> tuple[dict, dict]:
    """What a new store needs from its teacher before any shard: (encoding state for ``create_store``, root
    attributes: the calibration summary and, for a store without 'hflip', the mirroring error
    (``mtpd.cache.flip``)). ``teacher`` (a TeacherSpec) is built on the CPU, and only when needed."""
    fit = any(o.encoding.needs_fit for o in header.outputs.values())
    # an augmented store's views carry their own flips: a student never mirrors them
    augmented = bool(header.views.get("augment"))
    flip = teacher is not None and flip_images > 0 and "hflip" not in header.views["views"] and not augmented
    model = dataclasses.replace(teacher, device="cpu").build() if teacher is not None and (fit or flip) else None
    state, summary = fit_encodings(model, dataset, header)
    attrs: dict = {"calibration": summary} if summary else {}
    if flip:
        attrs["flip_error"] = measure_flip_error(
            model, dataset, ViewSpec.from_dict(header.views), header.outputs, flip_images
        )
    return state, attrs


def calibration_images(n_images: int, wanted: int = CALIBRATION_IMAGES) -> list[int]:
    """Image indices spread evenly over the dataset, first and last included (all when fewer)."""
    if n_images <= wanted:
        return list(range(n_images))
    return sorted({int(round(x)) for x in np.linspace(0, n_images - 1, wanted)})


@torch.inference_mode()
def fit_encodings(
    teacher, dataset: CocoDataset, header: StoreHeader, n_images: int = CALIBRATION_IMAGES
) -> tuple[dict[str, dict[str, np.ndarray]], dict]:
    """(output -> state arrays for ``create_store``, a summary for the store's ``calibration`` attribute).
    Unreadable images are passed over (the build reports or skips them itself)."""
    names = [n for n, o in header.outputs.items() if o.encoding.needs_fit]
    if not names:
        return {}, {}
    if teacher is None:
        raise StoreError(
            f"precision {header.precision!r} fits its encodings on the teacher's outputs: pass the teacher"
        )
    spec = ViewSpec.from_dict(header.views)
    rows: dict[str, list[list[torch.Tensor]]] = {n: [[] for _ in header.outputs[n].levels] for n in names}
    used = []
    for i in calibration_images(len(dataset), n_images):
        try:
            img = dataset.load_image(i)
        except DatasetError:
            continue
        used.append(dataset.images[i].file_name)
        x, meta = prepare_view(img, spec, "orig")
        res = run_teacher(teacher, x[None], names, [meta.size])
        for n in names:
            levels = header.outputs[n].levels
            grid = np.array([grid_size(meta.size, 2**lvl) for lvl in levels])
            for j, r in enumerate(flatten([res[f"{n}.p{lvl}"][0] for lvl in levels], grid)):
                rows[n][j].append(r.float().cpu())
    if not used:
        raise DatasetError(f"{dataset.image_dir}: no readable image to calibrate the store's encodings on")
    state, summary = {}, {"images": used, "kept": {}}
    for n in names:
        per_level = [_thin(torch.cat(parts)) for parts in rows[n]]
        enc = header.outputs[n].encoding
        state[n] = enc.fit(per_level)
        fitted = enc.with_state(state[n])
        summary["kept"][n] = {
            f"P{lvl}": _kept(fitted, x, j) for j, (lvl, x) in enumerate(zip(header.outputs[n].levels, per_level))
        }
    return state, summary


def _thin(x: torch.Tensor) -> torch.Tensor:
    step = max(1, -(-x.shape[0] // MAX_ROWS))
    return x[::step]


def _kept(enc, x: torch.Tensor, level: int) -> float:
    """Fraction of the calibration cells' variance the fitted projection keeps."""
    if not hasattr(enc, "project"):
        return 1.0
    xc = x - x.mean(dim=0)
    total = float((xc.double() ** 2).sum())
    return float((enc.project(x, level).double() ** 2).sum()) / total if total > 0 else 1.0
