"""Reuse across students: stores under a cache root, named by identity, listed, found by teacher, sized
before they are built, and removed safely."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_VIEW, build_args, tiny_build
from test_trainer import write_plan

from mtpd.cache.build import BuildRequest, plan_store
from mtpd.cache.catalog import INDEX, record_use, scan, store_name
from mtpd.cache.inspect import store_info
from mtpd.cache.lock import _this_machine, lock_path
from mtpd.cache.schema import StoreError
from mtpd.data import ViewSpec
from mtpd.teachers.registry import TeacherSpec
from mtpd.trainer.plan import PlanError, load_plan
from mtpd.trainer.stage import run_plan

VIEWS = ViewSpec(views=("orig", "hflip"), **TINY_VIEW)


def _name(digits, teacher=None, views=VIEWS, **over) -> str:
    req = BuildRequest(
        teacher or TeacherSpec("retinanet_tiny", "none", 10),
        digits["train"]["ann"],
        digits["train"]["images"],
        "",
        views,
        **over,
    )
    return store_name(plan_store(req)[0].header)


def _build(digits, root: Path, teacher=None, **over):
    return tiny_build(digits, None, teacher, root=str(root), **over)


def test_identity_names_stores(digits, tiny_teacher_ckpt) -> None:
    base = _name(digits)
    assert base == _name(digits) and base.startswith("retinanet_tiny-instances_train-")
    changed = {
        "precision": _name(digits, precision="compact"),
        "outputs": _name(digits, outputs=["fpn"]),
        "views": _name(digits, views=ViewSpec(views=("orig",), **TINY_VIEW)),
        "size": _name(digits, views=ViewSpec(views=("orig", "hflip"), short=96, long=96)),
        "weights": _name(digits, teacher=TeacherSpec("retinanet_tiny", tiny_teacher_ckpt)),
        "shards": _name(digits, images_per_shard=2),
    }
    assert len(set(changed.values()) | {base}) == len(changed) + 1, changed


def test_rebuild_finds_the_store_and_writes_nothing(tmp_path, digits, capsys) -> None:
    first = _build(digits, tmp_path)
    assert first.shards_written == first.shards_total and Path(first.store).parent == tmp_path
    again = _build(digits, tmp_path)
    assert again.store == first.store and again.shards_written == 0
    from mtpd.cli.cache import main

    args = build_args(
        digits["train"]["ann"],
        digits["train"]["images"],
        "--views",
        "orig,hflip",
        "--workers",
        "0",
        "--images-per-shard",
        "4",
        "--precision",
        "lossless",  # as tiny_build's; the CLI's default precision would name another store
        "--root",
        str(tmp_path),
    )
    assert main(args) == 0
    assert "complete already" in capsys.readouterr().out


def _teacher_plan(tmp_path: Path, digits: dict, root: Path, weights: str) -> Path:
    stage = {
        "name": "t",
        "teacher": {"name": "retinanet_tiny", "weights": weights, "outputs": ["fpn"], "precision": "lossless"},
        "losses": [{"name": "mse", "weight": 0.1}],
        "epochs": 1,
        "eval": False,
        "optimizer": {"type": "adamw", "lr": 0.001},
        "schedule": {"warmup_iters": 1},
    }
    return write_plan(tmp_path, digits, [], [stage], cache_root=str(root))


def test_a_plan_names_its_teacher(tmp_path, digits, tiny_teacher_ckpt) -> None:
    root = tmp_path / "cache"
    plan = load_plan(_teacher_plan(tmp_path, digits, root, tiny_teacher_ckpt))
    with pytest.raises(
        PlanError, match="no complete store of teacher retinanet_tiny .*build it with: mtpd-cache build"
    ) as e:
        run_plan(plan, [1], log=None)
    command = str(e.value).split("build it with: ", 1)[1]
    from mtpd.cli.cache import main

    assert main(shlex.split(command)[1:] + ["--workers", "0", "--no-progress"]) == 0  # the command it gave works
    run_plan(plan, [1], log=None)
    (store,) = scan(root)[0]
    metrics = json.loads((tmp_path / "run" / "stage_1" / "metrics.json").read_text())
    assert metrics["stores"][0]["path"] == store["path"] and metrics["stores"][0]["name"] == store["name"]
    (row,) = scan(root)[0]
    assert row["runs"] == [str(tmp_path / "run")] and row["last_used"] is not None  # the catalog saw the use


def test_ls_lists_complete_partial_and_foreign(tmp_path, digits, capsys) -> None:
    from mtpd.cli.cache import main

    complete = _build(digits, tmp_path).store
    partial = _build(digits, tmp_path, precision="compact").store
    import zarr

    zarr.open_group(partial, mode="r+")["index/shards"][1] = np.zeros(3, np.uint64)  # one shard not written
    (tmp_path / "notes").mkdir()
    assert main(["ls", "--root", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r["path"]: r for r in out["stores"]}
    assert rows[complete]["complete"] and not rows[partial]["complete"]
    assert rows[partial]["images_done"] == rows[partial]["images_total"] - 4
    assert out["not_stores"] == ["notes"]
    assert main(["ls", "--root", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "2 store(s)" in text and "partial 6/10" in text and "not stores (ignored): notes" in text


def test_estimate_projects_the_real_size(tmp_path, digits) -> None:
    from mtpd.cache.estimate import estimate

    spec = TeacherSpec("retinanet_tiny", "none", 10)
    e = estimate(spec, digits["train"]["ann"], digits["train"]["images"], VIEWS, None, "lossless", sample=5)
    real = store_info(_build(digits, tmp_path).store)["bytes_on_disk"]
    projected, half = e.total_bytes()
    assert e.sample == 5 and e.images == 10 and half >= 0 and e.seconds_per_image > 0
    assert abs(projected - real) <= 0.2 * real, (projected, real)


def test_rm_refuses_a_store_being_written(tmp_path, digits, capsys) -> None:
    from mtpd.cli.cache import main

    store = Path(_build(digits, tmp_path).store)
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock_path(store).write_text(json.dumps({**_this_machine(), "pid": writer.pid, "heartbeat": 1e12}))
        assert main(["rm", store.name, "--root", str(tmp_path), "--yes"]) == 2
        assert "another build is writing this store" in capsys.readouterr().err and store.is_dir()
    finally:
        writer.kill()
        writer.wait()
    assert main(["rm", "--older-than", "0", "--root", str(tmp_path), "--yes"]) == 0  # the writer is gone
    assert not store.exists() and not lock_path(store).exists()


def test_the_index_is_rebuilt_from_the_stores(tmp_path, digits) -> None:
    store = _build(digits, tmp_path).store
    rows, _ = scan(tmp_path)
    index = tmp_path / INDEX
    assert index.is_file()
    index.unlink()
    assert scan(tmp_path)[0] == rows and index.is_file()  # missing: rebuilt, same answer
    index.write_text("{ not json")
    assert scan(tmp_path)[0] == rows  # unreadable: rebuilt
    record_use(store, "runs/other", 1, "s")  # the store changed: its entry is recomputed, not served stale
    (row,) = scan(tmp_path)[0]
    assert row["runs"] == ["runs/other"]
    with pytest.raises(StoreError):
        from mtpd.cache.catalog import remove

        lock_path(Path(store)).write_text(json.dumps({**_this_machine(), "pid": 1, "heartbeat": 1e12}))
        remove(Path(store))  # pid 1 is alive: refused


def test_the_index_never_decides_a_path(tmp_path, digits) -> None:
    """A copied or crafted index cannot point ls, find or rm at another folder."""
    store = _build(digits, tmp_path).store
    scan(tmp_path)
    index = json.loads((tmp_path / INDEX).read_text())
    (entry,) = index.values()
    entry["row"]["path"] = "/somewhere/else"
    (tmp_path / INDEX).write_text(json.dumps(index))
    (row,) = scan(tmp_path)[0]
    assert row["path"] == store


def test_rm_without_a_terminal_removes_nothing(tmp_path, digits, monkeypatch, capsys) -> None:
    from mtpd.cli.cache import main

    store = Path(_build(digits, tmp_path).store)

    def no_tty(prompt: str) -> str:
        raise EOFError

    monkeypatch.setattr("builtins.input", no_tty)
    assert main(["rm", store.name, "--root", str(tmp_path)]) == 1
    assert store.is_dir() and "nothing removed" in capsys.readouterr().out


def test_complete_store_on_a_read_only_root_and_a_moved_checkpoint(tmp_path, digits, tiny_teacher_ckpt) -> None:
    import shutil

    root = tmp_path / "root"
    first = _build(digits, root, teacher=TeacherSpec("retinanet_tiny", tiny_teacher_ckpt))
    moved = tmp_path / "elsewhere.pt"
    shutil.copy(tiny_teacher_ckpt, moved)  # the same checkpoint, another path
    r = subprocess.run(["chattr", "+i", str(root)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot make the root read-only here ({r.stderr.strip() or r.returncode}); needs root on ext4")
    try:
        again = _build(digits, root, teacher=TeacherSpec("retinanet_tiny", str(moved)))
    finally:
        subprocess.run(["chattr", "-i", str(root)], check=False)
    assert again.store == first.store and again.shards_written == 0 and again.shards_skipped == first.shards_total
