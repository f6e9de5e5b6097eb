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
def test_quality_quick_mode_trains_every_kind_of_row(tmp_path, ray_session, capsys):
    """bench/quality.py at the demo's quick scale: stores, a plain, a cached and an online student,
    the per-seed results file and the table (no --write: RESULTS.md is left alone)."""
    import json

    from bench import quality

    results = ROOT / "bench" / "RESULTS.md"
    before = results.read_bytes() if results.exists() else None
    rows = ["baseline", "mtpd_mgd", "mtpd_mgd_online"]
    assert quality.main(["--quick", "--seeds", "0", "--rows", ",".join(rows), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "results.json").read_text())
    assert sorted(saved["results"]) == sorted(rows)
    for row in rows:
        ap = saved["results"][row]["0"]
        assert 0.0 <= ap <= 1.0, (row, ap)
        assert (tmp_path / "runs" / f"{row}_s0" / "stage_2" / "final.pt").is_file(), row
        assert f"| {row} | 1 |" in printed, row
    # The four stores the rows read, each complete.
    assert sorted(p.name for p in (tmp_path / "stores").iterdir()) == [
        "strong_compact",
        "strong_lossless",
        "weak_compact",
        "weak_lossless",
    ]
    assert "cached - online (target within ±0.3 AP)" in printed
    assert (results.read_bytes() if results.exists() else None) == before


def test_quality_summary_pairs_rows_by_seed_and_judges_targets():
    from bench.quality import _summary

    r = {
        "baseline": {0: 0.070, 1: 0.060},
        "mtpd_mgd": {0: 0.100, 1: 0.092, 2: 0.5},
        "mtpd_mgd_online": {0: 0.102, 1: 0.094},
        "mtpd_mgd_compact": {0: 0.106, 1: 0.098},
        "direct": {1: 0.090},
    }
    table, checks = _summary(r, [0, 1, 2], {"baseline": {0: 60.0, 1: 120.0}})
    text = "\n".join(checks)
    # Seed 2 has no partner in any other row, so it enters no paired difference.
    assert "cached - online (target within ±0.3 AP): -0.20 AP (paired over 2 seed(s))  **met**" in text
    assert "compact - lossless (target within ±0.3 AP): +0.60 AP (paired over 2 seed(s))  **missed**" in text
    assert "progressive - direct (target >= 0): +0.20 AP (paired over 1 seed(s))  **met**" in text
    assert "progressive - baseline (target >= +3 AP): +3.10 AP (paired over 2 seed(s))  **met**" in text
    assert "RM+PFI" not in text  # no such row ran
    assert "| baseline | 2 | 6.5 ± 0.7 | 7.0, 6.0 | 1.5 |" in table
    assert any(line.startswith("| mtpd_mgd | 3 |") for line in table)
