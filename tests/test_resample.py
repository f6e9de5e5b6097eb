"""Resampling: plain views' feature maps warped onto fresh augmented views. The identity returns the stored maps,
a warp and its inverse return them within interpolation error where both are defined, a field linear in image
coordinates lands exactly where the view's pixels came from, and a student trains on resampled targets from a
flip-only store (refused for outputs tied to anchors)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_augment import aug_stage, with_augment

from mtpd.cache.read import valid_masks
from mtpd.data import ViewSpec
from mtpd.data.augment import Aug
from mtpd.data.resample import source_meta, warp
from mtpd.data.views import aug_meta, boxes_from_view, view_meta
from mtpd.trainer.plan import PlanError, load_plan
from mtpd.trainer.stage import Stage, run_plan

SPEC = ViewSpec(short=96, long=128)
ORIG = (150, 210)  # (h, w) of the source image: its view is 91 x 128, padded to 96 x 128
LEVELS = (3, 4)


def maps_on(meta, field, channels: int = 2) -> tuple[dict[str, torch.Tensor], dict[int, torch.Tensor]]:
    """``field(y, x)`` (image pixels -> value) sampled at the cell centres of ``meta``'s levels, zero on padding,
    and the view's valid-cell masks."""
    masks = valid_masks(meta.padded, [meta.size], list(LEVELS))
    maps = {}
    for lvl in LEVELS:
        s = 2**lvl
        h, w = masks[lvl].shape[-2:]
        ys, xs = np.meshgrid((np.arange(h) + 0.5) * s, (np.arange(w) + 0.5) * s, indexing="ij")
        pts = np.stack([xs.ravel(), ys.ravel(), xs.ravel(), ys.ravel()], 1)
        img = boxes_from_view(pts, meta)  # each cell centre in image pixels
        vals = np.stack([field(img[:, 1], img[:, 0]) * (c + 1) for c in range(channels)]).reshape(channels, h, w)
        maps[f"fpn.p{lvl}"] = torch.from_numpy(vals).float()[None] * masks[lvl]
    return maps, masks


def linear(y, x):
    return 0.02 * x - 0.03 * y + 1.0


def smooth(y, x):
    return np.sin(x / 80.0) + np.cos(y / 60.0) + 0.3  # several P4 cells per radian: bilinear error stays small


def plain(flip: bool = False):
    return view_meta(SPEC, ORIG, "hflip" if flip else "orig")


@pytest.mark.parametrize("flip", [False, True])
def test_the_identity_returns_the_stored_maps(flip) -> None:
    meta = aug_meta(SPEC, ORIG, Aug(1.0, 0.3, 0.7, flip), "aug")
    src = source_meta(SPEC, meta)
    assert src.view == ("hflip" if flip else "orig") and meta.size == src.size
    stored, masks = maps_on(src, smooth)
    out, out_masks = warp(stored, [meta], [src], masks)
    for key, t in stored.items():
        torch.testing.assert_close(out[key], t, atol=1e-5, rtol=0)
    for lvl in LEVELS:
        assert torch.equal(out_masks[lvl], masks[lvl])


@pytest.mark.parametrize("aug", [Aug(1.3, 0.4, 0.6, False), Aug(1.6, 0.9, 0.1, True), Aug(0.7, 0.0, 0.0, True)])
def test_a_field_linear_in_the_image_lands_where_the_views_pixels_came_from(aug) -> None:
    """Bilinear interpolation reproduces a linear field exactly: every served cell of the augmented view holds
    the field at the image point its centre shows, and cells whose source lies outside the stored view are out."""
    meta = aug_meta(SPEC, ORIG, aug, "aug")
    src = source_meta(SPEC, meta)
    stored, _ = maps_on(src, linear)
    want, masks = maps_on(meta, linear)
    out, out_masks = warp(stored, [meta], [src], masks)
    for lvl in LEVELS:
        m = out_masks[lvl].bool()
        assert m.sum() > 0.5 * masks[lvl].sum()  # most of the view is served
        key = f"fpn.p{lvl}"
        torch.testing.assert_close(
            out[key][m.expand_as(out[key])], want[key][m.expand_as(want[key])], atol=1e-4, rtol=0
        )
        assert not out[key][~m.expand_as(out[key])].any()  # left out of every loss: zero and masked
    if aug.scale < 1:  # a smaller view shows all of the image: every valid cell away from the edge is served
        assert out_masks[3][0, 0, 1:-1, 1:-1][masks[3][0, 0, 1:-1, 1:-1] > 0].all()


@pytest.mark.parametrize("aug", [Aug(1.25, 0.5, 0.5, False), Aug(0.8, 0.0, 0.0, True)])
def test_a_warp_and_its_inverse_return_the_maps_within_interpolation_error(aug) -> None:
    meta = aug_meta(SPEC, ORIG, aug, "aug")
    src = source_meta(SPEC, meta)
    stored, src_masks = maps_on(src, smooth)
    _, aug_masks = maps_on(meta, smooth)
    there, there_masks = warp(stored, [meta], [src], aug_masks)
    back, back_masks = warp(there, [src], [meta], src_masks)
    # where both are defined: the way back reads only cells the way there served
    served = {f"fpn.p{lvl}": there_masks[lvl] for lvl in LEVELS}
    ok, _ = warp(served, [src], [meta], src_masks)
    for lvl in LEVELS:
        key = f"fpn.p{lvl}"
        both = (back_masks[lvl] > 0) & (ok[key] > 1 - 1e-6)
        assert both.sum() >= 0.25 * src_masks[lvl].sum()
        sel = both.expand_as(stored[key])
        err = (back[key][sel] - stored[key][sel]).norm() / stored[key][sel].norm()
        assert err < 0.05, (lvl, float(err))


def resample(**extra) -> dict:
    return {"scale": [0.7, 1.4], "bank": 0, "resample": True, **extra}


def test_a_student_trains_on_fresh_views_resampled_from_a_flip_only_store(tmp_path, digits, tiny_store) -> None:
    mgd = [{"name": "mgd", "weight": 2.0e-4}]
    plan = load_plan(with_augment(tmp_path, digits, [aug_stage([tiny_store], losses=mgd, eval=True)], resample()))
    stage = Stage(plan, 1, log=None)
    engine, _, _ = stage.build()
    ds = engine.loader.dataset
    sample = ds[0]
    assert sample.meta.view == "aug" and sample.source.view == ("hflip" if sample.meta.flip else "orig")
    batch = next(iter(engine.loader))
    maps, masks = engine.targets(batch)
    assert batch.sources is not None and set(maps[0]) == {f"fpn.p{lvl}" for lvl in (3, 4, 5)}
    for lvl, m in masks.items():
        assert m.shape == batch.masks[lvl].shape and (m <= batch.masks[lvl]).all()
    assert any((m < batch.masks[lvl]).any() for lvl, m in masks.items())  # zoomed-in views lose border cells
    res = run_plan(plan, [1], log=None)
    assert "AP" in res[0].metrics
    # class logits and box deltas are tied to anchors: a loss reading them is refused before anything trains
    (tmp_path / "kd").mkdir()
    kd = load_plan(with_augment(tmp_path / "kd", digits, [aug_stage([tiny_store])], resample()))
    with pytest.raises(PlanError, match=r"reads 'cls' \(logits\), which data.augment.resample cannot serve"):
        run_plan(kd, [1], log=None)
    with pytest.raises(PlanError, match=r"resample serves fresh views \(bank: 0\)"):
        load_plan(with_augment(tmp_path / "kd", digits, [aug_stage([tiny_store])], resample(bank=2)))


def test_the_resampling_error_is_measured_recorded_and_reported(tmp_path, digits, tiny_store, capsys) -> None:
    import shutil

    from mtpd.cache.store import StoreReader
    from mtpd.cli.cache import main

    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)  # the session's store stays as built
    data = ["--ann", digits["train"]["ann"], "--images", digits["train"]["images"]]
    args = ["resample-error", str(store), *data, "--augment", "scale=0.7:1.4", "--n-images", "2", "--draws", "3"]
    assert main(args) == 0
    assert "recorded in the store: fpn P3" in capsys.readouterr().out
    entry = next(iter(StoreReader(str(store)).root.attrs["resample_error"].values()))
    err = entry["error"]
    assert set(err) == {"fpn"} and set(err["fpn"]) == {"P3", "P4", "P5"}  # features only: logits, deltas not served
    assert all(0.0 < e["all"] < 2.0 for e in err["fpn"].values())
    # a stage resampling from the store reports it
    (tmp_path / "plan").mkdir()
    mgd = [{"name": "mgd", "weight": 2.0e-4}]
    plan = load_plan(with_augment(tmp_path / "plan", digits, [aug_stage([str(store)], losses=mgd)], resample()))
    events: list[dict] = []
    lines: list[str] = []
    Stage(plan, 1, log=lines.append, on_event=events.append).build()
    (ev,) = [e for e in events if e["event"] == "resampled"]
    assert ev["resample_error"] == err and any("relative RMSE against the teacher" in ln for ln in lines)
    # another policy's geometry was not measured: the stage says how to measure it
    (tmp_path / "other").mkdir()
    other = load_plan(with_augment(tmp_path / "other", digits, [aug_stage([str(store)], losses=mgd)],
                                   resample(scale=[0.5, 2.0])))  # fmt: skip
    lines.clear()
    Stage(other, 1, log=lines.append).build()
    assert any("not measured: `mtpd-cache resample-error" in ln for ln in lines)
    assert (
        main(["resample-error", str(store), *data, "--augment", "scale=0.7:1.4", "--weights", str(store / "zarr.json")])
        == 2
    )
    assert "is not the weights" in capsys.readouterr().err
