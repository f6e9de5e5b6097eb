"""Shared fixtures: one Ray instance for the session, a tiny digits set, tiny teacher stores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests run on 2 cores next to Ray workers: keep torch from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

TINY_VIEW = dict(short=64, long=64)


def assert_fp16_close(stored, live, msg: str = "") -> None:
    """``stored`` (a lossless store's value, numpy or torch) is ``live`` (the teacher run directly) within fp16
    rounding: relative 2^-11 (1 % slack), 2^-24 absolute for fp16 subnormals. The two sides ran the teacher at
    other batch sizes and thread counts, which on some CPUs picks kernels that sum in another order; that noise
    (1.1e-6 of a map's largest value between AVX-512 and AVX2 kernels on a random-init retinanet_tiny, and
    enough to take the bare rounding bound to 0.98-0.99 of itself on an AVX-512 AMD EPYC) gets 2^-16 of the
    map's largest value."""
    import torch

    stored, live = torch.as_tensor(stored), torch.as_tensor(live)
    noise = 2**-16 * float(live.abs().max())
    torch.testing.assert_close(stored, live, rtol=2**-11 * 1.01, atol=2**-24 + noise, msg=msg or None)


def assert_store_is_the_teacher(store: str, teacher, ds, picks, views=None) -> None:
    """Every output and level the store holds for images ``picks`` (dataset positions) and ``views`` (default:
    all the store's) is ``teacher`` run on the same prepared view, within fp16 rounding (``assert_fp16_close``).
    Returns the view sizes seen."""
    from mtpd.cache.store import StoreReader
    from mtpd.data import ViewSpec, prepare_view

    reader = StoreReader(store)
    spec = ViewSpec.from_dict(reader.header.views)
    sizes = set()
    for idx in picks:
        image_id = ds.images[idx].image_id
        for view in views or spec.views:
            x, meta = prepare_view(ds.load_image(idx), spec, view, image_id)
            sizes.add(meta.size)
            direct = teacher(x[None], list(reader.header.outputs))
            cached = reader.read(reader.sample_index(image_id, view))
            for name, maps in cached.items():
                for lvl, m in zip(reader.header.outputs[name].levels, maps):
                    ref = direct[f"{name}.p{lvl}"][0, :, : m.shape[1], : m.shape[2]].numpy()
                    assert m.shape == ref.shape
                    # the builder batched views; this forward runs one
                    assert_fp16_close(m, ref, f"{view} {name}.p{lvl}")
    return sizes


def assert_resumes_bitwise(straight, stopped, stop_after: int) -> None:
    """Stage 1 of plan ``stopped``, interrupted after ``stop_after`` log lines (mid-epoch, after a checkpointed
    step) and resumed, ends with exactly the weights of plan ``straight`` run without a stop."""
    import torch

    from mtpd.trainer.stage import Stage, run_plan

    run_plan(straight, [1], log=None)
    ref = torch.load(Path(straight.output_dir) / "stage_1" / "final.pt", weights_only=True)["model"]
    calls = []

    def killer(msg: str) -> None:
        calls.append(msg)
        if len(calls) == stop_after:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Stage(stopped, 1, log=killer).run()
    Stage(stopped, 1, resume=True, log=lambda s: None).run()
    got = torch.load(Path(stopped.output_dir) / "stage_1" / "final.pt", weights_only=True)["model"]
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def tiny_build(digits: dict, out, teacher=None, **options):
    """``build_store`` of the tiny teacher (random, seeded, unless ``teacher``) on the digits train split:
    orig + hflip views at 64 px, lossless, in this process, 4 images per shard, unless ``options`` say otherwise."""
    from mtpd.cache.build import build_store
    from mtpd.data import ViewSpec
    from mtpd.teachers.registry import TeacherSpec

    options = {
        "views": ViewSpec(views=("orig", "hflip"), **TINY_VIEW),
        "precision": "lossless",
        "workers": 0,
        "images_per_shard": 4,
        "progress": False,
        **options,
    }
    return build_store(
        teacher or TeacherSpec("retinanet_tiny", "none", 10),
        digits["train"]["ann"],
        digits["train"]["images"],
        None if out is None else str(out),
        **options,
    )


def eval_args(digits: dict, checkpoint, *extra: str) -> list[str]:
    """`mtpd-eval` arguments for ``checkpoint`` on the digits val split at 64 px."""
    return [
        "--checkpoint",
        str(checkpoint),
        "--ann",
        digits["val"]["ann"],
        "--images",
        digits["val"]["images"],
        "--short",
        "64",
        "--long",
        "64",
        *extra,
    ]


def build_args(ann: str, images: str, *extra: str) -> list[str]:
    """`mtpd-cache build` arguments for the tiny teacher on 64 px views, in this process, plus ``extra``."""
    return [
        "build",
        "--teacher",
        "retinanet_tiny",
        "--ann",
        ann,
        "--images",
        images,
        "--short",
        "64",
        "--long",
        "64",
        "--no-progress",
        *extra,
    ]


TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def crash_marker(tmp_path_factory) -> Path:
    """Where tests.faults.CrashOnce records that it already crashed (set before Ray starts its workers)."""
    path = Path(tmp_path_factory.mktemp("faults")) / "crashed"
    os.environ["MTPD_TEST_CRASH_MARKER"] = str(path)
    return path


@pytest.fixture(scope="session")
def ray_session(crash_marker):
    import ray

    if not ray.is_initialized():
        # Workers import tests/faults.py for fault injection; mtpd itself is installed in the venv.
        env = {"PYTHONPATH": str(TESTS), "MTPD_TEST_CRASH_MARKER": str(crash_marker), "OMP_NUM_THREADS": "1"}
        from mtpd.cache.ray_local import start_local_ray

        start_local_ray(2, runtime_env={"env_vars": env})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> dict:
    from mtpd.data.digits import make_digits

    return make_digits(tmp_path_factory.mktemp("digits"), train=10, val=4, size=64, seed=0)


@pytest.fixture(scope="session")
def tiny_teacher_ckpt(tmp_path_factory, digits) -> str:
    """A retinanet_tiny teacher with fixed random weights, saved like a trained one."""
    import torch

    from mtpd.models import arch_checkpoint, build_arch

    torch.manual_seed(0)
    model = build_arch("retinanet_tiny", num_classes=10)
    with torch.no_grad():
        # torchvision initialises head weights with std 0.01, so a random head's logits barely
        # vary; a trained head's do. Scale them up so head outputs carry signal like a trained one.
        for name, p in model.head.named_parameters():
            if name.endswith("weight"):
                p.mul_(20.0)
    path = Path(tmp_path_factory.mktemp("teacher")) / "tiny_teacher.pt"
    torch.save(arch_checkpoint(model), path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory, digits, tiny_teacher_ckpt, ray_session) -> str:
    """A lossless store of the tiny teacher on the digits train split, orig + hflip views."""
    from mtpd.cache.build import build_store
    from mtpd.data import ViewSpec
    from mtpd.teachers.registry import TeacherSpec

    out = str(Path(tmp_path_factory.mktemp("stores")) / "tiny_lossless")
    build_store(
        TeacherSpec("retinanet_tiny", tiny_teacher_ckpt),
        digits["train"]["ann"],
        digits["train"]["images"],
        out,
        views=ViewSpec(views=("orig", "hflip"), **TINY_VIEW),
        precision="lossless",
        workers=2,
        images_per_shard=4,
        progress=False,
    )
    return out
