"""A study file: a base plan, rows as overlays on it, seeds, pairs and decision rules.

A study answers "which choice pays on my data" the way a result should be measured: every row trains the same
student from the same stores once per seed, and rows are compared by the per-seed differences (paired by seed),
never by one run each. The file says only what differs between rows::

    plan: student.yaml                      # the base plan (relative paths: relative to this file)
    seeds: [0, 1, 2, 3, 4]
    rows:
      baseline: {stages.*.losses: []}       # a dotted key sets one path; `*` is every list element
      small: {stages.*.teacher.precision: small}
      lossless: {stages.*.teacher.precision: lossless}
      online: {online: true}                # the stages' teachers run live in every step (the reference)
    refs: [baseline]                        # every row is paired with each of these
    pairs: [[small, lossless]]              # and these pairs besides
    rules:                                  # decisions as data, printed as verdicts
      - {name: precision, ref: lossless, rows: [small], mean_at_least: -0.5, low_above: -1.0, pick: smallest}

A row is a mapping of overlays on the base plan: a key is a path (``data.flip``, ``stages.0.epochs``,
``stages.*.teacher.precision``); a mapping merges into the mapping at its path, any other value (a list
included) replaces it. Three keys belong to the study, not the plan: ``online``, ``note`` and ``splits`` (the
splits a row runs in when ``--rows`` does not say: ``[dev]`` for a candidate the dev study rules out). Top-level
keys starting with ``x-`` are ignored: YAML anchors for stages that several rows share live there.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mtpd.checkpoint import sha256_file
from mtpd.errors import MtpdError
from mtpd.trainer.overlay import overlay as plan_overlay
from mtpd.trainer.plan import Plan, PlanError, _resolve_paths, from_dict, load_plan, plan_to_dict

ROW_KEYS = ("online", "note", "splits")  # a row's keys that are the study's, not overlays on the plan
PICKS = ("smallest", "first", "all")


class StudyError(MtpdError, ValueError):
    """A study file that cannot be run; the message names the key and what to do."""


@dataclass
class Rule:
    """A decision as data: among ``rows``, those whose paired difference to ``ref`` has a mean of at least
    ``mean_at_least`` AP and a 90 % interval whose lower end is above ``low_above`` AP pass; ``pick`` chooses
    among them (``smallest``: fewest store bytes per image; ``first``: the first passing in ``rows`` order;
    ``all``: list them), and ``ref`` itself when none passes."""

    name: str
    ref: str
    rows: list[str]
    mean_at_least: float = -0.5
    low_above: float = -1.0
    pick: str = "smallest"


@dataclass
class DevSplit:
    """Carve ``images`` images out of the base plan's train set as a dev set: ``--split dev`` trains on the rest
    and evaluates on them, so that choices are made before the val split is looked at. The images are the first
    by the hash (``digest``) of ``dev<seed>:<file name>``: the same on every machine, whatever the file's order.
    ``set``: overlays every row gets on the dev split (e.g. warm-up steps tied to the train set's size)."""

    images: int
    seed: int = 0
    digest: str = "sha256"
    set: dict = field(default_factory=dict)
    seeds: list[int] | None = None  # the dev study's seeds (default: the study's first)


@dataclass
class QuickConfig:
    """``--quick``: the study's plans on the first ``images`` train and val images, ``epochs`` per stage and the
    first seed only; it checks that a study runs, in minutes. Its numbers are not results."""

    images: int = 16
    epochs: int = 1
    warmup_iters: int = 2


@dataclass
class Row:
    name: str
    overlay: dict[str, Any]
    online: bool = False
    note: str = ""
    splits: tuple[str, ...] = ("val", "dev")


@dataclass
class Study:
    path: Path  # the study file
    plan: Path  # the base plan
    rows: dict[str, Row]
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    refs: list[str] = field(default_factory=list)
    pairs: list[tuple[str, ...]] = field(default_factory=list)  # (row, row) or (row, row, what the pair tests)
    rules: list[Rule] = field(default_factory=list)
    dev: DevSplit | None = None
    quick: QuickConfig = field(default_factory=QuickConfig)
    title: str = ""  # the report's heading (default: the study file's stem)
    out: Path | None = None  # working folder (default: <study file's folder>/<stem>_out)
    records: Path | None = None  # folder of the records, <stem>-<split>.json (default: <out>/<split>/record.json)

    @property
    def name(self) -> str:
        return self.title or self.path.stem

    def out_dir(self) -> Path:
        return self.out or self.path.parent / f"{self.path.stem}_out"

    def record_path(self, split: str) -> Path:
        """Where the finished runs of ``split`` are kept (a --quick run's never beside real records)."""
        if self.records is None or split.startswith("quick"):
            return self.out_dir() / split / "record.json"
        return self.records / f"{self.path.stem}-{split}.json"

    def base(self) -> Plan:
        """The base plan, loaded and checked like ``mtpd-train`` does (paths made absolute)."""
        return load_plan(self.plan)


def load_study(path: str | Path) -> Study:
    """Read and check a study file: every row, pair and rule names rows that exist, before anything trains."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StudyError(f"{p}: study file not found") from None
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise StudyError(f"{p}: not a valid YAML study file ({' '.join(str(e).split())})") from None
    if not isinstance(raw, dict):
        raise StudyError(f"{p}: a study file is a mapping with at least plan: and rows:")
    known = {"plan", "rows", "seeds", "refs", "pairs", "rules", "dev", "quick", "title", "out", "records"}
    unknown = sorted(repr(k) for k in raw if k not in known and not str(k).startswith("x-"))
    if unknown:
        raise StudyError(f"{p}: unknown key(s) {', '.join(unknown)}; a study has {', '.join(sorted(known))}")
    for key in ("plan", "rows"):
        if key not in raw:
            raise StudyError(f"{p}: {key}: missing; see `mtpd-study --help` for a study file's shape")
    if not isinstance(raw["rows"], dict) or not raw["rows"]:
        raise StudyError(f"{p}: rows: a mapping of row name -> overlay on the plan, with at least one row")
    rows = {}
    for name, body in raw["rows"].items():
        body = {} if body is None else body
        if not isinstance(body, dict):
            raise StudyError(f"{p}: rows.{name}: an overlay mapping (e.g. {{data.flip: false}}), got {body!r}")
        overlay = {k: v for k, v in body.items() if k not in ROW_KEYS}
        splits = body.get("splits", ["val", "dev"])
        if not isinstance(splits, list) or not set(splits) <= {"val", "dev"}:
            raise StudyError(f"{p}: rows.{name}.splits: a list of val and/or dev, got {splits!r}")
        rows[str(name)] = Row(
            str(name), overlay, bool(body.get("online", False)), str(body.get("note", "")), tuple(splits)
        )
    seeds = raw.get("seeds", [0, 1, 2, 3, 4])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise StudyError(f"{p}: seeds: a list of integers, got {seeds!r}")
    try:
        rules = [from_dict(Rule, r, f"rules[{i}]") for i, r in enumerate(raw.get("rules") or [])]
        dev = from_dict(DevSplit, raw["dev"], "dev") if raw.get("dev") else None
        quick = from_dict(QuickConfig, raw.get("quick") or {}, "quick")
    except PlanError as e:
        raise StudyError(f"{p}: {e}") from None
    pairs = [tuple(x) for x in raw.get("pairs") or []]
    study = Study(
        path=p.resolve(),
        plan=(p.parent / str(raw["plan"])).resolve(),
        rows=rows,
        seeds=seeds,
        refs=[str(r) for r in raw.get("refs") or []],
        pairs=pairs,  # type: ignore[arg-type]
        rules=rules,
        dev=dev,
        quick=quick,
        title=str(raw.get("title") or ""),
        out=(p.parent / str(raw["out"])).resolve() if raw.get("out") else None,
        records=(p.parent / str(raw["records"])).resolve() if raw.get("records") else None,
    )
    _check_names(study)
    return study


def _check_names(study: Study) -> None:
    where = study.path
    named = [("refs", r) for r in study.refs]
    for i, pair in enumerate(study.pairs):
        if len(pair) not in (2, 3):
            what = "a pair is [row, row] or [row, row, what it tests]"
            raise StudyError(f"{where}: pairs[{i}]: {what}, got {list(pair)!r}")
        named += [(f"pairs[{i}]", r) for r in pair[:2]]
    for i, rule in enumerate(study.rules):
        named += [(f"rules[{i}].ref", rule.ref)] + [(f"rules[{i}].rows", r) for r in rule.rows]
        if rule.pick not in PICKS:
            raise StudyError(f"{where}: rules[{i}].pick: {rule.pick!r} is not one of {', '.join(PICKS)}")
    for key, row in named:
        if row not in study.rows:
            raise StudyError(f"{where}: {key}: no row {row!r}; the rows are {', '.join(study.rows)}")


# --------------------------------------------------------------------------- overlays


def overlay(plan: dict, changes: dict[str, Any], where: str = "row") -> dict:
    """``plan`` with ``changes`` applied (a deep copy; ``mtpd.trainer.overlay`` has the rules)."""
    try:
        return plan_overlay(plan, changes, where)
    except PlanError as e:
        raise StudyError(str(e)) from None


def row_plan(study: Study, row: Row, base: dict | None = None, after: dict | None = None) -> Plan:
    """The plan ``row`` trains: the base plan with the row's overlays, then ``after`` (a split's own), checked as
    ``mtpd-train`` checks plans. Paths the overlays add are relative to the study file."""
    base = plan_to_dict(study.base()) if base is None else base
    data = overlay(base, row.overlay, f"{study.path}: rows.{row.name}")
    data = overlay(data, after or {}, f"{study.path}: dev.set")
    try:
        plan = from_dict(Plan, data, "plan")
        plan.validate()
    except PlanError as e:
        raise StudyError(f"{study.path}: rows.{row.name}: the row's plan is not valid: {e}") from None
    plan = _resolve_paths(plan, study.path.parent)
    if row.online:
        missing = [s.name for s in plan.stages if s.teacher is None]
        if missing:
            raise StudyError(
                f"{study.path}: rows.{row.name}: online: true runs each stage's teacher live, but stage(s) "
                f"{', '.join(missing)} name no teacher; give each stage teacher: {{name, weights}}"
            )
    return plan


# What never changes the weights a run trains: where things go, how often it logs and checkpoints.
NOT_TRAINING = ("output_dir", "seed", "cache_root", "log_every", "checkpoint_every")


def fingerprint(plan: Plan, row: Row, split: str, where: Path) -> str:
    """What a run of ``row`` depends on, its seed and folders aside: a changed row trains again.

    Fields at their defaults are left out, so a field added to plans later does not retrain old studies. A path
    counts by the content of the file it names when there is one (annotations, checkpoints: a retrained teacher
    at the same path retrains its rows), else relative to ``where`` (the study file's folder), so a clone
    elsewhere keeps its records."""
    d = _set_fields(plan)
    for k in NOT_TRAINING:
        d.pop(k, None)
    d = _by_content(d, where)
    d["online"], d["split"] = row.online, split
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _set_fields(obj: Any) -> Any:
    """A dataclass as a dict of its fields that differ from their defaults (recursively)."""
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING
            )  # fmt: skip
            if default is dataclasses.MISSING or v != default:
                out[f.name] = _set_fields(v)
        return out
    if isinstance(obj, list):
        return [_set_fields(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _set_fields(x) for k, x in obj.items()}
    return obj


def _by_content(v: Any, where: Path) -> Any:
    if isinstance(v, dict):
        return {k: _by_content(x, where) for k, x in v.items()}
    if isinstance(v, list):
        return [_by_content(x, where) for x in v]
    if isinstance(v, str):
        scheme, path = ("onnx:", v[5:]) if v.startswith("onnx:") else ("", v)
        if path.startswith("/"):
            if Path(path).is_file():
                return scheme + "sha256:" + _file_sha256(path, Path(path).stat().st_mtime_ns)
            return scheme + os.path.relpath(path, where)
    return v


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, stamp: int) -> str:
    """``sha256_file``, once per file version in a process (every row names the same annotations)."""
    return sha256_file(path)
