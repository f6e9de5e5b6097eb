"""The documentation agrees with the code: generated reference pages are current, every plan key has a line of
meaning, the plans the docs show are the example files, and every example plan loads."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))

import gen_reference  # noqa: E402


def test_the_generated_reference_pages_are_current() -> None:
    """docs/reference/*.md are what docs/gen_reference.py writes from today's code (rerun it after a change)."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "gen_reference.py"), "--check"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_plan_key_and_command_flag_is_in_the_reference() -> None:
    import dataclasses

    from mtpd.trainer import plan

    page = gen_reference.plan_page()
    rows = [ln for ln in page.splitlines() if ln.startswith("- **`")]
    for cls in (plan.Plan, plan.DataConfig, plan.AugmentConfig, plan.StageConfig, plan.LossConfig, plan.TeacherRef):
        for f in dataclasses.fields(cls):
            assert any(ln.startswith(f"- **`{f.name}`** (") for ln in rows), (cls.__name__, f.name)
    assert not [ln for ln in rows if ln.rstrip().endswith(":")], "plan keys without a line of meaning"
    import argparse

    cli = gen_reference.cli_page()

    def flags(parser: argparse.ArgumentParser):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, subparser in action.choices.items():
                    assert f"`mtpd-{name} {sub}`" in cli
                    yield from flags(subparser)
            elif not isinstance(action, argparse._HelpAction):
                yield from action.option_strings

    for name in gen_reference.COMMANDS:
        for flag in flags(gen_reference.parser_of(name)):
            assert f"`{flag}`" in cli, (name, flag)


@pytest.mark.parametrize(
    "page, example", [("getting-started.md", "own_data/student.yaml"), ("training.md", "coco/plan.yaml")]
)
def test_the_plans_the_docs_show_are_the_example_files(page, example) -> None:
    """A plan written out in a page is an example file verbatim (which the next test loads)."""
    text = (ROOT / "docs" / page).read_text()
    shown = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "stages:" in b]
    assert (ROOT / "examples" / example).read_text() in shown


@pytest.mark.parametrize(
    "path", sorted((ROOT / "examples").rglob("*.yaml")), ids=lambda p: str(p.relative_to(ROOT / "examples"))
)
def test_every_example_plan_loads(path) -> None:
    """Plans (not studies) in examples/ parse and validate: keys, types, stage references."""
    from mtpd.trainer.plan import load_plan

    if "rows:" in path.read_text():  # a study file: mtpd-study reads it (tests/test_study.py runs one)
        from mtpd.study.spec import load_study

        assert load_study(path).rows
        return
    assert load_plan(path).stages


def walkthrough_script(bin_dir: Path) -> str:
    """The shell block of getting-started.md's own-data section, as a user pastes it, with the page's dry run
    (``--set stages.*.epochs=1`` on each mtpd-train line) and this interpreter's scripts for ``.venv/bin/``."""
    text = (ROOT / "docs" / "getting-started.md").read_text()
    section = text.split("## Your own data and detector", 1)[1]
    block = re.findall(r"```sh\n(.*?)```", section, re.S)[0]
    assert "--set stages.*.epochs=1" in section, "the page no longer tells the dry run this test runs"
    block = re.sub(r"(mtpd-train --plan \S+ --stage all --device cpu)", r"\1 --set stages.*.epochs=1", block)
    return "set -euo pipefail\n" + block.replace(".venv/bin/", f"{bin_dir}/")


@pytest.mark.slow
def test_the_getting_started_walkthrough_runs_as_written(tmp_path) -> None:
    """Every command of the own-data walk-through, in bash, in a folder with examples/own_data (as the repository
    root is): import, teacher, estimate, build, student, eval, export each exit 0 and leave what the next reads."""
    import importlib.util
    import os
    import shutil

    if importlib.util.find_spec("deepforest") is None:
        pytest.skip("needs deepforest's photos: `make install` installs them (pip install --no-deps deepforest)")
    shutil.copytree(ROOT / "examples" / "own_data", tmp_path / "examples" / "own_data")
    script = walkthrough_script(Path(sys.executable).parent)
    assert script.count("--set stages.*.epochs=1") == 2  # the teacher's and the student's training
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "2"}
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    out = tmp_path / "demo_out"
    assert len(list((out / "trees" / "images" / "train").iterdir())) > 10  # 400-px tiles of three photos
    assert (out / "trees_store" / "zarr.json").is_file()
    student = out / "trees_runs" / "student" / "stage_1"
    from mtpd.trainer.plan import load_plan

    assert load_plan(student / "plan.yaml").stages[0].epochs == 1
    assert "AP" in json.loads((student / "metrics.json").read_text())
    assert re.search(r"\bAP\b", done.stdout) and (out / "trees_student.onnx").stat().st_size > 100_000
