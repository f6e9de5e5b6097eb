"""`mtpd-demo --quick`: the whole pipeline runs and reports numbers (CI smoke test, not a quality check)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from mtpd.cli.demo import main


@pytest.mark.slow
def test_quick_demo_runs_end_to_end_and_reports_metrics(
    tmp_path: Path, ray_session, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A relative --out, as `make demo` passes: plans must still find the data from their own folder.
    monkeypatch.chdir(tmp_path)
    assert main(["--out", "demo_out", "--quick"]) == 0
    printed = capsys.readouterr().out
    root = tmp_path / "demo_out" / "quick"

    # Every step ran and said which command it stands for.
    for cmd in ("$ mtpd-data digits", "$ mtpd-cache build", "$ mtpd-train --plan", "$ mtpd-plan order", "$ mtpd-eval"):
        assert cmd in printed, cmd

    metrics = json.loads((root / "metrics.json").read_text())
    rows = {r["model"]: r for r in metrics["rows"]}
    assert {"teacher weak", "teacher strong", "student baseline", "student direct (strong)"} <= set(rows)
    assert any(m.startswith("student MTPD") for m in rows)
    for r in rows.values():
        for k in ("AP", "AP50", "AP75"):
            assert 0.0 <= r["metrics"][k] <= 1.0 and math.isfinite(r["metrics"][k])
        assert r["params"] > 0
    # Teachers come with stores; students trained two stages each and were evaluated after both.
    for key in ("weak", "strong"):
        assert rows[f"teacher {key}"]["store_bytes"] > 0
    students = [r for r in rows.values() if r["run_dir"]]
    assert len(students) == 3 and all(len(r["stage_metrics"]) == 2 for r in students)
    assert sorted(metrics["order"]) == ["strong", "weak"]

    # The printed table and the report hold a numeric row per model.
    for model in rows:
        assert re.search(re.escape(model) + r".*\d+\.\d+M\s+\d+\.\d", printed), model
    report = (root / "report.md").read_text()
    assert "| teacher strong |" in report and "| student baseline |" in report
    for png in ("ap_per_stage.png", "loss_curves.png"):
        assert (root / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The table's latency column: every model timed as deployed.
    assert all(r["cpu_ms"] > 0 for r in rows.values())
    assert "CPU ms/img" in report
    _export_and_eval_the_students(root, rows, capsys)

    # A second run reuses everything: no stage retrains, no store rebuilds.
    assert main(["--out", "demo_out", "--quick"]) == 0
    again = capsys.readouterr().out
    assert again.count("reusing") >= 6 and "shards," not in again


def _export_and_eval_the_students(root: Path, rows: dict, capsys: pytest.CaptureFixture) -> None:
    """The quick demo's MTPD student through mtpd-export and mtpd-eval --onnx: the same AP as its checkpoint."""
    from mtpd.cli.eval import main as eval_main
    from mtpd.cli.export import main as export_main

    (student,) = [r for m, r in rows.items() if m.startswith("student MTPD")]
    ckpt = Path(student["run_dir"]) / "stage_2" / "final.pt"
    onnx_path = root / "student.onnx"
    assert export_main(["--checkpoint", str(ckpt), "--out", str(onnx_path)]) == 0
    capsys.readouterr()
    data = ["--ann", str(root / "digits/annotations/instances_val.json"), "--images", str(root / "digits/images/val")]
    assert eval_main(["--onnx", str(onnx_path), "--checkpoint", str(ckpt), "--json", *data]) == 0
    both = json.loads(capsys.readouterr().out)
    assert abs(both["AP"] - both["pytorch"]["AP"]) <= 0.002 and both["parity"]["fraction"] >= 0.95


def test_a_full_demo_reads_its_single_run_against_the_five_seed_figures() -> None:
    from types import SimpleNamespace as NS

    from mtpd.demo.report import FIVE_SEEDS, gains

    rows = [
        NS(run_dir="x/baseline", model="student baseline", metrics={"AP": 0.177}),
        NS(run_dir="x/progressive", model="student MTPD", metrics={"AP": 0.224}),
    ]
    lines = gains(NS(rows=rows, scale={"quick": False}))
    assert lines[0] == "student MTPD: +4.7 AP over the baseline (same epochs)"
    mean, std = FIVE_SEEDS["progressive"]
    assert f"student MTPD: 22.4 AP in this run; over five seeds {mean:.1f} ± {std:.1f}" in lines[2]
    assert f"({(22.4 - mean) / std:+.1f} std" in lines[2]
    assert len(gains(NS(rows=rows, scale={"quick": True}))) == 1  # a quick run's APs mean nothing
