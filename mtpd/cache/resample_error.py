"""How far resampled maps are from the teacher's own on an augmented view (``mtpd.data.resample``).

A store of the plain views serves fresh augmented views by warping its feature maps; this measures that
approximation the way ``mtpd.cache.flip`` measures mirroring: on ``n_images`` images and ``draws`` views of each
drawn from the policy, the teacher runs on the augmented view itself, and the relative RMSE of the warped maps
against it is summed per output, level and kind of transform (zoomed out, about the view's size, zoomed in),
over the cells resampling serves. ``mtpd-cache resample-error`` records it in the store (``resample_error``, one
entry per policy), and every stage that resamples from that store reports it (reading it through
``mtpd.cache.resample_record``, which runs no teacher).
"""

from __future__ import annotations

import os

import torch

from mtpd.cache.read import valid_masks
from mtpd.cache.resample_record import policy_key
from mtpd.cache.schema import StoreError
from mtpd.cache.store import StoreReader, open_root
from mtpd.checkpoint import sha256_file
from mtpd.data import CocoDataset, prepare_view
from mtpd.data.augment import AugmentPolicy
from mtpd.data.resample import RESAMPLABLE, plain_views, source_view, warp
from mtpd.data.views import ViewSpec
from mtpd.teachers.base import run_teacher
from mtpd.teachers.registry import TeacherSpec

RESAMPLE_IMAGES = 8
DRAWS = 4  # views drawn per image


def transform_kind(scale: float) -> str:
    return "zoom out" if scale < 0.95 else "zoom in" if scale > 1.05 else "about 1x"


@torch.inference_mode()
def measure_resample_error(
    teacher,
    dataset: CocoDataset,
    spec: ViewSpec,
    outputs: dict,
    policy: AugmentPolicy,
    n_images: int = RESAMPLE_IMAGES,
    draws: int = DRAWS,
) -> dict:
    """{output: {"P3": {"zoom out": rel. RMSE, "about 1x": .., "zoom in": .., "all": ..}, ...}} of feature maps
    warped from the plain view (``spec``: the store's) against the teacher run on each augmented view, over the
    first ``n_images`` readable images; ``outputs``: the header's ``StoredOutput``s (features are measured)."""
    names = [n for n, o in outputs.items() if o.spec.kind in RESAMPLABLE]
    plain = plain_views(spec)
    aug_spec = ViewSpec(short=spec.short, long=spec.long, views=("aug",), pad=spec.pad, mean=spec.mean,
                        std=spec.std, augment=policy.to_dict())  # fmt: skip
    sums: dict[tuple[str, int, str], list[float]] = {}
    for i, img in dataset.readable_images(n_images):
        for d in range(draws):
            draw = policy.draw([policy.seed, i, d])
            x, meta = prepare_view(img, aug_spec, "aug", aug=draw)
            x0, m0 = prepare_view(img, plain, source_view(meta))
            live = run_teacher(teacher, x[None], names, [meta.size])
            stored = run_teacher(teacher, x0[None], names, [m0.size])
            levels = sorted({lvl for n in names for lvl in outputs[n].levels})
            masks = valid_masks(meta.padded, [meta.size], levels)
            keys = [f"{n}.p{lvl}" for n in names for lvl in outputs[n].levels]
            warped, served = warp({k: stored[k].float() for k in keys}, [meta], [m0], masks)
            for key in keys:
                name, lvl = key.rsplit(".p", 1)
                m = served[int(lvl)].bool().expand_as(warped[key])
                ref = live[key].float()[:, :, : m.shape[-2], : m.shape[-1]]
                for part in (transform_kind(draw.scale), "all"):
                    acc = sums.setdefault((name, int(lvl), part), [0.0, 0.0])
                    acc[0] += float(((warped[key] - ref)[m] ** 2).sum())
                    acc[1] += float((ref[m] ** 2).sum())
    out: dict = {}
    order = ("zoom out", "about 1x", "zoom in", "all")
    for (name, lvl, part), (err, ref) in sorted(sums.items(), key=lambda kv: (*kv[0][:2], order.index(kv[0][2]))):
        out.setdefault(name, {}).setdefault(f"P{lvl}", {})[part] = (err / ref) ** 0.5 if ref > 0 else 0.0
    return out


def record_resample_error(
    store: str,
    ann: str,
    images: str,
    policy: AugmentPolicy,
    weights: str | None = None,
    n_images: int = RESAMPLE_IMAGES,
    draws: int = DRAWS,
) -> dict:
    """Measure the resampling error of ``store``'s teacher (rebuilt from its header; ``weights`` when its file
    moved, checked against the recorded digest) under ``policy`` on the store's own images, and record it in the
    store's ``resample_error`` attribute under the policy's key. Returns the measurement."""
    reader = StoreReader(store)
    h = reader.header
    dataset = CocoDataset(ann, images)
    if h.manifest_sha256 != dataset.manifest_hash():
        raise StoreError(f"{store} was built on {h.ann_file} ({h.num_images} images), not {ann}; pass the store's data")
    path = weights or h.teacher.get("weights", "none")
    want = h.teacher.get("weights_sha256")
    if path not in ("none", "default"):
        if not os.path.isfile(path):
            raise StoreError(f"{store}: its teacher's weights {path} are not there; pass --weights with that file")
        if want and sha256_file(path) != want:
            raise StoreError(f"{path} is not the weights {store} was built with (sha256 {want[:12]}...); pass those")
    teacher = TeacherSpec(h.teacher["name"], path, h.dataset.get("num_classes")).build()
    spec = ViewSpec.from_dict(h.views)
    err = measure_resample_error(teacher, dataset, spec, h.outputs, policy, n_images, draws)
    root = open_root(store, "r+", reader.storage_options)
    entries = dict(root.attrs.get("resample_error", {}))
    entries[policy_key(policy)] = {"images": n_images, "draws": draws, "error": err}
    root.attrs["resample_error"] = entries
    return err
