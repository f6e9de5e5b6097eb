"""Train the engine golden's two-stage plan on a pinned numeric path and print its final weights' sha256.

``tests/test_engine_golden.py`` runs this file in a fresh process. It makes everything the plan reads itself
(the digits set, a seeded random teacher, a lossless store built in this process) so that no byte of the
result comes from a fixture built on another numeric path (the session's store is built by Ray workers).

Why a fresh process: the same code trains different bits on different x86 CPUs when torch picks its kernels
by instruction set. oneDNN's convolutions (AVX2, AVX-512, AMX), ATen's vectorised loops (``ATEN_CPU_CAPABILITY``),
MKL's GEMM and numpy's SIMD loops all dispatch at run time, and the choice is made when each library loads.
``pinned_env`` fixes every one of them before anything is imported:

- ``ATEN_CPU_CAPABILITY=default``: ATen's loops compiled for baseline x86-64, whatever the CPU offers;
- oneDNN off (``torch.backends.mkldnn.enabled = False``): convolutions go through im2col and BLAS GEMM;
- ``MKL_CBWR=COMPATIBLE``: MKL's conditional numerical reproducibility, the same GEMM code path on every x86 CPU;
- ``NPY_DISABLE_CPU_FEATURES``: numpy's dispatched loops above its baseline (the digits generator calls exp/log);
- one thread everywhere, so no reduction is split differently.

The outer environment's ISA caps (``ONEDNN_MAX_CPU_ISA``, ``MKL_ENABLE_INSTRUCTIONS``) pass through untouched,
so running the test under them checks that the pinned path does not depend on them.

Making the golden from the reference commit (never from the code under test)::

    git worktree add /tmp/ref 9fbd3d9
    cp tests/golden_run.py /tmp/ref/tests/
    PYTHONPATH=/tmp/ref python tests/golden_run.py --pinned --reference

``--reference`` writes RM and PFI without parameters, as that commit's defaults were the forms the golden keeps
(``THEN``); it prints which ``mtpd`` it imported, to check it is the reference tree.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# RM and PFI in the forms they had at the reference commit, where these were the defaults (the defaults since
# follow the paper's reimplementation: RM with low-quality matches, PFI not detached, norm).
THEN = {"pfi": {"detach_pred": True, "reduction": "mean"}, "rm": {"low_quality": False}}
LR = 0.002


def pinned_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with every run-time kernel choice pinned; see the module
    docstring. numpy's features to disable are those this machine would dispatch to: naming one the CPU lacks
    is an error in numpy, so the list is read from the numpy already loaded here."""
    import numpy as np

    try:
        from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
    except ImportError:  # numpy 1.x
        from numpy.core._multiarray_umath import __cpu_dispatch__, __cpu_features__
    del np
    env = dict(os.environ if base is None else base)
    env.update(
        ATEN_CPU_CAPABILITY="default",
        MKL_CBWR="COMPATIBLE",
        NPY_DISABLE_CPU_FEATURES=" ".join(f for f in __cpu_dispatch__ if __cpu_features__.get(f)),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONHASHSEED="0",
    )
    return env


def weights_digest(state: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def plan_dict(digits: dict, store: str, out: Path, lr: float, reference: bool) -> dict:
    """The plan of ``tests/test_trainer.write_plan`` at the reference commit: two one-epoch stages on one store."""

    def loss(name: str, **extra) -> dict:
        params = {} if reference or name not in THEN else {"params": THEN[name]}
        return {"name": name, **params, **extra}

    stage = {"epochs": 1, "optimizer": {"type": "adamw", "lr": lr}, "schedule": {"warmup_iters": 2}}
    return {
        "output_dir": str(out),
        "seed": 0,
        "log_every": 1,
        "checkpoint_every": 2,
        "student": {"arch": "retinanet_tiny", "options": {"fpn_channels": 32, "width": 8}},
        "data": {
            "train_ann": digits["train"]["ann"],
            "train_images": digits["train"]["images"],
            "val_ann": digits["val"]["ann"],
            "val_images": digits["val"]["images"],
            "short": 64,
            "long": 64,
            "flip": True,
            "batch_size": 4,
            "workers": 0,
        },
        "stages": [
            {"name": "weak", "stores": [store], "losses": [loss("mgd", weight=2.0e-4), loss("pfi")], **stage},
            {"name": "strong", "stores": [store], "losses": [loss("rm"), loss("mse", weight=0.1)], **stage},
        ],
    }


def train(work: Path, lrs: list[float], reference: bool) -> dict:
    """Make the data, teacher and store under ``work``, train the plan once per learning rate, and return the
    digests with what the numeric path was."""
    import torch
    import yaml

    torch.backends.mkldnn.enabled = False
    torch.set_num_threads(1)
    import mtpd
    from mtpd.cache.build import build_store
    from mtpd.data import ViewSpec
    from mtpd.data.digits import make_digits
    from mtpd.models import arch_checkpoint, build_arch
    from mtpd.teachers.registry import TeacherSpec
    from mtpd.trainer.plan import load_plan

    try:
        from mtpd.trainer.stage import run_plan
    except ImportError:  # the reference commit's stage runner
        from mtpd.trainer.runner import run_plan

    digits = make_digits(work / "digits", train=10, val=4, size=64, seed=0)
    # The conftest's tiny teacher: fixed random weights, head scaled up so its outputs carry signal.
    torch.manual_seed(0)
    model = build_arch("retinanet_tiny", num_classes=10)
    with torch.no_grad():
        for name, p in model.head.named_parameters():
            if name.endswith("weight"):
                p.mul_(20.0)
    torch.save(arch_checkpoint(model), work / "teacher.pt")
    store = str(work / "store")
    build_store(
        TeacherSpec("retinanet_tiny", str(work / "teacher.pt")),
        digits["train"]["ann"],
        digits["train"]["images"],
        store,
        views=ViewSpec(views=("orig", "hflip"), short=64, long=64),
        precision="lossless",
        batch_size=2,
        workers=0,
        images_per_shard=4,
        progress=False,
    )
    digests = {}
    for lr in lrs:
        out = work / f"run_lr{lr}"
        path = work / f"plan_lr{lr}.yaml"
        path.write_text(yaml.safe_dump(plan_dict(digits, store, out, lr, reference)))
        plan = load_plan(path)
        for s in plan.stages:
            s.eval = False  # evaluation reads the weights, never writes them
        run_plan(plan, [1, 2], device="cpu", log=lambda s: None)
        final = torch.load(out / "stage_2" / "final.pt", map_location="cpu", weights_only=True)["model"]
        digests[str(lr)] = weights_digest(final)
    return {
        "digests": digests,
        "mtpd": str(Path(mtpd.__file__).parent),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn": torch.backends.mkldnn.enabled,
        "threads": torch.get_num_threads(),
    }


def run_pinned(lrs: list[float], outer: dict[str, str] | None = None, timeout: float = 600) -> dict:
    """Run ``train`` in a fresh process on the pinned path, from this environment plus ``outer``; returns its
    result."""
    with tempfile.TemporaryDirectory(prefix="mtpd-golden-") as work:
        cmd = [sys.executable, __file__, "--work", work, "--lr", *map(str, lrs)]
        done = subprocess.run(
            cmd, env=pinned_env({**os.environ, **(outer or {})}), capture_output=True, text=True, timeout=timeout
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", help="directory for data, store and runs (default: a temporary one)")
    p.add_argument("--lr", type=float, nargs="+", default=[LR], help="train once per learning rate")
    p.add_argument("--reference", action="store_true", help="the reference commit's RM/PFI forms (see docstring)")
    p.add_argument("--pinned", action="store_true", help="rerun this in a fresh process on the pinned path")
    a = p.parse_args(argv)
    if a.pinned:
        cmd = [sys.executable, __file__, "--lr", *map(str, a.lr)] + (["--reference"] if a.reference else [])
        return subprocess.run(cmd, env=pinned_env()).returncode
    if a.work:
        print(json.dumps(train(Path(a.work), a.lr, a.reference)))
        return 0
    with tempfile.TemporaryDirectory(prefix="mtpd-golden-") as work:
        print(json.dumps(train(Path(work), a.lr, a.reference)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
