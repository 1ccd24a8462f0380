r"""Compiled kernels: the per-iteration bodies of the solvers, for :func:`torch.compile` (``compile=True``).

The solvers' :class:`torch.autograd.Function` s stay eager; what they call per iteration (BADMM's step, its
backward's recomputation and adjoint step, Sinkhorn's iteration bodies forward and backward) is a pure
tensor function here, compiled once per function with ``fullgraph=True`` (a graph break is an error, not a
silent slow path) and ``dynamic=True`` (one graph for all ``N``, ``B``, ``D``). Each takes its iteration's
coefficients as 0-d tensors, so neither the iteration index nor ``K`` enters a graph; Python values that do
(``None`` for an absent term, the dtype) select one more graph each. Reductions over the sets trace as native
:func:`torch.Tensor.index_add` and :func:`torch.Tensor.scatter_reduce` on the index, whatever
:mod:`uotp_geometric.segment`'s backend (a third-party scatter would break the graph).
"""
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.fx.experimental._config as fx_config
from torch import Tensor

from uotp_geometric.segment import Segments, segment_max, segment_sum
from uotp_geometric.solvers.common import MAX_LOG_MASS

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


def _row_shift(g: Tensor) -> Tensor:
    shift = g.amax(dim=-1, keepdim=True)
    return torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))


def _marginal(log_total: Tensor, h: Tensor, log_prior: Tensor) -> Tuple[Tensor, Tensor]:
    # The block's capped log-marginal, and where its cap does not bind.
    uncapped = (1 - h) * log_total + h * log_prior
    return uncapped.clamp(max=MAX_LOG_MASS), uncapped <= MAX_LOG_MASS


class _BADMMInternals:
    r"""Iteration ``k`` of :func:`~uotp_geometric.solvers.badmm.badmm_step` from ``(log S, Z)`` (and
    ``S = exp(log S)`` where :math:`\delta` acts), as :func:`~uotp_geometric.solvers.badmm._recompute` names
    its parts; the compiled graph keeps of them only what its consumers read."""
    def __init__(self, x: Tensor, index: Tensor, num_sets: int, log_p: Tensor, log_q: Tensor, log_s: Tensor,
                 dual: Tensor, plan_in: Optional[Tensor], rho: Tensor, scale: Tensor, h_q: Tensor, h_p: Tensor,
                 delta: Optional[Tensor]) -> None:
        g = x - dual
        if delta is not None:
            g = g + plan_in * delta
        g = g / rho + log_s
        shift_r = _row_shift(g)
        e_t = (g - shift_r).exp()
        row_total = e_t.sum(dim=-1, keepdim=True)
        log_row_total = row_total.log()
        log_r = log_row_total + shift_r
        log_eta, eta_free = _marginal(log_r, h_q, log_q.unsqueeze(-1))
        row_factor = (log_eta - log_row_total).exp()
        plan_t = e_t * row_factor
        h = (g + (log_eta - log_r)) * rho + dual
        if delta is not None:
            h = h + plan_t * delta
        h = h * scale
        segments = Segments(index, num_sets)
        shift_c = segment_max(h, segments)
        e_s = (h - shift_c.index_select(0, index)).exp()
        col_total = segment_sum(e_s, segments).clamp_min(torch.finfo(h.dtype).tiny)
        log_col_total = col_total.log()
        log_c = log_col_total + shift_c
        log_mu, mu_free = _marginal(log_c, h_p, log_p)
        self.g, self.e_t, self.row_total, self.log_r, self.log_eta, self.eta_free = (
            g, e_t, row_total, log_r, log_eta, eta_free)
        self.plan_t, self.h, self.e_s, self.col_total, self.log_c, self.log_mu, self.mu_free = (
            plan_t, h, e_s, col_total, log_c, log_mu, mu_free)
        self.log_s_next = h + (log_mu - log_col_total - shift_c).index_select(0, index)
        self.plan_s = e_s * (log_mu - log_col_total).exp().index_select(0, index)


def badmm_step_(x: Tensor, index: Tensor, num_sets: int, log_p: Tensor, log_q: Tensor, log_s: Tensor, dual: Tensor,
                plan: Tensor, rho: Tensor, scale: Tensor, h_q: Tensor, h_p: Tensor, delta: Optional[Tensor]) -> None:
    r"""One BADMM iteration in place, as :func:`~uotp_geometric.solvers.badmm._step_` (``(log S, Z)`` in
    :obj:`log_s` and :obj:`dual`, :math:`S` in :obj:`plan`, read on entry only where :obj:`delta` acts),
    without the structure term. :obj:`delta` is BADMM-Q's :math:`\delta` (``None`` for BADMM)."""
    it = _BADMMInternals(x, index, num_sets, log_p, log_q, log_s, dual, plan, rho, scale, h_q, h_p, delta)
    dual.copy_(dual + it.plan_t * rho - it.plan_s * rho)
    log_s.copy_(it.log_s_next)
    plan.copy_(it.plan_s)


def dot(a: Tensor, b: Tensor) -> Tensor:
    r""":math:`\langle a, b \rangle` as a tensor whose sum it is: eager, the 0-d dot product; in a compiled
    kernel, its partial sums over the rows (shape ``(a.size(0),)``), for the caller to add up. The compiler
    guards a float32 sum on whether it has more than 4096 terms (beyond, it accumulates in chunks), so a
    full sum over ``N`` or ``N D`` entries would give a batch crossing that size a graph of its own; a sum
    over one row (``D`` terms) does not."""
    if torch.compiler.is_compiling():
        return (a * b).reshape(a.size(0), -1).sum(dim=-1)
    return torch.dot(a.reshape(-1), b.reshape(-1))


def badmm_adjoint_(x: Tensor, index: Tensor, num_sets: int, log_p: Tensor, log_q: Tensor, log_s: Tensor,
                   dual: Optional[Tensor], grad_log_s: Tensor, grad_dual: Tensor, grad_x: Tensor, rho: Tensor,
                   scale: Tensor, h_q: Tensor, h_p: Tensor, delta: Optional[Tensor],
                   grad_pool: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    r"""The recomputation and adjoint of one BADMM iteration from its state ``(log S, Z)`` (``dual = None``
    for zero), as :func:`~uotp_geometric.solvers.badmm._recompute` and
    :func:`~uotp_geometric.solvers.badmm._adjoint_step` (and, with :obj:`grad_pool`, the pooling's adjoint
    :func:`~uotp_geometric.solvers.badmm._pool_adjoint` before it): :obj:`grad_log_s` and :obj:`grad_dual`
    become the gradients w.r.t. the state entering the iteration and :obj:`grad_x` gains the iteration's
    share, in place. Returns the gradients w.r.t. ``(rho, scale, h_q, h_p, delta)``, each as partial sums
    (:func:`dot`; ``delta``'s 0 without it), and the shares of ``log p`` and ``log q``."""
    zero = torch.zeros_like(x) if dual is None else dual
    plan_in = log_s.exp() if delta is not None else None
    it = _BADMMInternals(x, index, num_sets, log_p, log_q, log_s, zero, plan_in, rho, scale, h_q, h_p, delta)
    g_log_s = grad_log_s
    if grad_pool is not None:  # z = D sum_n x S over the last S: D g S into x, D g x S into log S
        grad = grad_pool.index_select(0, index) * x.size(-1) * it.plan_s
        grad_x.add_(grad)
        g_log_s = grad * x
    plan_t, plan_s = it.plan_t, it.plan_s
    d_rho = dot(grad_dual, plan_t) - dot(grad_dual, plan_s)
    grad_h = plan_s * grad_dual * -rho + g_log_s
    col = segment_sum(grad_h, Segments(index, num_sets))
    pre_p = col * it.mu_free
    d_h_p = dot(pre_p, log_p - it.log_c)
    grad_log_p = h_p * pre_p
    col_grad = ((1 - h_p) * pre_p - col) / it.col_total
    grad_h = grad_h + it.e_s * col_grad.index_select(0, index)
    dot_log_t = dot(grad_h, it.g) + dot(grad_h.sum(dim=-1, keepdim=True), it.log_eta - it.log_r)
    d_scale = rho * dot_log_t
    if dual is not None:
        d_scale = d_scale + dot(grad_h, dual)
    d_rho = d_rho + dot_log_t * scale
    d_delta = torch.zeros_like(rho)
    if delta is not None:
        along = dot(grad_h, plan_t)
        d_delta = d_delta + scale * along
        d_scale = d_scale + delta * along
        grad_log_t = plan_t * (grad_h * delta * scale + grad_dual * rho)
    else:
        grad_log_t = plan_t * grad_dual * rho
    grad_h = grad_h * scale
    new_grad_dual = grad_dual + grad_h
    grad_log_t = grad_log_t + grad_h * rho
    row = grad_log_t.sum(dim=-1, keepdim=True)
    pre_q = row * it.eta_free
    d_h_q = dot(pre_q, log_q.unsqueeze(-1) - it.log_r)
    grad_log_q = h_q * pre_q.squeeze(-1)
    grad_g = grad_log_t + it.e_t * (((1 - h_q) * pre_q - row) / it.row_total)
    d_rho = d_rho - (dot(grad_g, it.g) - dot(grad_g, log_s)) / rho
    grad_x.add_(grad_g / rho)
    new_grad_dual = new_grad_dual - grad_g / rho
    if delta is not None:
        d_delta = d_delta + dot(grad_g, plan_in) / rho
        grad_g = grad_g + grad_g * delta / rho * plan_in
    grad_log_s.copy_(grad_g)
    grad_dual.copy_(new_grad_dual)
    return (d_rho, d_scale, d_h_q, d_h_p, d_delta), grad_log_p, grad_log_q
