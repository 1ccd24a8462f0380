r"""Bregman ADMM for unbalanced optimal transport over a ragged batch of sets: the entropic problem of
spec §3 and the quadratic one of spec §7 (BADMM-Q), each optionally with the structure term of spec §6.

All of them are one iteration with two blocks over the consensus :math:`T = S` with dual :math:`Z`, which
differ only in a linear map :math:`L` of the plan that each block adds to its score and in the entropy that
block 2 keeps:

.. math::
    G &= \log S + \big(X + L(S) - Z\big) / \rho, \quad
    \log \eta = (1 - h_q) \operatorname{LSE}_d G + h_q \log q, \quad
    \log T = G - \operatorname{LSE}_d G + \log \eta \\
    H &= \beta \big(Z + L(T) + \rho \log T\big), \quad
    \log \mu = (1 - h_p) \operatorname{LSE}_{n \in b} H + h_p \log p, \quad
    \log S = H - \operatorname{LSE}_{n \in b} H + \log \mu \\
    Z &\leftarrow Z + \rho (T - S)

with :math:`L(Y) = \gamma\, C_N Y C_D + \delta\, Y` and

* BADMM (§3): :math:`\beta = 1 / (\varepsilon + \rho)`, :math:`\delta = 0`,
  :math:`h_p = \lambda_p / (\lambda_p + \varepsilon + \rho)`;
* BADMM-Q (§7): :math:`\beta = 1 / \rho`, :math:`\delta = -\varepsilon / 2`,
  :math:`h_p = \lambda_p / (\lambda_p + \rho)`;

and in both :math:`h_q = \lambda_q / (\lambda_q + \rho)` and :math:`\gamma = \mathrm{gw} / 2` (spec §6's
bilinear split, 0 without the structure term). No step divides by :math:`\varepsilon`, so
:math:`\varepsilon = 0` is allowed (and makes the two the same iteration).

References:
    H. Wang and A. Banerjee, "Bregman Alternating Direction Method of Multipliers", NeurIPS 2014.
    H. Xu and M. Cheng, "Regularized Optimal Transport Layers for Generalized Global Pooling
    Operations", IEEE TPAMI 2023 (arXiv 2212.06339).
"""
import math
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from uotp_geometric.segment import Segments, segment_exp, segment_max, segment_sum
from uotp_geometric.solvers.common import MAX_LOG_MASS, hardness, pool_log_plan
from uotp_geometric.solvers.structure import (SetBlocks, Structure, structure_product,
                                              structure_product_vjp)


class BADMMCoefficients(NamedTuple):
    r"""The per-iteration coefficients of the iteration, each of shape ``(K,)`` (see the module):
    :obj:`rho` :math:`\rho`, :obj:`scale` :math:`\beta`, :obj:`h_q`, :obj:`h_p`, and the weights
    :obj:`gamma` of :math:`C_N Y C_D` and :obj:`delta` of :math:`Y` in :math:`L` (``None`` where that
    term is absent)."""
    rho: Tensor
    scale: Tensor
    h_q: Tensor
    h_p: Tensor
    gamma: Optional[Tensor] = None
    delta: Optional[Tensor] = None

    @property
    def linear(self) -> bool:
        return self.gamma is not None or self.delta is not None


def badmm_coefficients(eps: Tensor, lam_p: Tensor, lam_q: Tensor, rho: Tensor, gw: Optional[Tensor] = None,
                       quadratic: bool = False) -> BADMMCoefficients:
    r"""The :class:`BADMMCoefficients` of BADMM (spec §3) or, with :obj:`quadratic`, BADMM-Q (spec §7),
    with the structure weight :obj:`gw` (spec §6) if given; all arguments of shape ``(K,)``. They are
    computed here with autograd, so the solvers' backward needs to return gradients for them alone."""
    entropy = torch.zeros_like(eps) if quadratic else eps  # BADMM-Q's block 2 keeps no entropy
    return BADMMCoefficients(
        rho=rho, scale=(entropy + rho).reciprocal(), h_q=hardness(lam_q, rho), h_p=hardness(lam_p, entropy + rho),
        gamma=None if gw is None else gw / 2, delta=-eps / 2 if quadratic else None)


class BADMMProblem(NamedTuple):
    r"""What every iteration reads: the features :obj:`x` ``(N, D)`` and their :obj:`segments`, the log
    priors :obj:`log_p` ``(B, D)`` and :obj:`log_q` ``(N,)``, the coefficients
    (:func:`badmm_coefficients`) and the :obj:`structure` of spec §6 (``None`` without it)."""
    x: Tensor
    segments: Segments
    log_p: Tensor
    log_q: Tensor
    coef: BADMMCoefficients
    structure: Optional[Structure]

    def linear(self, k: int, plan: Tensor, out: Optional[Tensor] = None) -> Tensor:
        r""":math:`L_k(Y)` (only where :attr:`BADMMCoefficients.linear`), into :obj:`out` if given."""
        gamma, delta = self.coef.gamma, self.coef.delta
        if gamma is None:
            return torch.mul(plan, delta[k], out=out)
        out = torch.mul(structure_product(self.structure, plan), gamma[k], out=out)
        return out if delta is None else out.addcmul_(plan, delta[k])

    def add_linear_(self, out: Tensor, k: int, plan: Tensor) -> Tensor:
        r"""Adds :math:`L_k(Y)` into :obj:`out` in place (the quadratic's share without a temporary)."""
        if self.coef.gamma is not None:
            out.add_(structure_product(self.structure, plan).mul_(self.coef.gamma[k]))
        if self.coef.delta is not None:
            out.addcmul_(plan, self.coef.delta[k])
        return out


def _initial_log_s(prob: BADMMProblem, out: Optional[Tensor] = None) -> Tensor:
    r""":math:`\log S` entering the first iteration, :math:`\log q_n + \log p_d` (its dual is 0)."""
    return torch.index_select(prob.log_p, 0, prob.segments.index, out=out).add_(prob.log_q.unsqueeze(-1))


def _uncapped(log_total: Tensor, h: Tensor, log_prior: Tensor) -> Tensor:
    # The closed-form minimiser of a block's marginal, before the cap.
    return (1 - h) * log_total + h * log_prior


def _marginal(log_total: Tensor, h: Tensor, log_prior: Tensor) -> Tensor:
    # Capped, for the reason MAX_LOG_MASS gives.
    return _uncapped(log_total, h, log_prior).clamp(max=MAX_LOG_MASS)


def _row_shift(g: Tensor) -> Tensor:
    # A detached shift for the row exponential: it cancels in the plan and the log-sum-exp alike.
    return g.detach().amax(dim=-1, keepdim=True).nan_to_num_(0.0, 0.0, 0.0)  # 0 where not finite


def badmm_step(prob: BADMMProblem, k: int, log_s: Tensor, dual: Tensor) -> Tuple[Tensor, Tensor]:
    r"""Iteration :obj:`k` (see the module) from ``(log S, Z)``, out of place: the reference that plain
    autograd differentiates (``memory_efficient=False``). Each block exponentiates once, for its
    log-sum-exp and its plan alike."""
    coef, segments = prob.coef, prob.segments
    rho = coef.rho[k]
    score = prob.x if not coef.linear else prob.x + prob.linear(k, log_s.exp())
    g = log_s + (score - dual) / rho
    shift_r = _row_shift(g)
    e_t = (g - shift_r).exp()
    log_row_total = e_t.sum(dim=-1, keepdim=True).log()
    log_r = log_row_total + shift_r
    log_eta = _marginal(log_r, coef.h_q[k], prob.log_q.unsqueeze(-1))
    plan_t = e_t * (log_eta - log_row_total).exp()
    h = dual + rho * (g + (log_eta - log_r))
    if coef.linear:
        h = h + prob.linear(k, plan_t)
    h = coef.scale[k] * h
    e_s, col_total, shift_c = segment_exp(h, segments)
    log_col_total = col_total.log()
    log_mu = _marginal(log_col_total + shift_c, coef.h_p[k], prob.log_p)
    log_s = h + segments.gather(log_mu - log_col_total - shift_c)
    plan_s = e_s * segments.gather((log_mu - log_col_total).exp())
    return log_s, dual + rho * (plan_t - plan_s)


def _step_(prob: BADMMProblem, k: int, log_s: Tensor, dual: Tensor, work: Tensor, plan: Tensor) -> None:
    r"""Iteration :obj:`k` of :func:`badmm_step` in place: ``(log S, Z)`` in :obj:`log_s` and :obj:`dual`
    become the next state, and :obj:`plan` holds :math:`S` on entry (read only where :math:`L` acts)
    and the new :math:`S` on return where it is read (where :math:`L` acts, and after the last iteration,
    whose :math:`Z` is not updated); :obj:`work` is scratch. Four ``(N, D)`` buffers, nothing else of that
    size is allocated (save :math:`C_N S C_D`)."""
    coef, segments = prob.coef, prob.segments
    rho, last = coef.rho[k], k + 1 == coef.rho.numel()
    torch.sub(prob.x, dual, out=work)
    if coef.linear:
        prob.add_linear_(work, k, plan)
    torch.addcdiv(log_s, work, rho, out=work)  # G
    shift_r = _row_shift(work)
    torch.sub(work, shift_r, out=plan).exp_()
    log_row_total = plan.sum(dim=-1, keepdim=True).log_()
    log_r = log_row_total + shift_r
    log_eta = _marginal(log_r, coef.h_q[k], prob.log_q.unsqueeze(-1))
    row_factor = (log_eta - log_row_total).exp_()
    torch.addcmul(dual, work.add_(log_eta - log_r), rho, out=work)  # Z + rho log T
    if not last:
        _add_plan_t(prob, k, dual, plan, row_factor, out=dual)  # read by H no more
    if coef.linear:
        prob.add_linear_(work, k, plan.mul_(row_factor))  # T
    work.mul_(coef.scale[k])  # H
    e_s, log_col_total, shift_c = _segment_exp_(work, segments, out=plan, gathered=log_s)
    log_mu = _marginal(log_col_total + shift_c, coef.h_p[k], prob.log_p)
    torch.index_select(log_mu - log_col_total - shift_c, 0, segments.index, out=log_s).add_(work)
    col_factor = (log_mu - log_col_total).exp_()
    if not last:
        _sub_plan_s_(prob, k, dual, e_s, col_factor, scratch=work)
    if coef.linear or last:
        e_s.mul_(torch.index_select(col_factor, 0, segments.index, out=work))  # S


def _add_plan_t(prob: BADMMProblem, k: int, dual: Optional[Tensor], e_t: Tensor, row_factor: Tensor,
                out: Tensor) -> Tensor:
    r""":math:`Z + \rho T` into :obj:`out` (which may be :obj:`dual`; ``None`` for :math:`Z = 0`), from
    :math:`T` = :obj:`e_t` :math:`\odot` :obj:`row_factor`, which it does not form: one pass."""
    factor = row_factor * prob.coef.rho[k]
    return torch.mul(e_t, factor, out=out) if dual is None else torch.addcmul(dual, e_t, factor, out=out)


def _sub_plan_s_(prob: BADMMProblem, k: int, dual: Tensor, e_s: Tensor, col_factor: Tensor, scratch: Tensor) -> None:
    r""":math:`Z \mathrel{-}= \rho S` in place, from :math:`S` = :obj:`e_s` :math:`\odot`
    ``col_factor[index]``, which it does not form: one pass and a gather into :obj:`scratch`."""
    factor = torch.index_select(col_factor * prob.coef.rho[k], 0, prob.segments.index, out=scratch)
    dual.addcmul_(e_s, factor, value=-1)


def _segment_exp_(h: Tensor, segments: Segments, out: Tensor, gathered: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    r""":func:`~uotp_geometric.segment.segment_exp` into :obj:`out`, with :obj:`gathered` as scratch for the
    shift; returns ``(e, log total, shift)``."""
    shift = segment_max(h, segments)
    torch.index_select(shift, 0, segments.index, out=gathered)
    torch.sub(h, gathered, out=out).exp_()
    total = segment_sum(out, segments).clamp_min_(torch.finfo(h.dtype).tiny)
    return out, total.log_(), shift


# The lean backward keeps what every iteration's adjoint reads (five (N, D) tensors each: the state entering
# it and the three that _recompute makes) where that fits in this many bytes, and recomputes it otherwise:
# at K = 4 keeping skips six of the fourteen passes over (N, D) that a forward and backward make.
KEEP_BYTES = 256 * 2 ** 20

# Why the kept tensors are one block up to this size: glibc's malloc maps a block above its mmap threshold apart
# from its heap, page-faulted anew on every call, and freeing it raises the threshold to its size, up to 32 MiB
# (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit), and the heap's trim threshold to twice that. So one block comes from the
# heap from the second call on and stays there; many smaller ones grew the heap past the trim threshold, which
# gave it back to the system after every call (2-15 MB of page faults, a third of the time, at 128 x 30 x 64).
ONE_BLOCK_BYTES = 32 * 2 ** 20


def _buffers(like: Tensor, count: int) -> List[Tensor]:
    r""":obj:`count` uninitialised tensors shaped as :obj:`like`: views of one allocation up to
    :data:`ONE_BLOCK_BYTES`, separate allocations beyond."""
    if count * like.numel() * like.element_size() <= ONE_BLOCK_BYTES:
        return list(like.new_empty((count, *like.shape)).unbind(0))
    return [torch.empty_like(like) for _ in range(count)]


def _checkpoint_strides(num_iters: int) -> List[int]:
    r"""The distances between the states that the lean backward keeps, one per level of recomputation.

    The state ``(log S, Z)`` entering an iteration is ``2 N D`` values, and no closed form recovers it from
    the next one (block 2 mixes :math:`\log T` and :math:`T` through :math:`Z`), so the backward either
    keeps it or recomputes it. The forward keeps every ``L_1``-th state; the backward takes the spans of
    ``L_1`` iterations from the last, keeps every ``L_2``-th state of the span's recomputation, and so on
    down to ``L = 1``, where each iteration's adjoint runs. With strides ``K^{(d - i) / d}`` over ``d``
    levels that keeps about ``2 d K^{1 / d} N D`` values for ``d - 1`` more forward passes. Two levels
    (``L_1 = sqrt(K)``) up to ``K = 16``, three beyond, where the third level's one more forward pass buys
    the memory that keeps ``K = 32`` (seven states, against ten with two levels) within twice ``K = 4``'s
    peak (two states).
    """
    depth = 2 if num_iters <= 16 else 3
    strides, span = [], num_iters
    for left in range(depth, 0, -1):
        span = max(1, math.ceil(span ** ((left - 1) / left) - 1e-9))
        strides.append(span)
    return strides


def _iterate(prob: BADMMProblem, stride: int = 0) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    r"""All iterations in place from the initial state; returns :math:`\log S`, :math:`S` and, if
    :obj:`stride`, the states entering iterations ``L, 2 L, ...``, stacked ``(K / L - 1, 2, N, D)``. The
    dual and the two scratch buffers are one allocation, large enough for glibc to map it apart from its
    heap, so that freeing it returns the memory instead of leaving a hole in the heap."""
    num_iters = prob.coef.rho.numel()
    log_s = _initial_log_s(prob)
    dual, work, plan = log_s.new_empty((3, *log_s.shape)).unbind(0)
    dual.zero_()
    if prob.coef.linear:
        torch.exp(log_s, out=plan)
    kept = None
    if stride:
        kept = log_s.new_empty((math.ceil(num_iters / stride) - 1, 2, *log_s.shape))
    for k in range(num_iters):
        if stride and k and k % stride == 0:
            kept[k // stride - 1, 0].copy_(log_s)
            kept[k // stride - 1, 1].copy_(dual)
        _step_(prob, k, log_s, dual, work, plan)
    return log_s, plan, kept


def _pool_(prob: BADMMProblem, plan: Tensor) -> Tensor:
    r"""The pooled vectors :math:`z_b = D \sum_{n \in b} x_n \odot S_n`, overwriting :obj:`plan`."""
    return segment_sum(plan.mul_(prob.x), prob.segments).mul_(prob.x.size(-1))


class _Workspace:
    r"""The ``(N, D)`` buffers of the backward: the gradients w.r.t. the state, and the tensors that
    :func:`_recompute` and :func:`_adjoint_step` write (the last three may be absent where the forward kept
    what :func:`_recompute` makes and :math:`L` is absent: they are then scratch that no one reads)."""
    def __init__(self, buffers: Sequence[Tensor]) -> None:
        self.grad_log_s, self.grad_dual, self.plan_t, self.plan_s = buffers[:4]
        self.g, self.e_t, self.e_s = buffers[4:] if len(buffers) > 4 else (None, None, None)

    def buffers(self) -> Tuple[Tensor, ...]:
        return tuple(t for t in (self.grad_log_s, self.grad_dual, self.plan_t, self.plan_s, self.g, self.e_t,
                                 self.e_s) if t is not None)


class _Internals(NamedTuple):
    r"""What the adjoint of iteration ``k`` reads, recomputed from the state entering it: three ``(N, D)``
    tensors and per-row and per-(set, dim) values."""
    g: Tensor  # G
    e_t: Tensor  # exp(G - row shift)
    row_total: Tensor  # sum_d e_t, (N, 1)
    log_r: Tensor  # LSE_d G, (N, 1)
    log_eta: Tensor
    eta_free: Tensor  # where the cap of eta does not bind
    row_factor: Tensor  # T = e_t * row_factor
    e_s: Tensor  # exp(H - column shift)
    col_total: Tensor  # (B, D)
    log_c: Tensor  # LSE_{n in b} H
    mu_free: Tensor
    col_factor: Tensor  # S' = e_s * col_factor[index]


def _recompute(prob: BADMMProblem, k: int, log_s: Tensor, dual: Optional[Tensor], ws: _Workspace,
               next_log_s: Optional[Tensor] = None) -> _Internals:
    r"""Iteration :obj:`k` of :func:`badmm_step` from its state (``dual = None`` for zero), into :obj:`ws`
    (its ``plan_t`` is scratch, and ``plan_s`` holds :math:`S = \exp(\log S)` entering, where :math:`L`
    acts, until the adjoint step overwrites it), and the :math:`\log S` leaving it into :obj:`next_log_s`
    if given."""
    coef, segments = prob.coef, prob.segments
    rho = coef.rho[k]
    plan_in = torch.exp(log_s, out=ws.plan_s) if coef.linear else None
    if dual is None and not coef.linear:
        g = torch.addcdiv(log_s, prob.x, rho, out=ws.g)
    else:
        g = ws.g.copy_(prob.x) if dual is None else torch.sub(prob.x, dual, out=ws.g)
        if coef.linear:
            prob.add_linear_(g, k, plan_in)
        torch.addcdiv(log_s, g, rho, out=g)
    shift_r = _row_shift(g)
    e_t = torch.sub(g, shift_r, out=ws.e_t).exp_()
    row_total = e_t.sum(dim=-1, keepdim=True)
    log_r = row_total.log() + shift_r
    eta = _uncapped(log_r, coef.h_q[k], prob.log_q.unsqueeze(-1))
    log_eta = eta.clamp(max=MAX_LOG_MASS)
    row_factor = (log_eta - row_total.log()).exp_()
    # H, into next log S if given: log S' = H + log mu - log(col total) - shift, the rest added below.
    h = torch.add(g, log_eta - log_r, out=ws.e_s if next_log_s is None else next_log_s)
    h = h.mul_(rho) if dual is None else torch.addcmul(dual, h, rho, out=h)
    if coef.linear:
        prob.add_linear_(h, k, torch.mul(e_t, row_factor, out=ws.plan_t))
    h.mul_(coef.scale[k])
    shift_c = segment_max(h, segments)
    e_s = torch.sub(h, torch.index_select(shift_c, 0, segments.index, out=ws.plan_t), out=ws.e_s).exp_()
    col_total = segment_sum(e_s, segments).clamp_min_(torch.finfo(h.dtype).tiny)
    log_c = col_total.log() + shift_c
    mu = _uncapped(log_c, coef.h_p[k], prob.log_p)
    log_col_factor = mu.clamp(max=MAX_LOG_MASS) - col_total.log()
    if next_log_s is not None:
        next_log_s.add_(torch.index_select(log_col_factor - shift_c, 0, segments.index, out=ws.plan_t))
    return _Internals(g, e_t, row_total, log_r, log_eta, eta <= MAX_LOG_MASS, row_factor, e_s,
                      col_total, log_c, mu <= MAX_LOG_MASS, log_col_factor.exp())


class _Grads:
    r"""The gradients that the lean backward accumulates, one entry per input of :class:`_BADMMIterations`."""
    def __init__(self, prob: BADMMProblem) -> None:
        self.x = torch.zeros_like(prob.x)
        self.log_p, self.log_q = torch.zeros_like(prob.log_p), torch.zeros_like(prob.log_q)
        self.coef = BADMMCoefficients(*(None if c is None else torch.zeros_like(c) for c in prob.coef))
        st = prob.structure
        self.node = [torch.zeros_like(t) for t in st.x_node] if st is not None else []
        self.gram = [torch.zeros_like(t) for t in st.gram] if st is not None else []

    def linear(self, prob: BADMMProblem, k: int, plan: Tensor, grad: Tensor, weight: Tensor,
               out: Tensor) -> Tuple[Tensor, Tensor]:
        r"""Backpropagates :obj:`weight` times :obj:`grad` through :math:`L_k(Y)` at :math:`Y =` :obj:`plan`
        into :math:`\gamma_k, \delta_k` and the structure. Returns :math:`L_k(A)` for :math:`A =` :obj:`grad`
        (the gradient w.r.t. :math:`Y` up to :obj:`weight`: :math:`L` is self-adjoint), written into :obj:`out`, and
        :math:`\langle A, L_k(Y) \rangle`."""
        gamma, delta = prob.coef.gamma, prob.coef.delta
        inner = torch.zeros_like(weight)
        if gamma is not None:
            along = _dot(grad, structure_product(prob.structure, plan))
            self.coef.gamma[k] += weight * along
            inner = inner + gamma[k] * along
            node, gram = structure_product_vjp(prob.structure, plan, (weight * gamma[k]) * grad)
            for total, part in zip(self.node + self.gram, node + gram):
                total.add_(part)
        if delta is not None:
            along = _dot(grad, plan)
            self.coef.delta[k] += weight * along
            inner = inner + delta[k] * along
        return prob.linear(k, grad, out=out), inner


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return torch.dot(a.reshape(-1), b.reshape(-1))


def _adjoint_step(prob: BADMMProblem, k: int, state: Tuple[Tensor, Optional[Tensor]], inner: _Internals, ws: _Workspace,
                  grads: _Grads) -> None:
    r"""Backpropagates the gradients w.r.t. the state leaving iteration :obj:`k` (``ws.grad_log_s`` and
    ``ws.grad_dual``) to the state entering it, in place, and adds those w.r.t. the data, priors and
    coefficients into :obj:`grads`. The steps run :func:`badmm_step` backwards, block 2 first."""
    coef, segments, gc = prob.coef, prob.segments, grads.coef
    rho, scale, h_q, h_p = coef.rho[k], coef.scale[k], coef.h_q[k], coef.h_p[k]
    log_s, dual = state
    grad_log_s, grad_dual = ws.grad_log_s, ws.grad_dual
    # The last Z' is no output: its gradient is zero, and what it multiplies is skipped.
    zero_dual = k + 1 == coef.rho.numel()
    plan_t = None if zero_dual and not coef.linear else torch.mul(inner.e_t, inner.row_factor, out=ws.plan_t)
    if zero_dual:
        grad_h = ws.plan_s.copy_(grad_log_s)
    else:
        plan_s = torch.index_select(inner.col_factor, 0, segments.index, out=ws.plan_s).mul_(inner.e_s)
        # Z' = Z + rho (T - S'), and S' = exp(log S').
        gc.rho[k] += _dot(grad_dual, plan_t) - _dot(grad_dual, plan_s)
        grad_h = torch.addcmul(grad_log_s, plan_s.mul_(grad_dual), -rho, out=plan_s)  # S' is not read again
    # log S' = H - log c + log mu, log mu = (1 - h_p) log c + h_p log p, log c = LSE_{n in b} H.
    col = segment_sum(grad_h, segments)
    pre_p = col * inner.mu_free
    gc.h_p[k] += (pre_p * (prob.log_p - inner.log_c)).sum()
    grads.log_p.add_(h_p * pre_p)
    col_grad = ((1 - h_p) * pre_p - col) / inner.col_total
    grad_h.addcmul_(inner.e_s, torch.index_select(col_grad, 0, segments.index, out=grad_log_s))
    # H = beta (Z + L(T) + rho log T), log T = G - log r + log eta.
    dot_log_t = _dot(grad_h, inner.g) + (grad_h.sum(dim=-1, keepdim=True) * (inner.log_eta - inner.log_r)).sum()
    gc.scale[k] += rho * dot_log_t
    if dual is not None:
        gc.scale[k] += _dot(grad_h, dual)
    gc.rho[k] += dot_log_t * scale
    # scale grad_h is the gradient w.r.t. Z + L(T) + rho log T; grad_log_t below is the one w.r.t. log T.
    if zero_dual and not coef.linear:
        grad_log_t = torch.mul(grad_h, scale * rho, out=ws.plan_t)
        torch.mul(grad_h, scale, out=grad_dual)
    else:
        if coef.linear:
            linear_grad, linear_dot = grads.linear(prob, k, plan_t, grad_h, scale, out=ws.e_s)  # e_s is read no more
            gc.scale[k] += linear_dot
            grad_log_t = plan_t.mul_(linear_grad.mul_(scale).addcmul_(grad_dual, rho))
        else:
            grad_log_t = plan_t.mul_(grad_dual).mul_(rho)  # the gradient w.r.t. T, times T
        grad_dual.addcmul_(grad_h, scale)
        grad_log_t.addcmul_(grad_h, scale * rho)
    # log eta = (1 - h_q) log r + h_q log q, log r = LSE_d G.
    row = grad_log_t.sum(dim=-1, keepdim=True)
    pre_q = row * inner.eta_free
    gc.h_q[k] += (pre_q * (prob.log_q.unsqueeze(-1) - inner.log_r)).sum()
    grads.log_q.add_(h_q * pre_q.squeeze(-1))
    grad_g = grad_log_t.addcmul_(inner.e_t, ((1 - h_q) * pre_q - row) / inner.row_total)
    # G = log S + (X + L(S) - Z) / rho: the gradient w.r.t. the score X + L(S) is grad_g / rho.
    gc.rho[k] -= (_dot(grad_g, inner.g) - _dot(grad_g, log_s)) / rho
    grads.x.addcdiv_(grad_g, rho)
    grad_dual.addcdiv_(grad_g, rho, value=-1)
    if coef.linear:
        # S entering, recomputed (its buffer held S' since): G and exp(G - shift) are read no more. The
        # scratch is the workspace's, which holds them when recomputed: kept ones stay for a second backward.
        plan_in = torch.exp(log_s, out=ws.g)
        linear_grad, _ = grads.linear(prob, k, plan_in, grad_g, rho.reciprocal(), out=ws.e_t)
        grad_g.addcmul_(linear_grad.div_(rho), plan_in)
    ws.grad_log_s, ws.plan_t = grad_g, grad_log_s  # the gradient moved into the slot of T


def _pool_adjoint(prob: BADMMProblem, inner: _Internals, ws: _Workspace, grads: _Grads, grad_out: Tensor) -> None:
    r"""The gradient of :func:`_pool_` w.r.t. :math:`x` (added into :obj:`grads`) and w.r.t. the last
    :math:`\log S` (into ``ws.grad_log_s``), with that :math:`S` read from the last iteration's
    :obj:`inner`: :math:`D g_b S_n` and :math:`D g_b x_n S_n`."""
    segments = prob.segments
    plan = torch.index_select(inner.col_factor, 0, segments.index, out=ws.plan_s).mul_(inner.e_s)
    grad = torch.index_select(grad_out * prob.x.size(-1), 0, segments.index, out=ws.grad_log_s)
    grads.x.addcmul_(grad, plan)
    grad.mul_(plan).mul_(prob.x)


def _iterate_keeping(prob: BADMMProblem, pool: bool) -> Tuple[Optional[Tensor], Tensor,
                                                              List[Tuple[Tensor, Optional[Tensor]]],
                                                              List[_Internals], _Workspace]:
    r"""All iterations, keeping what each one's adjoint reads: the state entering it and its
    :func:`_recompute` internals. Returns the last :math:`\log S` and :math:`S`, the states, the internals
    and the backward's workspace (the forward's scratch). The ``(N, D)`` buffers come from :func:`_buffers`,
    save the last :math:`\log S`, which is returned, and not computed with :obj:`pool`."""
    num_iters = prob.coef.rho.numel()
    # Two allocations: views share a version counter, and the backward writes the workspace.
    ws = _Workspace(_buffers(prob.x, 7 if prob.coef.linear else 4))
    buffers = iter(_buffers(prob.x, 5 * num_iters - 1))
    log_s, dual = _initial_log_s(prob, out=next(buffers)), None
    states, inners = [], []
    for k in range(num_iters):
        into = _Workspace([*ws.buffers()[:4], *(next(buffers) for _ in range(3))])  # internals into kept buffers
        last = k + 1 == num_iters
        next_log_s = next(buffers) if not last else None if pool else torch.empty_like(log_s)
        next_dual = None if last else next(buffers)
        inner = _recompute(prob, k, log_s, dual, into, next_log_s)
        if not last:  # Z' = Z + rho T - rho S', as _step_ computes it, which gives the same numbers
            _add_plan_t(prob, k, dual, inner.e_t, inner.row_factor, out=next_dual)
            _sub_plan_s_(prob, k, next_dual, inner.e_s, inner.col_factor, scratch=ws.plan_t)
        states.append((log_s, dual))
        inners.append(inner)
        log_s, dual = next_log_s, next_dual
    col_factor = torch.index_select(inner.col_factor, 0, prob.segments.index, out=ws.plan_t)
    return log_s, torch.mul(inner.e_s, col_factor, out=ws.plan_s), states, inners, ws


def _kept_states(prob: BADMMProblem, start: int, stop: int, stride: int, first: Tuple[Tensor, Optional[Tensor]],
                 slots: Tensor, ws: _Workspace) -> List[Tuple[Tensor, Optional[Tensor]]]:
    r"""The states entering iterations ``start, start + stride, ...`` below :obj:`stop`, from the first of
    them: the others are recomputed in place into :obj:`slots` ``(n, 2, N, D)``, with two buffers of
    :obj:`ws` (free between adjoint steps) as scratch."""
    states = [first]
    for slot, begin in enumerate(range(start + stride, stop, stride)):
        log_s, dual = slots[slot]
        log_s.copy_(states[-1][0])
        if states[-1][1] is None:
            dual.zero_()
        else:
            dual.copy_(states[-1][1])
        if prob.coef.linear:
            torch.exp(log_s, out=ws.plan_s)
        for k in range(begin - stride, begin):
            _step_(prob, k, log_s, dual, ws.plan_t, ws.plan_s)
        states.append((log_s, dual))
    return states


class _Reverse(NamedTuple):
    r"""The backward of :class:`_BADMMIterations` below its first level (:func:`_checkpoint_strides`)."""
    prob: BADMMProblem
    ws: _Workspace
    grads: _Grads
    strides: List[int]
    slots: List[Tensor]  # per level below the first, the states it keeps inside one span
    grad_pool: Optional[Tensor]  # the gradient w.r.t. the pooled output, with pool=True

    def step(self, k: int, state: Tuple[Tensor, Optional[Tensor]], inner: _Internals) -> None:
        r"""Backpropagates through iteration :obj:`k` (and the pooling after the last)."""
        if self.grad_pool is not None and k + 1 == self.prob.coef.rho.numel():
            _pool_adjoint(self.prob, inner, self.ws, self.grads, self.grad_pool)
        _adjoint_step(self.prob, k, state, inner, self.ws, self.grads)

    def span(self, start: int, stop: int, first: Tuple[Tensor, Optional[Tensor]], level: int) -> None:
        r"""Backpropagates through iterations ``start`` to ``stop - 1`` from the state entering them."""
        if stop - start == 1:
            self.step(start, first, _recompute(self.prob, start, *first, self.ws))
            return
        stride = self.strides[level]
        states = _kept_states(self.prob, start, stop, stride, first, self.slots[level - 1], self.ws)
        for i in reversed(range(len(states))):
            begin = start + i * stride
            self.span(begin, min(begin + stride, stop), states[i], level + 1)


class _BADMMIterations(torch.autograd.Function):
    r"""The ``K`` iterations of :func:`badmm_step` with a hand-derived adjoint (:func:`_adjoint_step`).

    Where what the adjoints read fits in :data:`KEEP_BYTES` (five ``(N, D)`` tensors per iteration), the
    forward keeps it (:func:`_iterate_keeping`, one allocation up to :data:`ONE_BLOCK_BYTES`) and the backward
    runs the adjoints alone, in the forward's scratch buffers. Otherwise the
    forward runs in place (:func:`_iterate`) and keeps the states entering iterations ``L, 2 L, ...``;
    the backward walks the spans of ``L`` iterations from the last, recomputes states inside a span into
    buffers allocated once per level (:func:`_checkpoint_strides`, :class:`_Reverse`), and for each
    iteration, from its state, the three ``(N, D)`` tensors its adjoint reads (:func:`_recompute`), all in
    the seven buffers of one :class:`_Workspace`. Differentiable once (no double backward).
    """
    @staticmethod
    def forward(ctx: Any, pool: bool, x: Tensor, segments: Segments, blocks: Optional[SetBlocks], log_p: Tensor,
                log_q: Tensor, *values: Optional[Tensor]) -> Tensor:
        prob = _problem(x, segments, blocks, log_p, log_q, values)
        num_iters = prob.coef.rho.numel()
        ctx.strides, ctx.inners, ctx.ws = _checkpoint_strides(num_iters), None, None
        if 5 * num_iters * x.numel() * x.element_size() <= KEEP_BYTES:
            log_s, plan, states, inners, ws = _iterate_keeping(prob, pool)
            # The (N, D) tensors go through save_for_backward (freed after the backward), the rest on ctx.
            kept = [t for (log_s_k, dual_k), inner in zip(states, inners)
                    for t in (log_s_k, dual_k, inner.g, inner.e_t, inner.e_s)]
            # The forward's scratch is the backward's workspace: on ctx, as the backward overwrites it.
            ctx.ws = ws.buffers()
            ctx.inners = [inner._replace(g=None, e_t=None, e_s=None) for inner in inners]
        else:
            log_s, plan, checkpoints = _iterate(prob, ctx.strides[0])
            kept = [checkpoints]
        ctx.pool, ctx.segments, ctx.blocks, ctx.num_values = pool, segments, blocks, len(values)
        ctx.save_for_backward(x, log_p, log_q, *values, *kept)
        return _pool_(prob, plan) if pool else log_s

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> Tuple[Optional[Tensor], ...]:
        x, log_p, log_q, *saved = ctx.saved_tensors
        values, kept = saved[:ctx.num_values], saved[ctx.num_values:]
        prob = _problem(x, ctx.segments, ctx.blocks, log_p, log_q, values)
        grads = _Grads(prob)
        strides, num_iters, keeping = ctx.strides, prob.coef.rho.numel(), ctx.inners is not None
        slots = [] if keeping else [x.new_empty((math.ceil(outer / inner) - 1, 2, *x.shape))
                                    for outer, inner in zip(strides, strides[1:])]
        # One block, which glibc maps apart from its heap where it is large (see _iterate); a second backward
        # (retain_graph) allocates its own.
        ws, ctx.ws = _Workspace(ctx.ws or x.new_empty((7, *x.shape)).unbind(0)), None
        if not ctx.pool:
            ws.grad_log_s.copy_(grad_out)
        ws.grad_dual.zero_()
        reverse = _Reverse(prob, ws, grads, strides, slots, grad_out if ctx.pool else None)
        if keeping:
            for k in reversed(range(num_iters)):
                log_s, dual, g, e_t, e_s = kept[5 * k:5 * k + 5]
                reverse.step(k, (log_s, dual), ctx.inners[k]._replace(g=g, e_t=e_t, e_s=e_s))
        else:
            for start in reversed(range(0, num_iters, strides[0])):
                # The initial dual is zero: None stands for it, so that it takes no memory.
                first = (_initial_log_s(prob), None) if start == 0 else tuple(kept[0][start // strides[0] - 1])
                reverse.span(start, min(start + strides[0], num_iters), first, level=1)
        # The initial state log S = log q + log p.
        grads.log_q.add_(ws.grad_log_s.sum(dim=-1))
        grads.log_p.add_(segment_sum(ws.grad_log_s, prob.segments))
        return (None, grads.x, None, None, grads.log_p, grads.log_q, *grads.coef, *grads.node, *grads.gram)


def _problem(x: Tensor, segments: Segments, blocks: Optional[SetBlocks], log_p: Tensor, log_q: Tensor,
             values: Tuple[Optional[Tensor], ...]) -> BADMMProblem:
    r"""Reassembles a :class:`BADMMProblem` from the flat tensor arguments of :class:`_BADMMIterations`: the six
    coefficients, then the structure's per-bucket :math:`\tilde X` and :math:`\tilde C_D`."""
    coef, st_tensors = BADMMCoefficients(*values[:6]), values[6:]
    num_buckets = len(st_tensors) // 2
    st = None if blocks is None else Structure(list(st_tensors[:num_buckets]), list(st_tensors[num_buckets:]), blocks)
    return BADMMProblem(x, segments, log_p, log_q, coef, st)


def badmm_log_plan(
    x: Tensor,
    segments: Segments,
    eps: Tensor,
    lam_p: Tensor,
    lam_q: Tensor,
    rho: Tensor,
    log_p: Tensor,
    log_q: Tensor,
    memory_efficient: bool = True,
    structure: Optional[Structure] = None,
    gw: Optional[Tensor] = None,
    quadratic: bool = False,
    pool: bool = False,
) -> Tensor:
    r"""Solves, for every set :math:`b` of the batch, the unbalanced OT problem

    .. math::
        \min_{T \geq 0} \; -\langle X_b, T \rangle
        + \varepsilon \sum T (\log T - 1)
        + \lambda_p \operatorname{KL}(T^\top \mathbf{1} \,\|\, p_b)
        + \lambda_q \operatorname{KL}(T \mathbf{1} \,\|\, q_b)

    (spec §3) or, with :obj:`quadratic`, the same with :math:`\frac{\varepsilon}{2} \|T\|_F^2` in place of
    the entropy (BADMM-Q, spec §7), by ``K = eps.numel()`` Bregman ADMM iterations (see the module) from
    :math:`\log T = \log S = \log q_n + \log p_d`, :math:`Z = 0`, and returns :math:`\log S` of shape
    ``(N, D)``, whose dimension marginal is exact at every iteration. With :obj:`structure` and :obj:`gw`
    (:math:`\gamma`), the problem gains :math:`-\frac{\gamma}{2} \langle C_N T C_D, T \rangle` (spec §6).

    ``eps``, ``lam_p``, ``lam_q``, ``rho`` and ``gw`` are 1-D tensors of length ``K``: iteration ``k``
    uses entry ``k``. ``eps = 0`` is allowed (unregularised UOT, e.g. max pooling).

    With :obj:`memory_efficient`, the backward is the hand-derived adjoint of :class:`_BADMMIterations`.
    Where what it reads fits in :data:`KEEP_BYTES` (``5 K N D`` values), the forward keeps it; beyond, the
    iterations run in place on four ``(N, D)`` buffers, and the backward keeps every ``L``-th state (``2 N D``
    values each) and recomputes the rest: ``O(sqrt(K) N D)`` with ``L = ceil(sqrt(K))`` up to ``K = 16``,
    ``O(K^{1/3} N D)`` with one more level of recomputation beyond (:func:`_checkpoint_strides`). :obj:`False`
    backpropagates through :func:`badmm_step` with plain autograd (``O(K N D)`` memory, double backward).
    Without gradients, the iterations run in place either way.

    With :obj:`pool`, it returns the pooled vectors :math:`z_b = D \sum_{n \in b} x_n \odot S_n`, shape
    ``(B, D)``, instead, read from the last :math:`S`: the lean backward then runs the pooling's adjoint
    itself, and no ``(N, D)`` plan outlives the forward.
    """
    prob = _problem_of(x, segments, eps, lam_p, lam_q, rho, log_p, log_q, structure, gw, quadratic)
    return _solve(prob, memory_efficient, pool)


def _problem_of(x: Tensor, segments: Segments, eps: Tensor, lam_p: Tensor, lam_q: Tensor, rho: Tensor,
                log_p: Tensor, log_q: Tensor, structure: Optional[Structure], gw: Optional[Tensor],
                quadratic: bool) -> BADMMProblem:
    coef = badmm_coefficients(eps, lam_p, lam_q, rho, gw if structure is not None else None, quadratic)
    return BADMMProblem(x, segments, log_p, log_q, coef, structure)


def _solve(prob: BADMMProblem, memory_efficient: bool, pool: bool) -> Tensor:
    r"""Dispatch: in place without gradients, plain autograd, or :class:`_BADMMIterations`."""
    st = prob.structure
    st_tensors = [] if st is None else [*st.x_node, *st.gram]
    inputs = [prob.x, prob.log_p, prob.log_q, *(c for c in prob.coef if c is not None), *st_tensors]
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in inputs)):
        with torch.no_grad():
            log_s, plan, _ = _iterate(prob)
            return _pool_(prob, plan) if pool else log_s
    if not memory_efficient:
        log_s = _initial_log_s(prob)
        dual = torch.zeros_like(log_s)
        for k in range(prob.coef.rho.numel()):
            log_s, dual = badmm_step(prob, k, log_s, dual)
        return pool_log_plan(prob.x, log_s, prob.segments) if pool else log_s
    blocks = None if st is None else st.blocks
    return _BADMMIterations.apply(pool, prob.x, prob.segments, blocks, prob.log_p, prob.log_q, *prob.coef,
                                  *st_tensors)
