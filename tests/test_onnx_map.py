"""An ONNX teacher's first tries, on the shipped NanoDet-g graph: the graph named where its mapping belongs, a
mapping naming a tensor the graph lacks and views larger than the graph's fixed input are each one line from
`mtpd-cache build`, before any image is read; the fixed input is the default view size (of builds and of plans);
`mtpd-cache onnx-map` drafts the mapping, and its draft names the shipped mapping's own tensors."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import yaml

pytest.importorskip("onnxruntime")

from mtpd.cli.cache import main  # noqa: E402
from mtpd.demo.steps import shipped_teachers  # noqa: E402
from mtpd.teachers.registry import build_teacher  # noqa: E402

FOLDER = shipped_teachers() / "nanodet_g"
GRAPH, MAPPING = FOLDER / "nanodet_g.onnx", FOLDER / "mapping.yaml"


@pytest.fixture
def no_images(tmp_path) -> tuple[str, str]:
    """A COCO file of two photos (1088 x 800, the issue's, and 640 x 480) and an empty image folder: a build that
    got as far as reading an image would fail on it, naming it."""
    (tmp_path / "images").mkdir()
    ann = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 1088, "height": 800},
            {"id": 2, "file_name": "b.jpg", "width": 640, "height": 480},
        ],
        "annotations": [],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    return str(tmp_path / "ann.json"), str(tmp_path / "images")


def build(capsys, tmp_path, ann_images: tuple[str, str], teacher: str, *extra: str) -> str:
    """`mtpd-cache build` that must stop with one line (exit 2, no traceback, no progress, no store)."""
    ann, images = ann_images
    args = ["build", "--teacher", f"onnx:{teacher}", "--ann", ann, "--images", images, "--out", str(tmp_path / "s")]
    assert main([*args, *extra]) == 2
    out, err = capsys.readouterr()
    err = err.strip()
    assert "\n" not in err and "Traceback" not in err and "img/s" not in err, err
    assert err.startswith("mtpd-cache: error: ") and not out
    assert not (tmp_path / "s").exists()
    return err


def test_the_graph_where_its_mapping_belongs_is_one_line(tmp_path, no_images, capsys) -> None:
    err = build(capsys, tmp_path, no_images, str(GRAPH), "--workers", "0")
    assert f"{GRAPH} is the graph itself, but onnx: names a mapping file" in err
    assert f"the mapping beside it names this graph: --teacher onnx:{MAPPING}" in err  # the one the user meant
    alone = tmp_path / "alone" / "model.onnx"  # a graph with no mapping yet: how to draft one
    alone.parent.mkdir()
    shutil.copy(GRAPH, alone)
    err = build(capsys, tmp_path, no_images, str(alone), "--workers", "0")
    assert f"write one, or draft one with: mtpd-cache onnx-map {alone} --out {alone.with_suffix('.yaml')}" in err


def test_a_mapping_naming_a_missing_tensor_is_one_line(tmp_path, no_images, capsys) -> None:
    m = yaml.safe_load(MAPPING.read_text())
    m["model"] = str(GRAPH)
    m["outputs"]["fpn"]["levels"][5] = "PartitionedCall/onnx_tf_prefix_Add_150:0"  # one past the real name
    bad = tmp_path / "typo.yaml"
    bad.write_text(yaml.safe_dump(m))
    for extra in ([], ["--short", "416", "--long", "416"]):  # the default views, or given ones
        err = build(capsys, tmp_path, no_images, str(bad), "--workers", "0", *extra)
        assert f"{bad}.outputs.fpn.levels.5: no tensor 'PartitionedCall/onnx_tf_prefix_Add_150:0'" in err
        assert "in nanodet_g.onnx; near: ['PartitionedCall/onnx_tf_prefix_Add_" in err


def test_views_larger_than_the_fixed_graph_are_refused_before_the_build(tmp_path, no_images, capsys) -> None:
    import ray

    ray_before = ray.is_initialized()
    # the default --workers 1 would start Ray: the refusal comes first
    err = build(capsys, tmp_path, no_images, str(MAPPING), "--short", "800", "--long", "1088")
    assert "views up to 800x1088 (padded to 32) do not fit the graph's fixed input 416x416" in err
    assert "--short 416 --long 416" in err
    assert ray.is_initialized() == ray_before
    # one side given keeps its value; the other follows the graph, never below it
    err = build(capsys, tmp_path, no_images, str(MAPPING), "--short", "800", "--workers", "0")
    assert "views up to 608x800 (padded to 32) do not fit the graph's fixed input 416x416" in err
    # without --short/--long the graph's input is the view size: the build goes as far as the first image
    ann, images = no_images
    args = ["build", "--teacher", f"onnx:{MAPPING}", "--ann", ann, "--images", images, "--workers", "0"]
    assert main([*args, "--out", str(tmp_path / "ok"), "--no-progress"]) == 2
    assert "a.jpg: image file not found" in capsys.readouterr().err


def test_a_plan_takes_the_fixed_graph_input_as_its_views(tmp_path, digits) -> None:
    """A plan that gives no data.short/long takes the graph's 416 x 416; one whose views exceed it is refused
    by the store lookup (the plan's check) with one line, not sent to a build that would refuse it."""
    from mtpd.trainer.plan import PlanError, load_plan
    from mtpd.trainer.store_refs import MissingStore, stage_stores

    def plan(**sizes: int):
        data = {"train_ann": digits["train"]["ann"], "train_images": digits["train"]["images"], **sizes}
        stage = {"name": "s", "teacher": {"name": f"onnx:{MAPPING}", "outputs": ["fpn"]}, "losses": []}
        body = {"student": {"arch": "retinanet_tiny"}, "data": data, "stages": [stage]}
        path = tmp_path / f"plan{len(list(tmp_path.glob('plan*.yaml')))}.yaml"
        path.write_text(yaml.safe_dump({**body, "output_dir": "run", "cache_root": "cache"}))
        return load_plan(path)

    p = plan()
    assert (p.data.short, p.data.long) == (416, 416)
    with pytest.raises(MissingStore, match="--short 416 --long 416"):
        stage_stores(p, p.stages[0])
    for given, views in [({"short": 320}, (320, 416)), ({"long": 300}, (300, 300)), ({"short": 800}, (800, 800))]:
        p = plan(**given)
        assert (p.data.short, p.data.long) == views, given
    big = plan(short=800, long=1333)
    with pytest.raises(PlanError) as e:
        stage_stores(big, big.stages[0])
    assert not isinstance(e.value, MissingStore) and "\n" not in str(e.value)
    assert "views up to 800x800 (data.short 800, data.long 1333) do not fit the graph's fixed input 416x416" in str(
        e.value
    )


def _listed(text: str) -> dict[int, set[str]]:
    """The draft's closing comment: level -> the tensors listed under it."""
    out: dict[int, set[str]] = {}
    level = None
    for line in text.splitlines():
        if m := re.match(r"# level (\d+) \(stride (\d+), ", line):
            level = int(m.group(1))
            assert int(m.group(2)) == 2**level
        elif line.startswith("#   ") and level is not None:
            out.setdefault(level, set()).add(json.loads(line[4:].split("  ")[0]))
    return out


def test_onnx_map_drafts_the_shipped_mapping(tmp_path, capsys) -> None:
    shipped = yaml.safe_load(MAPPING.read_text())
    out = tmp_path / "sub" / "draft.yaml"
    out.parent.mkdir()
    assert main(["onnx-map", str(GRAPH), "--out", str(out)]) == 0
    assert "fpn (feature, levels 3, 4, 5), cls (logits, levels 3, 4, 5), box (deltas, levels 3, 4, 5)" in (
        capsys.readouterr().out
    )
    text = out.read_text()
    draft = yaml.safe_load(text)
    assert (out.parent / draft["model"]).resolve() == GRAPH.resolve()  # relative to the draft's own folder
    assert draft["input"] == {**shipped["input"], "color": "rgb", "mean": [0.0] * 3, "std": [1.0] * 3}
    listed = _listed(text)
    assert sorted(listed) == [1, 2, 3, 4, 5]
    for name, o in shipped["outputs"].items():
        for lvl, t in o["levels"].items():
            assert t in listed[lvl], (name, lvl)  # every shipped tensor, under its own stride
        assert draft["outputs"][name]["levels"] == o["levels"], name  # and the guesses are the shipped ones
    # after the edits its comments ask for (colour order, normalisation, the box code's mirror) it is the mapping
    assert text.count("# EDIT") >= 5
    draft["input"].update({k: shipped["input"][k] for k in ("color", "mean", "std")})
    draft["outputs"]["box"]["mirror"] = "swap_lr"
    draft["model"] = shipped["model"]
    for o in draft["outputs"].values():
        o.pop("num_anchors", None)  # 1, the adapter's default
    assert draft == shipped
    teacher = build_teacher(f"onnx:{out}")  # and as drafted, it loads
    want = build_teacher(f"onnx:{MAPPING}").output_specs()
    got = teacher.output_specs()
    assert {k: (s.kind, s.levels, s.channels) for k, s in got.items()} == {
        k: (s.kind, s.levels, s.channels) for k, s in want.items()
    }
    assert main(["onnx-map", str(GRAPH), "--out", str(out)]) == 2  # never over a mapping
    assert "exists already" in capsys.readouterr().err


def test_onnx_map_of_a_dynamic_graph_and_its_mistakes(tmp_path, capsys) -> None:
    """A dynamic graph (the tiny torchvision RetinaNet of test_onnx_teacher) is drafted at the size given: its
    FPN output convs are the neck, its anchors read from the box map; mistakes are one line."""
    import torch
    from test_onnx_teacher import export

    from mtpd.models import build_arch

    torch.manual_seed(0)
    fpn = export(build_arch("retinanet_tiny", 10).eval(), tmp_path / "tiny.onnx")
    assert main(["onnx-map", str(tmp_path / "tiny.onnx")]) == 2
    assert "not a fixed size: give the size to draft for, e.g. --size 640 640" in capsys.readouterr().err
    assert main(["onnx-map", str(tmp_path / "tiny.onnx"), "--size", "64", "96"]) == 0
    text = capsys.readouterr().out  # no --out: printed, model: relative to the current folder
    draft = yaml.safe_load(text)
    assert draft["outputs"]["fpn"]["levels"] == dict(zip((3, 4, 5), fpn))
    assert draft["outputs"]["cls"] == {"kind": "logits", "num_classes": 10, "num_anchors": 9, "levels": {
        3: "cls_p3", 4: "cls_p4", 5: "cls_p5"}}  # fmt: skip
    assert draft["outputs"]["box"]["levels"] == {3: "box_p3", 4: "box_p4", 5: "box_p5"}
    assert "size" not in draft["input"] and "drafted at 64x96" in text
    for args, says in [
        ([str(MAPPING)], "a mapping file already; onnx-map takes the graph"),
        ([str(tmp_path / "nowhere.onnx")], "graph file not found"),
        ([str(GRAPH), "--size", "320"], "--size 320 320, but the graph's input is fixed at 416x416"),
        ([str(GRAPH), "--size", "1", "2", "3"], "--size: give H W or one N"),
    ]:
        assert main(["onnx-map", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert says in err and "\n" not in err, err
