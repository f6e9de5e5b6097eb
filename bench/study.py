"""A loss or teacher study on the digits benchmark: rows of stages, trained per seed, paired by seed.

The machinery bench/rm_pfi.py and bench/far_teachers.py share (the data, the dev/val splits, lossless
stores of every teacher a row reads, students side by side with one thread each, resumable runs, the
table of AP with paired differences) comes from bench/bytes_vs_ap.py; a study says only its rows, its
loss sets, its extra teachers and which rows the others are paired with.

A row's stage is ``(stage name, teacher key or None, store key, loss-set key)``; loss sets are lists of
plan loss entries, where ``auto_after: "epoch"`` becomes one epoch of steps. ``epochs`` sets each
stage's epochs per row (default: the benchmark's), so rows of different lengths can have equal totals.

Finished runs are recorded in ``bench/results/<study>-<split>.json``, in the repository, so that a fresh
clone reports them and trains only what is missing (working folders under --out do not outlive a machine):
per row and seed the AP, each stage's AP, the weights the run resolved, the tree that trained it and a
fingerprint of the row's definition. A record whose row has since changed is set aside and the run trains
again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bytes_vs_ap import Row, _build_stores, _lock, _plan, _split, _store_path, paired, run_all, store_keys
from bench.common import command_line, machine, write_section

STORE = "lossless"  # the store key most rows read: a preset or precision string; fpn, cls and box, both views
RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Study:
    prog: str  # bench/<prog>
    title: str  # its section in bench/RESULTS.md
    doc: str
    rows: dict[str, dict[str, Row]]  # split ("dev", "val") -> rows; val rows are set after the dev study
    loss_sets: dict[str, list[dict]]
    refs: tuple[str, ...] = ("baseline",)  # rows every other row is paired with
    ref_of: dict[str, str] = field(default_factory=dict)  # row -> its one reference, instead of every ref
    extra_teachers: dict[str, tuple[str, str]] = field(default_factory=dict)  # key -> (arch, shipped file)
    epochs: dict[str, list[int]] = field(default_factory=dict)  # row -> epochs per stage (default: benchmark's)
    extra_lines: object = None  # callable(paths, shown) -> list[str] printed and recorded under the table
    plot: object = None  # callable(shown, path, split) -> None: drawn to docs/<prog stem>.png with --write
    setup: str | None = None  # the study's own schedule and losses, said instead of the benchmark's default recipe

    def parser(self) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(
            prog=self.prog, description=self.doc, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        p.add_argument("--out", default=f"bench_out/{Path(self.prog).stem}", help="working folder; %(default)s")
        p.add_argument("--split", choices=("val", "dev"), default="val", help="evaluate on val or on the dev split")
        p.add_argument("--seeds", default=None, help="comma-separated seeds (default: 0 on dev, 0,1,2,3,4 on val)")
        p.add_argument("--rows", default=None, help="comma-separated rows (default: every row of the split)")
        p.add_argument("--jobs", type=int, default=1, help="students trained side by side, one thread each")
        p.add_argument("--quick", action="store_true", help="a few images, one epoch per stage: checks the script")
        p.add_argument("--write", action="store_true", help="write the table into bench/RESULTS.md")
        p.add_argument("--report", action="store_true", help="the table of what has finished, training nothing")
        p.add_argument(
            "--results",
            default=None,
            help="the record of finished runs (default: bench/results/<study>-<split>.json; --quick: under --out)",
        )
        return p

    def losses(self, key: str, iters_per_epoch: int) -> list[dict]:
        out = []
        for lc in self.loss_sets[key]:
            lc = json.loads(json.dumps(lc))  # a copy: plans are written from it
            if lc.get("auto_after") == "epoch":
                lc["auto_after"] = iters_per_epoch
            out.append(lc)
        return out


def fingerprint(study: Study, name: str, row: Row, split: str) -> str:
    """What a run of ``row`` depends on beyond the benchmark's recipe: its stages, their losses and epochs."""
    losses = {k: study.loss_sets.get(k) for k in sorted({s[3] for s in row.stages})}
    d = {"split": split, "stages": [list(s) for s in row.stages], "losses": losses, "epochs": study.epochs.get(name)}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def tree() -> str:
    """The commit of the code that trains: $MTPD_BENCH_TREE (a sweep run from an exported snapshot), else git's."""
    if os.environ.get("MTPD_BENCH_TREE"):
        return os.environ["MTPD_BENCH_TREE"]
    try:
        out = subprocess.run(
            ["git", "-C", str(RESULTS_DIR.parent), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def load_record(path: Path) -> dict[str, dict[int, dict]]:
    """Row -> seed -> run entry; an earlier bare form (row -> seed -> AP) reads as entries holding only AP."""
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"{path}: not valid JSON ({e}); restore it from git or delete the broken entry") from None
    return {r: {int(s): e if isinstance(e, dict) else {"AP": e} for s, e in d.items()} for r, d in raw.items()}


def save_record(path: Path, record: dict[str, dict[int, dict]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")  # a kill mid-write must not cost the finished runs' record
    tmp.write_text(json.dumps({r: {str(s): record[r][s] for s in sorted(record[r])} for r in record}, indent=1) + "\n")
    os.replace(tmp, path)


def _shown_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(RESULTS_DIR.parent))
    except ValueError:
        return str(path)


def teachers(study: Study, paths, scale, log) -> dict:
    """The benchmark's teachers and the study's extra ones (shipped checkpoints), by key."""
    from mtpd.demo import steps

    out = dict(steps.ensure_teachers(paths, scale, False, log))
    for key, (arch, file) in study.extra_teachers.items():
        out[key] = steps.TeacherInfo(key, arch, steps.shipped_teachers() / file, None, None, "shipped")
    return out


def plan_for(study: Study, name: str, row: Row, seed: int, paths, split, scale, stores: dict) -> Path:
    """bytes_vs_ap's plan of ``row``, with the study's losses and its epochs per stage (the quick scale's 1
    epoch per stage in --quick)."""
    from mtpd.demo import recipes

    epochs = study.epochs.get(name) if scale is recipes.FULL else None
    return _plan(row, seed, paths, split, scale, stores, study.losses, epochs)


def main(study: Study, argv: list[str] | None = None) -> int:
    a = study.parser().parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see mtpd.cli.demo: spinning threads stall on shared CPUs
    from mtpd.demo import jobs, recipes, steps

    table_rows = study.rows.get(a.split) or {}
    if not table_rows:
        raise SystemExit(f"no {a.split} rows yet: run the dev study (--split dev) and set the val rows from it first")
    rows = [r.strip() for r in (a.rows or ",".join(table_rows)).split(",") if r.strip()]
    unknown = [r for r in rows if r not in table_rows]
    if unknown:
        raise SystemExit(f"unknown row {unknown[0]!r} for --split {a.split}; choose from {', '.join(table_rows)}")
    seeds = [int(s) for s in (a.seeds or ("0" if a.split == "dev" else "0,1,2,3,4")).split(",")]
    if a.quick and a.write:
        raise SystemExit("--quick checks the script; its numbers are not results: drop --write")
    scale = recipes.QUICK if a.quick else recipes.FULL
    paths = steps.Paths(Path(a.out) / (f"quick-{a.split}" if a.quick else a.split))
    log = lambda s: print(s, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    steps.ensure_data(paths, scale, log)  # --report too: the split's sizes and store names come from the data
    if not a.report:
        lock = _lock(paths.root, Path(study.prog).name)  # noqa: F841 - held until the process ends
    split = _split(paths, a.split, scale)
    keys = sorted({s[1] for r in rows for s in table_rows[r].stages if s[1] is not None})
    ts = {k: v for k, v in teachers(study, paths, scale, log).items() if k in keys}
    used = {(s[1], s[2]) for r in rows for s in table_rows[r].stages if s[1] is not None}
    if a.report:
        stores = {(t, k): _store_path(paths, split, t, k) for t, k in used}
    else:
        stores = _build_stores(paths, split, ts, store_keys(table_rows[r] for r in rows), log, used)
    default_record = paths.root / "results.json" if a.quick else RESULTS_DIR / f"{Path(study.prog).stem}-{a.split}.json"
    res_path = Path(a.results) if a.results else default_record
    record = load_record(res_path)
    prints = {r: fingerprint(study, r, table_rows[r], a.split) for r in rows}
    for r in rows:
        stale = [s for s, e in record.get(r, {}).items() if e.get("fingerprint", prints[r]) != prints[r]]
        for s in stale:  # the row changed since: its old runs are not this row's
            log(f"  {res_path.name}: {r} seed {s} was trained from another definition of {r}; training it again")
            entry = record[r].pop(s)  # popped first: the old fingerprint names where it is kept
            record.setdefault(f"{r}@{entry['fingerprint']}", {})[s] = entry
    results = {r: {s: e["AP"] for s, e in d.items()} for r, d in record.items()}

    def on_done(row: str, seed: int, job) -> None:
        metrics = jobs.metrics(job)
        results.setdefault(row, {})[seed] = metrics[-1]["AP"]
        stage_aps = [round(100 * m["AP"], 2) for m in metrics]
        log(f"   {row} seed {seed}: AP {100 * metrics[-1]['AP']:.2f} (stages {stage_aps})")
        record.setdefault(row, {})[seed] = {
            "AP": metrics[-1]["AP"],
            "stage_AP": [m["AP"] for m in metrics],
            "weights": weights(paths, f"{row}_s{seed}"),
            "fingerprint": prints[row],
            "tree": tree(),
            "date": time.strftime("%Y-%m-%d"),
        }
        save_record(res_path, record)

    tasks = []
    for seed in [] if a.report else seeds:  # seed-major: a stopped run still has paired rows
        for r in rows:
            if seed in results.get(r, {}):  # recorded: trained here or on another machine
                continue
            tasks.append((r, seed, plan_for(study, r, table_rows[r], seed, paths, split, scale, stores), None))
    log("--report: nothing trains" if a.report else f"{len(tasks)} student runs to train, {a.jobs} side by side")
    run_all(tasks, a.jobs, log, on_done)

    shown = {r: {s: results[r][s] for s in seeds if s in results.get(r, {})} for r in rows}
    lines = table(study, rows, shown, paths, quick=a.quick, record=record)
    if study.extra_lines is not None:
        lines += ["", *study.extra_lines(paths, shown)]
    print("\n".join(["", *lines]))
    if a.write:
        body = "\n".join(
            [
                f"Command: `{command_line(Path(study.prog).name, argv)}`  ",
                f"Date: {time.strftime('%Y-%m-%d')}; machine: {machine()}"
                + ("  " if a.report else f"; wall time of this invocation {(time.perf_counter() - t0) / 3600:.1f} h  "),
                f"Setup: {recipes.describe(split.train_count, split.val_count, recipe=study.setup is None)}"
                f"{'; ' + study.setup if study.setup else ''}; split {a.split}; seeds {seeds}. "
                "AP is COCO box AP (×100) after the last stage; differences are paired by seed, with 90 % t-intervals "
                "where there are several. Weights: as given, or `auto` → the value the rule chose (per stage, from "
                "each run's resolved plan).",
                *(
                    [
                        "Recorded with --report while the sweep was still running: the seeds column says which seeds "
                        "each row has finished; differences are paired over the seeds both rows have."
                    ]
                    if a.report and any(len(shown[r]) < len(seeds) for r in rows)
                    else [
                        "Recorded with --report from the finished runs (trained by the same command without "
                        f"--report; each run's AP, weights and tree are in {_shown_path(res_path)})."
                    ]
                    if a.report
                    else []
                ),  # fmt: skip
                "",
                *lines,
            ]
        )
        write_section(study.title + (" — dev split" if a.split == "dev" else ""), body)
        print("wrote its section of bench/RESULTS.md")
        if study.plot is not None and a.split == "val":
            png = Path(__file__).resolve().parents[1] / "docs" / f"{Path(study.prog).stem}.png"
            study.plot(shown, png, a.split)
            print(f"drew {png}")
    return 0


def weights(paths, run: str) -> str:
    """The losses' weights per stage as the run resolved them (auto → chosen; "auto" when a stage ended before
    its warm-up did)."""
    import yaml

    def one(x: dict) -> str:
        w = x.get("weight")
        return x["name"] if w is None else f"{x['name']} {w:.3g}" if isinstance(w, (int, float)) else f"{x['name']} {w}"

    out = []
    for k in range(1, 10):
        f = paths.runs / run / f"stage_{k}" / "plan.yaml"
        if not f.is_file():
            break
        out.append(", ".join(one(x) for x in yaml.safe_load(f.read_text())["stages"][k - 1]["losses"]))
    return " / ".join(out) if any(out) else "-"


def table(
    study: Study, rows: list[str], shown: dict, paths, quick: bool = False, record: dict | None = None
) -> list[str]:
    refs = [r for r in study.refs if r in rows]
    cols = ["vs its reference"] if study.ref_of else [f"vs {r}" for r in refs]
    head = "| row | stages | losses (weights per stage) | seeds | AP | " + " | ".join(cols) + " |"
    lines = [head, "|---|---|---|---|---:|" + "---:|" * len(cols)]
    rows_of = study.rows.get("val", {}) | study.rows.get("dev", {})
    for r in rows:
        if not shown.get(r):
            continue
        aps = [100 * v for v in shown[r].values()]
        mean = statistics.mean(aps)
        ap = f"{mean:.2f}" if len(aps) == 1 else f"{mean:.2f} ± {statistics.stdev(aps):.2f}"
        cells = []
        row_refs = ([study.ref_of[r]] if r in study.ref_of else [r]) if study.ref_of else refs  # [r]: a "-" cell
        for ref in row_refs:
            d = paired(shown, r, ref) if r != ref else None
            named = f"{ref}: " if study.ref_of else ""
            if d is None:
                cells.append("-")
            elif d["n"] == 1:
                cells.append(f"{named}{d['mean']:+.2f}")
            else:
                cells.append(f"{named}{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]")
        keys = {k for _, t, k, _ in rows_of[r].stages if t}
        if len(keys) == 1:  # one store for every stage: named once
            teachers_ = " → ".join(t or "-" for _, t, _, _ in rows_of[r].stages)
            teachers_ += f" [`{next(iter(keys))}`]" if keys != {STORE} else ""
        else:
            teachers_ = " → ".join(
                (t or "-") + (f" [`{k}`]" if t and k != STORE else "") for _, t, k, _ in rows_of[r].stages
            )
        epochs = None if quick else study.epochs.get(r)
        stages = f"{teachers_} ({' + '.join(map(str, epochs))} ep)" if epochs else teachers_
        seeds = ",".join(str(x) for x in sorted(shown[r]))
        entry = (record or {}).get(r, {}).get(min(shown[r]), {})
        resolved = entry.get("weights") or weights(paths, f"{r}_s{min(shown[r])}")
        lines.append(f"| {r} | {stages} | {resolved} | {seeds} | {ap} | {' | '.join(cells)} |")
    return lines
