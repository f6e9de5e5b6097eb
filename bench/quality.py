"""Distillation quality on the digits benchmark, several seeds: mean ± std AP per method.

    .venv/bin/python bench/quality.py                       # the full comparison (hours on 2 CPU cores)
    .venv/bin/python bench/quality.py --seeds 0 --rows baseline,mtpd_mgd   # a subset

Rows (every student trains the same two stages of --stage-epochs epochs, seed by seed):

    baseline          detection loss only
    direct            MGD from the stronger teacher in both stages
    mtpd_mgd          MTPD: MGD from the weaker, then the stronger teacher (cached, lossless stores)
    mtpd_rmpfi        the same with RM + PFI (weights 4 and 1.5) instead of MGD
    mtpd_mgd_online   mtpd_mgd with the teachers run inside every step instead of read from stores
    mtpd_mgd_compact  mtpd_mgd from compact stores (BitRound 5 bits)

Targets (issue #4): cached within ±0.3 AP of online (paired by seed); progressive >= direct;
compact within 0.3 AP of lossless. Data (2000 train / 400 val, seed 0), models, recipes and
seeds are those of `mtpd-demo`, fixed before any run. Every finished stage is kept under
--out: rerunning the command resumes, and --write puts the table into bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/quality.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import command_line, machine, write_section

TITLE = "Quality (bench/quality.py)"
# Run in this order within a seed: the targets' rows first, RM+PFI last.
ROWS = ("baseline", "direct", "mtpd_mgd", "mtpd_mgd_online", "mtpd_mgd_compact", "mtpd_rmpfi")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--out", default="bench_out/quality", help="working folder (data, stores, runs); default: %(default)s"
    )
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (default: %(default)s)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows among {', '.join(ROWS)}")
    p.add_argument("--stage-epochs", type=int, default=None, help="epochs per stage (default: the demo's)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="the demo's quick scale (a few images, one epoch per stage): checks the script, not quality",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write", action="store_true", help="write the table into its section of bench/RESULTS.md")
    return p


def _stage_specs(row: str, stores: dict[str, str]) -> list[tuple[str, str | None, list[dict]]]:
    """(stage name, store, losses) per stage of a row."""
    from mtpd.demo import recipes

    mgd = [recipes.mgd_loss()]
    rmpfi = [{"name": "rm"}, {"name": "pfi"}]
    if row == "baseline":
        return [("plain_1", None, []), ("plain_2", None, [])]
    if row == "direct":
        return [("strong_1", stores["strong_lossless"], mgd), ("strong_2", stores["strong_lossless"], mgd)]
    if row in ("mtpd_mgd", "mtpd_mgd_online"):
        return [("weak", stores["weak_lossless"], mgd), ("strong", stores["strong_lossless"], mgd)]
    if row == "mtpd_mgd_compact":
        return [("weak", stores["weak_compact"], mgd), ("strong", stores["strong_compact"], mgd)]
    if row == "mtpd_rmpfi":
        return [("weak", stores["weak_lossless"], rmpfi), ("strong", stores["strong_lossless"], rmpfi)]
    raise SystemExit(f"unknown row {row!r}; choose from {', '.join(ROWS)}")


def _plan(row: str, seed: int, paths, scale, stores: dict[str, str]) -> Path:
    from mtpd.demo import recipes, steps

    ipe = -(-scale.train // 16)
    stages = [
        recipes.stage(name, scale.stage_epochs, ipe, [store] if store else [], losses)
        for name, store, losses in _stage_specs(row, stores)
    ]
    plan = recipes.plan(recipes.STUDENT, paths.data, paths.runs / f"{row}_s{seed}", stages, ipe, seed=seed)
    return steps.write_plan(plan, paths.plans / f"{row}_s{seed}.yaml")


def _online_teachers(teachers: dict) -> dict[int, tuple[str, object]]:
    """The online baseline's teacher per stage: weak, then strong (as the cached MTPD rows)."""
    return {k: (teachers[key].arch, teachers[key].checkpoint) for k, key in ((1, "weak"), (2, "strong"))}


def _build_stores(paths, teachers: dict, log) -> dict[str, str]:
    """Lossless stores with FPN and class logits (RM/PFI need them) and compact FPN-only stores."""
    import ray

    from mtpd.demo import steps

    specs = {
        f"{k}_{p}": (t, p, ("fpn", "cls") if p == "lossless" else ("fpn",))
        for k, t in teachers.items()
        for p in ("lossless", "compact")
    }
    out = {name: str(paths.stores / name) for name in specs}  # build_teacher_store names them {teacher}_{precision}
    if all(steps.store_complete(Path(p)) for p in out.values()):
        return out
    started = not ray.is_initialized()
    if started:
        from mtpd.cache.ray_local import start_local_ray

        start_local_ray(num_cpus=2)
    try:
        for t, prec, outputs in specs.values():
            steps.build_teacher_store(t, paths, prec, log, outputs=outputs, out=paths.stores / f"{t.key}_{prec}")
    finally:
        if started:
            ray.shutdown()
    return out


def _summary(
    results: dict[str, dict[int, float]], seeds: list[int], seconds: dict[str, dict[int, float]] | None = None
) -> tuple[list[str], list[str]]:
    """Table lines (Markdown) and target checks from final AP per row and seed (and train seconds)."""

    def ms(vals: list[float]) -> str:
        if not vals:
            return "-"
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return f"{100 * statistics.mean(vals):.1f} ± {100 * sd:.1f}"

    lines = ["| row | seeds | AP (mean ± std) | per seed | train min per student |", "|---|---:|---:|---|---:|"]
    for row in ROWS:
        r = results.get(row, {})
        if r:
            per = ", ".join(f"{100 * r[s]:.1f}" for s in seeds if s in r)
            secs = [v for s, v in (seconds or {}).get(row, {}).items() if s in r]
            minutes = f"{statistics.mean(secs) / 60:.1f}" if secs else "-"
            lines.append(f"| {row} | {len(r)} | {ms([r[s] for s in seeds if s in r])} | {per} | {minutes} |")

    def paired(a: str, b: str) -> tuple[float, int] | None:
        common = [s for s in seeds if s in results.get(a, {}) and s in results.get(b, {})]
        if not common:
            return None
        return 100 * statistics.mean(results[a][s] - results[b][s] for s in common), len(common)

    checks = []
    for a, b, label, ok in (
        ("mtpd_mgd", "mtpd_mgd_online", "cached - online (target within ±0.3 AP)", lambda d: abs(d) <= 0.3),
        ("mtpd_mgd", "direct", "progressive - direct (target >= 0)", lambda d: d >= 0),
        ("mtpd_mgd_compact", "mtpd_mgd", "compact - lossless (target within ±0.3 AP)", lambda d: abs(d) <= 0.3),
        ("mtpd_mgd", "baseline", "progressive - baseline (target >= +3 AP)", lambda d: d >= 3),
        ("direct", "baseline", "direct - baseline", None),
        ("mtpd_rmpfi", "baseline", "progressive RM+PFI - baseline", None),
    ):
        p = paired(a, b)
        if p is None:
            continue
        d, n = p
        verdict = "" if ok is None else ("  **met**" if ok(d) else "  **missed**")
        checks.append(f"- {label}: {d:+.2f} AP (paired over {n} seed(s)){verdict}")
    return lines, checks


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see mtpd.cli.demo: spinning threads stall on shared CPUs
    import torch

    from mtpd.demo import recipes, steps

    torch.set_num_threads(a.threads)
    seeds = [int(s) for s in a.seeds.split(",")]
    rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    for r in rows:
        if r not in ROWS:
            raise SystemExit(f"unknown row {r!r}; choose from {', '.join(ROWS)}")
    scale = recipes.QUICK if a.quick else recipes.FULL
    if a.stage_epochs is not None:
        scale = replace(scale, stage_epochs=a.stage_epochs)
    paths = steps.Paths(Path(a.out))
    log = lambda s: print(s, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    steps.ensure_data(paths, scale, log)
    teachers = steps.ensure_teachers(paths, scale, False, log)
    stores = _build_stores(paths, teachers, log)
    results: dict[str, dict[int, float]] = {}
    seconds: dict[str, dict[int, float]] = {}
    # Seed-major: a run stopped early still has paired rows for the seeds it finished.
    for seed in seeds:
        for row in rows:
            log(f"\n== {row}, seed {seed} ==")
            plan = _plan(row, seed, paths, scale, stores)
            online = _online_teachers(teachers) if row == "mtpd_mgd_online" else None
            metrics = steps.train(plan, log, quiet=True, online=online)
            results.setdefault(row, {})[seed] = metrics[-1]["AP"]
            seconds.setdefault(row, {})[seed] = sum(m["train_seconds"] for m in metrics)
            log(
                f"   {row} seed {seed}: AP {100 * metrics[-1]['AP']:.1f} (stage APs: "
                + ", ".join(f"{100 * m['AP']:.1f}" for m in metrics)
                + ")"
            )
            (paths.root / "results.json").write_text(
                json.dumps({"results": results, "train_seconds": seconds}, indent=2)
            )
    table, checks = _summary(results, seeds, seconds)
    print("\n" + "\n".join(table) + "\n\n" + "\n".join(checks))
    if a.write:
        body = "\n".join(
            [
                f"Command: `{command_line('quality.py', argv if argv is not None else sys.argv[1:])}`  ",
                f"Date: {time.strftime('%Y-%m-%d')}; machine: {machine()}; students trained for "
                f"{sum(v for r in seconds.values() for v in r.values()) / 3600:.1f} h "
                f"in all (this invocation's wall time {(time.perf_counter() - t0) / 3600:.1f} h: a rerun reuses "
                "finished stages)  ",
                f"Setup: digits {scale.train} train / {scale.val} val at 128 px; student {recipes.STUDENT['arch']} "
                f"{recipes.STUDENT['options']}; teachers shipped in mtpd/demo/teachers (weak "
                f"{recipes.TEACHERS['weak']['arch']}, "
                f"strong {recipes.TEACHERS['strong']['arch']}); two stages of {scale.stage_epochs} epochs per student; "
                f"MGD α={recipes.MGD_WEIGHT}, λ={recipes.MGD_LAMBDA}; RM 4, PFI 1.5; seeds {seeds}. "
                "AP is COCO box AP (×100) on val after the last stage.",
                "",
                *table,
                "",
                *checks,
            ]
        )
        write_section(TITLE, body)
        print("wrote its section of bench/RESULTS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
