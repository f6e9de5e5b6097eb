"""The teacher pass: store round trips, Ray builds, resume, verify, info, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_VIEW, assert_store_is_the_teacher, build_args

from mtpd.cache.build import BuildError, build_store
from mtpd.cache.inspect import store_info, verify_store
from mtpd.cache.schema import FORMAT_VERSION, PRECISIONS, StoreError
from mtpd.cache.store import StoreReader, open_store
from mtpd.cli.cache import main as cache_main
from mtpd.data import CocoDataset, ViewSpec, prepare_view
from mtpd.teachers.registry import TeacherSpec, build_teacher


def _arrays(store: str) -> dict[str, np.ndarray]:
    r = StoreReader(store)
    out = {f"outputs/{n}": np.asarray(r.root[f"outputs/{n}"][:]) for n in r.header.outputs}
    for n in ("image_ids", "grid", "view_size", "shards"):
        out[f"index/{n}"] = np.asarray(r.root[f"index/{n}"][:])
    return out


def test_cached_fpn_equals_direct_forward(tiny_store, digits, tiny_teacher_ckpt):
    """What the store returns is the teacher's own output on the same view, within fp16 rounding."""
    teacher = build_teacher("retinanet_tiny", weights=tiny_teacher_ckpt)
    ds = CocoDataset(digits["train"]["ann"], digits["train"]["images"])
    assert_store_is_the_teacher(tiny_store, teacher, ds, (0, 5, 9), ("orig", "hflip"))


def test_two_worker_build_is_complete_and_verifies(tiny_store, digits):
    info = store_info(tiny_store)
    assert info["images_done"] == info["images_total"] == 10
    assert info["shards_done"] == info["shards_total"] == 3
    assert info["views"]["views"] == ["orig", "hflip"]
    assert set(info["outputs"]) == {"fpn", "cls", "box"}
    assert info["outputs"]["fpn"]["levels"] == [3, 4, 5]
    assert info["compression_ratio"] > 1.0
    assert verify_store(tiny_store).ok
    assert cache_main(["verify", tiny_store]) == 0


def test_rerun_of_a_finished_build_writes_nothing(tiny_store, digits, tiny_teacher_ckpt):
    before = _arrays(tiny_store)
    rep = build_store(
        TeacherSpec("retinanet_tiny", tiny_teacher_ckpt),
        digits["train"]["ann"],
        digits["train"]["images"],
        tiny_store,
        views=ViewSpec(views=("orig", "hflip"), **TINY_VIEW),
        precision="lossless",
        workers=2,
        images_per_shard=4,
        progress=False,
    )
    assert rep.shards_written == 0 and rep.shards_skipped == 3
    after = _arrays(tiny_store)
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_store_round_trip_within_precision_error(precision, tmp_path, digits, tiny_teacher_ckpt):
    """``open_store(...).read(i)`` equals the teacher's own forward within each output's stated bound."""
    out = str(tmp_path / precision)
    build_store(
        TeacherSpec("retinanet_tiny", tiny_teacher_ckpt),
        digits["val"]["ann"],
        digits["val"]["images"],
        out,
        views=ViewSpec(**TINY_VIEW),
        precision=precision,
        workers=0,
        images_per_shard=3,
        batch_size=1,  # the builder's forward is then the test's own, to the bit
        progress=False,
    )
    store = open_store(out)
    assert store.num_samples == 4 and store.header.format_version == FORMAT_VERSION
    teacher = build_teacher("retinanet_tiny", weights=tiny_teacher_ckpt)
    ds = CocoDataset(digits["val"]["ann"], digits["val"]["images"])
    for idx in range(len(ds)):
        x, _ = prepare_view(ds.load_image(idx), ViewSpec(**TINY_VIEW))
        direct = teacher(x[None], ["fpn", "cls", "box"])
        for name, maps in store.read(idx).items():
            o = store.header.outputs[name]
            for j, (lvl, m) in enumerate(zip(o.levels, maps)):
                assert m.dtype == np.float32
                ref = direct[f"{name}.p{lvl}"][0, :, : m.shape[1], : m.shape[2]]
                rows = lambda t: torch.as_tensor(t).permute(1, 2, 0).reshape(-1, t.shape[0])  # noqa: E731
                assert o.encoding.within_bound(rows(ref), rows(m), j), (precision, name, lvl)


def test_resume_after_failure_gives_identical_store(tmp_path, digits, tiny_teacher_ckpt, tiny_store, ray_session):
    """A build stopped by a truncated image keeps finished shards; after the fix, a rerun completes it
    and the result equals an uninterrupted build byte for byte in every array."""
    images = tmp_path / "images"
    shutil.copytree(digits["train"]["images"], images)
    ds = CocoDataset(digits["train"]["ann"], images)
    bad = ds.image_path(9)  # last shard (images 8-9)
    good_bytes = bad.read_bytes()
    bad.write_bytes(good_bytes[: len(good_bytes) // 3])
    out = str(tmp_path / "store")
    # The same command as tiny_store's: CPU convolutions may differ in the last bit across thread counts.
    args = dict(
        views=ViewSpec(views=("orig", "hflip"), **TINY_VIEW),
        precision="lossless",
        workers=2,
        images_per_shard=4,
        progress=False,
    )
    spec = TeacherSpec("retinanet_tiny", tiny_teacher_ckpt)
    with pytest.raises(BuildError, match=bad.name):
        build_store(spec, digits["train"]["ann"], str(images), out, **args)
    res = verify_store(out)
    assert res.missing == [2] and not res.corrupt  # shards 0 and 1 finished and verify
    bad.write_bytes(good_bytes)
    rep = build_store(spec, digits["train"]["ann"], str(images), out, **args)
    assert rep.shards_written == 1 and rep.shards_skipped == 2
    a, b = _arrays(out), _arrays(tiny_store)
    for k in b:
        if k == "index/shards":
            np.testing.assert_array_equal(a[k][:, [0, 2]], b[k][:, [0, 2]])  # done flags and checksums
        else:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_verify_detects_deleted_and_corrupted_shards(tmp_path, tiny_store, capsys):
    store = tmp_path / "copy"
    shutil.copytree(tiny_store, store)
    shard_files = sorted((store / "outputs" / "fpn" / "c").rglob("*"))
    shard_files = [p for p in shard_files if p.is_file()]
    assert len(shard_files) == 3
    shard_files[0].unlink()  # shard 0 deleted
    cls_file = sorted(p for p in (store / "outputs" / "cls" / "c").rglob("*") if p.is_file())[1]
    raw = bytearray(cls_file.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # shard 1 corrupted in place
    cls_file.write_bytes(bytes(raw))
    res = verify_store(str(store))
    assert [s for s, _ in res.corrupt] == [0, 1] and not res.missing
    assert cache_main(["verify", str(store)]) == 1
    out = capsys.readouterr().out
    assert "corrupt  shard 0" in out and "corrupt  shard 1" in out


def test_info_cli_json(tiny_store, capsys):
    assert cache_main(["info", tiny_store, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["teacher"]["name"] == "retinanet_tiny" and len(info["teacher"]["weights_sha256"]) == 64
    assert cache_main(["info", tiny_store]) == 0
    assert "retinanet_tiny" in capsys.readouterr().out


def test_store_with_other_settings_is_refused(tiny_store, digits, tiny_teacher_ckpt):
    with pytest.raises(StoreError, match=r"precision: 'lossless' \(store\) vs 'compact'"):
        build_store(
            TeacherSpec("retinanet_tiny", tiny_teacher_ckpt),
            digits["train"]["ann"],
            digits["train"]["images"],
            tiny_store,
            views=ViewSpec(views=("orig", "hflip"), **TINY_VIEW),
            precision="compact",
            workers=2,
            images_per_shard=4,
            progress=False,
        )


def test_fsspec_url_store(tmp_path, digits, tiny_teacher_ckpt):
    url = "file://" + str(tmp_path / "url_store")
    build_store(
        TeacherSpec("retinanet_tiny", tiny_teacher_ckpt),
        digits["val"]["ann"],
        digits["val"]["images"],
        url,
        views=ViewSpec(**TINY_VIEW),
        precision="high",
        workers=0,
        images_per_shard=2,
        progress=False,
    )
    assert verify_store(url).ok
    assert store_info(url)["images_done"] == 4


# --- bad input: one line naming the file or value, non-zero exit ------------------------------


def _build_cli(digits, out, *extra, teacher="retinanet_tiny", ann=None, images=None):
    return cache_main(
        [
            "build",
            "--teacher",
            teacher,
            "--ann",
            ann or digits["val"]["ann"],
            "--images",
            images or digits["val"]["images"],
            "--out",
            str(out),
            "--short",
            "64",
            "--long",
            "64",
            "--no-progress",
            *extra,
        ]
    )


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_missing_image_is_named(tmp_path, digits, capsys):
    images = tmp_path / "images"
    shutil.copytree(digits["val"]["images"], images)
    victim = sorted(images.iterdir())[3]
    victim.unlink()
    assert _build_cli(digits, tmp_path / "s", "--images-per-shard", "2", "--workers", "0", images=str(images)) == 2
    line = _error_line(capsys)
    assert victim.name in line and "not found" in line
    assert verify_store(str(tmp_path / "s")).missing == [1]  # shard 0 finished and kept


def test_not_coco_json(tmp_path, digits, capsys):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"images": [], "foo": 1}))
    assert _build_cli(digits, tmp_path / "s", ann=str(bad)) == 2
    assert "x.json" in _error_line(capsys)
    bad.write_text("{not json")
    assert _build_cli(digits, tmp_path / "s", ann=str(bad)) == 2
    assert "not valid JSON" in _error_line(capsys)


def test_unknown_teacher(tmp_path, digits, capsys):
    assert _build_cli(digits, tmp_path / "s", teacher="retinanet_resnet9000") == 2
    line = _error_line(capsys)
    assert "retinanet_resnet9000" in line and "retinanet_tiny" in line


def test_weights_that_do_not_fit(tmp_path, digits, capsys):
    from mtpd.models import arch_checkpoint, build_arch

    path = tmp_path / "wide.pt"
    torch.save(arch_checkpoint(build_arch("retinanet_tiny_wide", num_classes=10)), path)
    assert _build_cli(digits, tmp_path / "s", "--weights", str(path)) == 2
    assert "wide.pt" in _error_line(capsys)


def test_output_the_teacher_cannot_produce(tmp_path, digits, capsys):
    assert _build_cli(digits, tmp_path / "s", "--outputs", "fpn,masks") == 2
    line = _error_line(capsys)
    assert "masks" in line and "fpn" in line


def test_out_of_range_view_size(tmp_path, digits, capsys):
    assert (
        cache_main(
            [
                "build",
                "--teacher",
                "retinanet_tiny",
                "--ann",
                digits["val"]["ann"],
                "--images",
                digits["val"]["images"],
                "--out",
                str(tmp_path / "s"),
                "--short",
                "4",
            ]
        )
        == 2
    )
    assert "short side 4" in _error_line(capsys)


def test_unknown_precision_is_rejected_by_argparse(tmp_path, digits):
    with pytest.raises(SystemExit):
        _build_cli(digits, tmp_path / "s", "--precision", "huge")
    assert set(PRECISIONS) == {"lossless", "high", "compact", "small", "tiny", "micro"}


@pytest.mark.slow
def test_lost_ray_worker_is_retried_and_store_is_identical(
    tmp_path, digits, tiny_teacher_ckpt, tiny_store, ray_session, crash_marker
):
    """A worker process dying mid-shard is replaced and its shards written again on the new one (counted in the
    report and in the store's attributes); writes are idempotent, so the store equals one built without the fault."""
    out = str(tmp_path / "store")
    rep = build_store(
        TeacherSpec("faults:crash_once_teacher", tiny_teacher_ckpt),
        digits["train"]["ann"],
        digits["train"]["images"],
        out,
        views=ViewSpec(views=("orig", "hflip"), **TINY_VIEW),
        precision="lossless",
        workers=2,
        images_per_shard=4,
        progress=False,
    )
    assert crash_marker.exists()  # the fault really happened
    assert rep.shards_written == 3 and verify_store(out).ok
    assert rep.retries >= 1 and StoreReader(out).root.attrs["build_retries"] == rep.retries
    a, b = _arrays(out), _arrays(tiny_store)
    for k in b:
        if k.startswith("outputs/"):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.slow
def test_killed_build_resumes_to_identical_store(tmp_path, digits, tiny_teacher_ckpt):
    """SIGKILL the build command mid-way; rerunning it finishes the store, equal to an uninterrupted build."""
    import os
    import signal
    import subprocess
    import sys
    import time

    def cmd(out):
        # A teacher that takes 1 s per forward, so the kill lands mid-build however loaded the machine is.
        return [
            sys.executable,
            "-m",
            "mtpd.cli.cache",
            "build",
            "--teacher",
            "faults:slow_teacher",
            "--weights",
            tiny_teacher_ckpt,
            "--ann",
            digits["train"]["ann"],
            "--images",
            digits["train"]["images"],
            "--out",
            str(out),
            "--short",
            "64",
            "--long",
            "64",
            "--workers",
            "0",
            "--images-per-shard",
            "1",
            "--no-progress",
        ]

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent)}
    ref = tmp_path / "ref"
    subprocess.run(cmd(ref), check=True, capture_output=True, timeout=600, env=env)
    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    marks = out / "index" / "shards" / "c"
    while time.time() < deadline and proc.poll() is None:
        # One chunk file per shard marked done: listing them is cheap next to a 0.3 s shard.
        if marks.is_dir() and len(list(marks.glob("*/0"))) >= 3:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = StoreReader(str(out)).status().done
    assert 3 <= partial.sum() < 10, partial  # killed mid-way, not before or after
    subprocess.run(cmd(out), check=True, capture_output=True, timeout=600, env=env)
    assert verify_store(str(out)).ok
    a, b = _arrays(str(out)), _arrays(str(ref))
    for k in b:
        if k != "index/shards":
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _all_arrays(store: str) -> dict[str, np.ndarray]:
    """Every array of a store (outputs, side parameters, calibration, index), by path."""
    import zarr

    root = StoreReader(store).root
    return {name: np.asarray(a[:]) for name, a in root.members(max_depth=None) if isinstance(a, zarr.Array)}


def _assert_same_store(a: str, b: str) -> None:
    x, y = _all_arrays(a), _all_arrays(b)
    assert sorted(x) == sorted(y)
    for k in x:
        np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_several_precisions_from_one_pass_equal_stores_built_alone(tmp_path, digits, tiny_teacher_ckpt, ray_session):
    """``build_stores`` (``mtpd-cache build --precision a,b``): one teacher forward per shard feeds every store,
    in this process and on Ray workers, and each store is byte for byte the one ``build_store`` writes alone;
    a store that lost a shard resumes that shard only."""
    from conftest import tiny_build

    from mtpd.cache.build import build_stores

    teacher = TeacherSpec("retinanet_tiny", tiny_teacher_ckpt)
    precisions = ["lossless", "small", "tiny"]
    for p in precisions:
        tiny_build(digits, tmp_path / "alone" / p, teacher=teacher, precision=p)
    views = ViewSpec(views=("orig", "hflip"), **TINY_VIEW)
    ann, images = digits["train"]["ann"], digits["train"]["images"]
    together = [str(tmp_path / "together" / p) for p in precisions]
    opts = dict(workers=0, images_per_shard=4, progress=False)
    reps = build_stores(teacher, ann, images, precisions, together, views, **opts)
    assert [r.shards_written for r in reps] == [3, 3, 3] and [r.store for r in reps] == together
    on_ray = [str(tmp_path / "ray" / p) for p in precisions[1:]]
    build_stores(teacher, ann, images, precisions[1:], on_ray, views, workers=2, images_per_shard=4, progress=False)
    for p, t in zip(precisions, together):
        _assert_same_store(t, str(tmp_path / "alone" / p))
    for p, r in zip(precisions[1:], on_ray):
        _assert_same_store(r, str(tmp_path / "alone" / p))

    # tiny loses its shard 1: a rerun computes shard 1 once, for tiny alone, and the others are complete already.
    from mtpd.cache.store import open_root

    open_root(together[2], "r+")["index/shards"][1] = np.zeros(3, dtype=np.uint64)
    reps = build_stores(teacher, ann, images, precisions, together, views, **opts)
    assert [(r.shards_written, r.shards_skipped) for r in reps] == [(0, 3), (0, 3), (1, 2)]
    _assert_same_store(together[2], str(tmp_path / "alone" / "tiny"))


def test_build_and_estimate_take_several_precisions(tmp_path, digits, capsys):
    ann, images = digits["train"]["ann"], digits["train"]["images"]
    args = build_args(ann, images, "--precision", "small,tiny", "--workers", "0", "--out", str(tmp_path / "s"))
    assert cache_main(args) == 2
    assert "put {precision} in the path" in capsys.readouterr().err
    out = str(tmp_path / "s-{precision}")
    assert cache_main(build_args(ann, images, "--precision", "small,tiny", "--workers", "0", "--out", out)) == 0
    printed = capsys.readouterr().out
    assert printed.count("one teacher pass for 2 stores") == 2
    assert StoreReader(str(tmp_path / "s-small")).header.precision == "small"
    assert StoreReader(str(tmp_path / "s-tiny")).header.precision == "tiny"
    # a precision whose parameters hold commas stays one precision
    est = ["estimate", *build_args(ann, images)[1:-1], "--sample", "3"]
    assert cache_main([*est, "--precision", "lossless,small+features=pq:bits=2,rotate=true"]) == 0
    table = [[c.strip() for c in ln.split("|")[1:-1]] for ln in capsys.readouterr().out.splitlines()]
    table = [r for r in table if len(r) == 5][2:]  # the table's rows, below its header
    errors, current = {}, None
    for precision, output, _, per_level, _ in table:
        current = precision or current  # a precision is named on its first output's row only
        errors[(current, output)] = dict(x.split() for x in per_level.replace("P", "|P").split("|")[1:])
    assert {p for p, _ in errors} == {"lossless", "small+features=pq:bits=2,rotate=true"}
    assert all(float(v) == 0.0 for (p, _), e in errors.items() if p == "lossless" for v in e.values())
    assert any(float(v) > 0.0 for v in errors[("small+features=pq:bits=2,rotate=true", "box")].values())


@pytest.mark.slow
def test_a_build_that_loses_a_worker_node_finishes_unattended(tmp_path, digits, tiny_teacher_ckpt):
    """A Ray cluster on loopback (tests/node_loss_run.py, its own process) loses the node under one actor mid-build:
    the shards lost with it are written again on a replacement actor, counted, and the store equals one built in
    this process without the fault."""
    import subprocess
    import sys

    out = tmp_path / "store"
    script = Path(__file__).resolve().parent / "node_loss_run.py"
    args = [digits["train"]["ann"], digits["train"]["images"], tiny_teacher_ckpt, str(out)]
    res = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["lost"] and report["retries"] >= 1, report
    assert verify_store(str(out)).ok and StoreReader(str(out)).root.attrs["build_retries"] == report["retries"]
    ref = build_store(
        TeacherSpec("retinanet_tiny", tiny_teacher_ckpt),
        digits["train"]["ann"],
        digits["train"]["images"],
        str(tmp_path / "ref"),
        views=ViewSpec(views=("orig", "hflip"), **TINY_VIEW),
        precision="lossless",
        workers=0,
        images_per_shard=1,
        progress=False,
    )
    a, b = _arrays(str(out)), _arrays(str(ref.store))
    for k in b:
        if k.startswith("outputs/"):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.slow
def test_a_local_instance_starts_beside_a_cluster_address_it_must_not_join(tmp_path):
    """A build's own Ray instance is new every time: a ``RAY_ADDRESS`` (or a ``ray_current_cluster`` file a dead
    instance left behind) naming a cluster is not joined, which ``ray.init(num_cpus=...)`` would refuse."""
    import os
    import subprocess
    import sys

    code = (
        "import ray; from mtpd.cache.ray_local import start_local_ray; start_local_ray(1); "
        "print(int(ray.cluster_resources()['CPU'])); ray.shutdown()"
    )
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "1", out.stderr[-2000:]
