"""One view instead of two: a store without the hflip view serves flipped samples by mirroring its maps,
with the error of that approximation measured at build time and reported when a stage starts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_VIEW
from test_trainer import write_plan

from mtpd.cache.build import build_store
from mtpd.cache.flip import mirror
from mtpd.cache.store import StoreReader
from mtpd.data import CocoDataset, ViewSpec, grid_size
from mtpd.teachers.registry import TeacherSpec
from mtpd.trainer.plan import load_plan
from mtpd.trainer.sources import StoreTargets
from mtpd.trainer.stage import run_plan
from mtpd.trainer.targets import DistillDataset, collate


@pytest.fixture(scope="module")
def orig_store(tmp_path_factory, digits, tiny_teacher_ckpt) -> str:
    out = str(tmp_path_factory.mktemp("orig") / "store")
    build_store(
        TeacherSpec("retinanet_tiny", tiny_teacher_ckpt),
        digits["train"]["ann"],
        digits["train"]["images"],
        out,
        views=ViewSpec(views=("orig",), **TINY_VIEW),
        precision="small",  # codes with side parameters and non-zero padding: the hardest to mirror
        workers=0,
        images_per_shard=4,
        progress=False,
    )
    return out


def test_flipped_samples_are_mirrored_orig_maps(digits, orig_store) -> None:
    """Through the training path (codes mirrored in the worker, decoded on the batch): the flipped sample's
    maps are the orig maps with columns reversed and box dx negated, and padding stays zero."""
    coco = CocoDataset(digits["train"]["ann"], digits["train"]["images"])
    spec = ViewSpec(views=("orig", "hflip"), **TINY_VIEW)
    ds = DistillDataset(coco, spec, [orig_store], flip=True, seed=0)
    plain = DistillDataset(coco, ViewSpec(**TINY_VIEW), [orig_store])
    metas = [f.header.outputs for f in ds.feeds]
    flipped = [i for i in range(len(ds)) if ds.view_of(i) == "hflip"]
    assert flipped
    bf = collate([ds[flipped[0]], ds[flipped[0]]], metas)
    bo = collate([plain[flipped[0]], plain[flipped[0]]], metas)
    got, orig = StoreTargets(ds.feeds)(bf)[0][0], StoreTargets(ds.feeds)(bo)[0][0]
    assert bf.teacher[0].mirrored.all() and not bo.teacher[0].mirrored.any()
    for key, g in got.items():
        h, w = grid_size(bf.metas[0].size, 2 ** int(key.split(".p")[1]))
        want = torch.flip(orig[key][:, :, :h, :w], dims=[3])
        if key.startswith("box"):
            want[:, 0::4] = -want[:, 0::4]  # dx of every anchor changes sign
        torch.testing.assert_close(g[:, :, :h, :w], want, rtol=0, atol=0, msg=key)
        assert not g[:, :, h:].any() and not g[:, :, :, w:].any()


def test_the_recorded_error_is_the_error_against_real_flipped_maps(digits, orig_store, tiny_store) -> None:
    """The builder's measure equals the error of mirrored maps against a store holding both views."""
    recorded = StoreReader(orig_store).root.attrs["flip_error"]
    both = StoreReader(tiny_store)
    coco = CocoDataset(digits["train"]["ann"], digits["train"]["images"])
    for name, meta in both.header.outputs.items():
        for lvl in meta.levels:
            sums = {"border": [0.0, 0.0], "inside": [0.0, 0.0]}
            for i in range(4):
                image_id = coco.images[i].image_id
                o = both.read(both.sample_index(image_id, "orig"), [name])[name]
                f = both.read(both.sample_index(image_id, "hflip"), [name])[name]
                j = meta.levels.index(lvl)
                ref = f[j].transpose(1, 2, 0).astype(np.float64)
                got = mirror(o[j].transpose(1, 2, 0), meta.spec).astype(np.float64)
                border = np.zeros(ref.shape[:2], bool)
                border[:, [0, -1]] = True
                for part, cells in (("border", border), ("inside", ~border)):
                    sums[part][0] += float(((got - ref)[cells] ** 2).sum())
                    sums[part][1] += float((ref[cells] ** 2).sum())
            for part, (err, tot) in sums.items():
                measured = recorded[name][f"P{lvl}"][part]
                want = (err / tot) ** 0.5 if tot > 0 else 0.0  # a level only 2 cells wide has no inside
                assert measured == pytest.approx(want, rel=0.02, abs=1e-3), (name, lvl, part)
    assert recorded["fpn"]["P3"]["inside"] > 0  # conv features are not exactly mirror-symmetric


def test_a_stage_reports_the_mirroring(tmp_path, digits, orig_store) -> None:
    stages = [
        {
            "name": "m",
            "stores": [orig_store],
            "losses": [{"name": "mse", "weight": 0.1}],
            "epochs": 1,
            "eval": False,
            "optimizer": {"type": "adamw", "lr": 0.001},
        }
    ]
    plan = load_plan(write_plan(tmp_path, digits, [], stages))
    events, lines = [], []
    run_plan(plan, [1], log=lines.append, on_event=events.append)
    (ev,) = [e for e in events if e["event"] == "mirrored"]
    assert ev["store"] == orig_store and ev["flip_error"]["fpn"]["P3"]["border"] >= 0
    assert any("has no hflip view, so flipped samples mirror its maps" in x and "fpn P3 border" in x for x in lines)
    metrics = json.loads((tmp_path / "run" / "stage_1" / "metrics.json").read_text())
    assert metrics["mirrored_flips"][orig_store] == ev["flip_error"]
    assert grid_size((64, 64), 8) == (8, 8)
