r"""Sinkhorn scaling for unbalanced optimal transport over a ragged batch of sets (spec §2).

:func:`sinkhorn_log_plan` and :func:`sinkhorn_pool` run the iterations in the scaling domain where they
can (:mod:`uotp_geometric.solvers.sinkhorn_scaling`) and in the log domain otherwise, with the lean
backward of :class:`SinkhornPotentials` or with plain autograd.
"""
from typing import Any, List, Optional, Tuple, Type

import torch
from torch import Tensor

from uotp_geometric.segment import Segments, segment_logsumexp, segment_sum
from uotp_geometric.solvers.common import MAX_LOG_MASS, hardness, pool_log_plan
from uotp_geometric.solvers.compiled import compiled, dot, iteration_value
from uotp_geometric.solvers.sinkhorn_scaling import (SinkhornScaling, SinkhornScalingPool,
                                                     scaling_applies)


def sinkhorn_step(
    x: Tensor,
    segments: Segments,
    v: Tensor,
    scale: Tensor,
    c_p: Tensor,
    c_q: Tensor,
    log_p: Tensor,
    log_q: Tensor,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""One Gauss-Seidel Sinkhorn iteration in the log domain, with :math:`s = 1 / \varepsilon`:

    .. math::
        u_{b,d} &\leftarrow c_p \Big(\log p_{b,d} - \operatorname{LSE}_{n \in b}
            \big(s\, x_{n,d} + v_n\big)\Big), \qquad
            c_p = \frac{\lambda_p}{\lambda_p + \varepsilon} \\
        v_n &\leftarrow c_q \Big(\log q_n - \operatorname{LSE}_{d}
            \big(s\, x_{n,d} + u_{b(n),d}\big)\Big), \qquad
            c_q = \frac{\lambda_q}{\lambda_q + \varepsilon}

    Args:
        x (Tensor): Features of shape ``(N, D)``.
        segments (Segments): The set of each row, ``B`` sets.
        v (Tensor): Node potentials of the previous iteration, shape ``(N,)``. (The new ``u``
            depends on ``v`` alone.)
        scale, c_p, c_q (Tensor): Scalar tensors :math:`1 / \varepsilon`, :math:`c_p`, :math:`c_q`.
        log_p (Tensor): Log dimension prior, shape ``(B, D)``.
        log_q (Tensor): Log node prior, shape ``(N,)``.

    Returns:
        The new ``u`` ``(B, D)`` and ``v`` ``(N,)``, and the two log-sum-exps they were made from
        (``(B, D)`` and ``(N,)``), which a backward pass can reuse.
    """
    lse_u = segment_logsumexp(torch.addcmul(v.unsqueeze(-1), x, scale),
                              segments)
    u = c_p * (log_p - lse_u)
    lse_v = torch.logsumexp(torch.addcmul(segments.gather(u), x, scale),
                            dim=-1)
    v = c_q * (log_q - lse_v)
    return u, v, lse_u, lse_v


def _iterate(x: Tensor, segments: Segments, scale: Tensor, c_p: Tensor, c_q: Tensor, log_p: Tensor,
             log_q: Tensor, trace: Optional[List[Tuple[Tensor, ...]]] = None,
             compile: bool = False) -> Tuple[Tensor, Tensor]:
    r"""The K iterations of :func:`sinkhorn_step` from ``u = v = 0``; returns the last ``u`` and ``v``.
    With :obj:`trace`, appends per iteration the ``v`` it started from, the new ``u`` and the two
    log-sum-exps, which :class:`SinkhornPotentials` keeps for its backward. With :obj:`compile`, each
    iteration runs compiled (:mod:`~uotp_geometric.solvers.compiled`), which needs gradients off (as
    inside an :class:`~torch.autograd.Function` or :func:`torch.no_grad`)."""
    v = log_q.new_zeros(x.size(0))
    u = torch.zeros_like(log_p)
    step = compiled(sinkhorn_step) if compile else sinkhorn_step
    for k in range(scale.numel()):
        v_prev = v
        u, v, lse_u, lse_v = step(x, segments, v, *(iteration_value(t, k, compile) for t in (scale, c_p, c_q)),
                                  log_p, log_q)
        if trace is not None:
            trace.append((v_prev, u, lse_u, lse_v))
    return u, v


class SinkhornPotentials(torch.autograd.Function):
    r"""The K Sinkhorn iterations with a backward that stores only the potentials and log-sum-exps
    of each iteration, ``O(K (B D + N))``, and recomputes the ``(N, D)`` softmax weights from them
    (spec §5). Differentiable once (no double backward).
    """
    @staticmethod
    def forward(ctx: Any, x: Tensor, segments: Segments, scale: Tensor, c_p: Tensor, c_q: Tensor, log_p: Tensor,
                log_q: Tensor, compile: bool = False) -> Tuple[Tensor, Tensor]:
        trace: List[Tuple[Tensor, ...]] = []
        u, v = _iterate(x, segments, scale, c_p, c_q, log_p, log_q, trace, compile)
        vs, us, lse_us, lse_vs = (torch.stack(state) for state in zip(*trace))
        ctx.segments, ctx.compile = segments, compile
        ctx.save_for_backward(x, scale, c_p, c_q, log_p, log_q, vs, us, lse_us, lse_vs)
        return u, v

    @staticmethod
    def backward(ctx: Any, grad_u: Optional[Tensor],
                 grad_v: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
        (x, scale, c_p, c_q, log_p, log_q, vs, us, lse_us,
         lse_vs) = ctx.saved_tensors
        segments = ctx.segments
        grad_x = torch.zeros_like(x)
        grad_scale, grad_c_p, grad_c_q = (torch.zeros_like(scale),
                                          torch.zeros_like(c_p),
                                          torch.zeros_like(c_q))
        grad_log_p, grad_log_q = torch.zeros_like(log_p), torch.zeros_like(log_q)
        gu = grad_u if grad_u is not None else torch.zeros_like(log_p)
        gv = grad_v if grad_v is not None else torch.zeros_like(log_q)
        step = compiled(_adjoint_step) if ctx.compile else _adjoint_step
        for k in reversed(range(scale.numel())):
            gv, *parts, part_p, part_q = step(
                x, segments, *(iteration_value(t, k, ctx.compile) for t in (scale, c_p, c_q)), log_p, log_q,
                *(iteration_value(t, k, ctx.compile) for t in (vs, us, lse_us, lse_vs)), gu, gv, grad_x)
            grad_scale[k], grad_c_p[k], grad_c_q[k] = (part.sum() for part in parts)
            grad_log_p.add_(part_p)
            grad_log_q.add_(part_q)
            gu = torch.zeros_like(gu)  # the previous u does not enter this iteration
        return (grad_x, None, grad_scale, grad_c_p, grad_c_q, grad_log_p,
                grad_log_q, None)


def _adjoint_step(x: Tensor, segments: Segments, scale: Tensor, c_p: Tensor, c_q: Tensor, log_p: Tensor,
                  log_q: Tensor, v_prev: Tensor, u: Tensor, lse_u: Tensor, lse_v: Tensor, gu: Tensor, gv: Tensor,
                  grad_x: Tensor) -> Tuple[Tensor, ...]:
    r"""The adjoint of one :func:`sinkhorn_step` (0-d ``scale``, ``c_p``, ``c_q``), from the ``v`` it started
    from, its ``u`` and its log-sum-exps: backpropagates ``gu``, ``gv``, adds the gradient w.r.t. ``x`` into
    :obj:`grad_x` (in place), and returns the gradient w.r.t. the previous ``v`` and the iteration's shares
    of the gradients w.r.t. ``scale``, ``c_p``, ``c_q`` (as partial sums,
    :func:`~uotp_geometric.solvers.compiled.dot`), ``log p`` and ``log q``."""
    # v = c_q (log q - LSE_d B), B = s x + u[index]: dv/dB is -c_q softmax_d(B).
    logits_v = torch.addcmul(segments.gather(u), x, scale)
    grad_b = (logits_v - lse_v.unsqueeze(-1)).exp_()
    grad_b.mul_((-c_q * gv).unsqueeze(-1))
    grad_c_q = dot(gv, log_q - lse_v)
    grad_log_q = c_q * gv
    gu = gu + segment_sum(grad_b, segments)

    # u = c_p (log p - LSE_{n in b} A), A = s x + v_prev: du/dA is -c_p softmax_n(A).
    logits_u = torch.addcmul(v_prev.unsqueeze(-1), x, scale)
    grad_a = (logits_u - segments.gather(lse_u)).exp_()
    grad_a.mul_(-c_p * segments.gather(gu))
    grad_c_p = dot(gu, log_p - lse_u)
    grad_log_p = c_p * gu
    gv = grad_a.sum(dim=-1)  # gradient of the previous v

    grad_logits = grad_a.add_(grad_b)
    grad_x.add_(scale * grad_logits)
    grad_scale = dot(x, grad_logits)
    return gv, grad_scale, grad_c_p, grad_c_q, grad_log_p, grad_log_q


def sinkhorn_log_plan(
    x: Tensor,
    segments: Segments,
    eps: Tensor,
    lam_p: Tensor,
    lam_q: Tensor,
    log_p: Tensor,
    log_q: Tensor,
    memory_efficient: bool = True,
    compile: bool = False,
) -> Tensor:
    r"""Solves, for every set :math:`b` of the batch, the entropic unbalanced OT problem

    .. math::
        \min_{T \geq 0} \; -\langle X_b, T \rangle
        + \varepsilon \sum T (\log T - 1)
        + \lambda_p \operatorname{KL}(T^\top \mathbf{1} \,\|\, p_b)
        + \lambda_q \operatorname{KL}(T \mathbf{1} \,\|\, q_b)

    by ``K = eps.numel()`` Sinkhorn iterations (:func:`sinkhorn_step`) from ``u = 0, v = 0``, and
    returns :math:`\log T = X / \varepsilon + u + v` of shape ``(N, D)``, capped at
    :data:`~uotp_geometric.solvers.common.MAX_LOG_MASS`.

    ``eps``, ``lam_p`` and ``lam_q`` are 1-D tensors of length ``K``: iteration ``k`` uses entry
    ``k``, and the plan is read with the last ``eps``. ``lam = inf`` makes a marginal hard, ``lam = 0``
    free.
    With :obj:`memory_efficient`, the backward stores ``O(N D + K (B D + N))`` instead of autograd's
    ``O(K N D)``, and one ``eps`` for all iterations runs in the scaling domain on the CPU
    (:class:`~uotp_geometric.solvers.sinkhorn_scaling.SinkhornScaling`: one exponential of the data
    instead of two per iteration), falling back to the log domain (:class:`SinkhornPotentials`) where a
    set spans more than the float's range.

    With :obj:`compile`, each iteration, and in the lean backwards each iteration's adjoint, runs as a
    compiled kernel (:mod:`~uotp_geometric.solvers.compiled`), in either domain; plain autograd
    (:obj:`memory_efficient` ``=False`` with gradients) stays eager.
    """
    c_p, c_q = hardness(lam_p, eps), hardness(lam_q, eps)
    out = _scaling(SinkhornScaling, x, segments, eps, c_p, c_q, log_p, log_q, memory_efficient, compile)
    u, v = out if out is not None else _log_domain(x, segments, eps, c_p, c_q, log_p, log_q,
                                                    memory_efficient, compile)
    return _read_log_plan(x, segments, u, v, eps)


def sinkhorn_pool(
    x: Tensor,
    segments: Segments,
    eps: Tensor,
    lam_p: Tensor,
    lam_q: Tensor,
    log_p: Tensor,
    log_q: Tensor,
    memory_efficient: bool = True,
    compile: bool = False,
) -> Tensor:
    r"""UOT-Pooling with the plan :math:`T` of :func:`sinkhorn_log_plan` (same arguments):
    :math:`z_b = D \sum_{n \in b} x_n \odot T_n`, shape ``(B, D)``.

    Where :func:`sinkhorn_log_plan` runs in the scaling domain, the pooled vectors are read from its
    kernel (:class:`~uotp_geometric.solvers.sinkhorn_scaling.SinkhornScalingPool`) and the plan is never
    formed, which saves a handful of ``(N, D)`` passes forward and backward; elsewhere, and where a plan
    entry may reach the cap, they are pooled from the log-domain plan.
    """
    c_p, c_q = hardness(lam_p, eps), hardness(lam_q, eps)
    out = _scaling(SinkhornScalingPool, x, segments, eps, c_p, c_q, log_p, log_q, memory_efficient, compile)
    if out is not None:
        return out[0]
    u, v = _log_domain(x, segments, eps, c_p, c_q, log_p, log_q, memory_efficient, compile)
    return pool_log_plan(x, _read_log_plan(x, segments, u, v, eps), segments)


def _scaling(function: Type[torch.autograd.Function], x: Tensor, segments: Segments, eps: Tensor,
             c_p: Tensor, c_q: Tensor, log_p: Tensor, log_q: Tensor,
             memory_efficient: bool, compile: bool = False) -> Optional[Tuple[Tensor, ...]]:
    r"""The outputs of a scaling-domain :obj:`function` where it applies and its flag says they are
    exact; :obj:`None` where the log domain must run instead."""
    if not (memory_efficient and scaling_applies(x, eps)):
        return None
    *out, ok = function.apply(x, segments, eps[0].reciprocal(), c_p, c_q, log_p, log_q, compile)
    return tuple(out) if bool(ok) else None


def _log_domain(x: Tensor, segments: Segments, eps: Tensor, c_p: Tensor, c_q: Tensor, log_p: Tensor,
                log_q: Tensor, memory_efficient: bool, compile: bool = False) -> Tuple[Tensor, Tensor]:
    r"""The potentials ``u``, ``v`` in the log domain: with the lean backward of
    :class:`SinkhornPotentials` where one is needed, else with plain autograd (compiled without gradients)."""
    scale = eps.reciprocal()
    if memory_efficient and torch.is_grad_enabled():
        return SinkhornPotentials.apply(x, segments, scale, c_p, c_q, log_p, log_q, compile)
    return _iterate(x, segments, scale, c_p, c_q, log_p, log_q, compile=compile and not torch.is_grad_enabled())


def _read_log_plan(x: Tensor, segments: Segments, u: Tensor, v: Tensor, eps: Tensor) -> Tensor:
    log_plan = torch.addcmul(segments.gather(u) + v.unsqueeze(-1), x, eps[-1].reciprocal())
    return log_plan.clamp(max=MAX_LOG_MASS)
