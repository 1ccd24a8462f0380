r"""Sinkhorn scaling for unbalanced optimal transport over a ragged batch of sets (spec §2)."""
from typing import Any, Optional, Tuple

import torch
from torch import Tensor

from uotp_geometric.segment import Segments, segment_logsumexp, segment_sum
from uotp_geometric.solvers.common import MAX_LOG_MASS, hardness


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


def _sinkhorn_loop(x: Tensor, segments: Segments, scale: Tensor,
                   c_p: Tensor, c_q: Tensor, log_p: Tensor,
                   log_q: Tensor) -> Tuple[Tensor, Tensor]:
    v = log_q.new_zeros(x.size(0))
    u = torch.zeros_like(log_p)
    for k in range(scale.numel()):
        u, v, _, _ = sinkhorn_step(x, segments, v, scale[k], c_p[k],
                                   c_q[k], log_p, log_q)
    return u, v


class _SinkhornPotentials(torch.autograd.Function):
    r"""The K Sinkhorn iterations with a backward that stores only the potentials and log-sum-exps
    of each iteration, ``O(K (B D + N))``, and recomputes the ``(N, D)`` softmax weights from them
    (spec §5). Differentiable once (no double backward).
    """
    @staticmethod
    def forward(ctx: Any, x: Tensor, segments: Segments, scale: Tensor, c_p: Tensor, c_q: Tensor, log_p: Tensor,
                log_q: Tensor) -> Tuple[Tensor, Tensor]:
        v = log_q.new_zeros(x.size(0))
        vs, us, lse_us, lse_vs = [], [], [], []
        for k in range(scale.numel()):
            vs.append(v)
            u, v, lse_u, lse_v = sinkhorn_step(x, segments, v, scale[k],
                                               c_p[k], c_q[k], log_p, log_q)
            us.append(u)
            lse_us.append(lse_u)
            lse_vs.append(lse_v)
        ctx.segments = segments
        ctx.save_for_backward(x, scale, c_p, c_q, log_p, log_q,
                              torch.stack(vs), torch.stack(us),
                              torch.stack(lse_us), torch.stack(lse_vs))
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
        for k in reversed(range(scale.numel())):
            # v = c_q (log q - LSE_d B), B = s x + u[index]: dv/dB is -c_q softmax_d(B).
            logits_v = torch.addcmul(segments.gather(us[k]), x, scale[k])
            grad_b = (logits_v - lse_vs[k].unsqueeze(-1)).exp_()
            grad_b.mul_((-c_q[k] * gv).unsqueeze(-1))
            grad_c_q[k] = torch.dot(gv, log_q - lse_vs[k])
            grad_log_q.add_(c_q[k] * gv)
            gu = gu + segment_sum(grad_b, segments)

            # u = c_p (log p - LSE_{n in b} A), A = s x + v_prev: du/dA is -c_p softmax_n(A).
            logits_u = torch.addcmul(vs[k].unsqueeze(-1), x, scale[k])
            grad_a = (logits_u - segments.gather(lse_us[k])).exp_()
            grad_a.mul_(-c_p[k] * segments.gather(gu))
            grad_c_p[k] = (gu * (log_p - lse_us[k])).sum()
            grad_log_p.add_(c_p[k] * gu)
            gv = grad_a.sum(dim=-1)  # gradient of the previous v

            grad_logits = grad_a.add_(grad_b)
            grad_x.add_(scale[k] * grad_logits)
            grad_scale[k] = torch.dot(x.reshape(-1), grad_logits.reshape(-1))
            gu = torch.zeros_like(gu)  # the previous u does not enter this iteration
        return (grad_x, None, grad_scale, grad_c_p, grad_c_q, grad_log_p,
                grad_log_q)


def sinkhorn_log_plan(
    x: Tensor,
    segments: Segments,
    eps: Tensor,
    lam_p: Tensor,
    lam_q: Tensor,
    log_p: Tensor,
    log_q: Tensor,
    memory_efficient: bool = True,
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
    With :obj:`memory_efficient`, the backward stores ``O(K (B D + N))`` instead of autograd's
    ``O(K N D)``.
    """
    scale = eps.reciprocal()
    c_p, c_q = hardness(lam_p, eps), hardness(lam_q, eps)
    if memory_efficient and torch.is_grad_enabled():
        u, v = _SinkhornPotentials.apply(x, segments, scale, c_p, c_q, log_p,
                                         log_q)
    else:
        u, v = _sinkhorn_loop(x, segments, scale, c_p, c_q, log_p, log_q)
    log_plan = torch.addcmul(segments.gather(u) + v.unsqueeze(-1), x,
                             scale[-1])
    return log_plan.clamp(max=MAX_LOG_MASS)
