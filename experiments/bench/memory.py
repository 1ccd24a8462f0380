"""Peak extra memory of one forward+backward: the allocator's counter on CUDA, the resident set on the CPU."""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from experiments.bench.cases import Batch, Method
from experiments.bench.timing import forward_backward


def cuda_peak_mb(module: torch.nn.Module, x: Tensor, index: Tensor, num_sets: int) -> float:
    x.grad = None  # gradients of an earlier call would count as memory held before
    module.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    forward_backward(module, x, index, num_sets)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _status_mb(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak) of this process, in MiB, from ``/proc``."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1]) / 1024


M_MMAP_THRESHOLD = -3  # mallopt's parameter, from glibc's malloc.h
# The CPU allocator settings a memory measurement runs under. glibc serves large blocks from its heap once its
# mmap threshold has adapted, and the heap keeps freed memory: the peak then depends on fragmentation, which is
# what a user's process sees ("default"). A fixed threshold maps and unmaps every block ("mmap 64 KiB").
DEFAULT_ALLOCATOR, FIXED_MMAP = "default", "mmap 64 KiB"
CPU_ALLOCATORS = (DEFAULT_ALLOCATOR, FIXED_MMAP)


def _rss_peak_mb(method: Method, batch: Batch, threads: int, allocator: str) -> float:
    """Runs in a fresh process: peak RSS of one forward+backward minus the RSS just before it.

    The peak is ``VmHWM``, reset to the current RSS first. ``getrusage().ru_maxrss`` would not do: over
    fork+exec it carries the parent's peak, and the parent here is the benchmark itself.
    """
    torch.set_num_threads(threads)
    if allocator == FIXED_MMAP:
        ctypes.CDLL(ctypes.util.find_library("c")).mallopt(M_MMAP_THRESHOLD, 1 << 16)
    x, index = batch.make()
    module = method.build(batch.dim, torch.device("cpu"))
    # A warm-up on a small batch loads the kernels and starts the thread pool (it needs 32k elements).
    small = replace(batch, num_sets=32, mean_size=32, dist="uniform")
    small_x, small_index = small.make()
    forward_backward(module, small_x.requires_grad_(), small_index, small.num_sets)
    del small_x, small_index
    x.requires_grad_()
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
    before = _status_mb("VmRSS")
    forward_backward(module, x, index, batch.num_sets)
    return _status_mb("VmHWM") - before


def peak_mb_in_subprocess(method: Method, batch: Batch, threads: int, allocator: str = FIXED_MMAP) -> float:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_rss_peak_mb, method, batch, threads, allocator).result()


def available_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.mem_get_info()[0] / 2**20
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return int(meminfo["MemAvailable"].split()[0]) / 1024

