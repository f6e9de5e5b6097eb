"""`mtpd-demo`: distill a student progressively on the digits benchmark and show the gain.

mtpd-demo --out demo_out            # the full demo (~7 min on 2 CPU cores)
mtpd-demo --out demo_out --direct   # add the direct-distillation student (a third student: minutes more)
mtpd-demo --out demo_out --quick    # a smoke test of the same pipeline (~2 min)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from mtpd.cache.schema import PRECISIONS
from mtpd.defaults import DEFAULT_PRECISION

DESCRIPTION = """\
Runs the whole mtpd pipeline on the digits benchmark and prints a table
(model, params, AP, AP50, AP75, train time, store size):

  1. mtpd-data digits        write the data set (real handwritten digits, 10 classes)
  2. mtpd-train               a baseline student (detection loss only), in its own process
                              while the next steps run (it reads no store)
  3. teachers                 two teachers of different strength: the checkpoints shipped
                              in the package (mtpd/demo/teachers), or trained with mtpd-train (--train-teachers)
  4. mtpd-cache build         each teacher runs once over the train split into a Zarr store
  5. mtpd-plan order          rank the teachers by their feature distance to the student
                              (the baseline after its first stage)
  6. mtpd-train               the student distilled progressively (MTPD: one MGD stage per
                              teacher, in that order); with --direct also from the stronger
                              teacher alone for the same epochs
  7. mtpd-eval                COCO AP of everything on the val split

Students train side by side, each in its own process with half the threads.
Each step prints the command it corresponds to. Everything lands in
OUT/full (or OUT/quick): data, plans, stores, runs, report.md and plots/.
Teachers, stores and finished stages are reused when the demo runs again.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mtpd-demo", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="demo_out", help="output folder (default: %(default)s)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a few images and one epoch per stage: checks the pipeline (CI), not the gain",
    )
    p.add_argument(
        "--direct",
        action="store_true",
        help="also train the student distilled from the stronger teacher in both stages (a third student on the same "
        "cores: the full demo takes minutes longer; always on with --quick)",
    )
    p.add_argument(
        "--train-teachers",
        action="store_true",
        help="train the two teachers with mtpd-train instead of using the shipped mtpd/demo/teachers/*.pt",
    )
    p.add_argument(
        "--precision",
        default=DEFAULT_PRECISION,
        choices=list(PRECISIONS),
        help="store precision preset (docs/stores.md: Precision presets; default: %(default)s)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for the teachers; each student process gets half (default: the CPU cores available to this "
        "process)",
    )
    p.add_argument("--verbose", action="store_true", help="print every training log line (default: one line per epoch)")
    return p


def _threads(requested: int | None) -> int:
    if requested:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores)


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress lines show up at once under `| tee` or in CI logs
    # On a shared CPU, OpenMP threads that spin while waiting slow training ~10x when
    # another process holds a core; passive waiting costs little when the cores are free.
    # Only effective before torch loads (the CLI imports it below).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from mtpd.demo.report import gains, table, write_report
    from mtpd.demo.run import run_demo
    from mtpd.errors import MtpdError, message

    torch.set_num_threads(_threads(a.threads))
    command = "mtpd-demo " + " ".join(argv if argv is not None else sys.argv[1:])
    t0 = time.perf_counter()
    try:
        result = run_demo(
            a.out,
            quick=a.quick,
            train_teachers=a.train_teachers,
            precision=a.precision,
            direct=a.direct or a.quick,
            quiet_training=not a.verbose,
            threads=_threads(a.threads),
        )
    except MtpdError as e:
        print(f"mtpd-demo: error: {message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "mtpd-demo: interrupted; rerun the same command to continue "
            "(finished teachers, stores and stages are kept)",
            file=sys.stderr,
        )
        return 130
    from pathlib import Path

    root = Path(a.out) / ("quick" if a.quick else "full")
    report = write_report(result, root, command.strip())
    print()
    print(table(result.rows))
    for g in gains(result):
        print(g)
    print(f"\nreport: {report}  plots: {root / 'plots'}  ({(time.perf_counter() - t0) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
