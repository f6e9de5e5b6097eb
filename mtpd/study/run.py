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
import time
from pathlib import Path
from typing import Callable

from mtpd.study.record import load_record, save_record, set_aside_stale
from mtpd.study.spec import Row, Study, StudyError, fingerprint, row_plan
from mtpd.study.splits import Split, first_images, split_data
from mtpd.trainer.plan import Plan, StageConfig, plan_to_dict, save_plan

Log = Callable[[str], None]


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
        if not plan.stages[-1].eval:
            raise StudyError(f"{study.path}: rows.{r}: its last stage has eval: false; a study compares each run's AP")
        if quick:  # a row that sets epochs itself still trains the quick length
            for stage in plan.stages:
                stage.epochs = study.quick.epochs
            if plan.data.pool_ann:  # ... and on the pool's first images
                pool = split.root / "data" / f"pool_{hashlib.sha256(plan.data.pool_ann.encode()).hexdigest()[:8]}.json"
                plan.data.pool_ann = str(first_images(Path(plan.data.pool_ann), study.quick.images, pool))
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


def ensure_stores(
    plans: dict[str, Plan], rows: dict[str, Row], workers: int, log: Log, device: str = "cpu"
) -> dict[str, list[str]]:
    """Every store the rows read, built through the catalog (teachers on ``device``) when missing: the missing
    precisions of one teacher, data, views and outputs from one teacher pass; row -> its stores."""
    from mtpd.trainer.store_refs import MissingStore, ref_views, set_files, stage_sets, stage_stores

    def distilled(r: str) -> list:
        # an undistilled stage reads nothing; an online row runs its teachers live
        return [] if rows[r].online else [s for s in plans[r].stages if s.losses]

    missing: dict[tuple, dict[str, tuple[Plan, StageConfig, str]]] = {}
    for r, plan in plans.items():
        for stage in distilled(r):
            for which in stage_sets(stage):  # the labelled set's stores and/or the pool's
                try:
                    stage_stores(plan, stage, which)
                except MissingStore:
                    ref = stage.teacher
                    views = str(ref_views(plan, ref).to_dict())
                    key = (ref.name, ref.weights, tuple(ref.outputs), views, set_files(plan, which), plan.cache_root)
                    missing.setdefault(key, {})[ref.precision] = (plan, stage, which)
    for group in missing.values():
        build_for(list(group.values()), workers, log, device)
    used: dict[str, list[str]] = {}
    for r, plan in plans.items():
        used[r] = []
        for stage in distilled(r):
            for which in stage_sets(stage):
                used[r] += [p for p in stage_stores(plan, stage, which) if p not in used[r]]
    return used


def build_for(stages: list[tuple[Plan, StageConfig, str]], workers: int, log: Log, device: str = "cpu") -> list[str]:
    """``mtpd-cache build --precision a,b`` of the stages' teacher (one teacher, data, views and outputs; one
    precision each) over one set of the plan (``train`` or ``pool``), under its cache root: one teacher pass."""
    import sys

    from mtpd.cache.build import build_stores
    from mtpd.cache.catalog import cache_root
    from mtpd.teachers.registry import TeacherSpec
    from mtpd.trainer.store_refs import ref_views, set_files

    plan, stage, which = stages[0]
    ref = stage.teacher
    ann, images = set_files(plan, which)
    precisions = [s.teacher.precision for _, s, _ in stages]
    log(f"building the {which} stores of {ref.name} ({', '.join(precisions)}; {','.join(ref.outputs)}) in one pass")
    t0 = time.perf_counter()
    reports = build_stores(
        TeacherSpec(ref.name, ref.weights, device=device),
        ann,
        images,
        precisions,
        None,
        views=ref_views(plan, ref),
        root=str(cache_root(plan.cache_root)),
        outputs=list(ref.outputs),
        workers=workers,
        progress=sys.stderr.isatty(),
    )
    for rep in reports:
        log(f"  {rep.store}: {rep.shards_written} shards")
    log(f"  {len(reports)} store(s) in {time.perf_counter() - t0:.0f}s")
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()  # the students need the GPU more than this process's cache does
    return [str(rep.store) for rep in reports]


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


# --------------------------------------------------------------------------- training


def online_teachers(plan: Plan) -> dict[int, tuple[str, str]]:
    """Stage -> (teacher, weights) for a row whose teachers run live."""
    return {k: (s.teacher.name, s.teacher.weights) for k, s in enumerate(plan.stages, 1) if s.teacher is not None}


def devices_for(device: str) -> list[str]:
    """The devices students train on: ``cpu``, or every GPU for ``cuda`` (one student per GPU at a time)."""
    if device != "cuda":
        return [device]
    import torch

    if not torch.cuda.is_available():
        raise StudyError("--device cuda: no CUDA device is visible to torch; use --device cpu")
    return [f"cuda:{k}" for k in range(torch.cuda.device_count())]


def train_runs(
    tasks: list[tuple[str, int, Path, dict | None]],
    n_jobs: int,
    log: Log,
    on_done: Callable[[str, int, list[dict], float], None],
    devices: list[str] | None = None,
) -> None:
    """Train ``tasks`` (row, seed, plan file, online teachers) ``n_jobs`` at a time, each in its own process with
    one torch thread (a thread count that followed the load would make weights depend on timing), on a device of
    ``devices`` no other running student holds (CPU: all share it); ``on_done(row, seed, stage metrics,
    seconds)`` after each."""
    from mtpd.demo import jobs

    devices = devices or ["cpu"]
    pending = list(tasks)
    running: dict[str, tuple[str, int, jobs.Job, float]] = {}
    held: dict[str, str] = {}  # job -> its GPU
    try:
        while pending or running:
            while pending and len(running) < n_jobs:
                free = [d for d in devices if d == "cpu" or d not in held.values()]
                if not free:
                    break
                row, seed, plan, online = pending.pop(0)
                j = jobs.start(f"{row}_s{seed}", plan, log, 1, online=online, device=free[0])
                held[j.name] = free[0]
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
                    held.pop(name, None)
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
    jobs: int | None = None,  # None: 1 on the CPU, one per GPU
    quick: bool = False,
    build_workers: int = 0,
    report_only: bool = False,
    record_path: Path | None = None,
    log: Log = print,
    device: str = "cpu",
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
    devices = None if report_only else devices_for(device)  # before any build: a missing GPU says so first
    if report_only:
        stores = found_stores(plans, study.rows)
    else:
        stores = ensure_stores(plans, study.rows, build_workers, log, device)

    def on_done(row: str, seed: int, metrics: list[dict], seconds: float) -> None:
        run = where.root / "runs" / f"{row}_s{seed}"
        record.setdefault(row, {})[seed] = entry(row, metrics, run, seconds, prints[row])
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
        side = jobs or len(devices or [1])
        log(f"{len(tasks)} run(s) to train, {side} side by side" if tasks else "every run is in the record")
    train_runs(tasks, jobs or len(devices or [1]), log, on_done, devices)
    return outcome(record, record_path, stores, rows, seeds, where.name)


def entry(row: str, metrics: list[dict], run: Path, seconds: float, fingerprint: str) -> dict:
    """A finished run as the record keeps it."""
    if "AP" not in metrics[-1]:
        raise StudyError(f"rows.{row}: its last stage was not evaluated (eval: false); a study compares AP")
    return {
        "AP": metrics[-1]["AP"],
        "stage_AP": [m.get("AP") for m in metrics],
        "weights": resolved_weights(run),
        "seconds": round(seconds, 1),
        "fingerprint": fingerprint,
        "date": time.strftime("%Y-%m-%d"),
    }


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
    from mtpd.trainer.store_refs import MissingStore, stage_sets, stage_stores

    out: dict[str, list[str]] = {}
    for r, plan in plans.items():
        out[r] = []
        for stage in plan.stages:
            for which in stage_sets(stage) if stage.losses and not rows[r].online else []:
                try:
                    out[r] += [p for p in stage_stores(plan, stage, which) if p not in out[r]]
                except MissingStore:
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
