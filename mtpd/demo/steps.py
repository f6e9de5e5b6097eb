"""The demo's steps, each reusing what an earlier run of the demo already finished.

Every step calls the same library function as the matching CLI and prints
that command first (``$ mtpd-cache build ...``), so the demo doubles as a
walk-through of the command line.
"""

from __future__ import annotations

import importlib.resources
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from mtpd.checkpoint import sha256_file
from mtpd.demo import recipes

Log = Callable[[str], None]


def shipped_teachers() -> Path:
    """The folder of the shipped teacher checkpoints: package data, in a source checkout and in a wheel alike."""
    return Path(str(importlib.resources.files("mtpd.demo").joinpath("teachers")))


@dataclass
class Paths:
    """Where one demo run (full or quick) keeps its files."""

    root: Path

    def __post_init__(self) -> None:
        # Plans resolve relative paths against the plan file's folder: write absolute ones.
        self.root = Path(self.root).resolve()

    @property
    def data(self) -> Path:
        return self.root / "digits"

    @property
    def plans(self) -> Path:
        return self.root / "plans"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def stores(self) -> Path:
        return self.root / "stores"

    @property
    def cache(self) -> Path:
        """The demo's cache root: its stores, named by identity (``mtpd-cache ls --root``)."""
        return self.root / "cache"

    @property
    def teachers(self) -> Path:
        return self.root / "teachers"

    @property
    def evals(self) -> Path:
        return self.root / "eval"

    def ann(self, split: str) -> Path:
        return self.data / "annotations" / f"instances_{split}.json"

    def images(self, split: str) -> Path:
        return self.data / "images" / split


def show(log: Log, command: str, **flags: object) -> None:
    """Print the CLI command a step corresponds to: ``show(log, "mtpd-eval", checkpoint=p)`` prints
    ``$ mtpd-eval --checkpoint p`` (underscores become dashes; a list gives several values)."""
    parts = command.split()
    for key, value in flags.items():
        parts.append("--" + key.replace("_", "-"))
        parts += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    log("$ " + " ".join(shlex.quote(p) for p in parts))


# ---------------------------------------------------------------------- data


def ensure_data(paths: Paths, scale: recipes.Scale, log: Log) -> None:
    """Write the digits set unless the same one is already there (the generator is deterministic)."""
    show(
        log, "mtpd-data digits", out=paths.data, train=scale.train, val=scale.val, size=recipes.SIZE, seed=recipes.SEED
    )
    want = {"train": scale.train, "val": scale.val}
    if all(_split_matches(paths.ann(s), n) for s, n in want.items()):
        log(f"  reusing {paths.data}")
        return
    from mtpd.data.digits import make_digits

    t0 = time.perf_counter()
    res = make_digits(paths.data, scale.train, scale.val, recipes.SIZE, recipes.SEED)
    log(f"  wrote {res['train']['num_images']} + {res['val']['num_images']} images in {time.perf_counter() - t0:.0f}s")


def _split_matches(ann: Path, n: int) -> bool:
    if not ann.is_file():
        return False
    info = json.loads(ann.read_text()).get("info", {})
    return info.get("num_images") == n and info.get("size") == recipes.SIZE and info.get("seed") == recipes.SEED


# ------------------------------------------------------------------ training


def write_plan(plan: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


def stages_todo(plan_path: Path, log: Log):
    """The plan and the stages an earlier demo run did not finish (a suffix: each stage starts from the one before)."""
    from mtpd.trainer.plan import load_plan
    from mtpd.trainer.stage import stage_done

    plan = load_plan(plan_path)
    todo: list[int] = []
    for k in range(1, len(plan.stages) + 1):
        # A stage starts from the previous one: once one must rerun, so must every later one.
        if todo or not stage_done(plan, k):
            todo.append(k)
    if len(todo) < len(plan.stages):
        log(f"  reusing stage(s) {[k for k in range(1, len(plan.stages) + 1) if k not in todo]} of {plan.output_dir}")
    return plan, todo


def progress_printer(log: Log, quiet: bool, prefix: str = "  "):
    """An ``on_event`` callback printing training events (epoch and stage ends only when ``quiet``)."""
    from mtpd.trainer.events import format_event, is_progress

    def on_event(ev: dict) -> None:
        line = format_event(ev)
        if line is not None and (not quiet or is_progress(ev)):
            log(prefix + line)

    return on_event


def train(
    plan_path: Path, log: Log, quiet: bool = False, online: dict[int, tuple[str, Path]] | None = None
) -> list[dict]:
    """``mtpd-train --plan PLAN --stage all``, skipping stages an earlier demo run finished; ``online``: stage ->
    (teacher arch, checkpoint) runs that stage with its teacher live (``--online-teacher ARCH=CKPT``)."""
    show_train(log, plan_path, online)
    plan, todo = stages_todo(plan_path, log)
    if todo:
        run_stages(plan, todo, online, log=None, on_event=progress_printer(log, quiet))
    return stage_metrics(plan)


def show_train(log: Log, plan_path: Path, online: dict[int, tuple[str, Path]] | None) -> None:
    """The mtpd-train command(s) a training of ``plan_path`` corresponds to (one per stage with a live teacher)."""
    if online is None:
        show(log, "mtpd-train", plan=plan_path, stage="all")
    for k, (arch, ckpt) in (online or {}).items():
        show(log, "mtpd-train", plan=plan_path, stage=k, online_teacher=f"{arch}={ckpt}")


def run_stages(plan, stages: list[int], online: dict | None, log, on_event, device: str = "cpu") -> None:
    """``run_plan`` of ``stages`` on ``device``, or with ``online`` one stage per call, its teacher run live."""
    from mtpd.teachers.registry import build_teacher
    from mtpd.trainer.stage import run_plan

    if online is None:
        run_plan(plan, stages, device=device, log=log, on_event=on_event)
    for k in stages if online else []:
        teacher = build_teacher(online[k][0], weights=str(online[k][1]), device=device)
        run_plan(plan, [k], device=device, online=[teacher], log=log, on_event=on_event)


def stage_metrics(plan) -> list[dict]:
    """Every stage's metrics.json of a finished plan, in stage order."""
    out = Path(plan.output_dir)
    return [json.loads((out / f"stage_{k}" / "metrics.json").read_text()) for k in range(1, len(plan.stages) + 1)]


# ------------------------------------------------------------------ teachers


@dataclass
class TeacherInfo:
    key: str  # weak | strong
    arch: str
    checkpoint: Path
    train_seconds: float | None
    epochs: int | None
    source: str  # "shipped" or "trained"


def ensure_teachers(paths: Paths, scale: recipes.Scale, train_teachers: bool, log: Log) -> dict[str, TeacherInfo]:
    """Shipped checkpoints by default; ``train_teachers`` (or missing files) trains them with mtpd-train."""
    folder = shipped_teachers()
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    out: dict[str, TeacherInfo] = {}
    for key, model in recipes.TEACHERS.items():
        shipped = folder / f"{model['file']}.pt"
        entry = manifest.get(model["file"], {})
        if not train_teachers and shipped.is_file():
            digest = sha256_file(shipped)
            if entry.get("sha256") not in (None, digest):
                log(f"  warning: {shipped} does not match {manifest_path} (sha256 {digest[:12]})")
            log(
                f"teacher {key}: shipped {shipped} ({model['arch']}, {entry.get('epochs', '?')} epochs, "
                f"{100 * entry.get('val_AP', 0):.1f} AP on val, "
                f"trained in {entry.get('train_seconds', 0) / 60:.0f} min; reproduce: see {folder / 'README.md'})"
            )
            out[key] = TeacherInfo(
                key, model["arch"], shipped, entry.get("train_seconds"), entry.get("epochs"), "shipped"
            )
            continue
        if not train_teachers:
            log(
                f"teacher {key}: no shipped checkpoint at {shipped}; training it (pass --train-teachers to do so on "
                "purpose)"
            )
        n_train = scale.train
        plan_path = write_plan(
            recipes.teacher_plan(key, paths.data, paths.teachers / key, scale, n_train),
            paths.plans / f"teacher_{key}.yaml",
        )
        metrics = train(plan_path, log)
        ckpt = paths.teachers / key / "stage_1" / "final.pt"
        out[key] = TeacherInfo(
            key, model["arch"], ckpt, sum(m["train_seconds"] for m in metrics), scale.teacher_epochs[key], "trained"
        )
    return out


def evaluate_checkpoint(ckpt: Path, paths: Paths, log: Log) -> dict:
    """``mtpd-eval`` on the demo's val split, cached by checkpoint and val-set digest."""
    from mtpd.data import CocoDataset, ViewSpec
    from mtpd.eval import evaluate
    from mtpd.trainer.student import load_student

    show(
        log,
        "mtpd-eval",
        checkpoint=ckpt,
        ann=paths.ann("val"),
        images=paths.images("val"),
        short=recipes.SIZE,
        long=recipes.SIZE,
    )
    key = sha256_file(ckpt)[:16] + "-" + sha256_file(paths.ann("val"))[:16]
    cache = paths.evals / f"{key}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    model = load_student(ckpt)
    stats = evaluate(
        model, CocoDataset(paths.ann("val"), paths.images("val")), ViewSpec(short=recipes.SIZE, long=recipes.SIZE), 32
    )
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(stats, indent=2))
    return stats


def count_params(ckpt: Path) -> int:
    from mtpd.trainer.student import load_student

    return sum(p.numel() for p in load_student(ckpt).parameters())


def cpu_ms(ckpt: Path, paths: Paths) -> float:
    """CPU ms per image of the model as deployed (``mtpd.export``: post-processing included), batch 1, one
    thread, on the first val view: the demo table's latency column (bench/latency.py adds ONNX Runtime)."""
    from mtpd.data import CocoDataset, ViewSpec, prepare_view
    from mtpd.export.latency import cpu_ms_per_image
    from mtpd.trainer.student import load_student

    ds = CocoDataset(paths.ann("val"), paths.images("val"))
    view, meta = prepare_view(ds.load_image(0), ViewSpec(short=recipes.SIZE, long=recipes.SIZE))
    return cpu_ms_per_image(load_student(ckpt).eval(), view, meta.size, threads=1)


# -------------------------------------------------------------------- stores


def store_complete(path: Path) -> bool:
    from mtpd.cache.schema import StoreError
    from mtpd.cache.store import StoreReader

    try:
        return bool(StoreReader(str(path)).status().done.all())
    except (StoreError, FileNotFoundError, KeyError):
        return False


def teacher_ref(t: TeacherInfo, precision: str, outputs: tuple[str, ...] = ("fpn",)) -> dict:
    """A plan's ``teacher:`` entry for teacher ``t``: the trainer finds its store under the plan's cache root."""
    return {"name": t.arch, "weights": str(t.checkpoint), "outputs": list(outputs), "precision": precision}


def build_teacher_store(
    t: TeacherInfo, paths: Paths, precision: str, log: Log, outputs: tuple[str, ...] = ("fpn",), out: Path | None = None
) -> tuple[Path, float]:
    """``mtpd-cache build`` of one teacher over the train split (FPN outputs by default), original and flipped
    views: into ``out``, or (by default) under the demo's cache root, named by the store's identity.

    Returns the store and the seconds spent (0 when an earlier demo run built it).
    """
    from mtpd.cache.build import build_store
    from mtpd.data import ViewSpec
    from mtpd.teachers.registry import TeacherSpec

    where = {"out": out} if out is not None else {"root": paths.cache}
    show(
        log,
        "mtpd-cache build",
        teacher=t.arch,
        weights=t.checkpoint,
        ann=paths.ann("train"),
        images=paths.images("train"),
        **where,
        views="orig,hflip",
        short=recipes.SIZE,
        long=recipes.SIZE,
        outputs=",".join(outputs),
        precision=precision,
        workers=1,
        batch_size=16,
        images_per_shard=64,
    )
    t0 = time.perf_counter()
    rep = build_store(
        TeacherSpec(t.arch, str(t.checkpoint)),
        str(paths.ann("train")),
        str(paths.images("train")),
        None if out is None else str(out),
        views=ViewSpec(short=recipes.SIZE, long=recipes.SIZE, views=("orig", "hflip")),
        root=str(paths.cache),
        outputs=list(outputs),
        precision=precision,
        batch_size=16,
        workers=1,
        images_per_shard=64,
        progress=sys.stderr.isatty(),
    )
    dt = time.perf_counter() - t0
    if rep.shards_written:
        log(f"  {rep.store}: {rep.shards_written} shards, {rep.bytes_written / 2**20:.1f} MiB in {dt:.0f}s")
        return Path(rep.store), dt
    log(f"  reusing {rep.store} (all {rep.shards_total} shards done)")
    return Path(rep.store), 0.0


def find_teacher_store(t: TeacherInfo, paths: Paths, precision: str, outputs: tuple[str, ...] = ("fpn",)) -> str | None:
    """The complete store of ``t`` under the demo's cache root, if an earlier run built it."""
    from mtpd.cache.catalog import find_store
    from mtpd.data import CocoDataset, ViewSpec

    manifest = CocoDataset(paths.ann("train"), paths.images("train")).manifest_hash()
    views = ViewSpec(short=recipes.SIZE, long=recipes.SIZE, views=("orig", "hflip")).to_dict()
    return find_store(
        paths.cache, t.arch, str(t.checkpoint), sha256_file(t.checkpoint), manifest, views, list(outputs), precision
    )


def store_size(path: Path) -> int:
    from mtpd.cache.inspect import store_info

    return int(store_info(str(path))["bytes_on_disk"])


# -------------------------------------------------------------------- order


def order_stores(
    student_ckpt: Path, plan_path: Path, ordered_path: Path, output_dir: Path, log: Log, n_images: int = 64
) -> list[str]:
    """``mtpd-plan order``: the plan's stages nearest-first by 1 - CKA of their teacher to the student;
    writes the reordered plan (with its own ``output_dir``) and returns its stores in order."""
    from mtpd.trainer.plan import load_plan, save_plan
    from mtpd.trainer.store_refs import stage_stores
    from mtpd.trainer.student import load_student
    from mtpd.trainer.teacher_order import order_plan

    plan = load_plan(plan_path)
    stores = [x for s in plan.stages for x in stage_stores(plan, s)]
    show(
        log, "mtpd-plan order", student=student_ckpt, stores=stores, plan=plan_path, write=ordered_path, images=n_images
    )
    plan, ranked = order_plan(plan, load_student(student_ckpt), n_images)
    for i, r in enumerate(ranked, 1):
        log(f"  {i}. distance {r.distance:.4f}  {r.store} ({r.teacher}, weights {Path(r.weights).name})")
    plan.output_dir = str(output_dir)
    save_plan(plan, ordered_path)
    return [stage_stores(plan, s)[0] for s in plan.stages]
