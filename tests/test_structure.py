"""The package's shape, as docs/design.md draws it: no import cycles, arrows one way, small functions and modules.

    cli -> study, demo -> export -> trainer, cache -> teachers -> models, data
        -> errors, checkpoint, output_spec, factory, defaults

The trainer never imports teachers (no teacher is built while a student trains; the
online baseline receives its teachers from the caller), and nothing imports the CLI.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "mtpd"

# What each part may import besides itself.
LEAVES = {"errors", "checkpoint", "output_spec", "factory", "defaults", "onnx_mapping", "__init__"}
ALLOWED = {
    "leaf": set(),
    "data": {"leaf"},
    "models": {"leaf"},
    "teachers": {"leaf", "data", "models"},
    "cache": {"leaf", "data", "models", "teachers"},
    # evaluation: plain views and COCO AP, for training, export and the CLI alike
    "eval": {"leaf", "data", "models"},
    "trainer": {"leaf", "data", "models", "cache", "eval"},
    # a finished student leaves through export: it runs evaluation, never the trainer, a teacher or a store
    "export": {"leaf", "data", "models", "eval"},
    "demo": {"leaf", "data", "models", "teachers", "cache", "eval", "trainer", "export"},
    # a study is a client like the demo: it builds stores and trains students through their side-by-side jobs
    "study": {"leaf", "data", "models", "teachers", "cache", "eval", "trainer", "demo"},
    "cli": {"leaf", "data", "models", "teachers", "cache", "eval", "trainer", "demo", "export", "study"},
}


def modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = f.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def part(module: str) -> str:
    pieces = module.split(".")
    if len(pieces) == 1 or (len(pieces) == 2 and pieces[1] in LEAVES):
        return "leaf"
    return pieces[1]


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """mtpd modules ``name`` imports anywhere in its body (function-level imports count too)."""
    out: set[str] = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            cands = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            cands = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out |= {c for c in cands if c in known and c != name}
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_no_import_cycles() -> None:
    edges = graph()
    # A package's __init__ re-exporting its own children is not a cycle of interest.
    edges = {
        m: {d for d in ds if not (m.startswith(d + ".") and (PKG.parent / d.replace(".", "/")).is_dir())}
        for m, ds in edges.items()
    }
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(edges[m]):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d) :] + [d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_imports_follow_the_layers() -> None:
    wrong = []
    for m, deps in sorted(graph().items()):
        src = part(m)
        for d in sorted(deps):
            dst = part(d)
            if dst != src and dst not in ALLOWED[src]:
                wrong.append(f"{m} imports {d} ({src} -> {dst})")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_functions_and_modules_stay_small() -> None:
    too_long = []
    for name, path in sorted(modules().items()):
        text = path.read_text()
        if len(text.splitlines()) > 400:
            too_long.append(f"{path.relative_to(PKG.parent)}: {len(text.splitlines())} lines (> 400)")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 60:
                    too_long.append(f"{path.relative_to(PKG.parent)}:{node.lineno} {node.name}: {n} lines (> 60)")
    assert not too_long, "\n".join(too_long)


def test_the_checker_sees_a_cycle_and_a_wrong_arrow(tmp_path, monkeypatch) -> None:
    """The checks above can fail: a made-up package with a cycle and a trainer -> teachers import."""
    pkg = tmp_path / "mtpd"
    for rel, body in {
        "__init__.py": "",
        "trainer/__init__.py": "",
        "trainer/a.py": "from mtpd.trainer import b\nfrom mtpd.teachers import t\n",
        "trainer/b.py": "def f():\n    from mtpd.trainer import a\n",
        "teachers/__init__.py": "",
        "teachers/t.py": "",
    }.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(body)
    monkeypatch.setattr(__import__(__name__), "PKG", pkg)
    edges = graph()
    assert "mtpd.trainer.b" in edges["mtpd.trainer.a"] and "mtpd.trainer.a" in edges["mtpd.trainer.b"]
    try:
        test_imports_follow_the_layers()
    except AssertionError as e:
        assert "mtpd.trainer.a imports mtpd.teachers.t (trainer -> teachers)" in str(e)
    else:
        raise AssertionError("the layering check missed trainer -> teachers")
    try:
        test_no_import_cycles()
    except AssertionError as e:
        assert "mtpd.trainer.a -> mtpd.trainer.b -> mtpd.trainer.a" in str(e)
    else:
        raise AssertionError("the cycle check missed a -> b -> a")


def family_branches(path: Path, families: set[str], detector_classes: set[str], root: Path = PKG.parent) -> list[str]:
    """Places in ``path`` that branch on a detector family: a comparison with a family name (``family ==
    "fcos"``, ``family in ("fasterrcnn", "maskrcnn")``), a dict keyed by family names, or an ``isinstance``
    test against a torchvision detector class."""
    found = []

    def names_in(node: ast.AST) -> set[str]:
        return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and n.value in families}

    for node in ast.walk(ast.parse(path.read_text())):
        hit = ""
        if isinstance(node, ast.Compare) and names_in(node):
            hit = f"compares with {sorted(names_in(node))}"
        elif isinstance(node, ast.Dict) and {k.value for k in node.keys if isinstance(k, ast.Constant)} & families:
            hit = "a dict keyed by family names"
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("isinstance", "issubclass"):
            used = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)} if len(node.args) > 1 else set()
            if used & detector_classes:
                hit = f"isinstance against {sorted(used & detector_classes)}"
        if hit:
            found.append(f"{path.relative_to(root)}:{node.lineno} {hit}")
    return found


def test_only_the_adapters_branch_on_a_family_name() -> None:
    """What differs between detector families lives in that family's adapter (mtpd/models/adapters)."""
    from mtpd.models.adapters import ADAPTERS

    families = {a.family for a in ADAPTERS}
    classes = {a.model_type.__name__ for a in ADAPTERS}
    adapters = PKG / "models" / "adapters"
    wrong = [
        hit
        for path in sorted(PKG.rglob("*.py"))
        if adapters not in path.parents
        for hit in family_branches(path, families, classes)
    ]
    assert not wrong, "family branches outside mtpd/models/adapters:\n" + "\n".join(wrong)


def test_the_family_check_can_fail(tmp_path) -> None:
    bad = tmp_path / "mtpd" / "m.py"
    bad.parent.mkdir()
    bad.write_text(
        "def f(family, model):\n"
        "    if family in ('fasterrcnn', 'maskrcnn'):\n"
        "        return 1\n"
        "    names = {'retinanet': 'RetinaNet'}\n"
        "    return isinstance(model, (RetinaNet, FCOS))\n"
    )
    hits = family_branches(bad, {"fasterrcnn", "maskrcnn", "retinanet"}, {"RetinaNet", "FCOS"}, tmp_path)
    assert [h.split(" ", 1)[0].rsplit(":", 1)[1] for h in hits] == ["2", "4", "5"], hits


# A detector state dict's key (``head.classification_head.cls_logits.weight``, ``roi_heads.``, mmdet's
# ``bbox_head.``): what a family names its parameters is the family's adapter's to know.
STATE_KEY = re.compile(
    r"^(head|backbone|roi_heads|rpn|neck|bbox_head)\.(\w|$)|classification_head\.|regression_head\.|cls_logits|"
    r"box_predictor|bbox_reg\b"
)


def state_dict_keys(path: Path, root: Path = PKG.parent) -> list[str]:
    """String literals in ``path`` that name detector state-dict keys (docstrings and messages aside: a literal
    of a line or more is prose)."""
    tree = ast.parse(path.read_text())
    return [
        f"{path.relative_to(root)}:{node.lineno} {node.value!r}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and len(node.value) < 80
        and STATE_KEY.search(node.value)
    ]  # fmt: skip


def test_only_the_adapters_name_state_dict_keys() -> None:
    """Class counts read off a checkpoint, the prefixes weight inheritance copies, other frameworks' key maps:
    a family's adapter says them (``classes_in_state``, ``parts``, ``import_state``)."""
    adapters = PKG / "models" / "adapters"
    wrong = [hit for path in sorted(PKG.rglob("*.py")) if adapters not in path.parents for hit in state_dict_keys(path)]
    assert not wrong, "state-dict keys outside mtpd/models/adapters:\n" + "\n".join(wrong)


def test_the_state_dict_key_check_can_fail(tmp_path) -> None:
    bad = tmp_path / "mtpd" / "m.py"
    bad.parent.mkdir()
    bad.write_text(
        '"""Reads head.classification_head.cls_logits.weight, in a docstring long enough to be prose, not a key."""\n'
        "PARTS = {'neck': ('backbone.fpn.',), 'head': ('head.', 'roi_heads.')}\n"
        "def f(sd):\n"
        "    return sd.get('head.classification_head.cls_logits.weight')\n"
    )
    hits = state_dict_keys(bad, tmp_path)
    assert [h.split(" ", 1)[0].rsplit(":", 1)[1] for h in hits] == ["2", "2", "2", "4"], hits


def test_export_loads_neither_the_trainer_nor_a_store_reader() -> None:
    """``OnnxDetector`` needs only the .onnx file: importing the export runtime in a fresh process loads no zarr, no
    trainer and no cache module."""
    import subprocess
    import sys

    code = (
        "import sys, mtpd.export.runtime; "
        "print(sorted(m for m in sys.modules if m == 'zarr' or m.startswith(('mtpd.trainer', 'mtpd.cache'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
