r"""Sinkhorn scaling for unbalanced optimal transport over a ragged batch of sets (spec §2)."""
from typing import Tuple

import torch
from torch import Tensor

from uotp_geometric.segment import segment_logsumexp
from uotp_geometric.solvers.common import hardness


def sinkhorn_step(
    x: Tensor,
    index: Tensor,
    num_sets: int,
    u: Tensor,
    v: Tensor,
    eps: Tensor,
    lam_p: Tensor,
    lam_q: Tensor,
    log_p: Tensor,
    log_q: Tensor,
) -> Tuple[Tensor, Tensor]:
    r"""One Gauss-Seidel Sinkhorn iteration in the log domain.

    .. math::
        u_{b,d} &\leftarrow c_p \Big(\log p_{b,d} - \operatorname{LSE}_{n \in b}
            \big(x_{n,d} / \varepsilon + v_n\big)\Big), \qquad
            c_p = \frac{\lambda_p}{\lambda_p + \varepsilon} \\
        v_n &\leftarrow c_q \Big(\log q_n - \operatorname{LSE}_{d}
            \big(x_{n,d} / \varepsilon + u_{b(n),d}\big)\Big), \qquad
            c_q = \frac{\lambda_q}{\lambda_q + \varepsilon}

    Args:
        x (Tensor): Features of shape ``(N, D)``.
        index (Tensor): The set of each row, shape ``(N,)``.
        num_sets (int): The number of sets ``B``.
        u (Tensor): Dimension potentials of shape ``(B, D)``.
        v (Tensor): Node potentials of shape ``(N,)``.
        eps, lam_p, lam_q (Tensor): Scalar tensors, ``eps > 0``.
        log_p (Tensor): Log dimension prior, shape ``(B, D)``.
        log_q (Tensor): Log node prior, shape ``(N,)``.
    """
    scores = x / eps
    u = hardness(lam_p, eps) * (
        log_p - segment_logsumexp(scores + v.unsqueeze(-1), index, num_sets))
    v = hardness(lam_q, eps) * (
        log_q - torch.logsumexp(scores + u.index_select(0, index), dim=-1))
    return u, v


def sinkhorn_log_plan(
    x: Tensor,
    index: Tensor,
    num_sets: int,
    eps: Tensor,
    lam_p: Tensor,
    lam_q: Tensor,
    log_p: Tensor,
    log_q: Tensor,
) -> Tensor:
    r"""Solves, for every set :math:`b` of the batch, the entropic unbalanced OT problem

    .. math::
        \min_{T \geq 0} \; -\langle X_b, T \rangle
        + \varepsilon \sum T (\log T - 1)
        + \lambda_p \operatorname{KL}(T^\top \mathbf{1} \,\|\, p_b)
        + \lambda_q \operatorname{KL}(T \mathbf{1} \,\|\, q_b)

    by ``K = eps.numel()`` Sinkhorn iterations (:func:`sinkhorn_step`) from ``u = 0, v = 0``, and
    returns :math:`\log T = X / \varepsilon + u + v` of shape ``(N, D)``.

    ``eps``, ``lam_p`` and ``lam_q`` are 1-D tensors of length ``K``: iteration ``k`` uses entry ``k``,
    and the plan is read with the last ``eps``. ``lam = inf`` makes a marginal hard, ``lam = 0`` free.
    """
    u = log_p.new_zeros(num_sets, x.size(-1))
    v = log_q.new_zeros(x.size(0))
    for k in range(eps.numel()):
        u, v = sinkhorn_step(x, index, num_sets, u, v, eps[k], lam_p[k],
                             lam_q[k], log_p, log_q)
    return x / eps[-1] + u.index_select(0, index) + v.unsqueeze(-1)
