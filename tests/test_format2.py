"""Store format 2: per-store state fitted before any shard, identical rebuilds, format-1 stores still read,
decoding on the training device equal to decoding on the CPU, and sizes per output in `info`."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import TINY_VIEW, tiny_build

from mtpd.cache.inspect import store_info
from mtpd.cache.store import open_root, open_store
from mtpd.data import CocoDataset, ViewSpec
from mtpd.trainer.sources import StoreTargets
from mtpd.trainer.targets import DistillDataset, make_loader

# Format 1 named encodings by strings and stored no side arrays; the fp16 codes' layout is the same.
V1_NAMES = {"fp16": "fp16", "fp16(keepbits=5)": "fp16-bitround5", "logprob-u8": "logprob-uint8"}


def _files(store) -> dict[str, bytes]:
    return {
        str(p.relative_to(store)): p.read_bytes()
        for p in sorted(store.rglob("*"))
        if p.is_file() and "zarr.json" not in p.name and p.suffix != ".lock"
    }


needs_faiss = pytest.mark.skipif(importlib.util.find_spec("faiss") is None, reason="pq fits codebooks with faiss")


@pytest.fixture(scope="module")
def tiny_stores(tmp_path_factory, digits) -> dict[str, str]:
    root = tmp_path_factory.mktemp("format2")
    out = {}
    for key, precision in (("compact", "compact"), ("tiny", "tiny"), ("pq", PQ), ("micro", "micro")):
        if key in ("pq", "micro") and importlib.util.find_spec("faiss") is None:
            continue
        out[key] = str(root / key)
        tiny_build(digits, out[key], precision=precision, outputs=["fpn", "cls", "box"])
    return out


# Codes whose padding does not decode to zero (codewords) and whose class scores are sparse per anchor
PQ = "small+features=pq:bits=2+logits=topk:k=2,groups=anchors"


def test_pca_basis_and_stored_bytes_identical_on_rebuild(tmp_path, digits, tiny_stores):
    again = tmp_path / "again"
    tiny_build(digits, again, precision="tiny", outputs=["fpn", "cls", "box"])
    first, second = _files(open_store(tiny_stores["tiny"]).root.store.root), _files(again)
    assert "calib/fpn/basis/c/0/0/0" in first  # the basis is in the store, written before any shard
    assert first.keys() == second.keys()
    for key in first:
        assert first[key] == second[key], key
    attrs = json.loads((again / "zarr.json").read_text())["attributes"]
    kept = attrs["calibration"]["kept"]["fpn"]
    assert set(kept) == {"P3", "P4", "P5"} and all(0 < v <= 1 for v in kept.values())


def _as_format1(src: str, dst) -> str:
    """A format-1 store: the same arrays, attributes as format 1 wrote them."""
    shutil.copytree(src, dst)
    root = open_root(str(dst), "r+")
    attrs = dict(root.attrs)
    attrs["mtpd_format"] = 1
    for o in attrs["outputs"].values():
        enc = o.pop("encoding")
        name = enc["kind"] + (f"(keepbits={enc['keepbits']})" if "keepbits" in enc else "")
        o["encoding"] = V1_NAMES[name]
        o["keepbits"] = enc.get("keepbits")
        o.pop("code_channels")
    root.attrs.put(attrs)
    return str(dst)


def test_format1_store_is_still_read(tmp_path, digits, tiny_stores):
    v1 = open_store(_as_format1(tiny_stores["compact"], tmp_path / "v1"))
    v2 = open_store(tiny_stores["compact"])
    assert v1.header.format_version == 1 and v2.header.format_version == 2
    for i in (0, 7, v1.num_samples - 1):
        for name, maps in v2.read(i).items():
            for a, b in zip(maps, v1.read(i)[name]):
                np.testing.assert_array_equal(a, b)
    coco = CocoDataset(digits["train"]["ann"], digits["train"]["images"])
    ds = DistillDataset(coco, ViewSpec(views=("orig", "hflip"), **TINY_VIEW), [v1.location], flip=True)
    batch = next(iter(make_loader(ds, 4, shuffle=False, workers=0, seed=0)))
    maps = StoreTargets(ds.feeds)(batch)[0][0]
    assert set(maps) == {f"{n}.p{lvl}" for n in ("fpn", "cls", "box") for lvl in (3, 4, 5)}


def _batch_and_reader(digits, store: str):
    coco = CocoDataset(digits["train"]["ann"], digits["train"]["images"])
    ds = DistillDataset(coco, ViewSpec(views=("orig", "hflip"), **TINY_VIEW), [store])
    return next(iter(make_loader(ds, 3, shuffle=False, workers=1, seed=0))), ds


@pytest.mark.parametrize(
    "precision", ["compact", "tiny", pytest.param("pq", marks=needs_faiss), pytest.param("micro", marks=needs_faiss)]
)
def test_batch_decode_equals_per_sample_cpu_decode(digits, tiny_stores, precision):
    """Workers hand over codes (here from a real worker process); the training process decodes the padded
    batch. Each sample's valid cells equal ``open_store(...).read`` (the CPU decode), padding is zero."""
    batch, ds = _batch_and_reader(digits, tiny_stores[precision])
    assert batch.teacher[0].codes["fpn.p3"].dtype in (torch.float16, torch.uint8)  # codes, not float32
    maps = StoreTargets(ds.feeds)(batch)[0][0]
    store = open_store(tiny_stores[precision])
    for b, image_id in enumerate(batch.image_ids):
        ref = store.read(store.sample_index(image_id, "orig"))
        for key, t in maps.items():
            name, lvl = key.split(".p")
            m = ref[name][store.header.outputs[name].levels.index(int(lvl))]
            h, w = m.shape[1:]
            np.testing.assert_allclose(t[b, :, :h, :w].numpy(), m, rtol=1e-6, atol=1e-6, err_msg=key)
            assert not t[b, :, h:].any() and not t[b, :, :, w:].any()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to compare GPU decoding with CPU")
@pytest.mark.parametrize(
    "precision", ["tiny", pytest.param("pq", marks=needs_faiss), pytest.param("micro", marks=needs_faiss)]
)
def test_decode_on_gpu_equals_cpu(digits, tiny_stores, precision):
    batch, ds = _batch_and_reader(digits, tiny_stores[precision])
    cpu = StoreTargets(ds.feeds)(batch)[0][0]
    gpu = StoreTargets(ds.feeds)(batch.to("cuda"))[0][0]
    for key, t in cpu.items():
        torch.testing.assert_close(gpu[key].cpu(), t, rtol=1e-5, atol=1e-5, msg=key)


def test_info_reports_bytes_per_output(tiny_stores):
    info = store_info(tiny_stores["tiny"])
    fpn = info["outputs"]["fpn"]
    assert fpn["encoding"] == "pca(rank=32,bits=4)" and "L2" in fpn["bound"]
    for o in info["outputs"].values():
        assert o["stored_bytes"] > 0 and o["raw_fp32_bytes"] > o["stored_bytes"]
        assert o["fraction_of_fp32"] == pytest.approx(o["stored_bytes"] / o["raw_fp32_bytes"])
    assert info["output_bytes"] == sum(o["stored_bytes"] for o in info["outputs"].values())


def test_damaged_calibration_is_named(tmp_path, tiny_stores):
    """A flipped bit in a PCA basis would change every decoded value: its crc32c catches it on open."""
    from mtpd.cache.schema import StoreError

    copy = tmp_path / "tiny"
    shutil.copytree(tiny_stores["tiny"], copy)
    chunk = copy / "calib/fpn/basis/c/0/0/0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"calibration of output fpn .*damaged.*rebuild"):
        open_store(copy)


def test_teacher_distance_reads_decoded_targets(digits, tiny_stores):
    """`mtpd-plan order` compares a student with decoded teacher maps, not with stored codes: a student equal
    to the teacher is near distance 0 even from a `tiny` store (PCA coefficients as 4-bit codes)."""
    from mtpd.teachers.registry import TeacherSpec
    from mtpd.trainer.teacher_order import measure

    student = TeacherSpec("retinanet_tiny", "none", 10).build().model  # the stores' own seeded teacher
    coco = CocoDataset(digits["train"]["ann"], digits["train"]["images"])
    (near,) = measure(student, [tiny_stores["tiny"]], coco, n_images=8)
    assert near.distance < 0.1, near
