"""An ONNX teacher's mapping file, read without loading the graph (``--teacher onnx:MAPPING.yaml``).

A leaf, so that the cache's catalog can name an ONNX teacher's stores (by the resolved mapping path and the
graph file) in a training process that never imports a teacher; ``mtpd.teachers.onnx_adapter`` runs the graph.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from mtpd.errors import MtpdError


class MappingError(MtpdError, ValueError):
    """A mapping file that cannot be read; the message names the file and what is wrong."""


GRAPH_GIVEN = (
    "{path} is the graph itself, but onnx: names a mapping file: a YAML file beside it whose model: names the "
    "graph and whose outputs: name its FPN tensors per level (see mtpd.teachers.onnx_adapter's docstring)"
)


def read_mapping(path: Path) -> dict:
    if path.suffix.lower() == ".onnx":  # the natural first try: the graph where its mapping belongs
        raise MappingError(GRAPH_GIVEN.format(path=path))
    try:
        m = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise MappingError(f"onnx teacher: mapping file {path} not found") from None
    except UnicodeDecodeError:
        raise MappingError(GRAPH_GIVEN.format(path=path).replace("is the graph itself", "is not text")) from None
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
