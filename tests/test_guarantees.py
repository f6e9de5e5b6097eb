"""Guarantees under faults: the same command gives the same store, no file runs code, one writer per
store, damaged shards are caught on read and repaired, unreadable images are skipped on request,
a full or forbidden disk ends in one line, and the local Ray instance stays on loopback."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_VIEW, build_args, eval_args, tiny_build
from test_trainer import write_plan

from mtpd.cache.build import BuildError
from mtpd.cache.inspect import store_info, verify_store
from mtpd.cache.lock import STALE_AFTER_S, WriterLock, _this_machine, lock_path
from mtpd.cache.schema import StoreError
from mtpd.cache.store import StoreReader
from mtpd.data import CocoDataset, ViewSpec
from mtpd.teachers.registry import TeacherSpec
from mtpd.trainer.targets import DistillDataset

VIEWS = ViewSpec(views=("orig", "hflip"), **TINY_VIEW)


def _arrays(store: str) -> dict[str, np.ndarray]:
    r = StoreReader(store)
    return {n: np.asarray(r.root[f"outputs/{n}"][:]) for n in r.header.outputs}


# -- 1. the same command, the same store ---------------------------------------------------------
def test_random_teacher_builds_are_byte_identical(tmp_path, digits) -> None:
    spec = TeacherSpec("retinanet_tiny", "none", 10)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    for out in ("a", "b"):
        tiny_build(digits, tmp_path / out, spec, outputs=["fpn", "cls"])
    assert torch.equal(torch.rand(3), expected_next)  # building a random teacher left the caller's RNG alone
    a, b = _arrays(str(tmp_path / "a")), _arrays(str(tmp_path / "b"))
    assert all(np.array_equal(a[n], b[n]) for n in a) and a["fpn"].any()
    ra, rb = StoreReader(str(tmp_path / "a")), StoreReader(str(tmp_path / "b"))
    assert np.array_equal(ra.status().checksum, rb.status().checksum)
    assert ra.header.teacher["extra"]["init_seed"] == 0


# -- 2. no file a user downloads can run code ------------------------------------------------------
class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_mmengine_training_checkpoint_is_read_as_data(tmp_path) -> None:
    pytest.importorskip("mmengine", reason="needs the mmdet extra (mmengine) to write a real training log")
    from mmengine.logging import MessageHub

    from mtpd import checkpoint

    hub = MessageHub.get_instance("mtpd-test")
    for i in range(3):
        hub.update_scalar("train/loss", 0.5 * i)
    hub.update_info("iter", np.int64(30))
    state = {"backbone.w": torch.arange(4.0)}
    path = tmp_path / "epoch_12.pth"
    torch.save(
        {
            "meta": {"seed": np.int64(0), "dataset_meta": {"classes": ("a", "b")}},
            "state_dict": state,
            "message_hub": hub.state_dict(),
        },
        path,
    )
    got = checkpoint.load(path)
    assert torch.equal(got["state_dict"]["backbone.w"], state["backbone.w"])
    buffer = got["message_hub"]["log_scalars"]["train/loss"]
    assert type(buffer).__name__ == "_Inert" and type(buffer).__module__ == "mtpd.checkpoint"  # data, no mmengine code


def test_trust_flag_is_the_only_way_to_unpickle(tmp_path, digits, tiny_teacher_ckpt, capsys) -> None:
    from mtpd import checkpoint
    from mtpd.cli.eval import main

    marker = tmp_path / "payload_ran"
    ckpt = torch.load(tiny_teacher_ckpt, weights_only=True)
    ckpt["extra"] = _Payload(str(marker))
    bad = tmp_path / "downloaded.pt"
    torch.save(ckpt, bad, pickle_module=pickle)
    args = eval_args(digits, bad)
    assert main(args) == 2 and not marker.exists()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "downloaded.pt" in err and "never unpickles" in err
    assert "--trust-checkpoint" in err
    try:
        with pytest.warns(UserWarning, match="full unpickling"):
            assert main(args + ["--trust-checkpoint"]) == 0
    finally:
        checkpoint.trust_checkpoints(False)
    assert marker.exists()  # the user vouched for the file: it was unpickled whole


# -- 3. one writer per store -----------------------------------------------------------------------
def _write_lock(store: Path, **holder) -> None:
    lock_path(store).parent.mkdir(parents=True, exist_ok=True)
    lock_path(store).write_text(json.dumps({"started": time.time(), "heartbeat": time.time(), **holder}))


def test_a_second_builder_stops_naming_the_first(tmp_path, digits) -> None:
    out = tmp_path / "store"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(out, **_this_machine(), pid=other.pid)
        with pytest.raises(StoreError, match=rf"another build is writing this store .*pid {other.pid}"):
            tiny_build(digits, out)
        assert not (out / "zarr.json").exists()  # refused before touching the store
        # On another host the process cannot be checked: a fresh heartbeat keeps the lock.
        _write_lock(out, host="elsewhere", pid=1)
        with pytest.raises(StoreError, match="host elsewhere"):
            WriterLock(out).acquire()
    finally:
        other.kill()
        other.wait()


def test_stale_locks_are_taken_over(tmp_path, digits, tiny_store) -> None:
    out = tmp_path / "store"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(out, **_this_machine(), pid=dead.pid)  # its process is gone
    rep = tiny_build(digits, out, outputs=["fpn"])
    assert rep.shards_written == rep.shards_total and not lock_path(out).exists()  # released at the end
    _write_lock(out, host="elsewhere", pid=1, heartbeat=time.time() - STALE_AFTER_S - 60)  # silent for too long
    with WriterLock(out):
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
        # Readers never need the lock.
        assert StoreReader(tiny_store).status().done.all()


# -- 4. damaged shards are caught on read, named, and repaired ------------------------------------
def _shard_file(store: Path, name: str, shard: int) -> Path:
    return store / "outputs" / name / "c" / str(shard) / "0" / "0"


def _read_all(store: str, digits) -> None:
    ds = DistillDataset(CocoDataset(digits["train"]["ann"], digits["train"]["images"]), VIEWS, [store], flip=True)
    for epoch in range(2):  # both flip choices of most images
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            ds[i]


def test_damaged_shards_stop_training_with_the_repair_command(
    tmp_path, digits, tiny_store, tiny_teacher_ckpt, capsys
) -> None:
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    flipped = _shard_file(store, "fpn", 1)
    data = bytearray(flipped.read_bytes())
    data[len(data) // 3] ^= 0xFF  # one bit pattern changed inside a stored sample
    flipped.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"shard 1 is damaged .*--repair"):
        _read_all(str(store), digits)
    _shard_file(store, "cls", 2).unlink()  # a shard file lost
    ds = DistillDataset(CocoDataset(digits["train"]["ann"], digits["train"]["images"]), VIEWS, [str(store)])
    with pytest.raises(StoreError, match=r"shard 2 is damaged \(its files hold \d+ bytes where \d+ were written"):
        ds[8]
    # The trainer, with loader workers, says it in one line and exits 2.
    from mtpd.cli.train import main

    plan = write_plan(
        tmp_path,
        digits,
        [str(store)],
        stages=[
            {
                "name": "s",
                "stores": [str(store)],
                "losses": [{"name": "mse", "weight": 0.1}],
                "epochs": 1,
                "optimizer": {"type": "adamw", "lr": 0.001},
            }
        ],
    )
    text = plan.read_text().replace("workers: 0", "workers: 1")
    plan.write_text(text)
    assert main(["--plan", str(plan), "--stage", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is damaged" in err and "--repair" in err, err
    # --repair rewrites exactly the two damaged shards; the store then reads as it was built.
    rep = tiny_build(digits, store, TeacherSpec("retinanet_tiny", tiny_teacher_ckpt), repair=True)
    assert rep.shards_written == 2 and verify_store(str(store)).ok
    _read_all(str(store), digits)
    fresh, repaired = _arrays(tiny_store), _arrays(str(store))
    for n in fresh:
        np.testing.assert_allclose(repaired[n].astype(np.float32), fresh[n].astype(np.float32), rtol=2e-3, atol=1e-3)


# -- 5. unreadable images: stop naming them, or skip them on request --------------------------------
def test_skip_bad_records_and_training_leaves_them_out(tmp_path, digits, capsys) -> None:
    from mtpd.cli.cache import main

    images = tmp_path / "images"
    shutil.copytree(digits["train"]["images"], images)
    coco = CocoDataset(digits["train"]["ann"], str(images))
    broken = coco.images[5].file_name
    (images / broken).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    args = build_args(
        digits["train"]["ann"], str(images), "--views", "orig,hflip", "--workers", "0", "--images-per-shard", "4"
    )
    assert main(args + ["--out", str(tmp_path / "strict")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and broken in err
    assert main(args + ["--out", str(tmp_path / "skip"), "--skip-bad"]) == 0
    assert "1 unreadable image(s) skipped" in capsys.readouterr().out
    assert store_info(str(tmp_path / "skip"))["bad_images"] == [broken]
    assert main(["info", str(tmp_path / "skip")]) == 0
    assert "skipped      1 unreadable image(s)" in capsys.readouterr().out
    ds = DistillDataset(coco, VIEWS, [str(tmp_path / "skip")], flip=True)
    assert len(ds) == len(coco) - 1 and ds.skipped == [broken]
    assert coco.images[5].image_id not in {ds[i].image_id for i in range(len(ds))}


# -- 6. a full or forbidden disk ends in one line, finished shards intact --------------------------
def test_disk_full_keeps_finished_shards(tmp_path, digits, tiny_store) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    size_kib = max(64, int(store_info(tiny_store)["bytes_on_disk"] * 0.6) // 1024)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here ({r.stderr.strip() or r.returncode}); needs root")
    try:
        out = mnt / "store"
        with pytest.raises(BuildError, match=r"cannot write the store: No space left on device.*rerun"):
            tiny_build(digits, out, images_per_shard=2)
        status = StoreReader(str(out)).status()
        res = verify_store(str(out))
        assert 0 < status.done.sum() < len(status.done)  # some shards finished before the disk filled
        assert not res.corrupt and len(res.missing) == int((~status.done).sum())  # and every one of them is intact
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_forbidden_store_path_is_one_line(tmp_path, digits, capsys) -> None:
    """Root passes permission bits, so the forbidden folder is made immutable (chattr +i: EPERM for root too)."""
    from mtpd.cli.cache import main

    locked = tmp_path / "locked"
    locked.mkdir()
    r = subprocess.run(["chattr", "+i", str(locked)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot make a folder immutable here ({r.stderr.strip() or r.returncode}); needs root on ext4")
    try:
        rc = main(
            build_args(
                digits["train"]["ann"], digits["train"]["images"], "--out", str(locked / "store"), "--workers", "0"
            )
        )
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=False)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "Operation not permitted" in err and "write access" in err and str(locked) in err


# -- 7. the local Ray instance: loopback only, and quiet --------------------------------------------
def _listening(pids: set[int]) -> list[str]:
    """Local addresses of the TCP sockets in LISTEN state owned by ``pids`` (from /proc)."""
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes[link[8:-1]] = pid
        except OSError:
            continue
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # 0A: LISTEN
                out.append(f[1].split(":")[0])
    return out


def test_local_ray_listens_on_loopback_only(ray_session) -> None:
    pids = {int(p) for p in os.listdir("/proc") if p.isdigit()}
    ray_pids = set()
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"gcs_server" in cmd or b"raylet" in cmd or b"ray::" in cmd or b"default_worker" in cmd:
            ray_pids.add(pid)
    addrs = _listening(ray_pids)
    assert addrs, "found no listening Ray sockets to check"
    loopback = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}
    assert set(addrs) <= loopback, addrs


def test_a_build_prints_no_ray_start_up_noise(tmp_path, digits) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mtpd.cli.cache",
            *build_args(
                digits["train"]["ann"], digits["train"]["images"], "--out", str(tmp_path / "s"), "--workers", "1"
            ),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    text = r.stdout + r.stderr
    assert "Token authentication" not in text and "shards written" in text
    assert len([x for x in text.splitlines() if x.strip()]) == 1, text


# -- a stage killed at any moment loses nothing -----------------------------------------------------
def _train(plan: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "mtpd.cli.train", "--plan", str(plan), "--stage", "1", "--device", "cpu", *extra],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [2, 4])  # steps logged: mid-epoch 1, and early in epoch 2 (3 steps per epoch)
def test_stage_killed_with_sigkill_resumes_to_the_same_weights(tmp_path, digits, tiny_store, kill_after) -> None:
    import signal

    stages = [
        {
            "name": "s",
            "stores": [tiny_store],
            "losses": [{"name": "mgd", "weight": 2.0e-4}],
            "epochs": 2,
            "optimizer": {"type": "sgd", "lr": 0.01},
            "schedule": {"warmup_iters": 2},
        }
    ]
    runs = {}
    for name in ("ref", "killed"):
        (tmp_path / name).mkdir()
        runs[name] = write_plan(tmp_path / name, digits, [], stages, checkpoint_every=1)
    ref = _train(runs["ref"])
    assert ref.wait(timeout=300) == 0, ref.stderr.read()[-2000:]
    proc = _train(runs["killed"])
    log = tmp_path / "killed" / "run" / "stage_1" / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) >= kill_after:
            os.kill(proc.pid, signal.SIGKILL)  # most likely while it writes last.pt
            break
        time.sleep(0.01)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    final = tmp_path / "killed" / "run" / "stage_1" / "final.pt"
    assert not final.exists()
    resumed = _train(runs["killed"], "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-2000:]
    want = torch.load(tmp_path / "ref" / "run" / "stage_1" / "final.pt", weights_only=True)["model"]
    got = torch.load(final, weights_only=True)["model"]
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_a_build_whose_lock_was_taken_over_stops(tmp_path) -> None:
    """A writer that finds another builder's token in its lock stops instead of writing on, and does not
    delete the new holder's lock when it ends."""
    out = tmp_path / "store"
    lock = WriterLock(out)
    lock.acquire()
    try:
        lock.check()  # still ours
        _write_lock(out, host="elsewhere", pid=7, token="someone-else")
        lock.beat()
        with pytest.raises(StoreError, match="was taken over .*host elsewhere"):
            lock.check()
    finally:
        lock.release()
    assert json.loads(lock_path(out).read_text())["token"] == "someone-else"
