"""Bytes vs AP: how little a teacher store may hold before MTPD distillation loses AP.

    .venv/bin/python bench/bytes_vs_ap.py --split dev --rows lossless,online   # noise floor (dev split)
    .venv/bin/python bench/bytes_vs_ap.py --write                              # the sweep (val), ~3 h
    .venv/bin/python bench/bytes_vs_ap.py --report                             # what has finished so far
    .venv/bin/python bench/bytes_vs_ap.py --quick --out /tmp/bva               # smoke test (CI)

Every row trains the benchmark's student (``mtpd.demo.recipes``: the student, both teachers,
schedule and loss weights, all fixed on the dev split before the sweep) once per seed. Rows:

    baseline        detection loss only
    <preset>        MTPD (MGD from the weaker, then the stronger teacher) from stores of that
                    precision preset: lossless, high, compact, small, tiny, and the variant pca-c4
                    (tiny with PCA to a quarter of the channels)
    flip_cached     lossless MTPD from orig-only stores: flips served by mirroring cached maps
    online          MTPD with both teachers run inside every step (no store): the reference
    direct          MGD from the stronger teacher in both stages (lossless)
    kd_lossless     MTPD with KD on class scores from lossless stores ...
    kd_tiny         ... and from tiny's top-8 class code (paired with kd_lossless)
    kd_small        (also-report row) ... and from small's logprob-u8 class code (paired with kd_lossless)
    full_schedule   (also-report row) MTPD lossless with a whole schedule per stage (twice the epochs)
    baseline_full   (also-report row) the baseline with as many epochs as full_schedule
    rm_pfi          (also-report row) MTPD with RM + PFI instead of MGD, weights set by the same rule

Splits: ``dev`` trains on the train split minus 400 images carved from it (``dev_split``) and
evaluates on those; ``val`` (the default) trains on the whole train split and evaluates on val.
The students train side by side (``--jobs`` processes, one torch thread each, as the demo does).
Every finished stage is kept under --out: rerunning the command resumes where it stopped. Rows
of a seed run before the next seed's, so a stopped sweep still has paired rows.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/bytes_vs_ap.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, command_line, machine, write_section

TITLE = "Bytes vs AP (bench/bytes_vs_ap.py)"
PLOT = REPO / "docs" / "bytes_vs_ap.png"
PRESETS = ("lossless", "high", "compact", "small", "tiny", "pca-c4")
LIBRARY_PRESETS = PRESETS[:5]  # what mtpd-cache build offers; pca-c4 is the sweep's own variant
DEV_IMAGES = 400  # carved from the train split: as many as val holds
# The decision rule for mtpd-cache build's default --precision (fixed before the sweep).
RULE_MEAN, RULE_LOW = -0.5, -1.0  # paired mean difference to lossless >= -0.5 AP, 90 % interval above -1.0 AP


@contextlib.contextmanager
def _variants():
    """The sweep's preset variants, registered while it runs and removed after (stores record their
    encodings, so training needs no registry, and the library's presets stay what they are)."""
    from mtpd.cache.codes import TopK
    from mtpd.cache.lowbit import PCA, Affine
    from mtpd.cache.schema import PRECISIONS, Precision

    added = {
        "pca-c4": Precision(
            "pca-c4",
            lambda s: PCA(rank=max(1, s.channels // 4), bits=4),
            lambda s: TopK(k=min(8, s.channels), channels=s.channels),
            lambda s: Affine(8),
            "tiny with PCA to a quarter of the channels",
        )
    }
    added = {k: v for k, v in added.items() if k not in PRECISIONS}
    PRECISIONS.update(added)
    try:
        yield
    finally:
        for k in added:
            PRECISIONS.pop(k, None)


@dataclass(frozen=True)
class Row:
    """One row of the sweep: its stages as (stage name, teacher key or None, store key, losses key)."""

    name: str
    stages: tuple[tuple[str, str | None, str, str], ...]
    online: bool = False
    epochs_factor: int = 1  # epochs per stage relative to the benchmark's


def _mtpd(name: str, store: str, losses: str = "mgd", **kw) -> Row:
    return Row(name, (("weak", "weak", store, losses), ("strong", "strong", store, losses)), **kw)


PLAIN = (("plain_1", None, "", "none"), ("plain_2", None, "", "none"))  # the student alone, two stages
ROWS: dict[str, Row] = {
    r.name: r
    for r in (
        Row("baseline", PLAIN),
        *(_mtpd(p, p) for p in PRESETS),
        _mtpd("flip_cached", "lossless-orig"),
        _mtpd("online", "lossless", online=True),
        Row("direct", (("strong_1", "strong", "lossless", "mgd"), ("strong_2", "strong", "lossless", "mgd"))),
        _mtpd("kd_lossless", "lossless", "kd"),
        _mtpd("kd_tiny", "tiny", "kd"),
        _mtpd("kd_small", "small", "kd"),
        _mtpd("full_schedule", "lossless", epochs_factor=2),
        Row("baseline_full", PLAIN, epochs_factor=2),
        _mtpd("rm_pfi", "lossless", "rm_pfi"),
    )
}
MAIN_ROWS = tuple(r for r in ROWS if r not in ("full_schedule", "baseline_full", "rm_pfi", "kd_small"))
# Pairs reported as differences (row, reference); presets are paired with lossless.
PAIRS = (
    *((p, "lossless") for p in PRESETS[1:]),
    ("flip_cached", "lossless"),
    ("lossless", "online"),
    ("kd_tiny", "kd_lossless"),
    ("kd_small", "kd_lossless"),
    ("lossless", "baseline"),
    ("direct", "baseline"),
    ("lossless", "direct"),
    ("full_schedule", "direct"),
    ("full_schedule", "lossless"),
    ("full_schedule", "baseline_full"),
    ("rm_pfi", "baseline"),
    ("kd_lossless", "baseline"),
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench/bytes_vs_ap.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="bench_out/bytes_vs_ap", help="working folder (data, stores, runs); %(default)s")
    p.add_argument("--split", choices=("val", "dev"), default="val", help="evaluate on val or on the dev split")
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated training seeds (default: %(default)s)")
    p.add_argument("--rows", default=",".join(MAIN_ROWS), help=f"comma-separated, among {', '.join(ROWS)}")
    p.add_argument("--jobs", type=int, default=2, help="students trained side by side, one thread each")
    p.add_argument("--quick", action="store_true", help="a few images, one epoch per stage: checks the script")
    p.add_argument("--write", action="store_true", help="write the table into bench/RESULTS.md and the plot")
    p.add_argument(
        "--report",
        action="store_true",
        help="print the table of what has finished so far, training and building nothing (safe while a sweep runs)",
    )
    return p


# ----------------------------------------------------------------------------- data and stores


def dev_split(paths, n_dev: int, seed: int = 0, digest: str = "sha256") -> tuple[Path, Path]:
    """Carve ``n_dev`` images out of the train split: (train-minus-dev, dev) annotation files.

    Which images is decided by a hash (``digest``) of the seed and the file name, so the split does not depend
    on the order of the annotation file and is the same on every machine."""
    ann = json.loads(paths.ann("train").read_text())
    key = lambda im: hashlib.new(digest, f"dev{seed}:{im['file_name']}".encode()).hexdigest()  # noqa: E731
    dev_ids = {im["id"] for im in sorted(ann["images"], key=key)[:n_dev]}
    out = []
    for name, keep in (("devtrain", lambda i: i not in dev_ids), ("dev", lambda i: i in dev_ids)):
        part = dict(ann)
        part["images"] = [im for im in ann["images"] if keep(im["id"])]
        part["annotations"] = [a for a in ann["annotations"] if keep(a["image_id"])]
        path = paths.ann(name)
        text = json.dumps(part)
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
        out.append(path)
    return out[0], out[1]


@dataclass(frozen=True)
class Split:
    train_ann: Path
    train_images: Path
    val_ann: Path
    val_images: Path
    train_count: int
    val_count: int


def _split(paths, which: str, scale) -> Split:
    if which == "val":
        return Split(
            paths.ann("train"), paths.images("train"), paths.ann("val"), paths.images("val"), scale.train, scale.val
        )
    n_dev = min(DEV_IMAGES, scale.train // 5)
    train_ann, dev_ann = dev_split(paths, n_dev)
    return Split(train_ann, paths.images("train"), dev_ann, paths.images("train"), scale.train - n_dev, n_dev)


def store_keys(rows) -> list[str]:
    """The store keys that ``rows`` (Row objects) read: a preset, ``lossless-orig``, or a precision string."""
    return sorted({s[2] for r in rows for s in r.stages if s[1] is not None})


def _store_specs(keys) -> dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]]:
    """Store key -> (precision, outputs, views)."""
    specs = {}
    for k in sorted(keys):
        if k == "lossless-orig":
            specs[k] = ("lossless", ("fpn",), ("orig",))
        else:  # every output, so the table can give bytes for FPN and for all outputs
            specs[k] = (k, ("fpn", "cls", "box"), ("orig", "hflip"))
    return specs


def _lock(root: Path, script: str = "bytes_vs_ap.py"):
    """An exclusive lock on ``root`` for this process's life: two sweeps training into one folder would write
    the same runs at once. Returns the open lock file (closing it releases the lock)."""
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    f = open(root / ".sweep.lock", "a+")  # noqa: SIM115 - held open for the life of the process
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(
            f"another {script} trains into {root}: wait for it, look with --report, or use another --out"
        ) from None
    return f


def store_name(stem: str, teacher: str, key: str) -> str:
    """A store's folder name; a precision string key (small+features=pq:bits=2) becomes one safe name."""
    return f"{stem}-{teacher}-{re.sub(r'[^A-Za-z0-9.-]+', '_', key)}"


def _store_path(paths, split: Split, teacher: str, key: str) -> Path:
    return paths.stores / store_name(split.train_ann.stem, teacher, key)


def _check_store(path: Path, teacher, precision: str, outputs: tuple[str, ...], views: tuple[str, ...]) -> None:
    """A store found under --out must hold what its name says: this teacher's weights, precision, outputs, views."""
    from mtpd.cache.store import StoreReader
    from mtpd.checkpoint import sha256_file

    h = StoreReader(str(path)).header
    found = (h.teacher.get("weights_sha256"), h.precision, tuple(sorted(h.outputs)), h.view_names)
    want = (sha256_file(teacher.checkpoint), precision, tuple(sorted(outputs)), views)
    if found != want:
        raise SystemExit(
            f"{path} holds (weights sha256, precision, outputs, views) = {found}, not {want} as the sweep wants: "
            "delete it (or use another --out) and rerun"
        )


def _build_stores(
    paths, split: Split, teachers: dict, keys, log, pairs: set[tuple[str, str]] | None = None
) -> dict[tuple[str, str], Path]:
    """(teacher key, store key) -> a complete store, for every teacher and key (or only the ``pairs`` given);
    built once, reused on reruns."""
    from mtpd.cache.build import build_store
    from mtpd.data import ViewSpec
    from mtpd.demo import recipes, steps
    from mtpd.teachers.registry import TeacherSpec

    out: dict[tuple[str, str], Path] = {}
    todo = []
    for tkey, t in teachers.items():
        for skey, (prec, outputs, views) in _store_specs(keys).items():
            if pairs is not None and (tkey, skey) not in pairs:
                continue
            path = _store_path(paths, split, tkey, skey)
            out[(tkey, skey)] = path
            if not steps.store_complete(path):
                todo.append((t, path, prec, outputs, views))
            else:
                _check_store(path, t, prec, outputs, views)
    if not todo:
        return out
    import ray

    from mtpd.cache.ray_local import start_local_ray

    started = not ray.is_initialized()
    if started:
        start_local_ray(num_cpus=2)
    try:
        for t, path, prec, outputs, views in todo:
            t0 = time.perf_counter()
            build_store(
                TeacherSpec(t.arch, str(t.checkpoint)),
                str(split.train_ann),
                str(split.train_images),
                str(path),
                views=ViewSpec(short=recipes.SIZE, long=recipes.SIZE, views=views),
                outputs=list(outputs),
                precision=prec,
                batch_size=16,
                workers=1,
                images_per_shard=64,
            )
            took = time.perf_counter() - t0
            log(f"  built {path.name} ({prec}, {','.join(outputs)}, {','.join(views)}) in {took:.0f}s")
    finally:
        if started:
            ray.shutdown()
    return out


def store_bytes(path: Path) -> dict[str, float]:
    """Bytes per image (all its stored views): FPN, class scores, all outputs, and each as fp32 would hold it."""
    from mtpd.cache.inspect import store_info

    info = store_info(str(path))
    n = info["images_done"]
    outs = info["outputs"]
    out = {"all": info["output_bytes"] / n}
    for name in ("fpn", "cls"):
        if name in outs:
            out[name] = outs[name]["stored_bytes"] / n
            out[f"{name}_fp32"] = outs[name]["raw_fp32_bytes"] / n
    return out


# ----------------------------------------------------------------------------- plans and runs


def _losses(kind: str) -> list[dict]:
    from mtpd.demo import recipes

    return {
        "none": [],
        "mgd": [recipes.mgd_loss()],
        "kd": [recipes.kd_loss()],
        "rm_pfi": recipes.rm_pfi_losses(),
    }[kind]


def _plan(row: Row, seed: int, paths, split: Split, scale, stores: dict, losses=None, epochs=None) -> Path:
    """The plan of ``row`` at ``seed``; ``losses(key, iters_per_epoch)`` gives each stage's losses (default:
    this sweep's ``_losses``), ``epochs`` each stage's epochs (default: the scale's times ``row.epochs_factor``)."""
    from mtpd.demo import recipes, steps

    ipe = -(-split.train_count // 16)
    pick = losses or (lambda key, _ipe: _losses(key))
    epochs = epochs or [scale.stage_epochs * row.epochs_factor] * len(row.stages)
    stages = [
        recipes.stage(sname, e, ipe, [str(stores[(t, s)])] if t else [], pick(loss, ipe))
        for (sname, t, s, loss), e in zip(row.stages, epochs)
    ]
    plan = recipes.plan(recipes.STUDENT, paths.data, paths.runs / f"{row.name}_s{seed}", stages, ipe, seed=seed)
    plan["data"].update(
        train_ann=str(split.train_ann),
        train_images=str(split.train_images),
        val_ann=str(split.val_ann),
        val_images=str(split.val_images),
    )
    return steps.write_plan(plan, paths.plans / f"{row.name}_s{seed}.yaml")


def _online(row: Row, teachers: dict) -> dict[int, tuple[str, str]] | None:
    if not row.online:
        return None
    return {k: (teachers[t].arch, str(teachers[t].checkpoint)) for k, (_, t, _, _) in enumerate(row.stages, 1)}


def run_all(tasks: list[tuple[str, int, Path, dict | None]], n_jobs: int, log, on_done) -> None:
    """Train ``tasks`` (row, seed, plan, online) ``n_jobs`` at a time, each in its own one-thread process;
    ``on_done(row, seed, job)`` after each."""
    from mtpd.demo import jobs

    pending = list(tasks)
    running: dict[str, tuple[str, int, jobs.Job]] = {}
    try:
        while pending or running:
            while pending and len(running) < n_jobs:
                row, seed, plan, online = pending.pop(0)
                j = jobs.start(f"{row}_s{seed}", plan, log, 1, online=online)
                running[j.name] = (row, seed, j)
            jobs.wait(
                [j for _, _, j in running.values()],
                log,
                True,
                until=lambda: any(not j.running() for _, _, j in running.values()),
            )
            for name, (row, seed, j) in list(running.items()):
                if not j.running():
                    del running[name]
                    j.relay(log, True)  # what it sent last, and its error if it failed after wait's last check
                    j.check()
                    on_done(row, seed, j)
    finally:
        for _, _, j in running.values():
            j.stop()


# ----------------------------------------------------------------------------- statistics


def t90(df: int) -> float:
    """Two-sided 90 % quantile of Student's t (df >= 1); scipy comes with scikit-learn, a core dependency."""
    from scipy.stats import t

    return float(t.ppf(0.95, df))


def paired(results: dict[str, dict[int, float]], a: str, b: str) -> dict | None:
    """Mean, std and 90 % interval (t) of the per-seed differences a - b, in AP points."""
    seeds = sorted(set(results.get(a, {})) & set(results.get(b, {})))
    if not seeds:
        return None
    d = [100 * (results[a][s] - results[b][s]) for s in seeds]
    mean = statistics.mean(d)
    sd = statistics.stdev(d) if len(d) > 1 else float("nan")
    half = t90(len(d) - 1) * sd / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    return {"n": len(d), "mean": mean, "std": sd, "low": mean - half, "high": mean + half, "per_seed": d}


def default_precision(
    results: dict[str, dict[int, float]], fpn_bytes: dict[str, float], candidates: tuple[str, ...] = LIBRARY_PRESETS
) -> str:
    """The smallest preset of ``candidates`` (FPN bytes) whose paired mean difference to lossless is >= RULE_MEAN
    AP and whose 90 % interval stays above RULE_LOW AP; lossless when none qualifies."""
    ok = ["lossless"]
    for p in candidates[1:]:
        d = paired(results, p, "lossless")
        if d is not None and d["n"] > 1 and d["mean"] >= RULE_MEAN and d["low"] > RULE_LOW:
            ok.append(p)
    return min(ok, key=lambda p: fpn_bytes.get(p, math.inf))


def _summary(results: dict, seconds: dict, bytes_: dict[str, dict[str, float]], seeds: list[int]) -> list[str]:
    def ms(vals: list[float]) -> str:
        if len(vals) < 2:
            return f"{100 * vals[0]:.2f}"
        return f"{100 * statistics.mean(vals):.2f} ± {100 * statistics.stdev(vals):.2f}"

    def kib(b: float | None) -> str:
        return "-" if b is None else f"{b / 1024:.1f}"

    lines = [
        "| row | FPN KiB/image | FPN vs fp32 | class scores KiB/image | all outputs KiB/image | seeds | "
        "AP (mean ± std) | paired diff to lossless [90 % CI] | train min |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for name, row in ROWS.items():
        r = {s: v for s, v in results.get(name, {}).items() if s in seeds}
        if not r:
            continue
        b = bytes_.get(name) or {}
        frac = f"1/{b['fpn_fp32'] / b['fpn']:.1f}" if "fpn" in b else "-"
        ref = "kd_lossless" if name.startswith("kd_") else "lossless"
        d = (
            paired(results, name, ref)
            if name != ref and (name in PRESETS or name == "flip_cached" or name.startswith("kd_"))
            else None
        )
        diff = (
            "-"
            if d is None
            else f"{d['mean']:+.2f}"
            + (f" [{d['low']:+.2f}, {d['high']:+.2f}]" if d["n"] > 1 else "")
            + (" (vs kd_lossless)" if ref == "kd_lossless" else "")
        )
        secs = [seconds[name][s] for s in r if s in seconds.get(name, {})]
        lines.append(
            f"| {name} | {kib(b.get('fpn'))} | {frac} | {kib(b.get('cls'))} | {kib(b.get('all'))} | {len(r)} | "
            f"{ms(list(r.values()))} | {diff} | {statistics.mean(secs) / 60:.1f} |"
        )
    return lines


def pairs_lines(results: dict, pairs: tuple = PAIRS) -> list[str]:
    """A table of paired differences, one row per ``(a, b)`` or ``(a, b, what the pair tests)`` of ``pairs``."""
    lines = [
        "| comparison | seeds | mean | std of differences | 90 % interval | per seed |",
        "|---|---:|---:|---:|---|---|",
    ]
    for a, b, *what in pairs:
        d = paired(results, a, b)
        if d is None:
            continue
        per = ", ".join(f"{x:+.2f}" for x in d["per_seed"])
        ci = f"[{d['low']:+.2f}, {d['high']:+.2f}]" if d["n"] > 1 else "-"
        sd = f"{d['std']:.2f}" if d["n"] > 1 else "-"
        name = f"{a} − {b}" + (f" ({what[0]})" if what else "")
        lines.append(f"| {name} | {d['n']} | {d['mean']:+.2f} | {sd} | {ci} | {per} |")
    return lines


def _noise_lines(results: dict) -> list[str]:
    """Std of single runs per row: the noise a one-seed comparison would carry."""
    out = []
    for name in ROWS:
        r = results.get(name, {})
        if len(r) > 1:
            out.append(f"{name} {100 * statistics.stdev(r.values()):.2f}")
    return ["Std of single runs (AP): " + ", ".join(out)] if out else []


def plot(results: dict, bytes_: dict[str, dict[str, float]], path: Path, split: str = "val") -> None:
    """AP against FPN bytes per image (log axis): a point per preset with its 90 % interval of the mean,
    and the baseline and online rows as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 - matplotlib.ticker below

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    shown = sorted(
        (n for n in (*PRESETS, "flip_cached") if results.get(n) and n in bytes_), key=lambda n: bytes_[n]["fpn"]
    )
    for i, name in enumerate(shown):
        vals = [100 * v for v in results[name].values()]
        m = statistics.mean(vals)
        half = t90(len(vals) - 1) * statistics.stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else 0.0
        x = bytes_[name]["fpn"] / 1024
        ax.errorbar([x], [m], yerr=[half], fmt="o", capsize=4, color="C3" if name == "flip_cached" else "C0")
        frac = bytes_[name]["fpn_fp32"] / bytes_[name]["fpn"]
        # Labels above and below the bars in turn: neighbours on the log axis sit close.
        up = i % 2 == 0
        ax.annotate(
            f"{name}\n1/{frac:.0f}",
            (x, m + half if up else m - half),
            textcoords="offset points",
            xytext=(0, 3 if up else -3),
            va="bottom" if up else "top",
            ha="center",
            fontsize=7,
        )
    for name, color in (("online", "C2"), ("baseline", "C7")):
        r = results.get(name)
        if r:
            ax.axhline(100 * statistics.mean(r.values()), color=color, ls="--", lw=1, label=f"{name} (mean)")
    ax.margins(y=0.15)  # room for the labels above the highest bars
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks([5, 10, 20, 50, 100])
    ax.set_xlim(
        left=min(bytes_[n]["fpn"] for n in shown) / 1024 / 1.3, right=max(bytes_[n]["fpn"] for n in shown) / 1024 * 1.3
    )
    ax.set_xlabel("FPN bytes per image (KiB, log scale; labels: fraction of fp32)")
    ax.set_ylabel("student AP (mean of seeds, 90 % interval of the mean)")
    ax.set_title(f"MTPD student AP against store size (digits, {split})")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see mtpd.cli.demo: spinning threads stall on shared CPUs
    with _variants():
        return _main(a, argv)


def _main(a: argparse.Namespace, argv: list[str] | None) -> int:
    from mtpd.demo import recipes, steps

    seeds = [int(s) for s in a.seeds.split(",")]
    rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    for r in rows:
        if r not in ROWS:
            raise SystemExit(f"unknown row {r!r}; choose from {', '.join(ROWS)}")
    if a.quick and a.write:
        raise SystemExit("--quick checks the script; its numbers are not results: drop --write")
    if a.report and a.write:
        raise SystemExit("--report shows runs as they stand; --write records a finished sweep: give one of them")
    scale = recipes.QUICK if a.quick else recipes.FULL
    paths = steps.Paths(Path(a.out) / (f"quick-{a.split}" if a.quick else a.split))  # never the real runs' data
    log = lambda s: print(s, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    if not a.report:
        steps.ensure_data(paths, scale, log)
        lock = _lock(paths.root)  # noqa: F841 - held until the process ends
    split = _split(paths, a.split, scale)
    teachers = steps.ensure_teachers(paths, scale, False, log)
    if a.report:
        stores = {(t, k): _store_path(paths, split, t, k) for t in teachers for k in store_keys(ROWS[r] for r in rows)}
    else:
        stores = _build_stores(paths, split, teachers, store_keys(ROWS[r] for r in rows), log)
    res_path = paths.root / "results.json"
    saved = json.loads(res_path.read_text()) if res_path.is_file() else {}
    results = {r: {int(s): v for s, v in d.items()} for r, d in saved.get("results", {}).items()}
    seconds = {r: {int(s): v for s, v in d.items()} for r, d in saved.get("train_seconds", {}).items()}

    def on_done(row: str, seed: int, job) -> None:
        from mtpd.demo import jobs

        metrics = jobs.metrics(job)
        results.setdefault(row, {})[seed] = metrics[-1]["AP"]
        seconds.setdefault(row, {})[seed] = sum(m["train_seconds"] for m in metrics)
        stage_aps = [round(100 * m["AP"], 2) for m in metrics]
        log(f"   {row} seed {seed}: AP {100 * metrics[-1]['AP']:.2f} (stages {stage_aps})")
        tmp = res_path.with_suffix(".tmp")  # a kill mid-write must not cost the finished runs' record
        tmp.write_text(json.dumps({"results": results, "train_seconds": seconds}, indent=2))
        os.replace(tmp, res_path)

    tasks = []
    rows_to_run = [] if a.report else rows
    # Seed-major (a stopped sweep still has paired rows), the also-report rows after every main row.
    order = [r for r in rows_to_run if r in MAIN_ROWS] + [r for r in rows_to_run if r not in MAIN_ROWS]
    for group in ([r for r in order if r in MAIN_ROWS], [r for r in order if r not in MAIN_ROWS]):
        for seed in seeds:
            for r in group:
                row = ROWS[r]
                plan = _plan(row, seed, paths, split, scale, stores)
                _, todo = steps.stages_todo(plan, lambda s: None)
                if todo or seed not in results.get(r, {}):
                    tasks.append((r, seed, plan, _online(row, teachers)))
    log("--report: nothing trains" if a.report else f"{len(tasks)} student runs to train, {a.jobs} side by side")
    run_all(tasks, a.jobs, log, lambda r, s, j: on_done(r, s, j))

    # What this invocation asked for: its rows and seeds (results.json may hold more).
    shown = {r: {s: results[r][s] for s in seeds if s in results.get(r, {})} for r in rows}
    shown = {r: v for r, v in shown.items() if v}
    # Bytes per image: mean over both teachers' stores of the row's precision.
    bytes_: dict[str, dict[str, float]] = {}
    for r in shown:
        keys = {s[2] for s in ROWS[r].stages if s[1] is not None}
        if len(keys) == 1 and (r in (*PRESETS, "flip_cached") or r.startswith("kd_")):
            (k,) = keys
            if not all(steps.store_complete(stores[(t, k)]) for t in teachers):
                continue  # --report before the stores were built
            per = [store_bytes(stores[(t, k)]) for t in teachers]
            b = {f: statistics.mean(x[f] for x in per) for f in per[0]}
            if r.startswith("kd_"):  # KD reads class scores only: show what it reads
                b = {f: v for f, v in b.items() if f.startswith("cls")}
            elif r == "flip_cached":  # its store holds FPN maps only
                b.pop("all")
            bytes_[r] = b
    table = _summary(shown, seconds, bytes_, seeds)
    pairs = pairs_lines(shown)
    fpn = {p: b["fpn"] for p, b in bytes_.items() if p in PRESETS}
    choice, with_variant = default_precision(shown, fpn), default_precision(shown, fpn, PRESETS)
    decision = (
        f"Default precision by the rule (paired mean ≥ {RULE_MEAN} AP and 90 % interval above {RULE_LOW} AP "
        f"against lossless, smallest FPN bytes), among mtpd-cache build's presets: **{choice}**"
        + ("" if with_variant == choice else f"; counting the sweep's variants: **{with_variant}**")
    )
    print("\n".join(["", *table, "", *pairs, "", *_noise_lines(shown), "", decision]))
    summary = {"bytes": bytes_, "default": choice, "default_with_variants": with_variant}
    (paths.root / "summary.json").write_text(json.dumps(summary, indent=2))
    if a.write:
        if a.split == "val":  # the plot is the sweep's answer; the dev split's runs are the noise floor
            plot(shown, bytes_, PLOT, a.split)
        students_h = sum(seconds.get(r, {}).get(s, 0.0) for r, v in shown.items() for s in v) / 3600
        body = "\n".join(
            [
                f"Command: `{command_line('bytes_vs_ap.py', argv)}`  ",
                f"Date: {time.strftime('%Y-%m-%d')}; machine: {machine()}; students trained for {students_h:.1f} h "
                f"of single-thread time, {a.jobs} side by side (this invocation's wall time "
                f"{(time.perf_counter() - t0) / 3600:.1f} h: a rerun reuses finished stages)  ",
                f"Setup: {recipes.describe(split.train_count, split.val_count)}; split {a.split}; seeds {seeds}. "
                "AP is COCO box AP (×100) after the "
                "last stage; bytes are per image (both stored views, orig-only for flip_cached), averaged over both "
                "teachers' stores; fp32 is what the same maps would take as raw float32.",
                "",
                *table,
                "",
                *pairs,
                "",
                *_noise_lines(shown),
                "",
                decision,
                *(["", f"![AP against bytes]({PLOT.relative_to(REPO)})"] if a.split == "val" else []),
            ]
        )
        write_section(TITLE + ("" if a.split == "val" else " — dev split (noise floor)"), body)
        print("wrote its section of bench/RESULTS.md" + (f" and {PLOT.relative_to(REPO)}" if a.split == "val" else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
