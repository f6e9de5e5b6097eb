"""Running a study: the split's data, the stores its rows read, and one student per row and seed.

Everything a study makes lives under its working folder, per split (``val``, ``dev``, ``quick-val`` ...):
``data/`` (carved or cut annotation files), ``plans/`` (each run's plan, as ``mtpd-train`` would read it),
``runs/`` (each run's stages) and ``record.json``, the finished runs. Stores go under the plans' cache root,
through the catalog, so other studies and plans find them by identity and nothing is built twice.

Resuming is at two grains: a run in the record with its row's fingerprint is never trained again, and a run
killed midway restarts at its first unfinished stage. A run whose row changed (another fingerprint) is set
aside in the record under ``row@fingerprint`` and trains again.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mtpd.study.spec import Row, Study, StudyError, fingerprint, row_plan
from mtpd.trainer.plan import Plan, PlanError, plan_to_dict, save_plan

Log = Callable[[str], None]


@dataclass
class Split:
    """Where the rows of one split train and evaluate."""

    name: str  # val, dev, quick-val, quick-dev
    root: Path  # the split's working folder
    data: dict[str, str]  # the plan's data paths for this split (train_ann ... val_images)


def split_data(study: Study, split: str, quick: bool, log: Log) -> Split:
    """The split's data: ``val``, the base plan's own; ``dev``, the train set less the study's dev images, which
    become the val set; ``quick``, the first images of either."""
    base = study.base().data
    name = f"quick-{split}" if quick else split
    root = study.out_dir() / name
    data = {"train_ann": base.train_ann, "train_images": base.train_images}
    data |= {"val_ann": base.val_ann or "", "val_images": base.val_images or ""}
    if split == "dev":
        if study.dev is None:
            raise StudyError(f"{study.path}: --split dev needs a dev: {{images: N}} entry in the study file")
        dev = study.dev
        data["train_ann"], data["val_ann"] = carve_dev(Path(base.train_ann), dev.images, dev.seed, dev.digest, root)
        data["val_images"] = base.train_images
    elif not (base.val_ann and base.val_images):
        raise StudyError(f"{study.plan}: data.val_ann and data.val_images: a study evaluates every run; set them")
    if quick:
        data["train_ann"] = str(first_images(Path(data["train_ann"]), study.quick.images, root / "data" / "train.json"))
        data["val_ann"] = str(first_images(Path(data["val_ann"]), study.quick.images, root / "data" / "val.json"))
    log(f"split {name}: train {_count(data['train_ann'])} images, evaluate on {_count(data['val_ann'])}")
    return Split(name, root, data)


def _count(ann: str) -> int:
    return len(json.loads(Path(ann).read_text())["images"])


def _subset(coco: dict, ids: set[int]) -> dict:
    return {
        **coco,
        "images": [im for im in coco["images"] if im["id"] in ids],
        "annotations": [a for a in coco.get("annotations", []) if a["image_id"] in ids],
    }


def _write_json(data: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
    return path


def carve_dev(train_ann: Path, n: int, seed: int, digest: str, root: Path) -> tuple[str, str]:
    """Annotation files of ``train_ann`` less ``n`` images, and of those ``n``: the first by the hash of
    ``dev<seed>:<file name>``, so the carve depends on neither the file's order nor the machine."""
    coco = json.loads(train_ann.read_text())
    ids = sorted(im["id"] for im in coco["images"])
    if not 0 < n < len(ids):
        raise StudyError(f"dev.images: {n} of {train_ann}'s {len(ids)} images; choose 1 to {len(ids) - 1}")
    if digest not in hashlib.algorithms_available:
        raise StudyError(f"dev.digest: {digest!r} is not a hash this Python has (e.g. sha256, sha1)")
    key = lambda im: hashlib.new(digest, f"dev{seed}:{im['file_name']}".encode()).hexdigest()  # noqa: E731
    dev = {im["id"] for im in sorted(coco["images"], key=key)[:n]}
    out = root / "data"
    rest = _write_json(_subset(coco, set(ids) - dev), out / "train_minus_dev.json")
    return str(rest), str(_write_json(_subset(coco, dev), out / "dev.json"))


def first_images(ann: Path, n: int, out: Path) -> Path:
    """``ann`` cut to its first ``n`` images (by id)."""
    coco = json.loads(ann.read_text())
    keep = set(sorted(im["id"] for im in coco["images"])[:n])
    return _write_json(_subset(coco, keep), out)


# --------------------------------------------------------------------------- plans


def plans_for(study: Study, rows: list[str], split: Split, quick: bool) -> dict[str, Plan]:
    """Each row's plan on ``split`` (its seed and output folder are set per run)."""
    base = plan_to_dict(study.base())
    base["data"].update(split.data)
    after = study.dev.set if split.name.endswith("dev") and study.dev is not None else {}
    if quick:
        for stage in base["stages"]:
            stage["epochs"] = study.quick.epochs
            stage["schedule"]["warmup_iters"] = min(stage["schedule"]["warmup_iters"], study.quick.warmup_iters)
    out = {}
    for r in rows:
        row = study.rows[r]
        plan = row_plan(study, row, base, after)
        if quick:  # a row that sets epochs itself still trains the quick length
            for stage in plan.stages:
                stage.epochs = study.quick.epochs
        out[r] = plan
    return out


def run_plan_file(plan: Plan, split: Split, row: str, seed: int) -> Path:
    """Write the plan of ``row`` for ``seed``; its runs go to ``runs/<row>_s<seed>``."""
    plan.seed = seed
    plan.output_dir = str(split.root / "runs" / f"{row}_s{seed}")
    path = split.root / "plans" / f"{row}_s{seed}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_plan(plan, path)
    return path


# --------------------------------------------------------------------------- stores


def ensure_stores(plans: dict[str, Plan], rows: dict[str, Row], workers: int, log: Log) -> dict[str, list[str]]:
    """Every store the rows read, built through the catalog when missing; row -> its stores."""
    from mtpd.trainer.store_refs import stage_stores

    used: dict[str, list[str]] = {}
    for r, plan in plans.items():
        paths: list[str] = []
        for stage in plan.stages:
            if not stage.losses or rows[r].online:
                continue  # an undistilled stage reads nothing; an online row runs its teachers live
            try:
                found = stage_stores(plan, stage)
            except PlanError:
                found = [build_for(plan, stage, workers, log)]
            paths += [p for p in found if p not in paths]
        used[r] = paths
    return used


def build_for(plan: Plan, stage, workers: int, log: Log) -> str:
    """``mtpd-cache build`` of ``stage``'s teacher over the plan's train set, under the plan's cache root."""
    import sys

    from mtpd.cache.build import build_store
    from mtpd.cache.catalog import cache_root
    from mtpd.teachers.registry import TeacherSpec
    from mtpd.trainer.store_refs import ref_views

    ref, d = stage.teacher, plan.data
    views = ref_views(plan, ref)
    log(f"building the store of {ref.name} ({ref.precision}, {','.join(ref.outputs)}) for stage {stage.name}")
    t0 = time.perf_counter()
    rep = build_store(
        TeacherSpec(ref.name, ref.weights),
        d.train_ann,
        d.train_images,
        None,
        views=views,
        root=str(cache_root(plan.cache_root)),
        outputs=list(ref.outputs),
        precision=ref.precision,
        workers=workers,
        progress=sys.stderr.isatty(),
    )
    log(f"  {rep.store}: {rep.shards_written} shards in {time.perf_counter() - t0:.0f}s")
    return str(rep.store)


def bytes_per_image(stores: list[str]) -> float | None:
    """Bytes on disk per image of the stores a row reads (None: it reads none)."""
    from mtpd.cache.inspect import store_info

    if not stores:
        return None
    total = 0.0
    for s in stores:
        info = store_info(s)
        total += info["bytes_on_disk"] / max(1, info["images_total"])
    return total


# --------------------------------------------------------------------------- record


def load_record(path: Path) -> dict[str, dict[int, dict]]:
    """Row -> seed -> finished run (AP, each stage's AP, seconds, fingerprint, date)."""
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise StudyError(f"{path}: not valid JSON ({e}); restore it or delete the broken entry") from None
    return {r: {int(s): e for s, e in d.items()} for r, d in raw.items()}


def save_record(path: Path, record: dict[str, dict[int, dict]]) -> None:
    data = {r: {str(s): record[r][s] for s in sorted(record[r])} for r in sorted(record)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")  # a kill mid-write must not cost the finished runs
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def set_aside_stale(record: dict[str, dict[int, dict]], prints: dict[str, str], log: Log) -> None:
    """Move runs of a row whose fingerprint changed to ``row@old``: they are not this row's."""
    for r, fp in prints.items():
        for s in [s for s, e in record.get(r, {}).items() if e.get("fingerprint") != fp]:
            entry = record[r].pop(s)
            log(f"{r} seed {s} was trained from another definition of {r}: training it again")
            record.setdefault(f"{r}@{entry.get('fingerprint')}", {})[s] = entry


# --------------------------------------------------------------------------- training


def online_teachers(plan: Plan) -> dict[int, tuple[str, str]]:
    """Stage -> (teacher, weights) for a row whose teachers run live."""
    return {k: (s.teacher.name, s.teacher.weights) for k, s in enumerate(plan.stages, 1) if s.teacher is not None}


def train_runs(
    tasks: list[tuple[str, int, Path, dict | None]],
    n_jobs: int,
    log: Log,
    on_done: Callable[[str, int, list[dict], float], None],
) -> None:
    """Train ``tasks`` (row, seed, plan file, online teachers) ``n_jobs`` at a time, each in its own process with
    one torch thread (a thread count that followed the load would make weights depend on timing);
    ``on_done(row, seed, stage metrics, seconds)`` after each."""
    from mtpd.demo import jobs

    pending = list(tasks)
    running: dict[str, tuple[str, int, jobs.Job, float]] = {}
    try:
        while pending or running:
            while pending and len(running) < n_jobs:
                row, seed, plan, online = pending.pop(0)
                j = jobs.start(f"{row}_s{seed}", plan, log, 1, online=online)
                running[j.name] = (row, seed, j, time.perf_counter())
            jobs.wait(
                [j for _, _, j, _ in running.values()],
                log,
                True,
                until=lambda: any(not j.running() for _, _, j, _ in running.values()),
            )
            for name, (row, seed, j, t0) in list(running.items()):
                if not j.running():
                    del running[name]
                    j.relay(log, True)
                    j.check()
                    on_done(row, seed, jobs.metrics(j), time.perf_counter() - t0)
    finally:
        for _, _, j, _ in running.values():
            j.stop()


def run_study(
    study: Study,
    split: str = "val",
    rows: list[str] | None = None,
    seeds: list[int] | None = None,
    jobs: int = 1,
    quick: bool = False,
    build_workers: int = 0,
    report_only: bool = False,
    record_path: Path | None = None,
    log: Log = print,
) -> dict:
    """Build what is missing and train every (row, seed) not yet in the record; returns what the report reads:
    ``results`` {row: {seed: AP}}, ``record``, ``bytes`` {row: bytes per image}, ``seeds``, ``rows``, ``split``."""
    rows = rows or [r for r, row in study.rows.items() if split in row.splits]
    unknown = [r for r in rows if r not in study.rows]
    if unknown:
        raise StudyError(f"{study.path}: no row {unknown[0]!r}; the rows are {', '.join(study.rows)}")
    if not rows:
        raise StudyError(f"{study.path}: no row runs on --split {split} (rows' splits: say which with --rows)")
    if not seeds and split == "dev":
        seeds = study.dev.seeds if study.dev and study.dev.seeds else study.seeds[:1]
    seeds = seeds or study.seeds
    seeds = seeds[:1] if quick else seeds
    where = split_data(study, split, quick, log)
    plans = plans_for(study, rows, where, quick)
    prints = {r: fingerprint(plans[r], study.rows[r], where.name, study.path.parent) for r in rows}
    record_path = record_path or study.record_path(where.name)
    record = load_record(record_path)
    set_aside_stale(record, prints, log)
    stores = found_stores(plans, study.rows) if report_only else ensure_stores(plans, study.rows, build_workers, log)

    def on_done(row: str, seed: int, metrics: list[dict], seconds: float) -> None:
        if "AP" not in metrics[-1]:
            raise StudyError(f"rows.{row}: its last stage was not evaluated (eval: false); a study compares AP")
        record.setdefault(row, {})[seed] = {
            "AP": metrics[-1]["AP"],
            "stage_AP": [m.get("AP") for m in metrics],
            "weights": resolved_weights(where.root / "runs" / f"{row}_s{seed}"),
            "seconds": round(seconds, 1),
            "fingerprint": prints[row],
            "date": time.strftime("%Y-%m-%d"),
        }
        save_record(record_path, record)
        log(f"{row} seed {seed}: AP {100 * metrics[-1]['AP']:.2f} in {seconds / 60:.1f} min")

    tasks = []
    for seed in [] if report_only else seeds:  # seed-major: a stopped study still has paired rows
        for r in rows:
            if seed in record.get(r, {}):
                continue
            plan = plans[r]
            path = run_plan_file(plan, where, r, seed)
            tasks.append((r, seed, path, online_teachers(plan) if study.rows[r].online else None))
    if not report_only:
        log(f"{len(tasks)} run(s) to train, {jobs} side by side" if tasks else "every run is in the record")
    train_runs(tasks, jobs, log, on_done)
    return outcome(record, record_path, stores, rows, seeds, where.name)


def resolved_weights(run: Path) -> str:
    """Each stage's losses with the weights the run trained with (``weight: auto`` as the number it chose):
    ``mgd 0.000115 / mgd 3.13e-05``."""
    import yaml

    def one(loss: dict) -> str:
        w = loss.get("weight")
        return loss["name"] if w is None else f"{loss['name']} {w:.3g}" if isinstance(w, (int, float)) else loss["name"]

    stages = []
    for k in range(1, 100):
        f = run / f"stage_{k}" / "plan.yaml"
        if not f.is_file():
            break
        stages.append(", ".join(one(x) for x in yaml.safe_load(f.read_text())["stages"][k - 1]["losses"]) or "-")
    return " / ".join(stages)


def found_stores(plans: dict[str, Plan], rows: dict[str, Row]) -> dict[str, list[str]]:
    """The stores each row reads that exist already (``--report`` builds nothing)."""
    from mtpd.trainer.store_refs import stage_stores

    out: dict[str, list[str]] = {}
    for r, plan in plans.items():
        out[r] = []
        for stage in plan.stages:
            if stage.losses and not rows[r].online:
                try:
                    out[r] += stage_stores(plan, stage)
                except PlanError:
                    pass
    return out


def outcome(record: dict, record_path: Path, stores: dict, rows: list[str], seeds: list[int], split: str) -> dict:
    """What the report reads, for the runs of ``rows`` and ``seeds`` in the record."""
    results = {r: {s: e["AP"] for s, e in record.get(r, {}).items() if s in seeds} for r in rows}
    # the first seed's resolved weights stand for the row's (auto picks per run; the table shows one)
    weights = {r: next((e["weights"] for _, e in sorted(record.get(r, {}).items()) if e.get("weights")), "")
               for r in rows}  # fmt: skip
    return {
        "weights": weights,
        "results": results,
        "record": record,
        "record_path": record_path,
        "bytes": {r: bytes_per_image(stores[r]) for r in rows},
        "seconds": {
            r: [e["seconds"] for s, e in record.get(r, {}).items() if s in seeds and "seconds" in e] for r in rows
        },
        "seeds": seeds,
        "rows": rows,
        "split": split,
    }
