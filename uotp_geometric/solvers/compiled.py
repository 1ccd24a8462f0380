r"""Compiled kernels for ``compile=True``: the cache of the functions compiled by :func:`torch.compile`, and
the helpers the kernels share.

``compile=True`` covers Sinkhorn (:mod:`~uotp_geometric.solvers.sinkhorn`,
:mod:`~uotp_geometric.solvers.sinkhorn_scaling`, and proximal Sinkhorn's inner iterations): its solvers'
:class:`torch.autograd.Function` s stay eager, and what they call per iteration, forward and backward, is a
pure tensor function of those modules that runs eager or, through :func:`compiled`, as a kernel compiled once
per function with ``fullgraph=True`` (a graph break is an error, not a silent slow path) and ``dynamic=True``
(one graph for all ``N``, ``B``, ``D``): the same body either way. Each takes its iteration's coefficients as
0-d tensors (:func:`iteration_value`), so neither the iteration index nor ``K`` enters a graph; Python values
that do (``None`` for an absent buffer, the dtype) select one more graph each. Reductions over the sets trace
as native :func:`torch.Tensor.index_add` and :func:`torch.Tensor.scatter_reduce` on the index, whatever
:mod:`uotp_geometric.segment`'s backend (a third-party scatter would break the graph).

BADMM and BADMM-Q run eager (``SolverOptions.validate`` refuses ``compile=True`` for them): their in-place
iterations and adjoint are not written as such pure functions, and compiling them needed a second
implementation of the iteration and its adjoint, for a modest gain (``docs/solvers.md``).
"""
from typing import Any, Callable, Dict

import torch
import torch.fx.experimental._config as fx_config
from torch import Tensor

from uotp_geometric.segment import Segments

_COMPILED: Dict[Callable, Callable] = {}


def compiled(fn: Callable) -> Callable:
    r"""The compiled :obj:`fn`, made on first use and kept for the process (one cache entry per kernel).

    Its tensor arguments are passed detached: the kernels run without autograd (inside the solvers'
    Functions or under :func:`torch.no_grad`), and a view would show the graph its base, whose sizes
    the compiler guards on, so that a view and a tensor of its own would each get a graph."""
    kernel = _COMPILED.get(fn)
    if kernel is None:
        graph = torch.compile(fn, fullgraph=True, dynamic=True)

        def kernel(*args: Any) -> Any:
            # Without duck shaping: sizes of the same value (B = D = 64, say) would share a symbol, and
            # the graph would hold only for batches where they are equal. (Set and reset by hand: the
            # config's patch() costs several times as much, at every call.)
            duck_shape = fx_config.use_duck_shape
            fx_config.use_duck_shape = False
            try:
                return graph(*(_detached(a) for a in args))
            finally:
                fx_config.use_duck_shape = duck_shape

        _COMPILED[fn] = kernel
    return kernel


def _detached(arg: Any) -> Any:
    if isinstance(arg, Tensor):
        return arg.detach()
    if isinstance(arg, Segments):
        return Segments(*(_detached(a) for a in arg))
    return arg


def iteration_value(values: Tensor, k: int, compile: bool) -> Tensor:
    r"""Entry :obj:`k` of a per-iteration value or state stacked over the iterations: for a kernel, a copy
    of its own, not a view, whose storage offset (0 for the first entry only) the graph would guard on."""
    return values[k].clone() if compile else values[k]


def dot(a: Tensor, b: Tensor) -> Tensor:
    r""":math:`\langle a, b \rangle` as a tensor whose sum it is: eager, the 0-d dot product; in a compiled
    kernel, its partial sums over the rows (shape ``(a.size(0),)``), for the caller to add up. The compiler
    guards a float32 sum on whether it has more than 4096 terms (beyond, it accumulates in chunks), so a
    full sum over ``N`` or ``N D`` entries would give a batch crossing that size a graph of its own; a sum
    over one row (``D`` terms) does not."""
    if torch.compiler.is_compiling():
        return (a * b).reshape(a.size(0), -1).sum(dim=-1)
    return torch.dot(a.reshape(-1), b.reshape(-1))
