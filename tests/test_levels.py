"""Levels: a feature loss distills the levels the student and the store share and says which it skips;
the tiny archs (and every RetinaNet/FCOS with P6P7 extras) also end at P6."""

from __future__ import annotations

import pytest
from test_trainer import write_plan

from mtpd.models import build_arch, output_specs
from mtpd.trainer.plan import PlanError, load_plan
from mtpd.trainer.stage import run_plan


@pytest.mark.parametrize("arch", ["retinanet_tiny", "retinanet_tiny_wide", "fcos_tiny"])
def test_tiny_archs_accept_p3_to_p6(arch):
    assert output_specs(build_arch(arch, 10, levels=(3, 4, 5, 6)))["fpn"].levels == (3, 4, 5, 6)


def _p6_student_plan(tmp_path, digits, store, losses):
    stage = {"name": "s", "stores": [store], "losses": losses, "epochs": 1, "optimizer": {"type": "adamw"}}
    student = {"arch": "retinanet_tiny", "options": {"fpn_channels": 32, "width": 8, "levels": [3, 4, 5, 6]}}
    return load_plan(write_plan(tmp_path, digits, [store], stages=[stage], student=student))


def test_a_feature_loss_skips_the_levels_the_store_lacks(tmp_path, digits, tiny_store):
    """The tiny store holds P3-P5; a P3-P6 student distills those three and says so."""
    events, lines = [], []
    plan = _p6_student_plan(tmp_path, digits, tiny_store, [{"name": "mgd", "weight": 2.0e-4}])
    run_plan(plan, [1], log=lines.append, on_event=events.append)
    (skip,) = [e for e in events if e["event"] == "levels_skipped"]
    assert skip["levels"] == ["P3", "P4", "P5"] and skip["skipped"] == ["P6"]
    assert any("mgd distills P3, P4, P5; skips P6" in line for line in lines)


def test_an_anchor_ranking_loss_needs_every_level(tmp_path, digits, tiny_store):
    plan = _p6_student_plan(tmp_path, digits, tiny_store, [{"name": "rm"}])
    with pytest.raises(PlanError, match=r"lacks \['P6'\]; rm ranks the anchors of every level") as e:
        run_plan(plan, [1], log=None)
    assert "\n" not in str(e.value)
