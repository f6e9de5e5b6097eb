"""`mtpd-study`: many students from the same stores, paired by seed, to measure which choice pays on your data."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from mtpd.cli import HelpFormatter

EPILOG = """\
A study file names a base plan (any plan mtpd-train runs) and rows as overlays on it:

  plan: student.yaml
  seeds: [0, 1, 2, 3, 4]
  dev: {images: 400}                 # optional: --split dev carves these from the train set
  rows:
    baseline: {stages.*.losses: [], stages.*.teacher: null}
    small: {stages.*.teacher.precision: small}
    lossless: {stages.*.teacher.precision: lossless}
    online: {online: true, note: teacher run live}
  refs: [baseline]                   # every row is paired with these
  pairs: [[small, lossless]]
  rules:
    - {name: precision, ref: lossless, rows: [small], mean_at_least: -0.5, low_above: -1.0, pick: smallest}

Each row trains once per seed; stores its stages name (teacher: {name, weights, outputs, precision}) are
built under the plan's cache root when missing. Finished runs are kept in <out>/<split>/record.json:
rerunning the command trains only what is missing, and a row whose definition changed trains again.

Examples:
  mtpd-study study.yaml --quick              # minutes: does the study run?
  mtpd-study study.yaml --split dev          # choose on the dev split first
  mtpd-study study.yaml --jobs 2             # the val rows, two students side by side
  mtpd-study study.yaml --report --write RESULTS.md --plot ap_vs_bytes.png

Guide, with a walk-through on the own-data example: docs/study.md
"""


class _Formatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, and the epilog's example study kept as written."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mtpd-study",
        description="Train students per row and seed from the same stores, and report AP with paired\n"
        "differences, 90 % t-intervals, the noise floor and the study's rules.",
        epilog=EPILOG,
        formatter_class=lambda prog: _Formatter(prog, max_help_position=32),
    )
    p.add_argument("study", help="the study file (YAML)")
    p.add_argument("--split", choices=("val", "dev"), default="val", help="evaluate on the plan's val set or on dev")
    p.add_argument("--rows", default=None, help="comma-separated rows (default: every row)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the study's; --quick: its first)")
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="students trained side by side, one torch thread each (default: 1 on "
        "the CPU, one per GPU with --device cuda)",
    )
    p.add_argument("--quick", action="store_true", help="a few images, one epoch per stage, one seed: a check")
    p.add_argument(
        "--device", default="cpu", choices=("cpu", "cuda"), help="train on the CPU, or one student per visible GPU"
    )
    p.add_argument("--build-workers", type=int, default=0, help="Ray workers for missing stores (0: in this process)")
    p.add_argument("--report", action="store_true", help="report what has finished; train and build nothing")
    p.add_argument("--write", default=None, metavar="FILE", help="put the report into this Markdown file")
    p.add_argument("--plot", default=None, metavar="PNG", help="draw AP against --x into this file")
    p.add_argument(
        "--x",
        choices=("bytes", "time", "rows"),
        default="bytes",
        help="the plot's axis: store bytes or minutes per run (rows that read no store are left out), or rows: "
        "one bar per row with its seeds",
    )
    p.add_argument("--record", default=None, help="the record of finished runs (default: <out>/<split>/record.json)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    from mtpd.errors import MtpdError, message
    from mtpd.study.report import plot, report, section, write_section
    from mtpd.study.run import run_study
    from mtpd.study.spec import StudyError, load_study

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads stall side-by-side students
    try:
        if a.jobs is not None and a.jobs < 1:
            raise StudyError("--jobs: at least 1")
        if a.quick and (a.write or a.record):
            raise StudyError("--quick checks a study; its numbers are not results: drop --write and --record")
        study = load_study(a.study)
        rows = [r.strip() for r in a.rows.split(",") if r.strip()] if a.rows else None
        try:
            seeds = [int(s) for s in a.seeds.split(",")] if a.seeds else None
        except ValueError:
            raise StudyError(f"--seeds: comma-separated integers, got {a.seeds!r}") from None
        out = run_study(
            study,
            split=a.split,
            rows=rows,
            seeds=seeds,
            jobs=a.jobs,
            quick=a.quick,
            build_workers=a.build_workers,
            report_only=a.report,
            record_path=Path(a.record) if a.record else None,
            device=a.device,
            log=lambda s: print(s, flush=True),
        )
    except MtpdError as e:
        print(f"mtpd-study: error: {message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mtpd-study: stopped; rerun the same command to go on where it stopped", file=sys.stderr)
        return 130
    print("\n" + "\n".join(report(study, out, a.quick)))
    if a.write:
        command = shlex.join(["mtpd-study", *(sys.argv[1:] if argv is None else argv)])
        write_section(
            Path(a.write), study.name + (" — dev split" if a.split == "dev" else ""), section(study, out, command)
        )
        print(f"wrote its section of {a.write}")
    if a.plot and not any(out["results"].get(r) for r in out["rows"]):
        print(f"mtpd-study: nothing to draw in {a.plot} yet: no run has finished", file=sys.stderr)
    elif a.plot:
        plot(study, out, Path(a.plot), a.x)
        print(f"drew {a.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
