"""The documentation agrees with the code: generated reference pages are current, every plan key has a line of
meaning, the plans the docs show are the example files, and every example plan loads."""

from __future__ import annotations

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
