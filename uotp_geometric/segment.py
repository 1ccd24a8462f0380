r"""Reductions over the sets of a ragged batch.

A batch of sets is stored flat, as in PyG: ``src`` has one row per element and ``index[n]`` names the set
of row ``n``. The index need not be sorted, and a set may be empty. Every reduction runs on scatter
operations over the flat tensor, so nothing is padded to the largest set.

The scatter kernels come from :func:`torch_geometric.utils.scatter` by default. ``torch_scatter`` can be
selected with :func:`use_backend`; on the CPU it was no faster for the reductions used here (see
``experiments/bench.py``), so it is never chosen implicitly.
"""
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor
from torch_geometric.utils import scatter as pyg_scatter

__all__ = [
    'segment_sum', 'segment_count', 'segment_logsumexp', 'use_backend',
    'available_backends'
]

ScatterFn = Callable[[Tensor, Tensor, int, Optional[int], str], Tensor]


def _torch_scatter(src: Tensor, index: Tensor, dim: int,
                   dim_size: Optional[int], reduce: str) -> Tensor:
    import torch_scatter
    out = torch_scatter.scatter(src, index, dim=dim, dim_size=dim_size,
                                reduce=reduce)
    return out


_BACKENDS = {'pyg': pyg_scatter, 'torch_scatter': _torch_scatter}
_scatter: ScatterFn = pyg_scatter


def available_backends() -> list:
    r"""The scatter backends that can be selected here."""
    names = ['pyg']
    try:
        import torch_scatter  # noqa: F401
        names.append('torch_scatter')
    except ImportError:
        pass
    return names


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    r"""Runs the enclosed code with the scatter backend :obj:`name`
    (``"pyg"`` or ``"torch_scatter"``)."""
    global _scatter
    if name not in _BACKENDS:
        raise ValueError(f"Unknown scatter backend '{name}' "
                         f"(expected one of {sorted(_BACKENDS)})")
    if name not in available_backends():
        raise ImportError(f"Scatter backend '{name}' is not installed")
    previous, _scatter = _scatter, _BACKENDS[name]
    try:
        yield
    finally:
        _scatter = previous


def segment_sum(src: Tensor, index: Tensor, dim_size: int) -> Tensor:
    r"""Sums the rows of :obj:`src` over each set: ``out[b] = sum_{n: index[n] = b} src[n]``."""
    return _scatter(src, index, 0, dim_size, 'sum')


def segment_count(index: Tensor, dim_size: int,
                  dtype: torch.dtype = torch.float) -> Tensor:
    r"""The number of elements of each set, as a :obj:`dtype` tensor of shape ``(dim_size,)``."""
    ones = torch.ones(index.numel(), dtype=dtype, device=index.device)
    return _scatter(ones, index, 0, dim_size, 'sum')


def segment_logsumexp(src: Tensor, index: Tensor, dim_size: int) -> Tensor:
    r"""Computes ``out[b] = log sum_{n: index[n] = b} exp(src[n])`` stably.

    The shift by the per-set maximum is taken on detached values: it cancels in the result, so it needs
    no gradient, and the max reduction then needs no backward. An empty set (or one whose entries are all
    ``-inf``) gives ``log(tiny)`` instead of ``-inf``, so that no ``inf - inf`` or ``0 * inf`` can reach a
    gradient downstream; no element reads that value back.
    """
    shift = _scatter(src.detach(), index, 0, dim_size, 'max')
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    total = _scatter((src - shift.index_select(0, index)).exp(), index, 0,
                     dim_size, 'sum')
    return total.clamp_min(torch.finfo(total.dtype).tiny).log() + shift
