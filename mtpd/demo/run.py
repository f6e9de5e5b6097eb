"""The demo end to end: data → baseline → teachers → stores → order → progressive (and direct) → report.

The students train with the same total epochs (two stages of ``stage_epochs``):
``baseline`` (detection loss only), ``progressive`` (MTPD: one MGD stage per
teacher, in the order ``mtpd-plan order`` measures) and, with ``direct=True``,
``direct`` (MGD from the stronger teacher in both stages). Teachers, stores and
finished stages are reused when the demo runs again into the same folder.

The students train side by side in their own processes (``mtpd.demo.jobs``):
the baseline starts right after the data, the others once the stores exist.
The teacher order is measured against the baseline after its first stage, so
the progressive student starts while the baseline's second stage still runs.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from mtpd.demo import jobs, recipes, steps
from mtpd.demo.steps import Log, Paths


@dataclass
class Row:
    """One line of the demo's table."""

    model: str
    arch: str
    params: int
    metrics: dict  # AP, AP50, AP75 (0-1)
    train_seconds: float | None
    store_bytes: int | None = None
    stage_metrics: list[dict] = field(default_factory=list)  # per stage, for the plots
    run_dir: str | None = None


@dataclass
class DemoResult:
    rows: list[Row]
    order: list[str]  # teacher keys in the measured order
    seconds: float
    scale: dict
    steps_seconds: dict[str, float]


def _student_plan(name: str, paths: Paths, scale: recipes.Scale, stage_specs: list[tuple[str, list[str]]]) -> Path:
    """A two-stage student plan; each stage (name, stores) distills with MGD from its store, or trains plainly."""
    ipe = -(-scale.train // 16)
    stages = [recipes.stage(sname, scale.stage_epochs, ipe, stores, [recipes.mgd_loss()] if stores else [])
              for sname, stores in stage_specs]
    plan = recipes.plan(recipes.STUDENT, paths.data, paths.runs / name, stages, ipe)
    return steps.write_plan(plan, paths.plans / f"{name}.yaml")


def run_demo(out: Path, quick: bool = False, train_teachers: bool = False, precision: str = "lossless",
             direct: bool = False, log: Log = print, quiet_training: bool = False, threads: int | None = None) -> DemoResult:
    """Run every step; returns the table's rows (the report is written by ``mtpd.demo.report``).

    The students train in their own processes, ``threads // 2`` torch threads each (at least one):
    the baseline from the start (it reads no store), the distilled students once the stores exist
    and the teachers are ordered. ``threads`` defaults to torch's current setting.
    """
    import torch

    scale = recipes.QUICK if quick else recipes.FULL
    paths = Paths(Path(out) / ("quick" if quick else "full"))
    per_job = max(1, (threads or torch.get_num_threads()) // 2)
    t_start = time.perf_counter()
    timing: dict[str, float] = {}

    def step(title: str) -> float:
        log(f"\n== {title} ==")
        return time.perf_counter()

    t = step(f"1/7 data: digits, {scale.train} train / {scale.val} val images at {recipes.SIZE} px")
    steps.ensure_data(paths, scale, log)
    timing["data"] = time.perf_counter() - t

    students: dict[str, jobs.Job] = {}
    try:
        step(f"2/7 baseline student: {2 * scale.stage_epochs} epochs, detection loss only (trains while the teachers run)")
        base_plan = _student_plan("baseline", paths, scale, [("plain_1", []), ("plain_2", [])])
        students["baseline"] = jobs.start("baseline", base_plan, log, per_job)

        t = step("3/7 teachers")
        teachers = steps.ensure_teachers(paths, scale, train_teachers, log)
        teacher_eval = {k: steps.evaluate_checkpoint(ti.checkpoint, paths, log) for k, ti in teachers.items()}
        for k, m in teacher_eval.items():
            log(f"  teacher {k}: AP {100 * m['AP']:.1f} on val")
        timing["teachers"] = time.perf_counter() - t

        t = step(f"4/7 stores: each teacher runs once over the train split ({precision})")
        store_paths = _build_stores(teachers, paths, precision, log)
        if direct:  # the direct student needs no order: start it as soon as its store exists
            strong = str(store_paths["strong"])
            direct_plan = _student_plan("direct", paths, scale, [("strong_1", [strong]), ("strong_2", [strong])])
            students["direct"] = jobs.start("direct", direct_plan, log, per_job)
        timing["stores"] = time.perf_counter() - t

        t = step("5/7 order the teachers by their distance to the student (the baseline after its first stage)")
        base = students["baseline"]
        jobs.wait(list(students.values()), log, quiet_training, until=lambda: base.stage_done(1))
        prog_unordered = _student_plan("progressive_unordered", paths, scale,
                                       [(k, [str(store_paths[k])]) for k in ("weak", "strong")])
        prog_plan = paths.plans / "progressive.yaml"
        order_stores = steps.order_stores(base.out_dir / "stage_1" / "final.pt", list(store_paths.values()),
                                          prog_unordered, prog_plan, log, n_images=min(64, scale.train))
        key_of = {str(Path(p).resolve()): k for k, p in store_paths.items()}
        order = [key_of.get(str(Path(s).resolve()), s) for s in order_stores]
        _retarget(prog_plan, paths.runs / "progressive")
        log(f"  progressive order: {' -> '.join(order)}")
        timing["order"] = time.perf_counter() - t

        t = step(f"6/7 distill: MTPD progressive ({' -> '.join(order)})" + (" and direct (stronger teacher in both stages)" if direct else ""))
        students["progressive"] = jobs.start("progressive", prog_plan, log, per_job)
        jobs.wait(list(students.values()), log, quiet_training)
        timing["students"] = time.perf_counter() - t
    finally:
        for j in students.values():
            j.stop()

    t = step("7/7 evaluate")
    rows = []
    for k, ti in teachers.items():
        rows.append(Row(f"teacher {k}", ti.arch, steps.count_params(ti.checkpoint), teacher_eval[k], ti.train_seconds,
                        steps.store_size(store_paths[k])))
    student_arch = f"{recipes.STUDENT['arch']}({', '.join(f'{a}={b}' for a, b in recipes.STUDENT['options'].items())})"
    n_student = steps.count_params(students["baseline"].out_dir / "stage_2" / "final.pt")
    for name, label in (("baseline", "student baseline"), ("direct", "student direct (strong)"),
                        ("progressive", f"student MTPD ({' -> '.join(order)})")):
        if name not in students:
            continue
        metrics = jobs.metrics(students[name])
        rows.append(Row(label, student_arch, n_student, metrics[-1], sum(m["train_seconds"] for m in metrics),
                        stage_metrics=metrics, run_dir=str(students[name].out_dir)))
    timing["evaluate"] = time.perf_counter() - t
    scale_d = {"train": scale.train, "val": scale.val, "stage_epochs": scale.stage_epochs, "quick": quick, "precision": precision,
               "direct": direct, "threads_per_student": per_job}
    result = DemoResult(rows, order, time.perf_counter() - t_start, scale_d, timing)
    (paths.root / "metrics.json").write_text(json.dumps(_jsonable(result), indent=2))
    return result


def _build_stores(teachers: dict[str, steps.TeacherInfo], paths: Paths, precision: str, log: Log) -> dict[str, Path]:
    """Both teachers' stores, through one local Ray instance (each build would otherwise start and stop its own)."""
    import ray

    need_ray = not all(steps.store_complete(paths.stores / f"{k}_{precision}") for k in teachers)
    started_ray = False
    if need_ray and not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
        started_ray = True
    try:
        return {k: steps.build_teacher_store(ti, paths, precision, log)[0] for k, ti in teachers.items()}
    finally:
        if started_ray:
            ray.shutdown()


def _retarget(plan_path: Path, output_dir: Path) -> None:
    """The ordered plan was written from the unordered one: give it its own output folder."""
    import yaml

    plan = yaml.safe_load(plan_path.read_text())
    plan["output_dir"] = str(output_dir)
    plan_path.write_text(yaml.safe_dump(plan, sort_keys=False))


def _jsonable(r: DemoResult) -> dict:
    from dataclasses import asdict

    return asdict(r)
