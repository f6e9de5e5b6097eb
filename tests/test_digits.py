"""The digits benchmark set: valid COCO, deterministic, boxes around real ink, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mtpd.cli.data import main
from mtpd.data.coco import CocoDataset
from mtpd.data.digits import INK_THRESHOLD, make_digits, render_glyph, source_indices

SIZE = 64
TRAIN, VAL = 6, 3


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return make_digits(tmp_path_factory.mktemp("digits"), TRAIN, VAL, size=SIZE, seed=0)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _coco(ann: str) -> dict:
    return json.loads(Path(ann).read_text())


def test_result_describes_what_was_written(digits: dict) -> None:
    root = Path(digits["root"])
    for split, count in (("train", TRAIN), ("val", VAL)):
        r = digits[split]
        assert Path(r["ann"]) == root / "annotations" / f"instances_{split}.json"
        assert Path(r["images"]) == root / "images" / split
        assert r["num_images"] == count
        assert r["num_boxes"] == len(_coco(r["ann"])["annotations"]) >= count


def test_loads_with_pycocotools(digits: dict) -> None:
    from pycocotools.coco import COCO

    for split, count in (("train", TRAIN), ("val", VAL)):
        coco = COCO(digits[split]["ann"])
        assert sorted(coco.getCatIds()) == list(range(1, 11))
        assert [c["name"] for c in coco.loadCats(list(range(1, 11)))] == [str(d) for d in range(10)]
        assert len(coco.getImgIds()) == count
        assert all(len(coco.getAnnIds(imgIds=[i])) >= 1 for i in coco.getImgIds())
        info = coco.dataset["info"]
        assert info["generator"] == "mtpd.data.digits.make_digits"
        assert (info["seed"], info["size"], info["split"]) == (0, SIZE, split)


def test_loads_with_coco_dataset(digits: dict) -> None:
    for split, count in (("train", TRAIN), ("val", VAL)):
        ds = CocoDataset(digits[split]["ann"], digits[split]["images"])
        assert len(ds) == count and ds.num_classes == 10
        assert ds.class_names == [str(d) for d in range(10)]
        for i in range(len(ds)):
            assert ds.load_image(i).shape == (SIZE, SIZE, 3)  # checks the file against the JSON's size
            ann = ds.annotations(i)
            assert len(ann.boxes) >= 1
            assert ((ann.labels >= 0) & (ann.labels < 10)).all()


def test_images_and_boxes_are_valid(digits: dict) -> None:
    for split in ("train", "val"):
        data = _coco(digits[split]["ann"])
        image_dir = Path(digits[split]["images"])
        assert [im["file_name"] for im in data["images"]] == [f"{i:06d}.png" for i in range(len(data["images"]))]
        for im in data["images"]:
            with Image.open(image_dir / im["file_name"]) as pil:
                assert pil.mode == "RGB" and pil.size == (SIZE, SIZE) == (im["width"], im["height"])
        assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])
        for a in data["annotations"]:
            x, y, w, h = a["bbox"]
            assert all(isinstance(v, float) for v in a["bbox"])
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= SIZE and y + h <= SIZE
            assert a["area"] == pytest.approx(w * h) and a["iscrowd"] == 0
            assert 1 <= a["category_id"] <= 10


def test_boxes_contain_ink(digits: dict) -> None:
    """Each box holds pixels far from its local background (ink is >= 90 luma from the page).

    The local background is the median grey of a ring just outside the box
    (other digits' boxes excluded); clutter is faint and noise is a few levels,
    so a box around nothing would have almost no pixels 40 levels off it.
    """
    for split in ("train", "val"):
        data = _coco(digits[split]["ann"])
        for im in data["images"]:
            grey = np.asarray(
                Image.open(Path(digits[split]["images"]) / im["file_name"]).convert("L"), dtype=np.float32
            )
            anns = [a for a in data["annotations"] if a["image_id"] == im["id"]]
            in_any_box = np.zeros_like(grey, dtype=bool)
            for a in anns:
                x, y, w, h = (int(v) for v in a["bbox"])
                in_any_box[y : y + h, x : x + w] = True
            for a in anns:
                x, y, w, h = (int(v) for v in a["bbox"])
                ring = np.zeros_like(in_any_box)
                ring[max(0, y - 3) : y + h + 3, max(0, x - 3) : x + w + 3] = True
                ring &= ~in_any_box
                background = np.median(grey[ring]) if ring.sum() >= 8 else np.median(grey[~in_any_box])
                inked = np.abs(grey[y : y + h, x : x + w] - background) > 40
                assert inked.mean() > 0.15, f"{split} image {im['id']} box {a['bbox']}: only {inked.mean():.0%} ink"


def test_glyph_box_is_tight_around_ink() -> None:
    from mtpd.data.digits import _load_source

    bitmaps, _ = _load_source()
    rng = np.random.default_rng(0)
    for k in range(20):
        glyph = render_glyph(bitmaps[k], float(rng.uniform(8, 40)), rng)
        assert glyph is not None
        ys, xs = np.nonzero(glyph.alpha >= INK_THRESHOLD)
        assert glyph.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_train_and_val_use_disjoint_digits() -> None:
    train, val = set(source_indices("train").tolist()), set(source_indices("val").tolist())
    assert not train & val
    assert train | val == set(range(1797))


def test_same_seed_same_bytes_other_seed_other_images(digits: dict, tmp_path: Path) -> None:
    first = _files(Path(digits["root"]))
    again = make_digits(tmp_path / "again", TRAIN, VAL, size=SIZE, seed=0)
    assert _files(Path(again["root"])) == first
    other = _files(Path(make_digits(tmp_path / "other", TRAIN, VAL, size=SIZE, seed=1)["root"]))
    pngs = [name for name in first if name.endswith(".png")]
    assert all(other[name] != first[name] for name in pngs)


def test_val_does_not_depend_on_train_count(digits: dict, tmp_path: Path) -> None:
    smaller = make_digits(tmp_path / "d", 2, VAL, size=SIZE, seed=0)
    assert _files(Path(smaller["val"]["images"])) == _files(Path(digits["val"]["images"]))
    assert Path(smaller["val"]["ann"]).read_bytes() == Path(digits["val"]["ann"]).read_bytes()


def test_rerun_with_fewer_images_removes_stale_files(tmp_path: Path) -> None:
    make_digits(tmp_path, 4, 1, size=32)
    make_digits(tmp_path, 2, 1, size=32)
    assert sorted(p.name for p in (tmp_path / "images" / "train").iterdir()) == ["000000.png", "000001.png"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"size": 16}, "size"), ({"train": -1}, ">= 0"), ({"val": -3}, ">= 0"), ({"seed": -1}, "seed")],
)
def test_bad_arguments_raise(tmp_path: Path, kwargs: dict, match: str) -> None:
    args = {"train": 1, "val": 1, "size": 32, "seed": 0} | kwargs
    with pytest.raises(ValueError, match=match):
        make_digits(tmp_path, **args)
    assert not (tmp_path / "annotations").exists()  # nothing written before the arguments are checked


def test_cli_writes_the_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    rc = main(["digits", "--out", str(out), "--train", "3", "--val", "2", "--size", "48", "--seed", "5", "--quiet"])
    assert rc == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "5 images" in last and str(out) in last and "boxes" in last
    assert len(_coco(str(out / "annotations" / "instances_val.json"))["images"]) == 2
    assert len(list((out / "images" / "train").glob("*.png"))) == 3


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["digits"],
        ["digits", "--out", "X", "--size", "10"],
        ["digits", "--out", "X", "--train", "-1"],
        ["digits", "--out", "X", "--val", "many"],
        ["mnist", "--out", "X"],
    ],
)
def test_cli_rejects_bad_arguments(argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(tmp_path / "o") if a == "X" else a for a in argv]
    assert main(argv) != 0
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_help_describes_the_dataset(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["digits", "--help"]) == 0
    text = capsys.readouterr().out
    assert "handwritten" in text and "instances_train.json" in text
