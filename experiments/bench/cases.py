"""What the benchmark measures: batches of sets, the methods timed on them, and the plan of a run."""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor
from torch_geometric.nn import MLP
from torch_geometric.nn import aggr as pyg_aggr

from experiments.bench.padded import PaddedUOT
from experiments.bench.training import TrainingPlan
from uotp_geometric import UOTAggregation

if TYPE_CHECKING:
    from experiments.bench.authors import AuthorsPlan

# The memory-lean backward is selected by this keyword where the installed package has it.
HAS_MEMORY_EFFICIENT = "memory_efficient" in inspect.signature(UOTAggregation).parameters
DEFAULT_MODE: Optional[bool] = True if HAS_MEMORY_EFFICIENT else None
MODES: tuple[Optional[bool], ...] = (True, False) if HAS_MEMORY_EFFICIENT else (None,)
# Sinkhorn's compiled kernels (an eager layer): UOTAggregation(compile=True), where the package has it.
HAS_COMPILE = "compile" in inspect.signature(UOTAggregation).parameters
SOLVERS = ("sinkhorn", "badmm")
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
    compiled: bool = False  # the whole module through torch.compile
    gw: float = 0.0  # ROT-Pooling's structure term (UOT only)
    kernels: bool = False  # UOT Sinkhorn only: the layer eager, its solver's iterations compiled (compile=True)

    @property
    def label(self) -> str:
        parts = [self.name, self.solver, f"K={self.num_iters}" if self.num_iters else ""]
        if self.memory_efficient is not None:
            parts.append("efficient" if self.memory_efficient else "autograd")
        parts.append("compiled" if self.compiled else "")
        parts.append("compiled kernels" if self.kernels else "")
        parts.append(f"gw={self.gw:g}" if self.gw else "")
        return " ".join(p for p in parts if p)

    @property
    def baseline(self) -> Method:
        """What this method's ratios divide by: the structure term by the same method without it, padding by
        ours, the rest (compiled ones too) by eager Softmax."""
        if self.gw:
            return replace(self, gw=0.0)
        if self.name == "padded UOT":
            return Method("UOT", self.solver, self.num_iters, DEFAULT_MODE)
        return SOFTMAX

    def build(self, dim: int, device: torch.device) -> torch.nn.Module:
        if self.name == "UOT":
            mode = {} if self.memory_efficient is None else {"memory_efficient": self.memory_efficient}
            structure = {"gw": self.gw} if self.gw else {}
            kernels = {"compile": True} if self.kernels else {}
            module = UOTAggregation(self.solver, num_iters=self.num_iters, learn=True, **mode, **structure,
                                    **kernels)
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
    memory_solvers: Sequence[str] = (*SOLVERS, "badmm_q")  # the memory target's solvers
    solvers: Sequence[str] = SOLVERS
    compile_solvers: Sequence[str] = ("sinkhorn",)  # eager against compiled kernels (compile=True: Sinkhorn only)
    module_compile_solvers: Sequence[str] = ("sinkhorn",)  # torch.compile of the whole layer, for contrast
    padded_max_elements: float = 2e8  # B * M * D * K above which padding is skipped (its memory)
    curve_batch: Batch = Batch(128, 30)  # the scaling curves vary its N, D or K
    compile_batches: Sequence[Batch] = SKEWED
    training: Optional[TrainingPlan] = None  # seconds per epoch of a GNN with each pooling, if given
    structure_gw: float = 0.1  # gw of the structure-term section, against gw = 0 on the same batches
    structure_batches: Sequence[Batch] = ()
    authors: Optional[AuthorsPlan] = None  # the authors' layers beside ours (--authors-code), if given


def make_plan(quick: bool) -> Plan:
    batches = [replace(b, dist=dist) for b in [*SKEWED, Batch(512, 25, dim=128)]
               for dist in ("uniform", "lognormal")]
    if quick:  # about 5 minutes on 2 idle cores; the memory target at half its size
        return Plan(repeats=5, warmup=1, batches=batches, num_iters=(4,), nodes=(1_000, 10_000, 100_000),
                    dims=(16, 64, 256, 512), iters=(1, 4, 16, 64), memory_batches=(),
                    memory_target=Batch(1000, 100, "uniform"), structure_batches=SKEWED)
    return Plan(repeats=15, warmup=2, batches=batches, num_iters=(1, 4, 16),
                nodes=(1_000, 3_000, 10_000, 30_000, 100_000, 300_000, 1_000_000),
                dims=(16, 32, 64, 128, 256, 512), iters=(1, 2, 4, 8, 16, 32, 64), memory_batches=batches,
                structure_batches=SKEWED)

