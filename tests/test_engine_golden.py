"""The training engine's refactor changed no arithmetic: a two-stage plan's final weights are bitwise those the
stage runner of the reference commit 9fbd3d9 trains, on any x86 CPU.

A bitwise digest holds across machines only on a numeric path that no CPU feature can change. The plan is
therefore trained in a fresh process on a pinned path (``tests/golden_run.py``: ATen's baseline loops, oneDNN
off, MKL's reproducible mode, numpy's dispatch off, one thread), which builds its own data and store too. The
golden below was made there from the reference commit, as ``golden_run``'s docstring says, never from the code
under test. The same digest came out of that commit under the default ISA, ``ONEDNN_MAX_CPU_ISA=AVX2`` and
``MKL_ENABLE_INSTRUCTIONS=AVX2``.

Resume (a killed stage resumes to the same weights) compares two runs on one machine and lives in
``tests/test_guarantees.py``.
"""

from __future__ import annotations

import platform

import pytest
import torch
from golden_run import LR, run_pinned

# The pins are x86 and MKL ones: elsewhere (ARM, a torch without MKL) the golden cannot be known, so it skips.
pytestmark = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkl.is_available(),
    reason="the golden's numeric path is pinned for x86 CPUs with torch's MKL",
)

# Made from 9fbd3d9 on an AMD EPYC (AVX-512, no AMX), 2026-12-07; the same under ONEDNN_MAX_CPU_ISA=AVX2 and
# MKL_ENABLE_INSTRUCTIONS=AVX2. Off the pinned path this machine trains other bits under ATEN_CPU_CAPABILITY=default
# than under its default, and without MKL_CBWR other bits again: each pin is doing work.
GOLDEN = "1c6123ca62168a98d24cee4f6dc93d7abab33cfc09111515a4b4369f944fff63"
# The caps another machine kind has: a run under them must land on the same path.
OTHER_CPU = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


@pytest.fixture(scope="module")
def pinned() -> dict:
    # One process trains both plans: the golden's, and the same with another learning rate.
    return run_pinned([LR, LR * 1.5])


def test_the_numeric_path_is_pinned(pinned) -> None:
    assert pinned["capability"] == "DEFAULT" and pinned["mkldnn"] is False and pinned["threads"] == 1


def test_two_stage_plan_weights_equal_the_reference_trainer(pinned) -> None:
    assert pinned["digests"][str(LR)] == GOLDEN


def test_capped_instruction_sets_train_the_same_bits(pinned) -> None:
    """Another machine kind's caps in the outer environment do not leak into the pinned path (ATen's is
    overridden, oneDNN is off, MKL runs its reproducible path), so the digest does not move."""
    assert run_pinned([LR], outer=OTHER_CPU)["digests"][str(LR)] == pinned["digests"][str(LR)]


def test_the_golden_sees_a_changed_learning_rate(pinned) -> None:
    """A test of the test: the same comparison fails when the plan's learning rate moves."""
    assert pinned["digests"][str(LR * 1.5)] != GOLDEN
    assert pinned["digests"][str(LR * 1.5)] != pinned["digests"][str(LR)]
