"""The measurements of a run: tables of methods timed round-robin on a batch, the memory target, the curves."""
from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from experiments.bench.cases import (DEFAULT_MODE, HAS_COMPILE, SOFTMAX, PYG_AGGREGATIONS, Batch, Method, Plan,
                                     uot_methods)
from experiments.bench.memory import CPU_ALLOCATORS, FIXED_MMAP, available_mb, cuda_peak_mb, peak_mb_in_subprocess
from experiments.bench.timing import elapsed_ms, forward, forward_backward, fresh_pages_mb
from experiments.bench.training import measure_training

_START_S = time.perf_counter()  # progress messages count from the import


COLUMNS = ["section", "config", "method", "solver", "K", "memory_efficient", "compiled", "allocator", "N", "D", "B",
           "max_set", "fwd_ms", "fwdbwd_ms", "fwdbwd_fresh_mb", "peak_mb", "baseline", "fwd_ratio", "fwdbwd_ratio",
           "fwdbwd_ratio_min", "fwdbwd_ratio_max", "peak_ratio", "epoch_s", "epoch_ratio", "note"]


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
                forward(module, x, index, batch.num_sets)
                forward_backward(module, x, index, batch.num_sets)
            if method.compiled or method.kernels:
                row["note"] = f"compile and warm-up: {time.perf_counter() - start_s:.1f} s"
            modules[method] = module
        except Exception as error:  # noqa: BLE001
            row["note"] = _failure(error)

    times: dict[Method, dict[str, list[float]]] = {m: {"fwd": [], "fwdbwd": [], "fresh": []} for m in modules}
    for _ in range(plan.repeats):
        for method, module in modules.items():
            for key, step in (("fwd", forward), ("fwdbwd", forward_backward)):
                fresh_before = fresh_pages_mb()
                times[method][key].append(elapsed_ms(lambda: step(module, x, index, batch.num_sets), device))
                if key == "fwdbwd":
                    times[method]["fresh"].append(fresh_pages_mb() - fresh_before)

    for method, module in modules.items():
        if device.type == "cuda":
            _record_peak(rows[method], lambda: cuda_peak_mb(module, x, index, batch.num_sets))
        elif memory:
            rows[method]["allocator"] = FIXED_MMAP
            _record_peak(rows[method], lambda: peak_mb_in_subprocess(method, batch, threads, FIXED_MMAP))
    for method in modules:
        row, base = rows[method], method.baseline
        if device.type == "cpu":
            row["fwdbwd_fresh_mb"] = float(np.median(times[method]["fresh"]))
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


def measure_memory_target(plan: Plan, device: torch.device, threads: int) -> list[dict[str, Any]]:
    """Peak extra memory of forward+backward at each K of ``plan.memory_iters``, on the CPU under each allocator
    setting of :data:`CPU_ALLOCATORS`; ratios to the least K under the same setting."""
    batch, k_base = plan.memory_target, min(plan.memory_iters)
    rows: dict[tuple[Method, str], dict[str, Any]] = {}
    allocators = CPU_ALLOCATORS if device.type == "cpu" else ("cuda caching allocator",)
    for allocator in allocators:
        for method in uot_methods(plan.memory_solvers, sorted(plan.memory_iters)):
            base = rows.get((replace(method, num_iters=k_base), allocator), {})
            row = rows[method, allocator] = dict(_row("memory", batch, method), allocator=allocator)
            row["baseline"] = base.get("method", method.label)
            # Autograd memory grows about linearly in K: skip what would crowd out the machine's other users.
            expected_mb = base.get("peak_mb", 0.0) * method.num_iters / k_base
            if expected_mb > available_mb(device) / 2:
                row["note"] = f"skipped: about {expected_mb:.0f} MB expected, {available_mb(device):.0f} MB free"
                continue
            if device.type == "cuda":
                x, index = batch.make(device)
                module = method.build(batch.dim, device)
                forward_backward(module, x.requires_grad_(), index, batch.num_sets)  # warm-up
                _record_peak(row, lambda: cuda_peak_mb(module, x, index, batch.num_sets))
            else:
                _record_peak(row, lambda: peak_mb_in_subprocess(method, batch, threads, allocator))
            row["peak_ratio"] = row.get("peak_mb", math.nan) / base.get("peak_mb", row.get("peak_mb", math.nan))
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
    # Per solver (Sinkhorn: compile=True refuses the BADMMs): eager and its compiled kernels (the layer eager:
    # compile=True); for contrast, the whole layer through torch.compile (slower than eager in the runs before
    # compile=True existed).
    eager = [Method("UOT", s, 4, DEFAULT_MODE) for s in plan.compile_solvers]
    compiled = [*eager, *(replace(m, kernels=True) for m in eager if HAS_COMPILE),
                *(Method("UOT", s, 4, DEFAULT_MODE, compiled=True) for s in plan.module_compile_solvers)]
    if compiled:  # compiled Softmax too, so that compiled UOT is also seen against a compiled baseline
        compiled.insert(0, replace(SOFTMAX, compiled=True))
    for batch in plan.compile_batches:
        rows += measure_group("compile", batch, [SOFTMAX, *compiled], device, plan, threads)
    structure = [replace(method, gw=gw) for method in uot_methods(plan.solvers, [4], [DEFAULT_MODE])
                 for gw in (0.0, plan.structure_gw)]
    for batch in plan.structure_batches:
        _log(f"structure term: gw={plan.structure_gw:g} against gw=0, {batch.name}")
        rows += measure_group("structure", batch, structure, device, plan, threads)
    for batch in plan.authors.batches if plan.authors is not None else ():
        _log(f"the authors' layers against ours, {batch.name}")
        rows += measure_group("authors", batch, plan.authors.methods(), device, plan, threads)
    if plan.training is not None:
        _log(f"training epochs: {', '.join(plan.training.poolings)}")
        rows += measure_training(plan.training)
    if device.type == "cuda":  # the GPU target: 1M nodes x 256 dims, K = 4
        gpu_batch = replace(plan.curve_batch, num_sets=round(1e6 / plan.curve_batch.mean_size), dim=256)
        methods = [*uot_methods(plan.solvers, [4], [DEFAULT_MODE]), SOFTMAX]
        rows += measure_group("gpu target", gpu_batch, methods, device, plan, threads)
    return pd.DataFrame(rows, columns=COLUMNS)

