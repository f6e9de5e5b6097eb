"""The training engine's refactor changed no arithmetic: a two-stage plan's final weights are bitwise
those the stage runner of commit e8d9fde produced (one torch thread, CPU).

The golden digest below was computed by this test's first version (commit 9fbd3d9, which called
``mtpd.trainer.runner.run_plan``) against e8d9fde's trainer. A bitwise digest holds only where the CPU
kernels round as they did there: oneDNN picks its convolution kernels by instruction set (capping this
machine at AVX2 with ``ONEDNN_MAX_CPU_ISA=AVX2`` trains other weights from the same code). So the test
first runs a kernel probe, and on a machine whose probe differs it skips, saying so. To judge the engine on
such a machine, regenerate the golden there from those commits, never from the code under test:
``git worktree add /tmp/ref 9fbd3d9``, then in /tmp/ref
``MTPD_PRINT_GOLDEN=1 PYTHONPATH=/tmp/ref python -m pytest -s tests/test_engine_golden.py``; and take the
probe from this file with ``MTPD_PRINT_GOLDEN=1`` (it prints ``PROBE ...``).
"""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
from test_trainer import write_plan

GOLDEN_SHA256 = "3c26560c2ce0008f12c1d585e5c96dc2bea2415a6aeefa735167c27f9654ab8b"
# The kernel probe's digest on the machine the golden was made on (AVX-512, oneDNN 3.12, MKL). A machine
# whose conv and matmul kernels round differently trains other weights from the same code, so there the
# golden cannot judge the engine: the test says so and skips instead of failing on the CPU.
PROBE_SHA256 = "26ab860ef7ed54464afade0145a242d27416567d5a266ab6960ef1eb307c8b6f"
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
    """The digest of one forward and backward pass of the plan's student on a fixed batch (one thread): the
    conv, matmul and reduction kernels the golden's training runs, without the store or the engine."""
    from mtpd.models import build_arch
    from mtpd.models.detect import detector_forward

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        student = build_arch("retinanet_tiny", num_classes=10, fpn_channels=32, width=8)
        images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # the plan's batch
        out = detector_forward(student, images, [(64, 64)] * 4, None, names=("fpn", "cls"), detect=False)
        sum(v.square().mean() for v in out.outputs.values()).backward()
        return weights_digest({n: p.grad for n, p in student.named_parameters() if p.grad is not None})
    finally:
        torch.set_num_threads(threads)


def test_two_stage_plan_weights_equal_the_pre_engine_trainer(tmp_path, digits, tiny_store):
    from mtpd.trainer.plan import load_plan
    from mtpd.trainer.stage import run_plan

    probe = kernel_probe()
    if os.environ.get("MTPD_PRINT_GOLDEN"):
        print(f"PROBE {probe}")
    elif probe != PROBE_SHA256:
        pytest.skip(
            f"this CPU's kernels round differently from the golden's machine (kernel probe {probe[:12]}, "
            f"golden's {PROBE_SHA256[:12]}): regenerate the golden here as the module docstring says"
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
    assert digest == GOLDEN_SHA256
