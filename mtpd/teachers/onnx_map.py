"""A draft mapping file for an ONNX graph (``mtpd-cache onnx-map GRAPH.onnx``), in ``onnx_adapter``'s format.

The graph runs once in ONNX Runtime on a blank input with every intermediate tensor made an output; each
[B, C, h, w] tensor whose grid is a level's (h = ceil(H / 2**level), w likewise) is listed under that level.
What is guessed, and left for the draft's comments to ask the user to check:

- the heads are each level's last such tensors (no tensor of any level follows them); one that a Sigmoid or
  Softmax made is replaced by that op's input, the logits; otherwise the widest head is the class map, a head of
  one channel an objectness map, and a head whose channels divide by 4 the box regression;
- the neck's map (``fpn``) is where a level's heads begin. Walking back from each level's heads through the
  tensors that every path to them passes through (their dominators), the levels' heads are alike op for op;
  the walk stops where the levels differ (an FPN's top level merges no upsampled map) or leave their own
  level. The earliest tensor the levels agree on, at its own level and of equal channels, is the neck's map.

Input colour order and normalisation cannot be read from a graph: the draft says so beside them.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mtpd.teachers.base import TeacherError

OUTPUT_NAMES = {"feature": "fpn", "logits": "cls", "deltas": "box", "objectness": "obj"}


@dataclass
class Draft:
    """What ``draft_mapping`` found: the input, the grid tensors by level and the guessed outputs."""

    graph: Path
    input_name: str
    size: tuple[int, int]
    fixed: bool  # the graph's input is fixed at ``size``
    tensors: dict[int, list[tuple[str, tuple[int, ...], str]]]  # level -> (name, shape, guessed kind), graph order
    outputs: dict[str, dict] = field(default_factory=dict)  # name -> {"kind", "channels", "levels": {lvl: tensor}}


def load_graph(path: str | Path):
    """The graph's ModelProto, or one line saying what the file is instead."""
    import onnx

    p = Path(path).expanduser()
    if p.suffix.lower() in (".yaml", ".yml"):
        raise TeacherError(f"{p}: a mapping file already; onnx-map takes the graph (.onnx) it would name")
    if not p.is_file():
        raise TeacherError(f"{p}: graph file not found")
    try:
        return onnx.load(str(p))
    except Exception as e:  # protobuf's DecodeError and friends: not an ONNX file
        raise TeacherError(f"{p}: not an ONNX graph (onnx.load: {type(e).__name__})") from None


def _image_input(model, path: Path, given: tuple[int, int] | None) -> tuple[str, tuple[int, int], bool, int]:
    """(input name, the size to lay tensors out for, whether the graph fixes it, the input's element type)."""
    weights = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in weights]
    if len(inputs) != 1:
        raise TeacherError(
            f"{path}: the graph has {len(inputs)} inputs ({[i.name for i in inputs]}); an mtpd teacher takes one "
            "image: export the graph with the image as its only input"
        )
    inp = inputs[0]
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
    if len(dims) != 4 or dims[1] not in (None, 3):
        raise TeacherError(f"{path}: graph input {inp.name!r} is {dims}; an image input is [B, 3, H, W] (NCHW)")
    fixed = tuple(dims[2:])
    if all(fixed):
        if given is not None and given != fixed:
            raise TeacherError(
                f"{path}: --size {given[0]} {given[1]}, but the graph's input is fixed at {fixed[0]}x{fixed[1]}: "
                "leave --size out"
            )
        return inp.name, fixed, True, inp.type.tensor_type.elem_type  # type: ignore[return-value]
    if given is None:
        raise TeacherError(
            f"{path}: graph input {inp.name!r} is {dims}, not a fixed size: give the size to draft for, e.g. "
            "--size 640 640 (one it was trained at)"
        )
    if any(f is not None and f != g for f, g in zip(fixed, given)):
        raise TeacherError(f"{path}: --size {given[0]} {given[1]} disagrees with the graph's input {dims}")
    return inp.name, given, any(fixed), inp.type.tensor_type.elem_type


def _probe(model, input_name: str, size: tuple[int, int], elem_type: int) -> dict[str, tuple[int, ...]]:
    """Every node output's shape, from one run of the graph on zeros with all of them made outputs."""
    import onnx
    import onnxruntime as ort

    have = {o.name for o in model.graph.output}
    extra = [o for n in model.graph.node for o in n.output if o and o not in have]
    model.graph.output.extend([onnx.ValueInfoProto(name=n) for n in extra])
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor as it is named
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        x = np.zeros((1, 3, *size), onnx.helper.tensor_dtype_to_np_dtype(elem_type))
        values = session.run(names, {input_name: x})
    except Exception as e:  # onnxruntime's own errors: the graph cannot run at this size
        msg = " ".join(str(e).split())[:200]
        raise TeacherError(f"onnx-map: the graph does not run on a blank {size[0]}x{size[1]} input: {msg}") from None
    return {n: tuple(np.shape(v)) for n, v in zip(names, values)}


def _grids(size: tuple[int, int]) -> dict[tuple[int, int], int]:
    """Grid (h, w) -> level, for levels 1..7 whose grids differ (a 1x1 grid belongs to the first level that has it)."""
    out: dict[tuple[int, int], int] = {}
    for lvl in range(1, 8):
        out.setdefault((math.ceil(size[0] / 2**lvl), math.ceil(size[1] / 2**lvl)), lvl)
    return out


class _Graph:
    """The node order, levels and dominator tree of the tensors reachable from the image input."""

    def __init__(self, model, input_name: str, shapes: dict[str, tuple[int, ...]], size: tuple[int, int]) -> None:
        self.nodes = list(model.graph.node)
        self.order, self.op = {input_name: -1}, {input_name: "input"}
        self.shape = shapes
        grids = _grids(size)
        self.level: dict[str, int] = {}
        # A tensor's immediate dominator: the meet of its node's inputs in the tree (nodes come in graph order).
        self.idom: dict[str, str | None] = {input_name: None}
        self.depth = {input_name: 0}
        for k, node in enumerate(self.nodes):
            ins = [i for i in node.input if i in self.idom]
            if not ins:
                continue  # constants and shape arithmetic on them: not the image's
            d = functools.reduce(self.meet, ins)
            for o in filter(None, node.output):
                self.order[o], self.op[o], self.idom[o], self.depth[o] = k, node.op_type, d, self.depth[d] + 1
                s = shapes.get(o, ())
                if len(s) == 4 and tuple(s[2:]) in grids:
                    self.level[o] = grids[tuple(s[2:])]
        self.after = self._followed()
        self.scores: set[str] = set()  # a Sigmoid's or Softmax's output at the end of a head: not a kind to map

    def meet(self, a: str, b: str) -> str:
        """The latest tensor that every path from the input to ``a`` and to ``b`` passes through."""
        while a != b:
            a, b = (a, b) if self.depth[a] >= self.depth[b] else (b, a)
            a = self.idom[a]  # type: ignore[assignment]  # the input, at depth 0, ends every walk
        return a

    def _followed(self) -> dict[str, bool]:
        """Whether a tensor of some level follows each tensor (walked in reverse graph order)."""
        after: dict[str, bool] = {}
        for node in reversed(self.nodes):
            hit = any(o in self.level or after.get(o, False) for o in node.output if o)
            for i in node.input:
                after[i] = after.get(i, False) or hit
        return after

    def channels(self, t: str) -> int:
        return int(self.shape[t][1])

    def heads(self) -> dict[int, dict[str, str]]:
        """Level -> {head tensor: guessed kind}, each level's last grid tensors (see the module docstring)."""
        found: dict[int, list[tuple[str, str | None]]] = {}
        producer = {o: n for n in self.nodes for o in n.output if o}
        for t in sorted(self.level, key=self.order.__getitem__):
            if self.after.get(t, False):
                continue
            n = producer[t]
            if n.op_type in ("Sigmoid", "Softmax") and self.level.get(n.input[0]) == self.level[t]:
                found.setdefault(self.level[t], []).append((n.input[0], "logits"))
                self.scores.add(t)
            else:
                found.setdefault(self.level[t], []).append((t, None))
        return {lvl: self._kinds(hs) for lvl, hs in found.items()}

    def _kinds(self, heads: list[tuple[str, str | None]]) -> dict[str, str]:
        kinds = {t: k for t, k in heads if k}
        kinds.update({t: "objectness" for t, k in heads if not k and self.channels(t) == 1})
        rest = [t for t, _ in heads if t not in kinds]
        if rest and "logits" not in kinds.values():
            widest = max(rest, key=self.channels)
            kinds[widest] = "logits"
            rest.remove(widest)
        kinds.update({t: "deltas" if self.channels(t) % 4 == 0 else "logits" for t in rest})
        return kinds

    def neck(self, heads: dict[int, dict[str, str]]) -> dict[int, str]:
        """Level -> the neck's map where that level's heads begin (see the module docstring)."""
        chains: dict[int, list[str]] = {}
        for lvl, hs in heads.items():
            t: str | None = functools.reduce(self.meet, hs)
            chains[lvl] = []
            while t is not None:  # up the dominator tree: latest first
                if t not in hs:
                    chains[lvl].append(t)
                t = self.idom[t]
        best: dict[int, str] = {}
        if len(chains) >= 2:
            for row in zip(*chains.values()):
                at = dict(zip(chains, row))
                if len({self.op[t] for t in row}) != 1 or any(self.level.get(t, lvl) != lvl for lvl, t in at.items()):
                    break  # the levels' paths differ here, or one left its own level
                if all(self.level.get(t) == lvl for lvl, t in at.items()) and len(set(map(self.channels, row))) == 1:
                    best = at
        if best:
            return best
        # one level, or levels alike nowhere: the tensor nearest the heads that all of them pass through
        near = {lvl: next((t for t in chain if self.level.get(t) == lvl), None) for lvl, chain in chains.items()}
        return {lvl: t for lvl, t in near.items() if t is not None}


def _outputs(g: _Graph, heads: dict[int, dict[str, str]], neck: dict[int, str]) -> dict[str, dict]:
    """The guessed outputs: the neck's maps, then each head kind and width found at one or more levels."""
    groups: dict[tuple[str, int], dict[int, str]] = {}
    if neck:
        groups[("feature", -1)] = dict(sorted(neck.items()))
    for lvl, hs in sorted(heads.items()):
        for t, kind in hs.items():
            groups.setdefault((kind, g.channels(t)), {})[lvl] = t
    out: dict[str, dict] = {}
    rank = list(OUTPUT_NAMES)
    for (kind, _), levels in sorted(groups.items(), key=lambda kv: (rank.index(kv[0][0]), -kv[0][1])):
        name, n = OUTPUT_NAMES[kind], 2
        while name in out:
            name, n = f"{OUTPUT_NAMES[kind]}{n}", n + 1
        out[name] = {"kind": kind, "channels": g.channels(next(iter(levels.values()))), "levels": levels}
    return out


def draft_mapping(graph: str | Path, size: tuple[int, int] | None = None) -> Draft:
    """The tensors of ``graph`` by level for an input of ``size`` (default: the graph's fixed input size) and the
    outputs a mapping would most likely name; ``render`` writes it as a mapping file."""
    path = Path(graph).expanduser().resolve()
    model = load_graph(path)
    name, hw, fixed, elem = _image_input(model, path, size)
    g = _Graph(model, name, _probe(model, name, hw, elem), hw)
    if not g.level:
        raise TeacherError(
            f"{path}: no [B, C, h, w] tensor on any level's grid of a {hw[0]}x{hw[1]} input (h = ceil(H / 2**level)); "
            "mtpd reads NCHW or flat maps: a channels-last graph needs its maps transposed in the export"
        )
    heads = g.heads()
    outputs = _outputs(g, heads, g.neck(heads))
    chosen = {t: o for o, spec in outputs.items() for t in spec["levels"].values()}
    guess = {t: k for hs in heads.values() for t, k in hs.items()}
    tensors: dict[int, list[tuple[str, tuple[int, ...], str]]] = {}
    for t in sorted(g.level, key=g.order.__getitem__):
        kind = "scores (of the logits)" if t in g.scores else guess.get(t, "feature")
        kind += f" <- {chosen[t]}" if t in chosen else ""
        tensors.setdefault(g.level[t], []).append((t, g.shape[t], kind))
    return Draft(path, name, hw, fixed, dict(sorted(tensors.items())), outputs)


def _levels(levels: dict[int, str]) -> str:
    return "{" + ", ".join(f"{lvl}: {json.dumps(t)}" for lvl, t in sorted(levels.items())) + "}"


EDITS = {
    "feature": "EDIT: the neck's maps, one per level (guessed: where each level's heads begin)",
    "logits": "EDIT: class logits, before any sigmoid (guessed: a Sigmoid's input, else the widest head)",
    "deltas": "EDIT: box regression (guessed: a head whose channels divide by 4)",
    "objectness": "EDIT: objectness or centerness logits (guessed: a head of one channel)",
}


def _anchors(outputs: dict[str, dict]) -> int:
    """Anchors per cell, guessed from the box and class widths: 4 per anchor when that gives a usual anchor count
    (3, 6 or 9) that divides the class map; else 1 (anchor-free, or box bins per side as GFL's and YOLOv8's)."""
    box = next((o["channels"] for o in outputs.values() if o["kind"] == "deltas"), 4)
    cls = next((o["channels"] for o in outputs.values() if o["kind"] == "logits"), 1)
    a = box // 4
    return a if box % 4 == 0 and a in (3, 6, 9) and cls % a == 0 else 1


def _output_lines(name: str, o: dict, anchors: int) -> list[str]:
    lines = [f"  {name}:  # {EDITS[o['kind']]}", f"    kind: {o['kind']}"]
    c = o["channels"]
    if o["kind"] == "logits":
        lines.append(f"    num_classes: {c // anchors}  # EDIT: {c} channels = num_anchors x num_classes")
    if o["kind"] == "deltas":
        lines += [
            "    # EDIT: how a flipped view's box channels follow: negate_dx for (dx, dy, dw, dh) anchor deltas,",
            "    # swap_lr for (l, t, r, b) distances or bins; none: never mirrored (build with --views orig,hflip)",
            "    mirror: none",
        ]
    if o["kind"] != "feature":
        lines.append(f"    num_anchors: {anchors}  # EDIT: anchors per cell (1 for anchor-free heads)")
    return [*lines, f"    levels: {_levels(o['levels'])}"]


def render(draft: Draft, base: Path) -> str:
    """The draft as a mapping file that will sit in folder ``base`` (``model:`` is relative to it), with comments
    saying what to check; it loads as it is."""
    h, w = draft.size
    model = os.path.relpath(draft.graph, base.resolve())
    size = (
        f"  size: [{h}, {w}]  # the graph's fixed input: views are padded to it (the default --short/--long)"
        if draft.fixed
        else f"  # size: [H, W]  # only for a graph with a fixed input; this one takes any size (drafted at {h}x{w})"
    )
    lines = [
        f"# A draft mapping for {draft.graph.name}, by `mtpd-cache onnx-map` from one run of the graph on a blank "
        f"{h}x{w} input.",
        "# It loads as it is, but its outputs and input are guesses: check each line marked EDIT (the candidates are",
        "# listed at the end), then build with --teacher onnx:THIS_FILE (docs/teachers.md describes the format).",
        f"model: {json.dumps(model)}  # the graph, relative to this file",
        "input:",
        f"  name: {json.dumps(draft.input_name)}",
        "  color: rgb  # EDIT: bgr if the graph was trained on BGR pixels (OpenCV pipelines: mmdet, NanoDet, Caffe)",
        "  mean: [0.0, 0.0, 0.0]  # EDIT: the graph's own normalisation, on 0-255 pixels in its channel order",
        "  std: [1.0, 1.0, 1.0]  # EDIT: e.g. ImageNet's in RGB: mean [123.675, 116.28, 103.53], std [58.395, 57.12, "
        "57.375]",
        size,
        "outputs:",
    ]
    anchors = _anchors(draft.outputs)
    for name, o in draft.outputs.items():
        lines += _output_lines(name, o, anchors)
    lines += [
        "",
        f"# Every [B, C, h, w] tensor on a level's grid of a {h}x{w} input, by level in graph order, with a guess of",
        "# its kind (<- the output above that names it). Any of them can go in levels: above; an output of any name",
        "# and kind (feature, logits, deltas, objectness) can be added; drop the outputs a stage will not read.",
    ]
    for lvl, ts in draft.tensors.items():
        gh, gw = ts[0][1][2:]
        lines.append(f"# level {lvl} (stride {2**lvl}, {gh}x{gw}):")
        lines += [f"#   {json.dumps(t)}  {list(s)}  {kind}" for t, s, kind in ts]
    return "\n".join(lines) + "\n"
