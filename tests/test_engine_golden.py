"""The training engine's refactor changed no arithmetic: a two-stage plan's final weights are bitwise
those the stage runner of commit e8d9fde produced (one torch thread, CPU).

The golden digest below was computed by this test's first version (commit 9fbd3d9, which called
``mtpd.trainer.runner.run_plan``) against e8d9fde's trainer. A bitwise digest holds only where the CPU
kernels round as they did there: oneDNN picks its convolution kernels by instruction set (capping this
machine at AVX2 with ``ONEDNN_MAX_CPU_ISA=AVX2`` trains other weights from the same code). So goldens are kept
per kernel probe (``GOLDENS``): on a machine whose probe has no golden the test skips, saying so. To add one,
on that machine: ``git worktree add /tmp/ref 9fbd3d9``, then in /tmp/ref
``MTPD_PRINT_GOLDEN=1 PYTHONPATH=/tmp/ref python -m pytest -s tests/test_engine_golden.py`` for the digest
(never from the code under test), and ``MTPD_PRINT_GOLDEN=1 python -m pytest -s tests/test_engine_golden.py``
here for the probe (it prints ``PROBE ...``).
"""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
from test_trainer import write_plan

# Kernel probe -> golden digest, one pair per kind of machine the golden was made on from commit 9fbd3d9. The
# probe runs plain torch convolutions shaped like the student's, never mtpd's code, so a change to the code under
# test cannot move the probe and hide behind a skip: on a machine with a recorded probe, another digest fails.
GOLDENS = {
    # AVX-512 (oneDNN 3.12, MKL): the machine this test was written on
    "0c7bb8902f7c8a4321e788b3ae0e8c9d361e11249714abd05ec8fb1262e5c493": (
        "3c26560c2ce0008f12c1d585e5c96dc2bea2415a6aeefa735167c27f9654ab8b"
    ),
    # AMD EPYC without AVX-512 (oneDNN's AVX2 kernels): made from 9fbd3d9 as the docstring says, 2026-12-03
    "00e29d74a1c49e08bfeb6d6fbd3b10bf3d06d2ddc00841633f58c90fe76dbd5b": (
        "9d9b2ea9bae631a95eee83cb61aa69d056cf49906485c04ea1ed1563f2fa72fb"
    ),
}
# The plan of test_trainer.write_plan with RM and PFI in the forms they had when the digest was made (the
# defaults since follow the paper's reimplementation: RM with low-quality matches, PFI not detached, norm).
STAGE = {"epochs": 1, "optimizer": {"type": "adamw", "lr": 0.002}, "schedule": {"warmup_iters": 2}}
PFI_THEN = {"name": "pfi", "params": {"detach_pred": True, "reduction": "mean"}}
RM_THEN = {"name": "rm", "params": {"low_quality": False}}


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def kernel_probe() -> str:
    """The digest of a forward and backward pass, on one thread, through plain torch convolutions shaped like the
    golden's student (stride-2 3x3 stages, 1x1 laterals, 3x3 heads on 32 channels; batch 4 at 64 px): the conv,
    matmul and reduction kernels its training runs, and nothing of mtpd."""
    import torch.nn.functional as F

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        shapes = [(8, 3, 3, 2), (16, 8, 3, 2), (32, 16, 3, 2), (32, 32, 1, 1), (32, 32, 3, 1), (90, 32, 3, 1)]
        ws = [(torch.randn(o, i, k, k, generator=g) / (i * k * k) ** 0.5).requires_grad_() for o, i, k, _ in shapes]
        x = torch.rand(4, 3, 64, 64, generator=g)
        for w, (_, _, k, stride) in zip(ws, shapes):
            x = F.relu(F.conv2d(x, w, stride=stride, padding=k // 2))
        x.square().mean().backward()
        return weights_digest({str(i): w.grad for i, w in enumerate(ws)} | {"out": x.detach()})
    finally:
        torch.set_num_threads(threads)


def test_two_stage_plan_weights_equal_the_pre_engine_trainer(tmp_path, digits, tiny_store):
    from mtpd.trainer.plan import load_plan
    from mtpd.trainer.stage import run_plan

    probe = kernel_probe()
    if os.environ.get("MTPD_PRINT_GOLDEN"):
        print(f"PROBE {probe}")
    elif probe not in GOLDENS:
        pytest.skip(
            f"no golden for this CPU's kernels (probe {probe[:12]}; recorded: {', '.join(p[:12] for p in GOLDENS)}): "
            "add one made here from commit 9fbd3d9 as the module docstring says"
        )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        stages = [
            {"name": "weak", "stores": [tiny_store], "losses": [{"name": "mgd", "weight": 2.0e-4}, PFI_THEN], **STAGE},
            {"name": "strong", "stores": [tiny_store], "losses": [RM_THEN, {"name": "mse", "weight": 0.1}], **STAGE},
        ]
        plan = load_plan(write_plan(tmp_path, digits, [tiny_store], stages, checkpoint_every=2))
        for s in plan.stages:
            s.eval = False  # evaluation reads the weights, never writes them
        run_plan(plan, [1, 2], device="cpu", log=lambda s: None)
    finally:
        torch.set_num_threads(threads)
    final = torch.load(tmp_path / "run" / "stage_2" / "final.pt", map_location="cpu", weights_only=True)["model"]
    digest = weights_digest(final)
    if os.environ.get("MTPD_PRINT_GOLDEN"):
        print(f"GOLDEN {digest}")
    assert digest == GOLDENS[probe]
