r"""Reductions over the sets of a ragged batch.

A batch of sets is stored flat, as in PyG: ``src`` has one row per element and ``index[n]`` names the set
of row ``n``. The index need not be sorted, and a set may be empty. Every reduction runs on scatter
operations over the flat tensor, so nothing is padded to the largest set.

The scatter kernels come from :func:`torch_geometric.utils.scatter` by default. ``torch_scatter`` can be
selected with :func:`use_backend`; on the CPU it was slower for the reductions used here, so it is never
chosen implicitly. On accelerators, rows grouped by set use :func:`torch.segment_reduce` instead (see
:class:`Segments`).
"""
from contextlib import contextmanager
from typing import Callable, Iterator, NamedTuple, Optional, Tuple

import torch
from torch import Tensor
from torch_geometric.utils import scatter as pyg_scatter

__all__ = [
    'Segments', 'sorted_segments', 'segment_sum', 'segment_count',
    'segment_max', 'segment_exp', 'segment_logsumexp', 'infer_num_sets', 'use_backend',
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


class Segments(NamedTuple):
    r"""The sets of a flat batch: ``index[n]`` is the set of row ``n``, out of :obj:`num_sets`.

    :obj:`ptr` (CSR offsets, shape ``(num_sets + 1,)``) may be given when the rows are grouped by set
    (sorted index); reductions then use :func:`torch.segment_reduce`, which needs no atomics: on a
    GPU it is faster than scatter, on the CPU slower, so :mod:`uotp_geometric.functional` builds
    :obj:`ptr` on accelerators only.
    """
    index: Tensor
    num_sets: int
    ptr: Optional[Tensor] = None

    def gather(self, src: Tensor) -> Tensor:
        r"""Broadcasts a per-set tensor ``(num_sets, ...)`` to the rows, ``(N, ...)``."""
        return src.index_select(0, self.index)


def infer_num_sets(index: Tensor, dim_size: Optional[int] = None) -> int:
    r"""The number of sets: :obj:`dim_size` where given, else ``index.max() + 1`` (0 for no rows), as
    PyG's scatter infers it."""
    if dim_size is not None:
        return dim_size
    return int(index.max()) + 1 if index.numel() > 0 else 0


def sorted_segments(index: Tensor, num_sets: int) -> Tuple[Tensor, Segments]:
    r"""Returns the permutation that groups the rows by set (stable), and the
    :class:`Segments` of the permuted rows, with CSR offsets."""
    perm = index.argsort(stable=True)
    count = _scatter(torch.ones_like(index), index, 0, num_sets, 'sum')
    ptr = torch.cat([count.new_zeros(1), count.cumsum(0)])
    return perm, Segments(index.index_select(0, perm), num_sets, ptr)


def _reduce(src: Tensor, segments: Segments, reduce: str) -> Tensor:
    if segments.ptr is not None:
        return torch.segment_reduce(src, reduce, offsets=segments.ptr, axis=0)
    # PyG's scatter traces under torch.compile; a third-party backend's custom op would break the graph.
    scatter = pyg_scatter if torch.compiler.is_compiling() else _scatter
    if reduce == 'sum' and scatter is pyg_scatter:
        # PyG's scatter broadcasts the index to src's shape for scatter_add_; index_add_ takes it
        # as it is: one op with the same result, and faster on the CPU.
        out = src.new_zeros((segments.num_sets, *src.shape[1:]))
        return out.index_add_(0, segments.index, src)
    return scatter(src, segments.index, 0, segments.num_sets, reduce)


def segment_sum(src: Tensor, segments: Segments) -> Tensor:
    r"""Sums the rows of :obj:`src` over each set: ``out[b] = sum_{n: index[n] = b} src[n]``."""
    return _reduce(src, segments, 'sum')


def segment_count(segments: Segments,
                  dtype: torch.dtype = torch.float) -> Tensor:
    r"""The number of elements of each set, as a :obj:`dtype` tensor of shape ``(num_sets,)``."""
    index = segments.index
    return _scatter(torch.ones(index.numel(), dtype=dtype,
                               device=index.device), index, 0,
                    segments.num_sets, 'sum')


def segment_max(src: Tensor, segments: Segments) -> Tensor:
    r"""The per-set maximum of :obj:`src`, detached, with 0 where a set is empty or all ``-inf``: a
    shift that cancels wherever it is used, so it needs no gradient and its reduction no backward."""
    out = _reduce(src.detach(), segments, 'max')
    return out.nan_to_num_(0.0, 0.0, 0.0)  # 0 where not finite


def segment_exp(src: Tensor, segments: Segments) -> Tuple[Tensor, Tensor, Tensor]:
    r"""Exponentiates :obj:`src` shifted by its per-set maximum, and sums the result over each set.

    Returns ``(e, total, shift)`` with ``e = exp(src - shift[index])`` (entries in ``[0, 1]``),
    ``total = segment_sum(e)`` clamped to at least ``tiny`` and the per-set maximum ``shift`` (0 where a set is
    empty or all ``-inf``), so that ``log(total) + shift`` is the per-set log-sum-exp and ``e / total[index]``
    the per-set softmax: one exponential serves both. ``shift`` is detached: it cancels in both results, so it
    needs no gradient, and the max reduction then needs no backward.
    """
    shift = segment_max(src, segments)
    e = (src - segments.gather(shift)).exp()
    total = segment_sum(e, segments)
    return e, total.clamp_min(torch.finfo(total.dtype).tiny), shift


def segment_logsumexp(src: Tensor, segments: Segments) -> Tensor:
    r"""Computes ``out[b] = log sum_{n: index[n] = b} exp(src[n])`` stably (see :func:`segment_exp`).

    An empty set (or one whose entries are all ``-inf``) gives ``log(tiny)`` instead of ``-inf``, so that
    no ``inf - inf`` or ``0 * inf`` can reach a gradient downstream; no element reads that value back.
    """
    _, total, shift = segment_exp(src, segments)
    return total.log() + shift
