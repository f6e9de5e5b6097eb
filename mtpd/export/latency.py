"""CPU latency of a detector at batch 1: its forward as it is deployed (``DeployableDetector``, post-processing
included), timed per image. Shared by the demo's table and bench/latency.py, so both time the same path."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from torch import nn

from mtpd.export.graph import DeployableDetector


def median_ms(fn: Callable[[], object], repeats: int = 20, warmup: int = 3) -> float:
    """Median wall-clock milliseconds of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def eager_runner(model: nn.Module, view: torch.Tensor, size: tuple[int, int]) -> Callable[[], object]:
    """A call of the deployed PyTorch model on one prepared view [3, H, W] (valid region ``size``)."""
    module = DeployableDetector(model).eval()
    x, s = view[None].float(), torch.tensor(size, dtype=torch.int64)

    @torch.inference_mode()
    def run() -> object:
        return module(x, s)

    return run


def count_flops(model: nn.Module, view: torch.Tensor, size: tuple[int, int]) -> int:
    """FLOPs of one deployed forward (torch's flop counter: convolutions and matrix products)."""
    from torch.utils.flop_counter import FlopCounterMode

    run = eager_runner(model, view, size)
    with FlopCounterMode(display=False) as counter:
        run()
    return int(counter.get_total_flops())


def cpu_ms_per_image(model: nn.Module, view: torch.Tensor, size: tuple[int, int], threads: int, repeats: int = 20):
    """Median CPU milliseconds per image of the deployed PyTorch model with ``threads`` torch threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        return median_ms(eager_runner(model, view, size), repeats)
    finally:
        torch.set_num_threads(before)
