"""An ONNX teacher's mapping file, read without running the graph (``--teacher onnx:MAPPING.yaml``).

A leaf, so that the cache's catalog can name an ONNX teacher's stores (by the resolved mapping path and the
graph file), and a plan take a fixed graph's input size as its views, in a training process that never imports a
teacher; ``mtpd.teachers.onnx_adapter`` runs the graph, ``mtpd.teachers.onnx_map`` drafts a mapping for one.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from mtpd.errors import MtpdError


class MappingError(MtpdError, ValueError):
    """A mapping file that cannot be read; the message names the file and what is wrong."""


def _mapping_beside(graph: Path) -> Path | None:
    """A YAML file beside ``graph`` whose ``model:`` is that graph: the mapping the user meant."""
    for cand in sorted([*graph.parent.glob("*.yaml"), *graph.parent.glob("*.yml")]):
        try:
            m = yaml.safe_load(cand.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        if isinstance(m, dict) and (graph.parent / str(m.get("model", ""))).resolve() == graph.resolve():
            return cand
    return None


def graph_given(path: Path, what: str = "the graph itself") -> str:
    """One line for the natural first try, the graph where its mapping belongs, naming the fix."""
    beside = _mapping_beside(path) if path.is_file() else None
    fix = f"the mapping beside it names this graph: --teacher onnx:{beside}; or " if beside else "write one, or "
    return (
        f"{path} is {what}, but onnx: names a mapping file (YAML: the graph's file and which of its tensors are each "
        f"output and level; docs/teachers.md); {fix}draft one with: mtpd-cache onnx-map {path} "
        f"--out {path.with_suffix('.yaml')}"
    )


def read_mapping(path: Path) -> dict:
    if path.suffix.lower() == ".onnx":  # the natural first try: the graph where its mapping belongs
        raise MappingError(graph_given(path))
    try:
        m = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise MappingError(f"onnx teacher: mapping file {path} not found") from None
    except UnicodeDecodeError:
        raise MappingError(graph_given(path, "not text (a graph?)")) from None
    except yaml.YAMLError as e:
        raise MappingError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(m, dict) or "model" not in m or not isinstance(m.get("outputs"), dict) or not m["outputs"]:
        raise MappingError(f"{path}: a mapping needs 'model' (the .onnx file) and 'outputs' (name -> levels)")
    unknown = sorted(set(m) - {"model", "input", "outputs"})
    if unknown:
        raise MappingError(f"{path}.{unknown[0]}: unknown key; allowed: model, input, outputs")
    return m


def onnx_reference(mapping: str | Path) -> tuple[str, Path]:
    """(the identity name, the graph file) an ONNX teacher records in its stores, from the mapping file alone:
    what a plan's ``teacher: {name: onnx:...}`` is looked up by."""
    path = Path(mapping).expanduser().resolve()
    return f"onnx:{path}", (path.parent / str(read_mapping(path)["model"])).resolve()


def fixed_input_size(mapping: str | Path) -> tuple[int, int] | None:
    """The (H, W) an ONNX teacher's graph is fixed at (the mapping's ``input.size``, else the graph input's own
    shape when both sides are fixed), or None: what views default to when none are given. Reads the graph's
    structure only (no weights, no runtime); the adapter checks the two agree when it builds the teacher."""
    path = Path(mapping).expanduser().resolve()
    m = read_mapping(path)
    inp = m.get("input") or {}
    if inp.get("size"):
        h, w = (int(v) for v in inp["size"])
        return h, w
    graph = path.parent / str(m["model"])
    if not graph.is_file():
        return None  # the adapter (or the catalog) names the missing graph
    import onnx

    try:
        g = onnx.load(str(graph), load_external_data=False).graph
    except Exception as e:  # protobuf's DecodeError and friends
        raise MappingError(f"{path}: model {graph} is not an ONNX graph (onnx.load: {type(e).__name__})") from None
    weights = {t.name for t in g.initializer}
    inputs = [i for i in g.input if i.name not in weights and (not inp.get("name") or i.name == inp["name"])]
    if len(inputs) != 1:
        return None
    dims = [d.dim_value if d.HasField("dim_value") else 0 for d in inputs[0].type.tensor_type.shape.dim]
    return (dims[2], dims[3]) if len(dims) == 4 and dims[2] > 0 and dims[3] > 0 else None
