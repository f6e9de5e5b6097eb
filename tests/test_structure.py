"""The package's shape, as DESIGN.md draws it: no import cycles, arrows one way, small functions and modules.

    cli, demo -> export -> trainer, cache -> teachers -> models, data
        -> errors, checkpoint, output_spec, factory, defaults

The trainer never imports teachers (no teacher is built while a student trains; the
online baseline receives its teachers from the caller), and nothing imports the CLI.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "mtpd"

# What each part may import besides itself.
LEAVES = {"errors", "checkpoint", "output_spec", "factory", "defaults", "__init__"}
ALLOWED = {
    "leaf": set(),
    "data": {"leaf"},
    "models": {"leaf"},
    "teachers": {"leaf", "data", "models"},
    "cache": {"leaf", "data", "models", "teachers"},
    "trainer": {"leaf", "data", "models", "cache"},
    # a finished student leaves through export: it runs the trainer's evaluation, never a teacher or a store
    "export": {"leaf", "data", "models", "trainer"},
    "demo": {"leaf", "data", "models", "teachers", "cache", "trainer", "export"},
    "cli": {"leaf", "data", "models", "teachers", "cache", "trainer", "demo", "export"},
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
