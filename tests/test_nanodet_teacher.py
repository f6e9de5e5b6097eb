"""The shipped NanoDet-g (a real COCO detector, converted from TensorFlow.js by tools/convert_nanodet.py) as an
ONNX teacher: through ``--teacher onnx:mapping.yaml`` its neck, class and box maps equal TensorFlow's own run of
the TF.js graph (recorded at conversion), on real photos; it finds what the photos show; a store builds from it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("skimage")

from mtpd.cache import open_store  # noqa: E402
from mtpd.cache.build import build_store  # noqa: E402
from mtpd.checkpoint import sha256_file  # noqa: E402
from mtpd.data import ViewSpec  # noqa: E402
from mtpd.demo.steps import shipped_teachers  # noqa: E402
from mtpd.teachers.registry import TeacherSpec, build_teacher  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FOLDER = shipped_teachers() / "nanodet_g"
MAPPING = FOLDER / "mapping.yaml"


def _tool():
    spec = importlib.util.spec_from_file_location("convert_nanodet", ROOT / "tools" / "convert_nanodet.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # the tool imports TensorFlow only inside its functions
    return mod


@pytest.fixture(scope="module")
def teacher():
    return build_teacher(f"onnx:{MAPPING}")


def _view_space(teacher, graph_input: np.ndarray) -> torch.Tensor:
    """The view (ImageNet-normalised RGB) that the teacher's input conversion turns into ``graph_input``."""
    c = teacher.conversion
    out = (torch.from_numpy(graph_input) - c.shift) / c.scale
    x = torch.empty_like(out)
    x[:, c.perm] = out
    return x


def test_the_shipped_files_are_the_ones_converted() -> None:
    prov = json.loads((FOLDER / "provenance.json").read_text())
    for name, digest in prov["outputs"].items():
        assert sha256_file(FOLDER / name) == digest, name
    assert prov["worst"] < 1e-4  # ONNX Runtime vs TensorFlow at conversion, every tensor of three photos


def test_outputs_equal_tensorflows_run_of_the_tfjs_graph(teacher) -> None:
    tool, ref = _tool(), np.load(FOLDER / "reference.npz")
    for photo in tool.PHOTOS:
        x = _view_space(teacher, tool.photo_input(photo))
        out = teacher(x, ["fpn", "cls", "box"])
        for k, (name, lvl) in enumerate(tool.TENSORS):
            got = out[f"{name}.p{lvl}"].numpy()
            want = ref[f"{photo}/{name}.p{lvl}"]
            assert got.shape[-2:] == (416 // 2**lvl, 416 // 2**lvl)
            vals = got.reshape(-1)[tool.sample_positions(got.shape, k)]
            # fp16 rounding of the largest value: the conversion's own error is ~1e-6 of it
            np.testing.assert_allclose(vals, want, rtol=0, atol=1e-3 * float(np.abs(want).max()))


def test_it_finds_the_person_and_the_cup(teacher) -> None:
    """A real COCO detector: the photo's object is its most confident class (COCO ids: person 0, cup 41). (The
    cat of ``chelsea``, stretched to 416 x 416, it ranks below person and dog: a small model.)"""
    tool = _tool()
    for photo, cls in (("astronaut", 0), ("coffee", 41)):
        out = teacher(_view_space(teacher, tool.photo_input(photo)), ["cls"])
        best = torch.stack([out[f"cls.p{lvl}"][0].flatten(1).amax(1) for lvl in (3, 4, 5)]).amax(0)  # per class
        assert int(best.argmax()) == cls, (photo, best.topk(3))
        assert torch.sigmoid(best[cls]) > 0.3


def test_a_store_builds_from_it(tmp_path, teacher) -> None:
    """Two real photos at 416 px through the builder (one process): every output stored, the graph's sha256 in the
    store's identity, and, the store holding the original view only, the error of mirroring it measured for
    every output (the box bins by their l/r swap)."""
    from bench.common import photo_images

    data = photo_images(tmp_path / "photos", 2)  # astronaut, chelsea: real photos at their own sizes
    out = tmp_path / "store"
    build_store(
        TeacherSpec(f"onnx:{MAPPING}"), data["ann"], data["images"], str(out), views=ViewSpec(short=416, long=416),
        outputs=["fpn", "cls", "box"], workers=0, progress=False, images_per_shard=2,
    )  # fmt: skip
    s = open_store(out)
    assert s.num_samples == 2  # 2 photos x the 'orig' view
    flip = s.root.attrs["flip_error"]
    assert set(flip) == {"fpn", "cls", "box"}
    assert all(0 < v["inside"] < 1 for out in flip.values() for v in out.values()), flip
    assert s.header.teacher["weights_sha256"] == sha256_file(FOLDER / "nanodet_g.onnx")
    maps = s.read(0)
    assert [m.shape[0] for m in maps["fpn"]] == [128] * 3 and maps["cls"][0].shape[0] == 80
