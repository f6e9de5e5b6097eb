"""mtpd-data import: VOC, YOLO and CSV boxes to mtpd's COCO layout, tiling, the split, errors at file:line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mtpd.cli.data import main
from mtpd.data import CocoDataset
from mtpd.data.importer import import_dataset, load_classes
from mtpd.data.readers import AnnotationError
from mtpd.data.tiling import TileSpec, clip_to_tile, starts, tiles
from mtpd.errors import MtpdError

# file name -> (width, height, [(label, (x0, y0, x1, y1))]); sub/ checks nested folders survive
SET = {
    "a.png": (96, 64, [("dog", (10.0, 5.0, 40.5, 30.0)), ("cat", (50.0, 20.0, 90.0, 60.0))]),
    "b.jpg": (128, 128, [("bird", (0.0, 0.0, 127.0, 100.25))]),
    "sub/c.png": (80, 100, [("cat", (3.0, 4.0, 20.0, 24.0)), ("cat", (30.5, 40.5, 70.0, 99.0))]),
}


def _image(path: Path, w: int, h: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _images(root: Path, spec: dict = SET) -> Path:
    for i, (name, (w, h, _)) in enumerate(spec.items()):
        _image(root / "images" / name, w, h, seed=i)
    return root / "images"


def _voc(root: Path, spec: dict = SET) -> Path:
    for name, (w, h, boxes) in spec.items():
        objs = "".join(
            f"  <object>\n    <name>{label}</name>\n    <difficult>0</difficult>\n    <bndbox>\n"
            f"      <xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax>\n    </bndbox>\n  </object>\n"
            for label, (x0, y0, x1, y1) in boxes
        )
        xml = (
            f"<annotation>\n  <filename>{name}</filename>\n"
            f"  <size><width>{w}</width><height>{h}</height><depth>3</depth></size>\n{objs}</annotation>\n"
        )
        path = root / "Annotations" / (name.replace("/", "_").rsplit(".", 1)[0] + ".xml")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(xml)
    return root / "Annotations"


def _yolo(root: Path, names: list[str], spec: dict = SET) -> Path:
    for name, (w, h, boxes) in spec.items():
        lines = [
            f"{names.index(k)} {(x0 + x1) / 2 / w:.6f} {(y0 + y1) / 2 / h:.6f} {(x1 - x0) / w:.6f} {(y1 - y0) / h:.6f}"
            for k, (x0, y0, x1, y1) in boxes
        ]
        path = root / "labels" / (name.rsplit(".", 1)[0] + ".txt")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
    return root / "labels"


def _csv(root: Path, spec: dict = SET, header: str | None = None) -> Path:
    rows = [header] if header else []
    rows += [
        f"{name},{x0},{y0},{x1},{y1},{label}"
        for name, (_, _, boxes) in spec.items()
        for label, (x0, y0, x1, y1) in boxes
    ]
    (root / "ann.csv").write_text("\n".join(rows) + "\n")
    return root / "ann.csv"


def _check_round_trip(result: dict, names: list[str], spec: dict = SET) -> None:
    """Every split loads with CocoDataset, ids are 1..K in ``names`` order, boxes within 0.5 px."""
    seen = {}
    for split in ("train", "val"):
        coco = json.loads(Path(result[split]["ann"]).read_text())
        assert [(c["id"], c["name"]) for c in coco["categories"]] == list(enumerate(names, 1))
        ds = CocoDataset(result[split]["ann"], result[split]["images"])
        assert ds.class_names == names
        for i, rec in enumerate(ds.images):
            w, h, boxes = spec[rec.file_name]
            assert ds.load_image(i).shape == (h, w, 3)
            ann = ds.annotations(i)
            got = sorted((ds.class_names[int(k)], tuple(b)) for k, b in zip(ann.labels, ann.boxes.tolist()))
            want = sorted(boxes)
            assert [g[0] for g in got] == [x[0] for x in want], rec.file_name
            np.testing.assert_allclose([g[1] for g in got], [x[1] for x in want], atol=0.5)
            seen[rec.file_name] = split
    assert sorted(seen) == sorted(spec)


# ------------------------------------------------------------------ round trips


def test_voc_round_trip(tmp_path: Path) -> None:
    images, anns = _images(tmp_path), _voc(tmp_path)
    result = import_dataset("voc", images, anns, tmp_path / "out", val_fraction=0.34)
    _check_round_trip(result, ["bird", "cat", "dog"])  # sorted names
    assert result["val"]["num_images"] == 1 and result["train"]["num_images"] == 2
    # untiled images are the source's bytes, at the same relative path
    assert (tmp_path / "out/images" / "train").is_dir()
    for split in ("train", "val"):
        for rec in json.loads(Path(result[split]["ann"]).read_text())["images"]:
            assert (Path(result[split]["images"]) / rec["file_name"]).read_bytes() == (
                images / rec["file_name"]
            ).read_bytes()


def test_voc_difficult_becomes_crowd(tmp_path: Path) -> None:
    images, anns = _images(tmp_path), _voc(tmp_path)
    xml = anns / "a.xml"
    xml.write_text(xml.read_text().replace("<difficult>0</difficult>", "<difficult>1</difficult>", 1))
    result = import_dataset("voc", images, anns, tmp_path / "out", val_fraction=0)
    coco = json.loads(Path(result["train"]["ann"]).read_text())
    assert sorted(a["iscrowd"] for a in coco["annotations"]) == [0, 0, 0, 0, 1]


def test_yolo_round_trip_keeps_the_names_order(tmp_path: Path) -> None:
    names = ["dog", "cat", "bird"]  # not sorted: the file's order is the category order
    images, labels = _images(tmp_path), _yolo(tmp_path, names)
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    _image(images / "empty.png", 64, 64)  # an image without a label file is a negative
    result = import_dataset("yolo", images, labels, tmp_path / "out", classes=str(tmp_path / "names.txt"))
    _check_round_trip(result, names, {**SET, "empty.png": (64, 64, [])})


@pytest.mark.parametrize("names_yaml", ["names: [dog, cat, bird]\n", "names:\n  0: dog\n  1: cat\n  2: bird\n"])
def test_yolo_classes_from_data_yaml(tmp_path: Path, names_yaml: str) -> None:
    (tmp_path / "data.yaml").write_text("path: .\ntrain: images\n" + names_yaml)
    assert load_classes(str(tmp_path / "data.yaml")) == ["dog", "cat", "bird"]
    images, labels = _images(tmp_path), _yolo(tmp_path, ["dog", "cat", "bird"])
    result = import_dataset("yolo", images, labels, tmp_path / "out", classes=str(tmp_path / "data.yaml"))
    _check_round_trip(result, ["dog", "cat", "bird"])


@pytest.mark.parametrize(
    "header", [None, "image,xmin,ymin,xmax,ymax,label", "filename,class,x1,y1,x2,y2"], ids=["none", "plain", "renamed"]
)
def test_csv_round_trip(tmp_path: Path, header: str | None) -> None:
    images = _images(tmp_path)
    if header and header.startswith("filename"):  # columns in another order, named as TF's CSVs name them
        rows = [f"{n},{lab},{x0},{y0},{x1},{y1}" for n, (_, _, bs) in SET.items() for lab, (x0, y0, x1, y1) in bs]
        (tmp_path / "ann.csv").write_text("\n".join([header, *rows]) + "\n")
        csv = tmp_path / "ann.csv"
    else:
        csv = _csv(tmp_path, header=header)
    _image(images / "neg.png", 64, 64)
    with open(csv, "a") as f:
        f.write("neg.png,,,,,\n")  # keras-retinanet's row for an image with no objects
    result = import_dataset("csv", images, csv, tmp_path / "out", classes="cat,dog,bird")
    _check_round_trip(result, ["cat", "dog", "bird"], {**SET, "neg.png": (64, 64, [])})


# ---------------------------------------------------------------------- tiling


def test_tile_grid_covers_the_image_with_the_last_tile_on_the_border() -> None:
    assert starts(256, 128, 32) == [0, 96, 128]
    assert starts(100, 128, 32) == [0]
    assert starts(300, 100, 0) == [0, 100, 200]
    assert tiles(256, 100, TileSpec(128, 32))[-1] == (128, 0, 256, 100)
    assert clip_to_tile((100, 20, 140, 60), (0, 0, 128, 128), 0.5) == (100, 20, 128, 60)
    assert clip_to_tile((100, 20, 140, 60), (128, 0, 256, 128), 0.5) is None  # 12/40 visible
    with pytest.raises(MtpdError, match="--overlap"):
        TileSpec(128, 128)


TILE_SET = {
    "big.png": (
        256,
        256,
        [
            ("a", (10.0, 10.0, 50.0, 50.0)),  # inside tile (0, 0) only
            ("b", (100.0, 20.0, 140.0, 60.0)),  # 70 % in x-tile 0, all in x-tile 96, 30 % in x-tile 128
            ("c", (200.0, 200.0, 250.0, 250.0)),  # 48 % in tile 96 per side, all in tile 128
            ("d", (0.0, 0.0, 256.0, 256.0)),  # a quarter at most in any tile: lost
        ],
    ),
    "small.png": (64, 64, [("a", (1.0, 2.0, 30.0, 40.0))]),  # no larger than a tile: kept whole
}


@pytest.mark.parametrize(
    "min_visible, want",
    [
        (0.5, {"a": [(0, 0, 10, 10, 50, 50)], "b": [(0, 0, 100, 20, 128, 60), (96, 0, 4, 20, 44, 60)]}),
        (0.4, {"a": [(0, 0, 10, 10, 50, 50)], "b": [(0, 0, 100, 20, 128, 60), (96, 0, 4, 20, 44, 60)]}),
    ],
)
def test_tiling_clips_boxes_and_respects_min_visible(tmp_path: Path, min_visible: float, want: dict) -> None:
    images = _images(tmp_path, TILE_SET)
    csv = _csv(tmp_path, TILE_SET)
    spec = TileSpec(128, 32, min_visible)
    result = import_dataset("csv", images, csv, tmp_path / "out", tile=spec, val_fraction=0)
    coco = json.loads(Path(result["train"]["ann"]).read_text())
    by_id = {im["id"]: im for im in coco["images"]}
    tiles_ = [im for im in coco["images"] if im["source"] == "big.png"]
    assert len(tiles_) == 9 and result["train"]["num_sources"] == 2  # 3 x 3 tiles, empty ones kept
    assert {(im["width"], im["height"]) for im in tiles_} == {(128, 128)}
    assert [im["file_name"] for im in coco["images"] if im["source"] == "small.png"] == ["small.png"]
    source = np.asarray(Image.open(images / "big.png"))
    for im in tiles_:
        x, y = im["tile"]
        np.testing.assert_array_equal(
            np.asarray(Image.open(tmp_path / "out/images/train" / im["file_name"])), source[y : y + 128, x : x + 128]
        )
    names = {c["id"]: c["name"] for c in coco["categories"]}
    got: dict[str, list] = {}
    for a in coco["annotations"]:
        im = by_id[a["image_id"]]
        if im["source"] == "big.png":
            x, y, w, h = a["bbox"]
            got.setdefault(names[a["category_id"]], []).append((*im["tile"], x, y, x + w, y + h))
    # c: all of it in tiles at 128; at 0.4 also the tiles at 96 that show 48 % of it (not 96/96: 23 %)
    want_c = [(128, 128, 72, 72, 122, 122)]
    if min_visible == 0.4:
        want_c += [(96, 128, 104, 72, 128, 122), (128, 96, 72, 104, 122, 128)]
    assert {k: sorted(v) for k, v in got.items()} == {**want, "c": sorted(want_c)}
    assert result["train"]["lost_boxes"] == 1  # d


# ----------------------------------------------------------------------- split

SPLIT_SET = {f"im{i:02d}.png": (200, 160, [("x", (10.0 + i, 10.0, 60.0 + i, 50.0))]) for i in range(10)}


def _split_of(result: dict, key: str = "file_name") -> dict[str, set]:
    return {
        s: {im.get("source", im[key]) for im in json.loads(Path(result[s]["ann"]).read_text())["images"]}
        for s in ("train", "val")
    }


def test_split_is_deterministic_and_disjoint(tmp_path: Path) -> None:
    images, csv = _images(tmp_path, SPLIT_SET), _csv(tmp_path, SPLIT_SET)
    runs = [
        import_dataset("csv", images, csv, tmp_path / f"o{i}", val_fraction=0.3, seed=s)
        for i, s in enumerate((0, 0, 1))
    ]
    first, again, other = (_split_of(r) for r in runs)
    assert len(first["val"]) == 3 and len(first["train"]) == 7
    assert not first["train"] & first["val"] and first["train"] | first["val"] == set(SPLIT_SET)
    assert first == again and first != other
    for split in ("train", "val"):  # same bytes, not only the same sets
        assert Path(runs[0][split]["ann"]).read_text().replace("o0", "") == Path(
            runs[1][split]["ann"]
        ).read_text().replace("o1", "")


def test_split_comes_before_tiling(tmp_path: Path) -> None:
    images, csv = _images(tmp_path, SPLIT_SET), _csv(tmp_path, SPLIT_SET)
    result = import_dataset("csv", images, csv, tmp_path / "out", val_fraction=0.3, tile=TileSpec(128, 32))
    split = _split_of(result)
    assert not split["train"] & split["val"] and len(split["val"]) == 3
    assert result["val"]["num_images"] == 3 * 4 and result["val"]["num_sources"] == 3  # 2 x 2 tiles each


# ---------------------------------------------------------------------- errors


def _write(root: Path, files: dict[str, str | bytes]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(text if isinstance(text, bytes) else text.encode())


VOC_A = (  # <filename> on line 2, <object> 4, <bndbox> 5, <xmin> 6
    "<annotation>\n<filename>a.png</filename>\n<size><width>64</width><height>48</height></size>\n<object>\n"
    "<name>{name}</name><bndbox>\n<xmin>{x0}</xmin><ymin>1</ymin><xmax>30</xmax><ymax>20</ymax>\n</bndbox>\n"
    "</object>\n</annotation>\n"
)

ERRORS = {
    "yolo 4 values": (
        ["--format", "yolo", "--annotations", "labels", "--classes", "a,b"],
        {"labels/a.txt": "0 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.2\n"},
        "labels/a.txt:2: 5 values expected (class cx cy w h), got 4",
    ),
    "yolo 6 values": (
        ["--format", "yolo", "--annotations", "labels", "--classes", "a,b"],
        {"labels/a.txt": "0 0.5 0.5 0.2 0.2 0.9\n"},
        "labels/a.txt:1: 5 values expected (class cx cy w h), got 6",
    ),
    "yolo unknown class": (
        ["--format", "yolo", "--annotations", "labels", "--classes", "a,b"],
        {"labels/a.txt": "\n7 0.5 0.5 0.2 0.2\n"},
        "labels/a.txt:2: unknown class 7; --classes has 2 names (0..1)",
    ),
    "yolo pixels": (
        ["--format", "yolo", "--annotations", "labels", "--classes", "a,b"],
        {"labels/a.txt": "0 32 24 10 10\n"},
        "labels/a.txt:1: cx cy w h must be normalised to 0..1, got 32 24 10 10",
    ),
    "yolo image missing": (
        ["--format", "yolo", "--annotations", "labels", "--classes", "a,b"],
        {"labels/zzz.txt": "0 0.5 0.5 0.2 0.2\n"},
        "labels/zzz.txt: image zzz.* not found in images (looked for .jpg, .jpeg, .png,",
    ),
    "yolo no classes": (
        ["--format", "yolo", "--annotations", "labels"],
        {"labels/a.txt": "0 0.5 0.5 0.2 0.2\n"},
        "YOLO labels hold class indices: pass --classes",
    ),
    "csv xmax <= xmin": (
        ["--format", "csv", "--annotations", "ann.csv"],
        {"ann.csv": "image,xmin,ymin,xmax,ymax,label\na.png,1,1,5,5,a\na.png,40,1,12,9,a\n"},
        "ann.csv:3: xmax 12 <= xmin 40",
    ),
    "csv columns": (
        ["--format", "csv", "--annotations", "ann.csv"],
        {"ann.csv": "a.png,1,1,5,5,a\na.png,1,1,5,5\n"},
        "ann.csv:2: 6 columns expected (image,xmin,ymin,xmax,ymax,label), got 5",
    ),
    "csv image missing": (
        ["--format", "csv", "--annotations", "ann.csv"],
        {"ann.csv": "a.png,1,1,5,5,a\nnope.png,1,1,5,5,a\n"},
        "ann.csv:2: image nope.png not found in images",
    ),
    "csv unknown class": (
        ["--format", "csv", "--annotations", "ann.csv", "--classes", "cat,dog"],
        {"ann.csv": "a.png,1,1,5,5,cat\na.png,1,1,5,5,dgo\n"},
        "ann.csv:2: unknown class 'dgo'; --classes has: cat, dog",
    ),
    "csv not a number": (
        ["--format", "csv", "--annotations", "ann.csv"],
        {"ann.csv": "a.png,1,1,5,5,a\na.png,1,one,5,5,a\n"},
        "ann.csv:2: ymin is 'one', not a number",
    ),
    "csv not utf-8": (
        ["--format", "csv", "--annotations", "ann.csv"],
        {"ann.csv": "a.png,1,1,5,5,a\na.png,1,1,5,5,café\n".encode("latin-1")},
        "ann.csv:2: not UTF-8 text",
    ),
    "csv extra column": (
        ["--format", "csv", "--annotations", "ann.csv"],
        {"ann.csv": "a.png,1,1,5,5,a\na.png,1,1,5,5,a,0.9\n"},
        "ann.csv:2: 6 columns expected (image,xmin,ymin,xmax,ymax,label), got 7",
    ),
    "voc not xml": (
        ["--format", "voc", "--annotations", "Annotations"],
        {"Annotations/a.xml": "<annotation>\n<filename>a.png</filename>\n<size></annotation>\n"},
        "Annotations/a.xml: not XML (line 3: mismatched tag)",
    ),
    "voc image missing": (
        ["--format", "voc", "--annotations", "Annotations"],
        {"Annotations/a.xml": VOC_A.replace("a.png", "missing.jpg").format(name="a", x0=1)},
        "Annotations/a.xml:2: image missing.jpg not found in images",
    ),
    "voc xmax <= xmin": (
        ["--format", "voc", "--annotations", "Annotations"],
        {"Annotations/a.xml": VOC_A.format(name="a", x0=40)},
        "Annotations/a.xml:5: xmax 30 <= xmin 40",
    ),
    "voc bad number": (
        ["--format", "voc", "--annotations", "Annotations"],
        {"Annotations/a.xml": VOC_A.format(name="a", x0="abc")},
        "Annotations/a.xml:6: <xmin> is 'abc', not a number",
    ),
    "voc size mismatch": (
        ["--format", "voc", "--annotations", "Annotations"],
        {"Annotations/a.xml": VOC_A.replace("<width>64", "<width>640").format(name="a", x0=1)},
        "Annotations/a.xml:3: <size> says 640x48 but image a.png is 64x48",
    ),
    "voc unknown class": (
        ["--format", "voc", "--annotations", "Annotations", "--classes", "a,b"],
        {"Annotations/a.xml": VOC_A.format(name="c", x0=1)},
        "Annotations/a.xml:5: unknown class 'c'; --classes has: a, b",
    ),
    "classes listed twice": (
        ["--format", "csv", "--annotations", "ann.csv", "--classes", "names.txt"],
        {"ann.csv": "a.png,1,1,5,5,a\n", "names.txt": "a\nb\n\na\n"},
        "names.txt:4: class 'a' is listed twice (first at names.txt:1)",
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_are_one_line_naming_file_and_line(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, files, expected = ERRORS[case]
    monkeypatch.chdir(tmp_path)  # relative paths in, relative paths in the message
    _image(tmp_path / "images" / "a.png", 64, 48)
    _write(tmp_path, files)
    assert main(["import", "--images", "images", "--out", "out", "--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mtpd-data: error: "), err
    assert expected in err, err
    assert not (tmp_path / "out").exists()  # nothing written before the input is known good


def test_errors_are_mtpd_errors(tmp_path: Path) -> None:
    _image(tmp_path / "images" / "a.png", 64, 48)
    _write(tmp_path, {"ann.csv": "a.png,40,1,12,9,a\n"})
    with pytest.raises(AnnotationError) as e:
        import_dataset("csv", tmp_path / "images", tmp_path / "ann.csv", tmp_path / "out")
    assert isinstance(e.value, MtpdError) and isinstance(e.value, ValueError)


# ------------------------------------------------------------------------- CLI


def test_cli_imports_and_reruns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images, anns = _images(tmp_path), _voc(tmp_path)
    argv = [
        "import",
        "--format",
        "voc",
        "--images",
        str(images),
        "--annotations",
        str(anns),
        "--out",
        str(tmp_path / "out"),
    ]
    assert main([*argv, "--tile", "64", "--overlap", "16", "--quiet"]) == 0
    assert main([*argv, "--quiet"]) == 0  # a rerun replaces the tiles of the first run
    out = capsys.readouterr().out
    assert "categories 1..3: bird, cat, dog" in out and out.strip().splitlines()[-1].startswith(
        "wrote 3 images and 5 boxes"
    )
    assert not list((tmp_path / "out/images").rglob("*_x*_y*.png"))
    foreign = tmp_path / "foreign"
    (foreign / "images/train").mkdir(parents=True)
    (foreign / "images/train/mine.png").write_bytes(b"x")
    assert main([*argv[:-1], str(foreign), "--quiet"]) == 2
    assert "holds files no finished mtpd-data import wrote" in capsys.readouterr().err
    assert (foreign / "images/train/mine.png").exists()
    assert main([*argv, "--overlap", "8"]) == 2
    assert "add --tile N" in capsys.readouterr().err


def test_cli_help_lists_both_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    lines = {line.split()[0]: line for line in text.splitlines() if line.strip().split(" ")[0] in ("digits", "import")}
    assert set(lines) == {"digits", "import"}
    assert main(["import", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--tile N" in text and "instances_{train,val}.json" in text and "class cx cy w h" in text
