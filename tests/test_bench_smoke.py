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


@pytest.mark.parametrize("name", ["step", "store", "reader", "build"])
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
