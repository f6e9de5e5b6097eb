"""Plans are checked whole before anything trains: a mistake in the last stage stops the run before the
first step of the first, as one line naming the stage and the key."""

from __future__ import annotations

import pytest
from conftest import tiny_build
from test_trainer import write_plan

from mtpd.trainer.plan import PlanError, load_plan
from mtpd.trainer.stage import run_plan


def stage(name: str, store: str, losses: list[dict]) -> dict:
    return {
        "name": name,
        "stores": [store],
        "losses": losses,
        "epochs": 1,
        "eval": False,
        "optimizer": {"type": "adamw", "lr": 0.001},
    }


@pytest.fixture(scope="module")
def fpn_store(tmp_path_factory, digits) -> str:
    out = tmp_path_factory.mktemp("fpn") / "store"
    tiny_build(digits, out, outputs=["fpn"])
    return str(out)


def test_a_bad_loss_name_in_the_last_stage_fails_when_the_plan_loads(tmp_path, digits, fpn_store) -> None:
    stages = [stage("one", fpn_store, [{"name": "mgd", "weight": 1e-4}]), stage("two", fpn_store, [{"name": "mgdd"}])]
    with pytest.raises(PlanError, match=r"^stages\[1\] \(two\)\.losses\[0\]\.name: unknown distillation loss 'mgdd'"):
        load_plan(write_plan(tmp_path, digits, [], stages))
    assert not (tmp_path / "run").exists()


def test_a_bad_loss_parameter_fails_when_the_plan_loads(tmp_path, digits, fpn_store) -> None:
    stages = [stage("one", fpn_store, [{"name": "mgd", "params": {"lambda": 0.5}}])]
    with pytest.raises(PlanError, match=r"losses\[0\]\.params: loss 'mgd' got unknown parameter\(s\) lambda"):
        load_plan(write_plan(tmp_path, digits, [], stages))


@pytest.mark.parametrize("params", [{"\n": None}, {None: 1, "a": 2}, {3: 1, " x": 0}])
def test_odd_loss_parameter_names_get_a_one_line_error(tmp_path, digits, fpn_store, params) -> None:
    """Keys a YAML file can hold (a newline, null, a number, spaces) are named by repr, on one line."""
    stages = [stage("one", fpn_store, [{"name": "mgd", "params": params}])]
    with pytest.raises(PlanError, match=r"got unknown parameter\(s\) ") as err:
        load_plan(write_plan(tmp_path, digits, [], stages))
    assert "\n" not in str(err.value) and all(repr(k) in str(err.value) for k in params if k != "a")


def test_a_last_stage_whose_store_lacks_an_output_fails_before_the_first_trains(tmp_path, digits, fpn_store) -> None:
    stages = [
        stage("one", fpn_store, [{"name": "mgd", "weight": 1e-4}]),
        stage("two", fpn_store, [{"name": "mse", "weight": 0.1}]),
        stage("three", fpn_store, [{"name": "kd"}]),  # class scores: the store holds features only
    ]
    plan = load_plan(write_plan(tmp_path, digits, [], stages))
    with pytest.raises(PlanError) as e:
        run_plan(plan, [1, 2, 3], log=None)
    msg = str(e.value)
    assert msg.startswith("stages[2] (three).losses[0] (kd) needs teacher output 'cls'") and "\n" not in msg
    assert "--outputs cls,fpn" in msg
    assert not (tmp_path / "run" / "stage_1").exists()  # nothing trained


def test_a_missing_inheritance_file_fails_before_training(tmp_path, digits, fpn_store) -> None:
    s = stage("one", fpn_store, [{"name": "mgd", "weight": 1e-4}])
    s["inherit"] = {"weights": str(tmp_path / "nope.pt")}
    plan = load_plan(write_plan(tmp_path, digits, [], [stage("zero", fpn_store, []), s]))
    with pytest.raises(PlanError, match=r"stages\[1\] \(one\)\.inherit\.weights: .*nope\.pt not found"):
        run_plan(plan, [1, 2], log=None)
    assert not (tmp_path / "run" / "stage_1").exists()


def test_an_unknown_stage_number_fails_first(tmp_path, digits, fpn_store) -> None:
    plan = load_plan(write_plan(tmp_path, digits, [], [stage("one", fpn_store, [])]))
    with pytest.raises(PlanError, match=r"--stage 3: the plan has stages 1\.\.1"):
        run_plan(plan, [1, 3], log=None)


def test_an_online_stage_with_too_few_teachers_is_a_plan_error(tmp_path, digits, fpn_store) -> None:
    plan = load_plan(write_plan(tmp_path, digits, [], [stage("one", fpn_store, [{"name": "mgd", "weight": 1e-4}])]))
    plan.stages[0].stores = [fpn_store, fpn_store]
    from mtpd.teachers.registry import TeacherSpec

    teacher = TeacherSpec("retinanet_tiny", "none", 10).build()
    with pytest.raises(PlanError, match=r"1 online teacher\(s\) for 2 store\(s\); give one per store"):
        run_plan(plan, [1], log=None, online=[teacher])
