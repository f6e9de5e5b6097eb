"""ONNX teachers (``--teacher onnx:MAPPING.yaml``): a tiny torchvision RetinaNet exported here, its FPN maps
taken from inside the graph, equal the torch model's own outputs; stores build from it in this process and
with Ray workers, resume and are catalogued by the graph's sha256; mapping mistakes are one-line errors."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_VIEW, build_args
from torch import nn

pytest.importorskip("onnxruntime")
import onnx  # noqa: E402

from mtpd.cache import open_store  # noqa: E402
from mtpd.cache.build import build_store  # noqa: E402
from mtpd.data import CocoDataset, ViewSpec, prepare_view  # noqa: E402
from mtpd.data.views import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from mtpd.models import build_arch, dense_outputs  # noqa: E402
from mtpd.teachers.base import TeacherError  # noqa: E402
from mtpd.teachers.registry import TeacherSpec, build_teacher  # noqa: E402


class Heads(nn.Module):
    """What a deployed graph might end in: the class and box maps; the FPN maps stay inside the graph."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = dense_outputs(self.model, x, ["cls", "box"])
        return tuple(out[f"{n}.p{lvl}"] for n in ("cls", "box") for lvl in (3, 4, 5))


NAMES = [f"{n}_p{lvl}" for n in ("cls", "box") for lvl in (3, 4, 5)]


def export(model: nn.Module, path, size: tuple[int, int] | None = None) -> list[str]:
    """The graph, and the names of its three FPN output-conv tensors (intermediate, P3..P5)."""
    x = torch.zeros(1, 3, *(size or (64, 64)))
    dense_outputs(model, x, ["fpn"])  # the levels probe runs here, not while tracing
    dynamic = None if size else {"image": {2: "h", 3: "w"}, **{n: {2: f"{n}_h", 3: f"{n}_w"} for n in NAMES}}
    torch.onnx.export(
        Heads(model).eval(), (x,), str(path), input_names=["image"], output_names=NAMES, dynamic_axes=dynamic,
        opset_version=17, dynamo=False,
    )  # fmt: skip
    graph = onnx.load(str(path)).graph
    # torchvision's FPN runs top-down (P5 first): order its output convs by their module index, layer_blocks.i = P(3+i)
    convs = {int(re.search(r"layer_blocks\.(\d+)", n.name).group(1)): n.output[0] for n in graph.node
             if n.op_type == "Conv" and "layer_blocks" in n.name}  # fmt: skip
    assert sorted(convs) == [0, 1, 2], [n.name for n in graph.node if n.op_type == "Conv"]
    return [convs[i] for i in (0, 1, 2)]


def mapping(path, model_file: str, fpn: list[str], size: tuple[int, int] | None = None) -> str:
    levels = (3, 4, 5)
    # the torch model takes the view itself: the graph's normalisation is the view's
    inp = {"color": "rgb", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    if size:
        inp["size"] = list(size)
    m = {
        "model": model_file,
        "input": inp,
        "outputs": {
            "fpn": {"kind": "feature", "levels": dict(zip(levels, fpn))},
            "cls": {"kind": "logits", "num_anchors": 9, "num_classes": 10, "levels": {v: f"cls_p{v}" for v in levels}},
            "box": {
                "kind": "deltas",
                "mirror": "negate_dx",
                "num_anchors": 9,
                "levels": {v: f"box_p{v}" for v in levels},
            },
        },
    }
    path.write_text(yaml.safe_dump(m))
    return str(path)


@pytest.fixture(scope="module")
def onnx_teacher(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    model = build_arch("retinanet_tiny", 10).eval()
    fpn = export(model, tmp / "tiny.onnx")
    return model, mapping(tmp / "tiny.yaml", "tiny.onnx", fpn), fpn


def test_the_graph_gives_the_torch_models_outputs(onnx_teacher, digits) -> None:
    model, spec, _ = onnx_teacher
    teacher = build_teacher(f"onnx:{spec}")
    specs = teacher.output_specs()
    assert specs["fpn"].channels == 64 and specs["cls"].channels == 90 and specs["box"].mirror == "negate_dx"
    coco = CocoDataset(digits["train"]["ann"], digits["train"]["images"])
    x, _ = prepare_view(coco.load_image(0), ViewSpec(**TINY_VIEW))
    batch = torch.stack([x, x.flip(-1)])
    got = teacher(batch, ["fpn", "cls", "box"])
    with torch.no_grad():
        want = dense_outputs(model, batch, ["fpn", "cls", "box"])
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-4, msg=k)
    assert teacher.identity.weights_sha256 and teacher.identity.name == f"onnx:{spec}"


def test_a_fixed_size_graph_gets_padded_views(tmp_path, digits) -> None:
    torch.manual_seed(0)
    model = build_arch("retinanet_tiny", 10).eval()
    fpn = export(model, tmp_path / "fixed.onnx", size=(64, 96))
    teacher = build_teacher(f"onnx:{mapping(tmp_path / 'fixed.yaml', 'fixed.onnx', fpn, size=(64, 96))}")
    x = torch.randn(1, 3, 64, 64)
    got = teacher(x, ["fpn"])
    with torch.no_grad():
        want = dense_outputs(model, torch.nn.functional.pad(x, (0, 32)), ["fpn"])
    for lvl in (3, 4, 5):
        g = -(-64 // 2**lvl)
        assert got[f"fpn.p{lvl}"].shape[-1] == g  # cropped to the view's own cells
        torch.testing.assert_close(got[f"fpn.p{lvl}"], want[f"fpn.p{lvl}"][..., :g], rtol=1e-4, atol=1e-4)
    with pytest.raises(TeacherError, match=r"do not fit the graph's fixed input \(64, 96\)"):
        teacher(torch.zeros(1, 3, 64, 128), ["fpn"])
    # the graph's own fixed size is read from it when the mapping gives none, and a wrong one is refused
    assert build_teacher(f"onnx:{mapping(tmp_path / 'nosize.yaml', 'fixed.onnx', fpn)}").size == (64, 96)
    with pytest.raises(TeacherError, match=r"input.size: \[64, 64\], but the graph's input is fixed at \[64, 96\]"):
        build_teacher(f"onnx:{mapping(tmp_path / 'wrong.yaml', 'fixed.onnx', fpn, size=(64, 64))}")


def test_stores_build_resume_and_are_catalogued(onnx_teacher, digits, tmp_path, ray_session) -> None:
    model, spec, _ = onnx_teacher
    ann, images = digits["train"]["ann"], digits["train"]["images"]
    views = ViewSpec(views=("orig", "hflip"), **TINY_VIEW)
    common = dict(views=views, precision="lossless", images_per_shard=4, progress=False)
    local = build_store(TeacherSpec(f"onnx:{spec}"), ann, images, str(tmp_path / "local"), workers=0, **common)
    rayed = build_store(TeacherSpec(f"onnx:{spec}"), ann, images, str(tmp_path / "ray"), workers=1, **common)
    again = build_store(TeacherSpec(f"onnx:{spec}"), ann, images, str(tmp_path / "ray"), workers=1, **common)
    assert again.shards_written == 0 and rayed.shards_written == rayed.shards_total
    a, b = open_store(local.store), open_store(rayed.store)
    coco = CocoDataset(ann, images)
    x, _ = prepare_view(coco.load_image(1), views, "hflip")
    with torch.no_grad():
        want = dense_outputs(model, x[None], ["fpn"])
    i = a.sample_index(coco.images[1].image_id, "hflip")
    for j, (la, lb) in enumerate(zip(a.read(i, ["fpn"])["fpn"], b.read(i, ["fpn"])["fpn"])):
        np.testing.assert_array_equal(la, lb)
        np.testing.assert_allclose(la, want[f"fpn.p{j + 3}"][0].numpy(), rtol=2e-3, atol=1e-4)
    # Under a cache root the store is named by identity, the graph's sha256 in it: found again, not rebuilt.
    first = build_store(
        TeacherSpec(f"onnx:{spec}"), ann, images, None, root=str(tmp_path / "root"), workers=0, **common
    )
    second = build_store(
        TeacherSpec(f"onnx:{spec}"), ann, images, None, root=str(tmp_path / "root"), workers=0, **common
    )
    assert first.store == second.store and second.shards_written == 0
    assert a.header.teacher["weights_sha256"] == TeacherSpec(f"onnx:{spec}").build().identity.weights_sha256


def test_the_cli_builds_from_an_onnx_teacher(onnx_teacher, digits, tmp_path) -> None:
    from mtpd.cli.cache import main

    _, spec, _ = onnx_teacher
    args = build_args(digits["train"]["ann"], digits["train"]["images"], "--out", str(tmp_path / "s"), "--workers", "0")
    args[args.index("--teacher") + 1] = f"onnx:{spec}"
    assert main(args) == 0
    assert open_store(str(tmp_path / "s")).header.teacher["name"] == f"onnx:{spec}"


def test_mapping_mistakes_are_one_line_errors(onnx_teacher, tmp_path) -> None:
    _, spec, fpn = onnx_teacher
    model_file = str(Path(spec).with_suffix(".onnx"))  # absolute: the mappings here live elsewhere
    bad = mapping(tmp_path / "typo.yaml", model_file, [fpn[0] + "x", fpn[1], fpn[2]])
    with pytest.raises(TeacherError, match=r"outputs\.fpn\.levels\.3: no tensor .* near: \[") as e:
        build_teacher(f"onnx:{bad}")
    assert "\n" not in str(e.value)
    wrong_level = mapping(tmp_path / "level.yaml", model_file, [fpn[1], fpn[0], fpn[2]])  # P4's map called P3
    with pytest.raises(TeacherError, match=r"outputs\.fpn\.levels\.3: shape \[1, 64, 16, 16\] does not fit stride 8"):
        build_teacher(f"onnx:{wrong_level}").output_specs()
    with pytest.raises(TeacherError, match="holds its own weights"):
        build_teacher(f"onnx:{spec}", weights="some.pt")
    with pytest.raises(TeacherError, match="not found"):
        build_teacher(f"onnx:{tmp_path / 'nope.yaml'}")


def test_a_plan_names_an_onnx_teacher_and_finds_its_store(onnx_teacher, digits, tmp_path) -> None:
    """``teacher: {name: onnx:MAPPING}`` in a plan: the catalogued store is found by the resolved mapping path and
    the graph's sha256 (the graph holds the weights: no ``weights`` entry), and a missing one names its build."""
    from mtpd.trainer.plan import Plan, PlanError, from_dict
    from mtpd.trainer.store_refs import stage_stores

    _, spec, _ = onnx_teacher
    ann, images = digits["train"]["ann"], digits["train"]["images"]
    views = ViewSpec(views=("orig", "hflip"), **TINY_VIEW)
    root = tmp_path / "root"

    def plan(name: str) -> Plan:
        data = {"train_ann": ann, "train_images": images, "short": TINY_VIEW["short"], "long": TINY_VIEW["long"]}
        stage = {"name": "s", "teacher": {"name": name, "outputs": ["fpn"], "precision": "lossless"}, "losses": []}
        body = {"output_dir": str(tmp_path / "run"), "cache_root": str(root), "student": {"arch": "retinanet_tiny"}}
        return from_dict(Plan, {**body, "data": {**data, "flip": True}, "stages": [stage]})

    with pytest.raises(PlanError, match="mtpd-cache build --teacher onnx:"):
        stage_stores(plan(f"onnx:{spec}"), plan(f"onnx:{spec}").stages[0])
    built = build_store(
        TeacherSpec(f"onnx:{spec}"), ann, images, None, root=str(root), views=views, outputs=["fpn"],
        precision="lossless", workers=0, images_per_shard=4, progress=False,
    )  # fmt: skip
    relative = Path(spec).relative_to(Path.cwd()) if Path(spec).is_relative_to(Path.cwd()) else Path(spec)
    p = plan(f"onnx:{relative}")  # the mapping named as the user wrote it
    assert stage_stores(p, p.stages[0]) == [built.store]
    with pytest.raises(PlanError, match="mapping file not found"):
        stage_stores(plan("onnx:nowhere.yaml"), plan("onnx:nowhere.yaml").stages[0])


def test_a_plan_file_names_its_onnx_teacher_relative_to_itself(onnx_teacher, digits, tmp_path, monkeypatch) -> None:
    """In a plan file, ``onnx:MAPPING`` is relative to the plan, like every other path in it, whatever the cwd;
    finding the teacher's store imports no teacher module (the trainer never builds a teacher)."""
    import subprocess
    import sys

    import yaml as yaml_

    from mtpd.trainer.plan import load_plan

    _, spec, _ = onnx_teacher
    plans = tmp_path / "plans"
    plans.mkdir()
    model = tmp_path / "model"  # the mapping and its graph, beside the plans folder
    model.mkdir()
    for f in Path(spec).parent.glob("tiny.*"):
        (model / f.name).write_bytes(f.read_bytes())
    rel = Path("..") / "model" / Path(spec).name
    body = {
        "student": {"arch": "retinanet_tiny"},
        "data": {"train_ann": digits["train"]["ann"], "train_images": digits["train"]["images"], "short": 64},
        "output_dir": str(tmp_path / "run"),
        "cache_root": str(tmp_path / "root"),
        "stages": [{"name": "s", "teacher": {"name": f"onnx:{rel}", "precision": "lossless"}, "losses": []}],
    }
    (plans / "p.yaml").write_text(yaml_.safe_dump(body))
    monkeypatch.chdir(digits["train"]["images"])  # anywhere but the plan's folder
    plan = load_plan(plans / "p.yaml")
    assert plan.stages[0].teacher.name == f"onnx:{(plans / rel).resolve()}"
    code = (
        "import sys\n"
        "from mtpd.trainer.plan import load_plan\n"
        "from mtpd.trainer.store_refs import stage_stores\n"
        f"p = load_plan({str(plans / 'p.yaml')!r})\n"
        "try:\n    stage_stores(p, p.stages[0])\nexcept Exception as e:\n    print(type(e).__name__)\n"
        "print(sorted(m for m in sys.modules if m.startswith('mtpd.teachers')))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert r.stdout.split("\n")[:2] == ["MissingStore", "[]"], r.stdout + r.stderr  # no store yet; no teacher import


def test_an_onnx_teachers_usual_mistakes_are_one_line_before_any_image_is_read(tmp_path, digits, capsys) -> None:
    """The graph passed where its mapping belongs, a mapping naming a tensor the graph lacks, and views larger than
    a fixed graph input: each stops `mtpd-cache build` with one line, before a store or shard is written."""
    from conftest import build_args

    from mtpd.cli.cache import main as cache_main

    torch.manual_seed(0)
    model = build_arch("retinanet_tiny", 10).eval()
    fpn = export(model, tmp_path / "fixed.onnx", size=(64, 96))
    ann, images = digits["train"]["ann"], digits["train"]["images"]

    def build(teacher: str, *extra: str) -> str:
        args = build_args(ann, images, "--workers", "0", "--out", str(tmp_path / "store"), *extra)
        args[args.index("retinanet_tiny")] = teacher
        assert cache_main(args) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "Traceback" not in err, err
        assert not (tmp_path / "store").exists()
        return err

    assert "fixed.onnx is the graph itself, but onnx: names a mapping file" in build(f"onnx:{tmp_path / 'fixed.onnx'}")
    missing = mapping(tmp_path / "missing.yaml", "fixed.onnx", [*fpn[:-1], "no_such_tensor"])
    assert "no_such_tensor" in build(f"onnx:{missing}")
    fixed = mapping(tmp_path / "fixed.yaml", "fixed.onnx", fpn)
    err = build(f"onnx:{fixed}", "--short", "128", "--long", "128")
    assert "views up to 128x128 (padded to 32) do not fit the graph's fixed input 64x96" in err
    assert "--short 64 --long 96" in err
    # without --short/--long, a fixed graph input is the views' size
    args = ["build", "--teacher", f"onnx:{fixed}", "--ann", ann, "--images", images, "--workers", "0", "--no-progress"]
    assert cache_main([*args, "--out", str(tmp_path / "store")]) == 0, capsys.readouterr().err
    from mtpd.cache.store import store_header

    views = store_header(str(tmp_path / "store")).views
    assert (views["short"], views["long"]) == (64, 96)
