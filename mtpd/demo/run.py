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

from mtpd.defaults import DEFAULT_PRECISION
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
    cpu_ms: float | None = None  # deployed forward (post-processing included), batch 1, one thread


@dataclass
class DemoResult:
    rows: list[Row]
    order: list[str]  # teacher keys in the measured order
    seconds: float
    scale: dict
    steps_seconds: dict[str, float]


def _student_plan(name: str, paths: Paths, scale: recipes.Scale, stage_specs: list[tuple[str, dict | None]]) -> Path:
    """A two-stage student plan; each stage (name, teacher) distills with MGD from that teacher's store (found
    by the trainer under the demo's cache root), or trains plainly (teacher None)."""
    ipe = -(-scale.train // 16)
    stages = [
        recipes.stage(sname, scale.stage_epochs, ipe, None, [recipes.mgd_loss()] if ref else [], teacher=ref)
        for sname, ref in stage_specs
    ]
    plan = recipes.plan(recipes.STUDENT, paths.data, paths.runs / name, stages, ipe)
    plan["cache_root"] = str(paths.cache)
    return steps.write_plan(plan, paths.plans / f"{name}.yaml")


def run_demo(
    out: Path,
    quick: bool = False,
    train_teachers: bool = False,
    precision: str = DEFAULT_PRECISION,
    direct: bool = False,
    log: Log = print,
    quiet_training: bool = False,
    threads: int | None = None,
) -> DemoResult:
    """Run every step; returns the table's rows (the report is written by ``mtpd.demo.report``).

    The students train in their own processes, ``threads // 2`` torch threads each (at least one):
    the baseline from the start (it reads no store), the distilled students once the stores exist
    and the teachers are ordered. ``threads`` defaults to torch's current setting.
    """
    import torch

    demo = _Demo(
        recipes.QUICK if quick else recipes.FULL,
        Paths(Path(out) / ("quick" if quick else "full")),
        log,
        quiet_training,
        max(1, (threads or torch.get_num_threads()) // 2),
    )
    t_start = time.perf_counter()
    demo.step("data", f"1/7 data: digits, {demo.scale.train} train / {demo.scale.val} val images at {recipes.SIZE} px")
    steps.ensure_data(demo.paths, demo.scale, log)
    try:
        demo.train_students(train_teachers, precision, direct)
    finally:
        for j in demo.students.values():
            j.stop()
    demo.step("evaluate", "7/7 evaluate")
    rows = demo.rows()
    scale = demo.scale
    scale_d = {
        "train": scale.train,
        "val": scale.val,
        "stage_epochs": scale.stage_epochs,
        "quick": quick,
        "precision": precision,
        "direct": direct,
        "threads_per_student": demo.per_job,
    }
    demo.step(None, None)
    result = DemoResult(rows, demo.order, time.perf_counter() - t_start, scale_d, demo.timing)
    (demo.paths.root / "metrics.json").write_text(json.dumps(_jsonable(result), indent=2))
    return result


class _Demo:
    """The state one demo run carries from step to step."""

    def __init__(self, scale: recipes.Scale, paths: Paths, log: Log, quiet: bool, per_job: int) -> None:
        self.scale, self.paths, self.log, self.quiet, self.per_job = scale, paths, log, quiet, per_job
        self.timing: dict[str, float] = {}
        self.students: dict[str, jobs.Job] = {}
        self.order: list[str] = []
        self._current: tuple[str, float] | None = None

    def step(self, key: str | None, title: str | None) -> None:
        """Close the timing of the step running now, and start the next one (``key`` None: none)."""
        now = time.perf_counter()
        if self._current is not None:
            self.timing[self._current[0]] = self.timing.get(self._current[0], 0.0) + now - self._current[1]
        self._current = (key, now) if key else None
        if title:
            self.log(f"\n== {title} ==")

    def train_students(self, train_teachers: bool, precision: str, direct: bool) -> None:
        self.precision = precision
        scale, paths, log = self.scale, self.paths, self.log
        self.step(
            None,
            f"2/7 baseline student: {2 * scale.stage_epochs} epochs, detection loss only (trains while the teachers "
            "run)",
        )
        base_plan = _student_plan("baseline", paths, scale, [("plain_1", None), ("plain_2", None)])
        self.students["baseline"] = jobs.start("baseline", base_plan, log, self.per_job)

        self.step("teachers", "3/7 teachers")
        self.teachers = steps.ensure_teachers(paths, scale, train_teachers, log)
        self.teacher_eval = {k: steps.evaluate_checkpoint(ti.checkpoint, paths, log) for k, ti in self.teachers.items()}
        for k, m in self.teacher_eval.items():
            log(f"  teacher {k}: AP {100 * m['AP']:.1f} on val")

        self.step("stores", f"4/7 stores: each teacher runs once over the train split ({precision})")
        self.store_paths = _build_stores(self.teachers, paths, precision, log)
        if direct:  # the direct student needs no order: start it as soon as its store exists
            strong = steps.teacher_ref(self.teachers["strong"], precision)
            direct_plan = _student_plan("direct", paths, scale, [("strong_1", strong), ("strong_2", strong)])
            self.students["direct"] = jobs.start("direct", direct_plan, log, self.per_job)

        self.step(
            "order", "5/7 order the teachers by their distance to the student (the baseline after its first stage)"
        )
        prog_plan = self.ordered_plan()

        self.step(
            "students",
            f"6/7 distill: MTPD progressive ({' -> '.join(self.order)})"
            + (" and direct (stronger teacher in both stages)" if direct else ""),
        )
        self.students["progressive"] = jobs.start("progressive", prog_plan, log, self.per_job)
        jobs.wait(list(self.students.values()), log, self.quiet)

    def ordered_plan(self) -> Path:
        """Wait for the baseline's first stage, measure the teachers against it, write the ordered plan."""
        base = self.students["baseline"]
        jobs.wait(list(self.students.values()), self.log, self.quiet, until=lambda: base.stage_done(1))
        unordered = _student_plan(
            "progressive_unordered",
            self.paths,
            self.scale,
            [(k, steps.teacher_ref(self.teachers[k], self.precision)) for k in ("weak", "strong")],
        )
        prog_plan = self.paths.plans / "progressive.yaml"
        ordered = steps.order_stores(
            base.out_dir / "stage_1" / "final.pt",
            unordered,
            prog_plan,
            self.paths.runs / "progressive",
            self.log,
            n_images=min(64, self.scale.train),
        )
        key_of = {str(Path(p).resolve()): k for k, p in self.store_paths.items()}
        self.order = [key_of.get(str(Path(s).resolve()), s) for s in ordered]
        self.log(f"  progressive order: {' -> '.join(self.order)}")
        return prog_plan

    def rows(self) -> list[Row]:
        rows = []
        for k, ti in self.teachers.items():
            rows.append(
                Row(
                    f"teacher {k}",
                    ti.arch,
                    steps.count_params(ti.checkpoint),
                    self.teacher_eval[k],
                    ti.train_seconds,
                    steps.store_size(self.store_paths[k]),
                    cpu_ms=steps.cpu_ms(ti.checkpoint, self.paths),
                )
            )
        student_arch = (
            f"{recipes.STUDENT['arch']}({', '.join(f'{a}={b}' for a, b in recipes.STUDENT['options'].items())})"
        )
        n_student = steps.count_params(self.students["baseline"].out_dir / "stage_2" / "final.pt")
        for name, label in (
            ("baseline", "student baseline"),
            ("direct", "student direct (strong)"),
            ("progressive", f"student MTPD ({' -> '.join(self.order)})"),
        ):
            if name not in self.students:
                continue
            metrics = jobs.metrics(self.students[name])
            rows.append(
                Row(
                    label,
                    student_arch,
                    n_student,
                    metrics[-1],
                    sum(m["train_seconds"] for m in metrics),
                    stage_metrics=metrics,
                    run_dir=str(self.students[name].out_dir),
                    cpu_ms=steps.cpu_ms(self.students[name].out_dir / "stage_2" / "final.pt", self.paths),
                )
            )
        return rows


def _build_stores(teachers: dict[str, steps.TeacherInfo], paths: Paths, precision: str, log: Log) -> dict[str, Path]:
    """Both teachers' stores, through one local Ray instance (each build would otherwise start and stop its own)."""
    import ray

    need_ray = not all(steps.find_teacher_store(t, paths, precision) for t in teachers.values())
    started_ray = False
    if need_ray and not ray.is_initialized():
        from mtpd.cache.ray_local import start_local_ray

        start_local_ray(num_cpus=2)
        started_ray = True
    try:
        return {k: steps.build_teacher_store(ti, paths, precision, log)[0] for k, ti in teachers.items()}
    finally:
        if started_ray:
            ray.shutdown()


def _jsonable(r: DemoResult) -> dict:
    from dataclasses import asdict

    return asdict(r)
