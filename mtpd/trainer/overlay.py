"""Changes to a plan by path: ``mtpd-train --set stages.*.epochs=1`` and a study's rows (``mtpd.study``).

A key is a dotted path into the plan's YAML (``data.flip``, ``stages.0.epochs``, ``stages.*.teacher.precision``);
``*`` is every element of a list, and under it an element whose section on the path is unset is left alone
(``stages.*.teacher.precision`` skips undistilled stages) while a named one starts it. A mapping value merges into
the mapping at its path; any other value (a list included) replaces it.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from mtpd.trainer.fields import PlanError


def overlay(plan: dict, changes: dict[str, Any], where: str = "--set") -> dict:
    """``plan`` (a plan's YAML as a dict) with ``changes`` applied, as a deep copy; an error names ``where`` the
    changes came from, then the key."""
    out = copy.deepcopy(plan)
    for key, value in changes.items():
        path = str(key).split(".")
        _set(out, path, copy.deepcopy(value), where, path)
    return out


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings as overlay changes; VALUE is read as YAML (``1``, ``true``, ``[0.75, 1.33]``,
    ``{scale: [0.75, 1.33], bank: 0}``), so it has the type the plan file would give it."""
    changes: dict[str, Any] = {}
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise PlanError(f"--set {item!r}: give KEY=VALUE, e.g. --set stages.*.epochs=1 or --set data.batch_size=4")
        try:
            changes[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise PlanError(f"--set {item!r}: the value is not valid YAML ({' '.join(str(e).split())})") from None
    return changes


def _set(node: Any, path: list[str], value: Any, where: str, full: list[str], every: bool = False) -> None:
    head, rest = path[0], path[1:]
    if isinstance(node, list):
        if head == "*":
            keys = range(len(node))
        elif head.lstrip("-").isdigit() and -len(node) <= int(head) < len(node):
            keys = [int(head)]
        else:
            raise PlanError(f"{where}: {'.'.join(full)}: {head!r} is not an index of a list of {len(node)}, nor *")
    elif isinstance(node, dict):
        keys = [head]
    else:
        raise PlanError(f"{where}: {'.'.join(full)}: {head!r} goes below a value that is not a mapping or list")
    every = every or head == "*"
    for k in keys:
        if rest:
            child = node[k] if not isinstance(node, dict) else node.get(k)
            if child is None and every:
                continue
            if child is None:  # an unset optional section (e.g. a stage's teacher): start one
                child = node[k] = {}
            _set(child, rest, value, where, full, every)
        elif isinstance(value, dict) and isinstance(node[k] if isinstance(node, list) else node.get(k), dict):
            node[k] = _merge(node[k], value)
        else:
            node[k] = value


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
