"""Every benchmark runs end to end on tiny sizes and prints its tables with numbers.

No timing is asserted: CI machines are as noisy as this one. What is checked is
that each script still runs through the library's current API and produces a
table, and that the RESULTS.md writer replaces only its own section.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ sits beside the package and is not installed
    sys.path.insert(0, str(ROOT))

NUMBER_CELL = re.compile(r"\|\s*-?\d[\d,]*(\.\d+)?(e[-+]?\d+)?\s*\|")


def _tables(text: str) -> list[list[str]]:
    """Markdown tables of ``text``, as lists of their lines."""
    tables, cur = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            cur.append(line)
        elif cur:
            tables.append(cur)
            cur = []
    if cur:
        tables.append(cur)
    return tables


@pytest.mark.parametrize("name", ["step", "store", "reader", "build", "latency", "losses", "scale"])
def test_benchmark_quick_mode_prints_tables(name, tmp_path, request):
    if name == "build":
        request.getfixturevalue("ray_session")  # share the session's Ray instead of starting another
    results = ROOT / "bench" / "RESULTS.md"
    before = results.read_bytes() if results.exists() else None
    mod = importlib.import_module(f"bench.{name}")
    text = mod.main(["--quick", "--no-write", "--work-dir", str(tmp_path)])
    tables = _tables(text)
    assert tables, f"bench/{name}.py printed no table:\n{text}"
    body_rows = [row for t in tables for row in t[2:]]
    assert any(NUMBER_CELL.search(row) for row in body_rows), f"bench/{name}.py's tables hold no numbers:\n{text}"
    assert "Command: `.venv/bin/python bench/" in text
    # --no-write leaves RESULTS.md as it was.
    assert (results.read_bytes() if results.exists() else None) == before


def test_results_writer_replaces_only_its_own_section(tmp_path):
    from bench.common import write_section

    path = tmp_path / "RESULTS.md"
    quality = "## Quality\n\nsomeone else's table\n| a | b |\n\n"
    path.write_text("# Benchmark results\n\n## Step (bench/step.py)\n\nold\n\n" + quality)
    write_section("Step (bench/step.py)", "new body", path=path)
    write_section("Reader (bench/reader.py)", "reader body", key="800x1333", path=path)
    write_section("Reader (bench/reader.py)", "quick body", key="64x96", path=path)
    write_section("Reader (bench/reader.py)", "reader body 2", key="800x1333", path=path)
    text = path.read_text()
    assert quality in text
    assert "old" not in text and "new body" in text
    assert text.count("## Reader (bench/reader.py)") == 1
    assert "reader body 2" in text and "reader body\n" not in text and "quick body" in text
    assert text.index("### 800x1333") < text.index("### 64x96")


STUDIES = ROOT / "bench" / "studies"


@pytest.fixture(scope="module")
def bench_copy(tmp_path_factory) -> Path:
    """bench/studies in a folder laid out like the repository: a small digits set where digits.yaml reads it,
    the shipped teachers where the studies name them, and dev splits of 8 images (the set has 24)."""
    from mtpd.data.digits import make_digits

    root = tmp_path_factory.mktemp("repo")
    (root / "bench" / "studies").mkdir(parents=True)
    for f in STUDIES.glob("*.yaml"):
        (root / "bench" / "studies" / f.name).write_text(f.read_text().replace("images: 400", "images: 8"))
    (root / "mtpd" / "demo").mkdir(parents=True)
    (root / "mtpd" / "demo" / "teachers").symlink_to(ROOT / "mtpd" / "demo" / "teachers")
    make_digits(root / "bench_out" / "digits", train=24, val=8, size=128, seed=0)
    make_digits(root / "bench_out" / "digits_pool", train=0, val=0, size=128, seed=0, pool=16)  # pool.yaml's
    make_digits(root / "bench_out" / "digits500", train=12, val=0, size=128, seed=0)
    return root


@pytest.mark.parametrize("name", sorted(p.stem for p in STUDIES.glob("*.yaml") if p.stem != "digits"))
def test_each_study_file_is_short_and_every_row_makes_a_valid_plan_on_both_splits(name, bench_copy):
    """Every row of every study file is a plan mtpd-train accepts, on val and on the dev split, and its
    teachers are shipped files: a study of the benchmark cannot fail an hour in."""
    from mtpd.study.run import plans_for
    from mtpd.study.spec import load_study
    from mtpd.study.splits import split_data

    assert len((STUDIES / f"{name}.yaml").read_text().splitlines()) <= 80
    study = load_study(bench_copy / "bench" / "studies" / f"{name}.yaml")
    for split in ("val", "dev"):
        rows = [r for r, row in study.rows.items() if split in row.splits]
        if not rows:
            continue
        plans = plans_for(study, rows, split_data(study, split, False, lambda s: None), False)
        for r, plan in plans.items():
            for stage in plan.stages:
                if stage.teacher is not None:
                    assert Path(stage.teacher.weights).is_file(), (name, r, stage.name)
                    assert Path(stage.teacher.weights).parent.name == "teachers"


def test_bytes_vs_ap_study_quick_builds_its_stores_and_trains_every_kind_of_row(bench_copy, capsys):
    """bench/studies/bytes_vs_ap.yaml in --quick mode through mtpd-study: stores of two presets with every output
    and an orig-only one, built through the catalog for both teachers; plain, cached, flip-from-cache, online and KD
    students side by side; bytes per row from the stores they read; bench/kd_targets.py reads the same stores."""
    import json

    from mtpd.cli.study import main

    study = bench_copy / "bench" / "studies" / "bytes_vs_ap.yaml"
    rows = ["baseline", "lossless", "tiny", "flip_cached", "online", "kd_lossless", "kd_tiny"]
    assert main([str(study), "--quick", "--rows", ",".join(rows), "--jobs", "2"]) == 0
    printed = capsys.readouterr().out
    out_dir = bench_copy / "bench" / "studies" / "bytes_vs_ap_out"
    record = json.loads((out_dir / "quick-val" / "record.json").read_text())
    assert sorted(record) == sorted(rows)
    assert not (bench_copy / "bench" / "results").exists()  # a quick run never writes beside the real records
    table = {ln.split("|")[1].strip().split(" (")[0]: ln for ln in printed.splitlines() if ln.startswith("| ")}

    def kib(row: str) -> float:
        return float(table[row].split("|")[-3])

    assert kib("tiny") < kib("lossless") / 3 and kib("flip_cached") < kib("lossless") / 2
    assert table["baseline"].split("|")[-3].strip() == "-" and table["online"].split("|")[-3].strip() == "-"
    from mtpd.cache.store import store_header

    stores = {}
    for p in (bench_copy / "bench_out" / "cache").iterdir():
        if p.is_dir():
            h = store_header(str(p))
            stores[(h.teacher["name"], h.precision, tuple(h.view_names))] = p
    assert sorted(stores) == sorted(
        (t, prec, views)
        for t in ("retinanet_tiny", "retinanet_tiny_wide")
        for prec, views in (("lossless", ("orig", "hflip")), ("lossless", ("orig",)), ("tiny", ("orig", "hflip")))
    )
    from bench import kd_targets

    pick = {prec: str(p) for (t, prec, views), p in stores.items() if t == "retinanet_tiny_wide" and len(views) == 2}
    args = [f"--store={k}={v}" for k, v in pick.items()]
    assert kd_targets.main([*args, "--presets", "lossless,tiny", "--samples", "3", "--candidate", "0"]) == 0
    out = capsys.readouterr().out.splitlines()
    moved = {ln.split(", ")[1].split("'")[0]: float(ln.split()[-1]) for ln in out if "KD loss" in ln}
    assert moved["lossless"] == 0.0 and moved["tiny"] > 0.0


def test_pool_study_quick_builds_pool_stores_and_trains_pool_rows(bench_copy, capsys):
    """bench/studies/pool.yaml in --quick mode: both teachers' stores of the pool built through the catalog beside
    the labelled set's, and MTPD, a mixed and a pool-pretraining row trained side by side."""
    import json

    from mtpd.cache.store import store_header
    from mtpd.cli.study import main

    study = bench_copy / "bench" / "studies" / "pool.yaml"
    rows = ["baseline", "mtpd", "mix50_kd", "pretrain_kd", "mix50_kd_500"]
    assert main([str(study), "--quick", "--rows", ",".join(rows), "--jobs", "2"]) == 0
    record = json.loads((bench_copy / "bench" / "studies" / "pool_out" / "quick-val" / "record.json").read_text())
    assert sorted(record) == sorted(rows)
    built = {}
    for p in (bench_copy / "bench_out" / "cache").iterdir():
        if p.is_dir() and (p / "zarr.json").is_file():
            h = store_header(str(p))
            built.setdefault(h.teacher["name"], set()).add((Path(h.ann_file).name, h.num_images))
    for teacher in ("retinanet_tiny", "retinanet_tiny_wide"):
        # the train set's and the pool's quick cuts (their first 16 images: the same file names, other pixels, so
        # other stores), and the 500-image set's, which a quick run leaves whole
        got = sorted(("pool_*.json" if f.startswith("pool_") else f, n) for f, n in built[teacher])
        assert got == [("instances_train.json", 12), ("pool_*.json", 16), ("train.json", 16)], built
    runs = bench_copy / "bench" / "studies" / "pool_out" / "quick-val" / "runs"
    first = [json.loads(x) for x in (runs / "pretrain_kd_s0" / "stage_1" / "log.jsonl").read_text().splitlines()]
    assert first and not any(k.startswith("det_") for rec in first for k in rec)  # the pool alone: no labels
    mixed = [json.loads(x) for x in (runs / "mix50_kd_s0" / "stage_1" / "log.jsonl").read_text().splitlines()]
    assert all({"det_classification", "mgd", "kd"} <= set(rec) for rec in mixed)


def test_augment_study_quick_builds_banks_and_trains_live_on_fresh_views(bench_copy, capsys):
    """bench/studies/augment.yaml in --quick mode: both teachers' banks of 8 augmented views built through the
    catalog, a student from them, the teachers live on fresh views, and the plain student on fresh views."""
    import json

    from mtpd.cache.store import store_header
    from mtpd.cli.study import main

    study = bench_copy / "bench" / "studies" / "augment.yaml"
    rows = ["baseline_aug_long", "online_aug_long", "bank8_long"]
    assert main([str(study), "--quick", "--rows", ",".join(rows), "--jobs", "2"]) == 0
    record = json.loads((bench_copy / "bench" / "studies" / "augment_out" / "quick-val" / "record.json").read_text())
    assert sorted(record) == sorted(rows)
    cache = bench_copy / "bench_out" / "cache"
    headers = [store_header(str(p)) for p in cache.iterdir() if (p / "zarr.json").is_file()]
    banks = [h for h in headers if h.views.get("augment")]
    assert sorted(h.teacher["name"] for h in banks) == ["retinanet_mobilenet_v2_fpn", "retinanet_tiny_wide"]
    assert all(len(h.view_names) == 8 and h.views["augment"]["scale"] == [0.75, 1.33] for h in banks)


def test_rm_terms_counts_candidates_per_box(bench_copy, capsys):
    from bench import rm_terms

    assert rm_terms.main(["--ann", str(bench_copy / "bench_out/digits/annotations/instances_train.json")]) == 0
    out = capsys.readouterr().out
    assert "IoU ≥ 0.5 only" in out and "Best anchor IoU per box" in out


def test_cls_codes_quick_mode_compares_per_anchor_and_per_cell_top_k(tmp_path, capsys):
    from bench import cls_codes

    assert cls_codes.main(["--quick", "--out", str(tmp_path)]) == 0
    rows = {
        (ln.split("|")[1].strip(), ln.split("|")[2].strip()): ln
        for ln in capsys.readouterr().out.splitlines()
        if "|" in ln
    }
    kd = {k: float(v.split("|")[6]) for k, v in rows.items() if k[0] == "strong"}
    assert kd[("strong", "lossless")] == 0.0 < kd[("strong", "logprob-u8")] < kd[("strong", "top8-cell")]
    assert kd[("strong", "top3-anchor")] < kd[("strong", "top1-anchor")]  # more kept per anchor: closer targets
    assert 0.0 < kd[("strong", "pq2-anchor")] and 0.0 < kd[("strong", "pq1-anchor")] < kd[("strong", "top8-cell")]
    with pytest.raises(SystemExit, match="drop --write"):
        cls_codes.main(["--quick", "--write", "--out", str(tmp_path)])
