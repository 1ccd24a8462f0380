"""One forward, one forward+backward, and the time they take (CUDA events on a GPU, wall clock on the CPU)."""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch import Tensor


def forward(module: torch.nn.Module, x: Tensor, index: Tensor, num_sets: int) -> None:
    with torch.no_grad():
        module(x, index, dim_size=num_sets)


def forward_backward(module: torch.nn.Module, x: Tensor, index: Tensor, num_sets: int) -> None:
    x.grad = None  # as after optimizer.zero_grad(): backward allocates fresh gradients
    module.zero_grad(set_to_none=True)
    module(x, index, dim_size=num_sets).sum().backward()


def elapsed_ms(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    start_s = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - start_s)

