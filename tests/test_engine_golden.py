"""The training engine's refactor changed no arithmetic: a two-stage plan's final weights are bitwise
those the stage runner of commit e8d9fde produced (one torch thread, CPU).

The golden digest below was computed by this test's first version (commit 9fbd3d9, which called
``mtpd.trainer.runner.run_plan``) against e8d9fde's trainer. Should a machine's CPU kernels round
differently (another instruction set), regenerate it there from those commits, never from the code
under test: ``git worktree add /tmp/ref 9fbd3d9``, then in /tmp/ref
``MTPD_PRINT_GOLDEN=1 PYTHONPATH=/tmp/ref python -m pytest -s tests/test_engine_golden.py``.
"""

from __future__ import annotations

import hashlib
import os

import torch
from test_trainer import write_plan

GOLDEN_SHA256 = "3c26560c2ce0008f12c1d585e5c96dc2bea2415a6aeefa735167c27f9654ab8b"
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


def test_two_stage_plan_weights_equal_the_pre_engine_trainer(tmp_path, digits, tiny_store):
    from mtpd.trainer.plan import load_plan
    from mtpd.trainer.stage import run_plan

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
