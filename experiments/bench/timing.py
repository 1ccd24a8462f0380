"""One forward, one forward+backward, and the time they take (CUDA events on a GPU, wall clock on the CPU)."""
from __future__ import annotations

import resource
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



def fresh_pages_mb() -> float:
    """The memory this process has taken from the system so far and touched first, in MiB (its minor page
    faults times the page size). Its growth over a call is what the C library did not serve from memory it
    held: on the CPU, each such page costs a page fault (a few microseconds on a virtual machine)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt * resource.getpagesize() / 2 ** 20
