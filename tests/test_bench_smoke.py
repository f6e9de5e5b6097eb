"""Every benchmark runs end to end on tiny sizes and prints its tables with numbers.

No timing is asserted: CI machines are as noisy as this one. What is checked is
that each script still runs through the library's current API and produces a
table, and that the RESULTS.md writer replaces only its own section.
"""

from __future__ import annotations

import importlib
import re
import shutil
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


@pytest.mark.parametrize("name", ["step", "store", "reader", "build", "latency", "losses"])
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


@pytest.mark.slow
def test_bytes_vs_ap_quick_mode_trains_every_kind_of_row_and_resumes(tmp_path, ray_session, capsys):
    """bench/bytes_vs_ap.py at the demo's quick scale (CI's smoke test of the sweep): stores of two presets
    with every output, an orig-only store, plain, cached, flip-from-cache, online and KD students trained
    side by side, results per seed, the table with bytes; a rerun trains nothing (no --write: RESULTS.md and
    the plot are left alone)."""
    import json

    from bench import bytes_vs_ap as bva

    results = ROOT / "bench" / "RESULTS.md"
    before = results.read_bytes() if results.exists() else None
    plot_before = bva.PLOT.read_bytes() if bva.PLOT.exists() else None
    rows = ["baseline", "lossless", "tiny", "flip_cached", "online", "kd_lossless", "kd_tiny"]
    args = ["--quick", "--seeds", "0", "--rows", ",".join(rows), "--out", str(tmp_path)]
    assert bva.main(args) == 0
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "quick-val" / "results.json").read_text())
    assert sorted(saved["results"]) == sorted(rows)
    for row in rows:
        ap = saved["results"][row]["0"]
        assert 0.0 <= ap <= 1.0, (row, ap)
        assert (tmp_path / "quick-val" / "runs" / f"{row}_s0" / "stage_2" / "final.pt").is_file(), row
    stores = sorted(p.name for p in (tmp_path / "quick-val" / "stores").iterdir())
    assert stores == [
        f"instances_train-{t}-{k}" for t in ("strong", "weak") for k in ("lossless", "lossless-orig", "tiny")
    ]
    table = {line.split("|")[1].strip(): line for line in printed.splitlines() if line.startswith("| ")}

    # Bytes per image: tiny's FPN is several times smaller than lossless's; the orig-only store half of it.
    def kib(row: str, col: int) -> float:
        return float(table[row].split("|")[col])

    assert kib("tiny", 2) < kib("lossless", 2) / 4
    assert kib("flip_cached", 2) == pytest.approx(kib("lossless", 2) / 2, rel=0.15)
    assert kib("kd_tiny", 4) < kib("kd_lossless", 4) / 2  # top-8 class codes against fp16 scores
    assert "(vs kd_lossless)" in table["kd_tiny"]
    # bench/kd_targets.py reads the same stores: lossless against itself moves KD's targets by nothing.
    from bench import kd_targets

    st = str(tmp_path / "quick-val" / "stores")
    assert kd_targets.main(["--stores", st, "--presets", "lossless,tiny", "--samples", "3", "--candidate", "0"]) == 0
    out = capsys.readouterr().out.splitlines()
    moved = {ln.split(", ")[1].split("'")[0]: float(ln.split()[-1]) for ln in out if "KD loss" in ln}
    assert moved["lossless"] == 0.0 and moved["tiny"] > 0.0
    # RM's view over every anchor: lossless ranks them as itself; top-8 per cell leaves most at its floor (ties).
    ranked = {ln.split(", ")[1].split(":")[0]: ln for ln in out if ln.startswith("RM's view")}
    assert "with lossless over anchors at p >= 0.0: 1.000" in ranked["lossless"]
    assert float(ranked["tiny"].split(": ")[-1].split()[0]) < 1.0
    assert "Default precision by the rule" in printed
    assert "| - |" in table["flip_cached"]  # its store holds FPN maps only: no "all outputs" figure
    # A rerun finds every stage finished and trains nothing.
    assert bva.main(args) == 0
    assert "0 student runs to train" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="drop --write"):
        bva.main([*args, "--write"])
    # --report reads what has finished; a second sweep into the same folder is refused while one trains.
    assert bva.main([*args, "--report"]) == 0
    assert "--report: nothing trains" in capsys.readouterr().out
    held = bva._lock(tmp_path / "quick-val")
    with pytest.raises(SystemExit, match="another bytes_vs_ap.py trains into"):
        bva.main(args)
    held.close()
    # A store under --out that holds another teacher's maps than its name says is refused, not reused.
    from mtpd.demo import recipes, steps

    teachers = steps.ensure_teachers(steps.Paths(tmp_path / "quick-val"), recipes.QUICK, False, lambda s: None)
    store = tmp_path / "quick-val" / "stores" / "instances_train-weak-tiny"
    bva._check_store(store, teachers["weak"], "tiny", ("fpn", "cls", "box"), ("orig", "hflip"))
    with pytest.raises(SystemExit, match="delete it"):
        bva._check_store(store, teachers["strong"], "tiny", ("fpn", "cls", "box"), ("orig", "hflip"))
    assert (results.read_bytes() if results.exists() else None) == before
    assert (bva.PLOT.read_bytes() if bva.PLOT.exists() else None) == plot_before


def test_bytes_vs_ap_paired_intervals_and_default_rule():
    from bench.bytes_vs_ap import default_precision, paired, t90

    # Paired by seed: seed 2 has no partner and enters no difference.
    r = {"lossless": {0: 0.200, 1: 0.210, 2: 0.5}, "small": {0: 0.198, 1: 0.206}}
    d = paired(r, "small", "lossless")
    assert d["n"] == 2 and d["per_seed"] == pytest.approx([-0.2, -0.4])
    assert d["mean"] == pytest.approx(-0.3)
    half = t90(1) * d["std"] / 2**0.5
    assert (d["low"], d["high"]) == pytest.approx((-0.3 - half, -0.3 + half))
    assert t90(4) == pytest.approx(2.132, abs=1e-3) and abs(t90(30) - 1.697) < 0.01

    base = {s: 0.20 + 0.01 * s for s in range(5)}
    fpn = {"lossless": 100.0, "high": 80.0, "compact": 60.0, "small": 20.0, "tiny": 10.0}

    def shifted(points: list[float]) -> dict[int, float]:
        return {s: base[s] + p / 100 for s, p in enumerate(points)}

    results = {
        "lossless": base,
        "high": shifted([0.1, -0.1, 0.0, 0.2, -0.2]),
        "compact": shifted([-0.3, -0.2, -0.4, -0.3, -0.3]),  # mean -0.3, tight: qualifies
        "small": shifted([-0.4, 0.5, -1.5, -0.9, 0.3]),  # mean -0.4 but the interval reaches below -1.0
        "tiny": shifted([-0.7, -0.6, -0.8, -0.5, -0.9]),  # mean -0.7: below -0.5
    }
    assert default_precision(results, fpn) == "compact"
    results["small"] = shifted([-0.4, -0.3, -0.5, -0.4, -0.4])
    assert default_precision(results, fpn) == "small"
    assert default_precision({"lossless": base}, fpn) == "lossless"
    # The sweep's own variant is no candidate for the library's default unless asked for.
    results["pca-c4"] = shifted([0.0, 0.1, -0.1, 0.0, 0.0])
    fpn["pca-c4"] = 5.0
    assert default_precision(results, fpn) == "small"
    assert default_precision(results, fpn, tuple(fpn)) == "pca-c4"


def test_dev_split_is_carved_from_train_deterministically(tmp_path):
    import json

    from bench.bytes_vs_ap import dev_split
    from mtpd.demo.steps import Paths

    paths = Paths(tmp_path)
    ann = paths.ann("train")
    ann.parent.mkdir(parents=True)
    images = [{"id": i, "file_name": f"{i:05d}.png", "width": 8, "height": 8} for i in range(1, 51)]
    annotations = [
        {"id": i, "image_id": i, "category_id": 1, "bbox": [0, 0, 2, 2], "area": 4, "iscrowd": 0} for i in range(1, 51)
    ]
    ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "a"}]}))
    train, dev = dev_split(paths, 10)
    t, d = json.loads(train.read_text()), json.loads(dev.read_text())
    t_ids, d_ids = {im["id"] for im in t["images"]}, {im["id"] for im in d["images"]}
    assert len(d_ids) == 10 and len(t_ids) == 40 and not t_ids & d_ids
    assert {a["image_id"] for a in d["annotations"]} == d_ids
    # The same files whatever the order of the annotation file.
    ann.write_text(
        json.dumps({"images": images[::-1], "annotations": annotations, "categories": [{"id": 1, "name": "a"}]})
    )
    _, dev2 = dev_split(paths, 10)
    assert {im["id"] for im in json.loads(dev2.read_text())["images"]} == d_ids


def test_bytes_vs_ap_plot(tmp_path):
    """The plot of the sweep's answer draws from results and bytes alone (what --write passes it)."""
    from PIL import Image

    from bench.bytes_vs_ap import plot

    results = {
        p: {s: 0.20 + 0.002 * s + 0.001 * i for s in range(5)} for i, p in enumerate(("lossless", "small", "tiny"))
    }
    results["baseline"] = {s: 0.15 for s in range(5)}
    bytes_ = {
        p: {"fpn": kib * 1024, "fpn_fp32": 170 * 1024} for p, kib in (("lossless", 77), ("small", 24), ("tiny", 12))
    }
    plot(results, bytes_, tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as im:
        assert im.size[0] > 500 and im.size[1] > 300


def test_rm_pfi_quick_mode_trains_its_dev_rows_and_resumes(tmp_path, ray_session, capsys):
    """bench/rm_pfi.py at the quick scale on its dev split (CI's smoke test of the RM + PFI study): a plain, an
    RM-with-warm-up, an earlier-form PFI and a chain row train; weights chosen by the rule are read back; a rerun
    trains nothing; --terms counts RM's candidates."""
    import json

    from bench import rm_pfi

    rows = ["baseline", "rm_auto", "pfi_ours", "rmpfi_auto_chain"]
    args = ["--quick", "--split", "dev", "--rows", ",".join(rows), "--out", str(tmp_path), "--jobs", "2"]
    assert rm_pfi.main(args) == 0
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "quick-dev" / "results.json").read_text())
    assert sorted(saved) == sorted(rows) and all(0.0 <= saved[r]["0"]["AP"] <= 1.0 for r in rows)
    table = {line.split("|")[1].strip(): line for line in printed.splitlines() if line.startswith("| ")}
    assert "rm " in table["rm_auto"] and "pfi 0.13" in table["pfi_ours"]
    plan = (tmp_path / "quick-dev" / "runs" / "rm_auto_s0" / "stage_1" / "plan.yaml").read_text()
    assert "auto_after: 10" in plan  # one epoch of the quick dev split: 192 - 38 images, batch 16
    assert rm_pfi.main(args) == 0
    assert "0 student runs to train" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="drop --write"):
        rm_pfi.main([*args, "--write"])
    assert rm_pfi.main(["--quick", "--out", str(tmp_path), "--split", "dev", "--terms"]) == 0
    assert "low-quality" in capsys.readouterr().out


def test_far_teachers_quick_mode_trains_direct_and_chained_rows(tmp_path, ray_session, capsys):
    """bench/far_teachers.py at the quick scale (CI's smoke test of the far-teacher study): the transformer
    teacher's store is built from the shipped swin.pt, a direct and a three-teacher chain train, the chain's
    stages read weak, strong and swin in order, each MGD weight set by the rule; a rerun trains nothing."""
    import json

    import yaml

    from bench import far_teachers

    rows = ["baseline", "direct_swin", "weak_strong_swin"]
    args = ["--quick", "--split", "dev", "--rows", ",".join(rows), "--out", str(tmp_path), "--jobs", "2"]
    assert far_teachers.main(args) == 0
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "quick-dev" / "results.json").read_text())
    assert sorted(saved) == sorted(rows)
    run = tmp_path / "quick-dev" / "runs" / "weak_strong_swin_s0"
    stores = [
        yaml.safe_load((run / f"stage_{k}" / "plan.yaml").read_text())["stages"][k - 1]["stores"][0] for k in (1, 2, 3)
    ]
    assert [Path(s).name.split("-")[1] for s in stores] == ["weak", "strong", "swin"]
    table = {line.split("|")[1].strip(): line for line in printed.splitlines() if line.startswith("| ")}
    assert "weak → strong → swin" in table["weak_strong_swin"] and table["weak_strong_swin"].count("mgd ") == 3
    assert far_teachers.main(args) == 0
    assert "0 student runs to train" in capsys.readouterr().out


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


def test_store_codes_quick_mode_builds_a_store_per_code_and_pairs_each_row_with_its_reference(
    tmp_path, ray_session, capsys
):
    """bench/store_codes.py at the quick scale (CI's smoke test of the store-code study): rows read stores named by
    precision strings (product quantisation with per-anchor top-k), each row is paired with lossless MGD or KD,
    and the stores' bytes are tabled; a rerun trains nothing."""
    import json

    from bench import store_codes

    rows = ["mgd", "pq2", "kd", "kd_a2"]
    args = ["--quick", "--split", "dev", "--rows", ",".join(rows), "--out", str(tmp_path), "--jobs", "2"]
    assert store_codes.main(args) == 0
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "quick-dev" / "results.json").read_text())
    assert sorted(saved) == sorted(rows) and sorted(saved["pq2"]) == ["0", "1"]  # the dev study's two seeds
    stores = sorted(p.name for p in (tmp_path / "quick-dev" / "stores").iterdir())
    assert len(stores) == 2 and any("features_pq_bits_2_rotate_true" in s for s in stores)
    table = {line.split("|")[1].strip(): line for line in printed.splitlines() if line.startswith("| ")}
    assert "kd: " in table["kd_a2"] and "mgd: " in table["pq2"] and "[`small+features=pq" in table["pq2"]
    assert "| `lossless` |" in printed and "pq:bits=2,rotate=true" in printed  # the bytes table
    assert store_codes.main(args) == 0
    assert "0 student runs to train" in capsys.readouterr().out

    # A fresh machine has the record and nothing else: it reports every row, weights included, and trains nothing.
    shutil.rmtree(tmp_path / "quick-dev" / "runs")
    assert store_codes.main([*args, "--report"]) == 0
    table = {line.split("|")[1].strip(): line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")}
    assert sorted(r for r in table if r in rows) == sorted(rows) and "kd 10" in table["kd_a2"]
    # A record trained from another definition of its row is set aside, and that run trains again.
    record = tmp_path / "quick-dev" / "results.json"
    saved["kd"]["1"]["fingerprint"] = "0" * 12
    record.write_text(json.dumps(saved))
    kd_args = ["--quick", "--split", "dev", "--rows", "kd", "--out", str(tmp_path), "--jobs", "1"]
    assert store_codes.main(kd_args) == 0
    out = capsys.readouterr().out
    assert "another definition of kd" in out and "1 student runs to train" in out
    again = json.loads(record.read_text())
    assert again["kd"]["1"]["fingerprint"] == saved["kd"]["0"]["fingerprint"] and "kd@000000000000" in again


def test_far_teachers_plot_draws_every_row(tmp_path):
    from PIL import Image

    from bench import far_teachers

    shown = {r: {s: 0.15 + 0.01 * s + 0.001 * i for s in range(5)} for i, r in enumerate(far_teachers.VAL_ROWS)}
    far_teachers.plot(shown, tmp_path / "far.png")
    with Image.open(tmp_path / "far.png") as im:
        assert im.size[0] > 600 and im.size[1] > 300
