"""``python -m experiments.bench [--quick] [--device cpu|cuda] [--out docs/bench] [--repeats R]``.

Times UOT-Pooling (:class:`~uotp_geometric.UOTAggregation`, both solvers) against PyG's aggregations and
against a padded implementation of the same iterations (:func:`padded_uot_pool`: ``to_dense_batch`` and a
mask, the layout of the published layer), measures the peak extra memory of forward+backward, and writes
``results.csv``, ``README.md`` and PNG plots of the scaling curves into ``--out``.

CPU timings on a shared machine are noisy, so every number that is compared is a ratio against a baseline
measured in the same process, with the methods timed round-robin within each repeat: a ratio is the median
over repeats of the per-repeat ratio, so a load spike hits both sides of it alike.
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import datetime
import gc
import inspect
import math
import multiprocessing
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import matplotlib
import numpy as np
import pandas as pd
import torch
import torch_geometric
from torch import Tensor
from torch_geometric.nn import MLP
from torch_geometric.nn import aggr as pyg_aggr
from torch_geometric.utils import to_dense_batch

from uotp_geometric import UOTAggregation
from uotp_geometric.solvers.common import hardness

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

# The memory-lean backward is selected by this keyword where the installed package has it.
HAS_MEMORY_EFFICIENT = "memory_efficient" in inspect.signature(UOTAggregation).parameters
DEFAULT_MODE: Optional[bool] = True if HAS_MEMORY_EFFICIENT else None
MODES: tuple[Optional[bool], ...] = (True, False) if HAS_MEMORY_EFFICIENT else (None,)
SOLVERS = ("sinkhorn", "badmm")
_START_S = time.perf_counter()  # progress messages count from the import
LOGNORMAL_SIGMA = 1.0  # of log(set size): the largest of a few hundred sets is 4 to 13 times the mean

PYG_AGGREGATIONS: dict[str, Callable[[int], torch.nn.Module]] = {
    "SumAggregation": lambda dim: pyg_aggr.SumAggregation(),
    "MeanAggregation": lambda dim: pyg_aggr.MeanAggregation(),
    "MaxAggregation": lambda dim: pyg_aggr.MaxAggregation(),
    "SoftmaxAggregation": lambda dim: pyg_aggr.SoftmaxAggregation(learn=True),
    "PowerMeanAggregation": lambda dim: pyg_aggr.PowerMeanAggregation(learn=True),
    "Set2Set": lambda dim: pyg_aggr.Set2Set(dim, processing_steps=3),
    "DeepSetsAggregation": lambda dim: pyg_aggr.DeepSetsAggregation(MLP([dim, dim, dim], norm=None),
                                                                     MLP([dim, dim, dim], norm=None)),
    "GraphMultisetTransformer": lambda dim: pyg_aggr.GraphMultisetTransformer(dim, k=16, heads=4),
}


def padded_uot_pool(x: Tensor, index: Tensor, dim_size: int, *, solver: str = "sinkhorn",
                    eps: Union[float, Tensor] = 1.0, lam_p: Union[float, Tensor] = 1.0,
                    lam_q: Union[float, Tensor] = 1.0, rho: Union[float, Tensor] = 1.0,
                    num_iters: int = 4) -> Tensor:
    """:func:`uotp_geometric.uot_pool` (uniform priors) computed on the padded layout ``(B, M, D)``.

    Every set is padded to the largest one, ``M`` nodes, and the padding enters each log-sum-exp over the
    nodes of a set as ``-inf``. ``index`` must be sorted and every set non-empty. ``eps``, ``lam_p``,
    ``lam_q`` and ``rho`` are scalars or tensors of shape ``(1,)`` or ``(num_iters,)``.
    """
    dense, mask = to_dense_batch(x, index, batch_size=dim_size)  # (B, M, D), (B, M)
    pad = torch.zeros_like(mask, dtype=x.dtype).masked_fill(~mask, -math.inf).unsqueeze(-1)
    log_p = -math.log(x.size(-1))  # p = 1 / D
    log_q = -mask.sum(1).to(x.dtype).log().view(-1, 1, 1)  # q = 1 / N_b
    eps, lam_p, lam_q, rho = (torch.as_tensor(v, dtype=x.dtype, device=x.device).expand(num_iters)
                              for v in (eps, lam_p, lam_q, rho))
    if solver == "sinkhorn":  # spec §2; u is (B, 1, D), v is (B, M, 1)
        v = dense.new_zeros(dense.shape[:2]).unsqueeze(-1)
        for k in range(num_iters):
            scores = dense / eps[k]
            u = hardness(lam_p[k], eps[k]) * (log_p - torch.logsumexp(scores + (v + pad), 1, keepdim=True))
            v = hardness(lam_q[k], eps[k]) * (log_q - torch.logsumexp(scores + u, 2, keepdim=True))
        log_plan = dense / eps[-1] + u + (v + pad)
    elif solver == "badmm":  # spec §3, read out of S
        log_s, dual = log_q + log_p, torch.zeros_like(dense)
        for k in range(num_iters):
            g = log_s + (dense - dual) / rho[k]
            log_r = torch.logsumexp(g, 2, keepdim=True)
            h_q = hardness(lam_q[k], rho[k])
            log_t = g + ((1 - h_q) * log_r + h_q * log_q - log_r)
            h = (dual + rho[k] * log_t) / (eps[k] + rho[k])
            log_c = torch.logsumexp(h + pad, 1, keepdim=True)
            h_p = hardness(lam_p[k], eps[k] + rho[k])
            log_s = h + ((1 - h_p) * log_c + h_p * log_p - log_c)
            dual = dual + rho[k] * (log_t.exp() - log_s.exp())
        log_plan = log_s + pad
    else:
        raise ValueError(f"Unknown solver '{solver}'")
    return x.size(-1) * (dense * log_plan.exp()).sum(1)


class PaddedUOT(torch.nn.Module):
    """:func:`padded_uot_pool` with the learned parameters of a :class:`UOTAggregation`."""

    def __init__(self, solver: str, num_iters: int) -> None:
        super().__init__()
        self.params = UOTAggregation(solver, num_iters=num_iters, learn=True)

    def forward(self, x: Tensor, index: Tensor, dim_size: int) -> Tensor:
        p = self.params
        return padded_uot_pool(x, index, dim_size, solver=p.solver, num_iters=p.num_iters,
                               eps=p.value("eps"), lam_p=p.value("lam_p"), lam_q=p.value("lam_q"),
                               rho=p.value("rho") if p.solver == "badmm" else 1.0)


@dataclass(frozen=True)
class Batch:
    """``num_sets`` sets with ``dim`` features and sizes drawn from ``dist``: ``"uniform"`` (every set has
    ``mean_size`` nodes) or ``"lognormal"`` (mean ``mean_size``, sigma :data:`LOGNORMAL_SIGMA`)."""

    num_sets: int
    mean_size: float
    dist: str = "lognormal"
    dim: int = 64
    seed: int = 0

    @property
    def name(self) -> str:
        return f"B={self.num_sets} mean={self.mean_size:g} {self.dist} D={self.dim}"

    def sizes(self) -> np.ndarray:
        if self.dist == "uniform":
            return np.full(self.num_sets, round(self.mean_size))
        mu = math.log(self.mean_size) - LOGNORMAL_SIGMA**2 / 2  # so that the mean is mean_size
        sizes = np.random.default_rng(self.seed).lognormal(mu, LOGNORMAL_SIGMA, self.num_sets)
        return np.maximum(np.rint(sizes), 1).astype(np.int64)

    def make(self, device: Union[str, torch.device] = "cpu") -> tuple[Tensor, Tensor]:
        """Features ``x`` of shape ``(N, dim)`` and the sorted set ``index`` of each row."""
        sizes = torch.from_numpy(self.sizes())
        gen = torch.Generator().manual_seed(self.seed)
        x = torch.randn(int(sizes.sum()), self.dim, generator=gen).to(device)
        return x, torch.repeat_interleave(torch.arange(self.num_sets), sizes).to(device)


@dataclass(frozen=True)
class Method:
    """A pooling to measure: ``"UOT"``, ``"padded UOT"`` or the name of a PyG aggregation."""

    name: str
    solver: str = ""
    num_iters: int = 0
    memory_efficient: Optional[bool] = None  # None: not applicable, or the keyword does not exist yet
    compiled: bool = False

    @property
    def label(self) -> str:
        parts = [self.name, self.solver, f"K={self.num_iters}" if self.num_iters else ""]
        if self.memory_efficient is not None:
            parts.append("efficient" if self.memory_efficient else "autograd")
        parts.append("compiled" if self.compiled else "")
        return " ".join(p for p in parts if p)

    @property
    def baseline(self) -> Method:
        """What this method's ratios divide by: padding by ours, the rest (compiled ones too) by eager Softmax."""
        if self.name == "padded UOT":
            return Method("UOT", self.solver, self.num_iters, DEFAULT_MODE)
        return SOFTMAX

    def build(self, dim: int, device: torch.device) -> torch.nn.Module:
        if self.name == "UOT":
            mode = {} if self.memory_efficient is None else {"memory_efficient": self.memory_efficient}
            module = UOTAggregation(self.solver, num_iters=self.num_iters, learn=True, **mode)
        elif self.name == "padded UOT":
            module = PaddedUOT(self.solver, self.num_iters)
        else:
            module = PYG_AGGREGATIONS[self.name](dim)
        module = module.to(device)
        return torch.compile(module, dynamic=False) if self.compiled else module


SOFTMAX = Method("SoftmaxAggregation")


def uot_methods(solvers: Sequence[str], num_iters: Sequence[int],
                modes: Sequence[Optional[bool]] = MODES) -> list[Method]:
    return [Method("UOT", s, k, m) for s in solvers for k in num_iters for m in modes]


SKEWED = (Batch(128, 30), Batch(64, 400))  # the batches of the targets


@dataclass
class Plan:
    """What one run measures. ``memory_batches`` name the batches whose methods get a CPU memory
    measurement (one process each, so it is slow); on CUDA every timed method gets one."""

    repeats: int
    warmup: int
    batches: Sequence[Batch]
    num_iters: Sequence[int]  # K of UOTAggregation and of the padded implementation in the batch tables
    nodes: Sequence[int]  # scaling curves: total nodes, feature size, iterations
    dims: Sequence[int]
    iters: Sequence[int]
    memory_batches: Sequence[Batch]
    memory_target: Batch = Batch(2000, 100, "uniform")  # N = 200k
    memory_iters: Sequence[int] = (4, 32)
    solvers: Sequence[str] = SOLVERS
    compile_solvers: Sequence[str] = ("sinkhorn",)
    padded_max_elements: float = 2e8  # B * M * D * K above which padding is skipped (its memory)
    curve_batch: Batch = Batch(128, 30)  # the scaling curves vary its N, D or K
    compile_batches: Sequence[Batch] = SKEWED


def make_plan(quick: bool) -> Plan:
    batches = [replace(b, dist=dist) for b in [*SKEWED, Batch(512, 25, dim=128)]
               for dist in ("uniform", "lognormal")]
    if quick:  # about 5 minutes on 2 idle cores; the memory target at a quarter of its size
        return Plan(repeats=5, warmup=1, batches=batches, num_iters=(4,), nodes=(1_000, 10_000, 100_000),
                    dims=(16, 64, 256, 512), iters=(1, 4, 16, 64), memory_batches=(),
                    memory_target=Batch(500, 100, "uniform"))
    return Plan(repeats=15, warmup=2, batches=batches, num_iters=(1, 4, 16),
                nodes=(1_000, 3_000, 10_000, 30_000, 100_000, 300_000, 1_000_000),
                dims=(16, 32, 64, 128, 256, 512), iters=(1, 2, 4, 8, 16, 32, 64), memory_batches=batches,
                compile_solvers=SOLVERS)


def _forward(module: torch.nn.Module, x: Tensor, index: Tensor, num_sets: int) -> None:
    with torch.no_grad():
        module(x, index, dim_size=num_sets)


def _forward_backward(module: torch.nn.Module, x: Tensor, index: Tensor, num_sets: int) -> None:
    x.grad = None  # as after optimizer.zero_grad(): backward allocates fresh gradients
    module.zero_grad(set_to_none=True)
    module(x, index, dim_size=num_sets).sum().backward()


def _elapsed_ms(fn: Callable[[], None], device: torch.device) -> float:
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


def _cuda_peak_mb(module: torch.nn.Module, x: Tensor, index: Tensor, num_sets: int) -> float:
    x.grad = None  # gradients of an earlier call would count as memory held before
    module.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    _forward_backward(module, x, index, num_sets)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _status_mb(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak) of this process, in MiB, from ``/proc``."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1]) / 1024


M_MMAP_THRESHOLD = -3  # mallopt's parameter, from glibc's malloc.h


def _rss_peak_mb(method: Method, batch: Batch, threads: int) -> float:
    """Runs in a fresh process: peak RSS of one forward+backward minus the RSS just before it.

    The peak is ``VmHWM``, reset to the current RSS first. ``getrusage().ru_maxrss`` would not do: over
    fork+exec it carries the parent's peak, and the parent here is the benchmark itself.
    """
    torch.set_num_threads(threads)
    # glibc serves large blocks from its heap once its mmap threshold has adapted, and the heap keeps
    # freed memory: the peak then depends on fragmentation. A fixed threshold maps and unmaps every block.
    ctypes.CDLL(ctypes.util.find_library("c")).mallopt(M_MMAP_THRESHOLD, 1 << 16)
    x, index = batch.make()
    module = method.build(batch.dim, torch.device("cpu"))
    # A warm-up on a small batch loads the kernels and starts the thread pool (it needs 32k elements).
    small = replace(batch, num_sets=32, mean_size=32, dist="uniform")
    small_x, small_index = small.make()
    _forward_backward(module, small_x.requires_grad_(), small_index, small.num_sets)
    del small_x, small_index
    x.requires_grad_()
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
    before = _status_mb("VmRSS")
    _forward_backward(module, x, index, batch.num_sets)
    return _status_mb("VmHWM") - before


def peak_mb_in_subprocess(method: Method, batch: Batch, threads: int) -> float:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_rss_peak_mb, method, batch, threads).result()


COLUMNS = ["section", "config", "method", "solver", "K", "memory_efficient", "compiled", "N", "D", "B",
           "max_set", "fwd_ms", "fwdbwd_ms", "peak_mb", "baseline", "fwd_ratio", "fwdbwd_ratio",
           "fwdbwd_ratio_min", "fwdbwd_ratio_max", "peak_ratio", "note"]


def _row(section: str, batch: Batch, method: Method) -> dict[str, Any]:
    sizes = batch.sizes()
    return dict(section=section, config=batch.name, method=method.label, solver=method.solver,
                K=method.num_iters, memory_efficient=method.memory_efficient, compiled=method.compiled,
                N=int(sizes.sum()), D=batch.dim, B=batch.num_sets, max_set=int(sizes.max()),
                baseline=method.baseline.label, note="")


def _failure(error: Exception) -> str:
    first_line = (str(error).strip().splitlines() or [""])[0]
    return f"failed: {type(error).__name__}: {first_line[:200]}"


def _record_peak(row: dict[str, Any], measure: Callable[[], float]) -> None:
    try:
        row["peak_mb"] = measure()
    except Exception as error:  # noqa: BLE001
        row["note"] = f"memory {_failure(error)}"


def measure_group(section: str, batch: Batch, methods: Sequence[Method], device: torch.device, plan: Plan,
                  threads: int, memory: bool = False) -> list[dict[str, Any]]:
    """Times ``methods`` on ``batch`` round-robin, one row each with its ratios to its baseline.

    Peak memory is measured on CUDA always, on the CPU if ``memory`` (in one fresh process per method).
    """
    x, index = batch.make(device)
    x.requires_grad_()
    rows = {method: _row(section, batch, method) for method in methods}
    modules: dict[Method, torch.nn.Module] = {}
    for method, row in rows.items():
        padded_size = row["B"] * row["max_set"] * batch.dim * method.num_iters
        if method.name == "padded UOT" and padded_size > plan.padded_max_elements:
            row["note"] = f"skipped: B*M*D*K = {padded_size:.2g} > {plan.padded_max_elements:.2g}"
            continue
        try:  # the warm-up also compiles; a method that fails is reported, not fatal
            module = method.build(batch.dim, device)
            start_s = time.perf_counter()
            for _ in range(plan.warmup):
                _forward(module, x, index, batch.num_sets)
                _forward_backward(module, x, index, batch.num_sets)
            if method.compiled:
                row["note"] = f"compile and warm-up: {time.perf_counter() - start_s:.1f} s"
            modules[method] = module
        except Exception as error:  # noqa: BLE001
            row["note"] = _failure(error)

    times: dict[Method, dict[str, list[float]]] = {m: {"fwd": [], "fwdbwd": []} for m in modules}
    for _ in range(plan.repeats):
        for method, module in modules.items():
            for key, step in (("fwd", _forward), ("fwdbwd", _forward_backward)):
                times[method][key].append(_elapsed_ms(lambda: step(module, x, index, batch.num_sets), device))

    for method, module in modules.items():
        if device.type == "cuda":
            _record_peak(rows[method], lambda: _cuda_peak_mb(module, x, index, batch.num_sets))
        elif memory:
            _record_peak(rows[method], lambda: peak_mb_in_subprocess(method, batch, threads))
    for method in modules:
        row, base = rows[method], method.baseline
        for key in ("fwd", "fwdbwd"):
            row[f"{key}_ms"] = float(np.median(times[method][key]))
            if base in times:
                ratios = np.divide(times[method][key], times[base][key])
                row[f"{key}_ratio"] = float(np.median(ratios))
                if key == "fwdbwd":  # how far single repeats strayed: a wide range flags a noisy machine
                    row.update(fwdbwd_ratio_min=float(ratios.min()), fwdbwd_ratio_max=float(ratios.max()))
        if base in rows:
            row["peak_ratio"] = row.get("peak_mb", math.nan) / rows[base].get("peak_mb", math.nan)
    return list(rows.values())


def _available_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.mem_get_info()[0] / 2**20
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return int(meminfo["MemAvailable"].split()[0]) / 1024


def measure_memory_target(plan: Plan, device: torch.device, threads: int) -> list[dict[str, Any]]:
    """Peak extra memory of forward+backward at each K of ``plan.memory_iters``; ratios to the least K."""
    batch, k_base = plan.memory_target, min(plan.memory_iters)
    rows: dict[Method, dict[str, Any]] = {}
    for method in uot_methods(plan.solvers, sorted(plan.memory_iters)):
        base = replace(method, num_iters=k_base)
        row = rows[method] = _row("memory", batch, method)
        row["baseline"] = base.label
        # Autograd memory grows about linearly in K: skip what would crowd out the machine's other users.
        expected_mb = rows[base].get("peak_mb", 0.0) * method.num_iters / k_base if base in rows else 0.0
        if expected_mb > _available_mb(device) / 2:
            row["note"] = f"skipped: about {expected_mb:.0f} MB expected, {_available_mb(device):.0f} MB free"
            continue
        if device.type == "cuda":
            x, index = batch.make(device)
            module = method.build(batch.dim, device)
            _forward_backward(module, x.requires_grad_(), index, batch.num_sets)  # warm-up
            _record_peak(row, lambda: _cuda_peak_mb(module, x, index, batch.num_sets))
        else:
            _record_peak(row, lambda: peak_mb_in_subprocess(method, batch, threads))
        row["peak_ratio"] = row.get("peak_mb", math.nan) / rows[base].get("peak_mb", math.nan)
    return list(rows.values())


def _log(message: str) -> None:
    print(f"[{time.perf_counter() - _START_S:5.0f} s] {message}", flush=True)


def run(plan: Plan, device: torch.device, threads: int) -> pd.DataFrame:
    """Every measurement of ``plan``, one row each, in the columns :data:`COLUMNS`."""
    pyg = [Method(name) for name in PYG_AGGREGATIONS]
    padded = [Method("padded UOT", s, k) for s in plan.solvers for k in plan.num_iters]
    rows = []
    for batch in plan.batches:
        _log(f"batch {batch.name}")
        rows += measure_group("batch", batch, [*uot_methods(plan.solvers, plan.num_iters), *padded, *pyg],
                              device, plan, threads, memory=batch in plan.memory_batches)
    _log(f"memory {plan.memory_target.name}")
    rows += measure_memory_target(plan, device, threads)

    def curve(num_iters: int) -> list[Method]:
        return [Method("UOT", "sinkhorn", num_iters, DEFAULT_MODE),
                Method("padded UOT", "sinkhorn", num_iters), SOFTMAX]

    _log("scaling curves")
    for nodes in plan.nodes:
        batch = replace(plan.curve_batch, num_sets=max(1, round(nodes / plan.curve_batch.mean_size)))
        rows += measure_group("scaling N", batch, curve(4), device, plan, threads)
    for dim in plan.dims:
        batch = replace(plan.curve_batch, dim=dim)
        rows += measure_group("scaling D", batch, curve(4), device, plan, threads)
    for num_iters in plan.iters:
        rows += measure_group("scaling K", plan.curve_batch, curve(num_iters), device, plan, threads)
    _log("torch.compile")
    compiled = [Method("UOT", s, 4, DEFAULT_MODE, c) for s in plan.compile_solvers for c in (False, True)]
    if compiled:  # compiled Softmax too, so that compiled UOT is also seen against a compiled baseline
        compiled.insert(0, replace(SOFTMAX, compiled=True))
    for batch in plan.compile_batches:
        rows += measure_group("compile", batch, [SOFTMAX, *compiled], device, plan, threads)
    if device.type == "cuda":  # the GPU target: 1M nodes x 256 dims, K = 4
        gpu_batch = replace(plan.curve_batch, num_sets=round(1e6 / plan.curve_batch.mean_size), dim=256)
        methods = [*uot_methods(plan.solvers, [4], [DEFAULT_MODE]), SOFTMAX]
        rows += measure_group("gpu target", gpu_batch, methods, device, plan, threads)
    return pd.DataFrame(rows, columns=COLUMNS)


def machine_info(device: torch.device, command: str, load_before: float) -> dict[str, str]:
    """The header of the README: where, when and how the numbers were made."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                if line.startswith("model name")), platform.processor())
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> Optional[str]:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True)
        except (OSError, subprocess.CalledProcessError):
            return None
        return done.stdout.strip()

    commit, status = git("rev-parse", "HEAD"), git("status", "--porcelain")
    tree = "unknown" if status is None else "dirty" if status else "clean"
    info = {
        "command": f"`{command}`",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "CPU": f"{cpu} ({os.cpu_count()} cores)",
        "threads": str(torch.get_num_threads()),
        # Other processes on the cores slow some operations more than others, which ratios cannot cancel.
        "load average (1 min) before / after": f"{load_before:.1f} / {os.getloadavg()[0]:.1f}",
        "torch / torch_geometric / python": f"{torch.__version__} / {torch_geometric.__version__} / "
                                            f"{platform.python_version()}",
        "commit": f"{commit or 'none (no commit yet)'}, tree {tree}",
        "memory_efficient keyword": "present: UOT rows say efficient or autograd" if HAS_MEMORY_EFFICIENT
        else "absent: UOT rows run the library's only backward (autograd through the K iterations)",
    }
    if device.type == "cpu" and max(load_before, os.getloadavg()[0]) >= (os.cpu_count() or 1):
        info["warning"] = ("other processes kept the cores busy. A parallel operation then waits for a "
                           "descheduled thread, so times grow with the number of operations rather than "
                           "with the work, and ratios can be off by large factors even when their range is "
                           "narrow: rerun on an idle machine, or with --threads 1")
    return info


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return "–" if value is None else str(value)


def markdown_table(df: pd.DataFrame) -> str:
    """``df`` as a GitHub markdown table (``DataFrame.to_markdown`` would need ``tabulate``)."""
    lines = ["| " + " | ".join(df.columns) + " |", "|" + " --- |" * len(df.columns)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def headline(df: pd.DataFrame) -> pd.DataFrame:
    """The issue's targets next to what this run measured (rows whose measurement is missing are left out)."""
    rows = []
    for batch in SKEWED:
        group = df[(df.section == "batch") & (df.config == batch.name)].set_index("method")
        for solver in SOLVERS:
            for label, quantity, target in (
                    (Method("padded UOT", solver, 4).label, f"padded / ours, {solver} K=4", ">= 30"),
                    (Method("UOT", solver, 4, DEFAULT_MODE).label,
                     f"ours ({solver} K=4) / SoftmaxAggregation(learn=True)", "<= 3")):
                if label in group.index:
                    row = group.loc[label]
                    rows.append((f"{quantity}, fwd+bwd, {batch.name}", row.fwdbwd_ratio,
                                 f"{row.fwdbwd_ratio_min:.3g} to {row.fwdbwd_ratio_max:.3g}", target))
            compiled = df[(df.section == "compile") & (df.config == batch.name)].set_index("method")
            label = Method("UOT", solver, 4, DEFAULT_MODE, compiled=True).label
            if label in compiled.index and not np.isnan(compiled.loc[label].fwdbwd_ratio):
                row = compiled.loc[label]
                rows.append((f"ours ({solver} K=4, torch.compile) / SoftmaxAggregation(learn=True) eager, fwd+bwd, "
                             f"{batch.name}", row.fwdbwd_ratio,
                             f"{row.fwdbwd_ratio_min:.3g} to {row.fwdbwd_ratio_max:.3g}", "<= 3"))
    memory = df[df.section == "memory"]
    for row in memory[memory.K == memory.K.max()].itertuples():
        rows.append((f"peak memory K={row.K} / K={memory.K.min()}, {row.method}, N={row.N}, D={row.D}, "
                     f"B={row.B}", row.peak_ratio, "one measurement each", "<= 1.2"))
    return pd.DataFrame(rows, columns=["quantity", "measured", "range over repeats", "issue 4 target"])


TABLE_COLUMNS = ["method", "fwd_ms", "fwdbwd_ms", "peak_mb", "baseline", "fwd_ratio", "fwdbwd_ratio",
                 "fwdbwd_ratio_min", "fwdbwd_ratio_max", "peak_ratio", "note"]
CURVES = {"scaling N": ("N", "total nodes N"), "scaling D": ("D", "features D"),
          "scaling K": ("K", "iterations K")}  # section: (the column it varies, its axis label)


def _section_table(df: pd.DataFrame, first: Sequence[str] = ()) -> str:
    table = df[[*first, *TABLE_COLUMNS]].dropna(axis=1, how="all")
    return markdown_table(table.loc[:, (table != "").any()])  # drops an empty note column


def plot_curve(df: pd.DataFrame, section: str, path: Path) -> None:
    """Forward and forward+backward time against the curve's variable, one line per method."""
    column, xlabel = CURVES[section]
    data = df[df.section == section].assign(curve=lambda d: d.method.str.replace(r" K=\d+", "", regex=True))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for ax, (key, title) in zip(axes, (("fwd_ms", "forward"), ("fwdbwd_ms", "forward+backward"))):
        for name, line in data.groupby("curve", sort=False):
            if (line[column] > 0).all():
                ax.plot(line[column], line[key], marker="o", label=name)
            else:  # a method without iterations, in the K curve: the median over its measurements
                ax.axhline(line[key].median(), color="tab:green", linestyle="--", label=name)
        ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="median time (ms)", title=title)
        if column != "N":  # few values: label each
            ticks = sorted(data[column][data[column] > 0].unique())
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.set_xticks([], minor=True)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    varied = {"N": "B=", "D": "D="}.get(column, "K=")  # N varies through the number of sets
    fixed = [t for t in f"{data.config.iloc[0]} K={data.K.max()}".split() if not t.startswith(varied)]
    fig.suptitle(f"{section}: {' '.join(fixed)}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(df: pd.DataFrame, out: Path, info: dict[str, str], plan: Plan) -> None:
    """``results.csv``, ``README.md`` and one PNG per scaling curve in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "results.csv", index=False)
    cpu = info["device"] == "cpu"
    memory_how = ("on the CPU, which has no allocator counter, the peak resident set size (`VmHWM`, "
                  "reset just before) minus the RSS just before, each measurement in a fresh process after "
                  "a warm-up on a small batch; `ru_maxrss` is not used because it carries the parent's peak "
                  "over fork+exec. Resolution: a few MB (pages, allocator caches)"
                  if cpu else "`torch.cuda.max_memory_allocated()` minus the memory allocated before")
    parts = [
        "# UOT-Pooling: speed and memory",
        f"Written by {info['command']}; do not edit by hand, rerun the command.",
        markdown_table(pd.DataFrame(list(info.items()), columns=["", "value"])),
        f"**How.** Medians over {plan.repeats} repeats after {plan.warmup} warm-up round(s); within a repeat "
        "the methods of a table run round-robin, so load noise hits them alike. `fwd`: forward under "
        "`torch.no_grad()`; `fwdbwd`: forward, then `.sum().backward()` into `x` and the parameters. A "
        "ratio is the median over repeats of (time / the baseline's time in the same repeat); its baseline "
        "is named in the row: PyG's `SoftmaxAggregation(learn=True)` for the aggregations, ours at the same "
        "solver and K for the padded implementation (so its ratio is how many times slower padding is); "
        "compiled methods are divided by eager Softmax too. Peak memory (`peak_mb`) is the extra memory of "
        f"forward+backward: {memory_how}. "
        f"Set sizes: `uniform` = every set has the mean size; `lognormal` = sigma {LOGNORMAL_SIGMA} in "
        "log-size, mean as given. `max_set` is the largest set, to which padding pads every set.",
        "## Headline",
        markdown_table(headline(df)),
        "## Batches",
    ]
    for config, group in df[df.section == "batch"].groupby("config", sort=False):
        first = group.iloc[0]
        parts += [f"### {config}: N={first.N}, largest set {first.max_set} (padding stores "
                  f"{first.B * first.max_set / first.N:.1f}x the nodes)", _section_table(group)]
    memory = df[df.section == "memory"]
    if len(memory):
        parts += [f"## Memory: {memory.config.iloc[0]}, N={memory.N.iloc[0]}", _section_table(memory)]
    for config, group in df[df.section == "compile"].groupby("config", sort=False):
        parts += [f"## torch.compile: {config}", _section_table(group)]
    gpu = df[df.section == "gpu target"]
    if len(gpu):
        parts += [f"## GPU target: {gpu.config.iloc[0]}, N={gpu.N.iloc[0]}", _section_table(gpu)]
    for section, (column, _) in CURVES.items():
        curve = df[df.section == section]
        if len(curve):
            png = f"{section.replace(' ', '_')}.png"
            plot_curve(df, section, out / png)
            parts += [f"## Scaling in {column}", f"![{section}]({png})",
                      _section_table(curve, [] if column == "K" else [column])]
    (out / "README.md").write_text("\n\n".join(parts) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, K=4 only, capped scaling")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("docs/bench"))
    parser.add_argument("--repeats", type=int, help="timed repeats per method (default: 5 quick, 15 full)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on the CPU")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    plan = make_plan(args.quick)
    if args.repeats:
        plan.repeats = args.repeats
    command = shlex.join(["python", "-m", "experiments.bench", *(sys.argv[1:] if argv is None else argv)])
    load_before = os.getloadavg()[0]
    df = run(plan, device, args.threads)
    write_outputs(df, args.out, machine_info(device, command, load_before), plan)
    print(f"wrote {args.out}/results.csv, README.md and the scaling plots")


if __name__ == "__main__":
    main()
