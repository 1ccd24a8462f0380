r"""Bregman ADMM for unbalanced optimal transport over a ragged batch of sets (spec §3)."""
from typing import Tuple

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from uotp_geometric.segment import Segments, segment_logsumexp
from uotp_geometric.solvers.common import MAX_LOG_MASS, hardness


def badmm_step(
    x: Tensor,
    segments: Segments,
    log_s: Tensor,
    dual: Tensor,
    eps: Tensor,
    lam_p: Tensor,
    lam_q: Tensor,
    rho: Tensor,
    log_p: Tensor,
    log_q: Tensor,
) -> Tuple[Tensor, Tensor]:
    r"""One Bregman ADMM iteration in the log domain, for the consensus :math:`T = S` with dual
    :math:`Z`. Block 1 updates :math:`(T, \eta)`, block 2 :math:`(S, \mu)`, each an exact joint
    minimiser:

    .. math::
        G &= \log S + (X - Z) / \rho, \quad
        \log \eta = (1 - h_q) \operatorname{LSE}_d G + h_q \log q, \quad
        \log T = G - \operatorname{LSE}_d G + \log \eta \\
        H &= (Z + \rho \log T) / (\varepsilon + \rho), \quad
        \log \mu = (1 - h_p) \operatorname{LSE}_{n \in b} H + h_p \log p, \quad
        \log S = H - \operatorname{LSE}_{n \in b} H + \log \mu \\
        Z &\leftarrow Z + \rho (T - S)

    with :math:`h_q = \lambda_q / (\lambda_q + \rho)` and
    :math:`h_p = \lambda_p / (\lambda_p + \varepsilon + \rho)`. No step divides by
    :math:`\varepsilon`, so :math:`\varepsilon = 0` is allowed. The marginals :math:`\eta, \mu` are
    capped at :data:`~uotp_geometric.solvers.common.MAX_LOG_MASS` (in log).

    Args:
        x (Tensor): Features of shape ``(N, D)``.
        segments (Segments): The set of each row, ``B`` sets.
        log_s (Tensor): :math:`\log S`, shape ``(N, D)``.
        dual (Tensor): :math:`Z`, shape ``(N, D)``.
        eps, lam_p, lam_q, rho (Tensor): Scalar tensors, ``eps >= 0``, ``rho > 0``.
        log_p (Tensor): Log dimension prior, shape ``(B, D)``.
        log_q (Tensor): Log node prior, shape ``(N,)``.
    """
    g = log_s + (x - dual) / rho
    log_r = torch.logsumexp(g, dim=-1)
    h_q = hardness(lam_q, rho)
    log_eta = ((1 - h_q) * log_r + h_q * log_q).clamp(max=MAX_LOG_MASS)
    log_t = g + (log_eta - log_r).unsqueeze(-1)

    h = (dual + rho * log_t) / (eps + rho)
    log_c = segment_logsumexp(h, segments)
    h_p = hardness(lam_p, eps + rho)
    log_mu = ((1 - h_p) * log_c + h_p * log_p).clamp(max=MAX_LOG_MASS)
    log_s = h + segments.gather(log_mu - log_c)

    dual = dual + rho * (log_t.exp() - log_s.exp())
    return log_s, dual


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
) -> Tensor:
    r"""Solves, for every set :math:`b` of the batch, the unbalanced OT problem

    .. math::
        \min_{T \geq 0} \; -\langle X_b, T \rangle
        + \varepsilon \sum T (\log T - 1)
        + \lambda_p \operatorname{KL}(T^\top \mathbf{1} \,\|\, p_b)
        + \lambda_q \operatorname{KL}(T \mathbf{1} \,\|\, q_b)

    by ``K = eps.numel()`` Bregman ADMM iterations (:func:`badmm_step`) from
    :math:`\log T = \log S = \log q_n + \log p_d`, :math:`Z = 0`, and returns :math:`\log S` of shape
    ``(N, D)``, whose dimension marginal is exact at every iteration.

    ``eps``, ``lam_p``, ``lam_q`` and ``rho`` are 1-D tensors of length ``K``: iteration ``k`` uses
    entry ``k``. ``eps = 0`` is allowed (unregularised UOT, e.g. max pooling).

    With :obj:`memory_efficient`, each iteration is checkpointed: the backward keeps only the state
    ``(log S, Z)`` entering each iteration, ``2 N D`` values, and recomputes the rest.
    """
    log_s = log_q.unsqueeze(-1) + segments.gather(log_p)
    dual = torch.zeros_like(log_s)
    lean = memory_efficient and torch.is_grad_enabled()
    for k in range(eps.numel()):
        args = (x, segments, log_s, dual, eps[k], lam_p[k], lam_q[k],
                rho[k], log_p, log_q)
        if lean:
            log_s, dual = checkpoint(badmm_step, *args, use_reentrant=False)
        else:
            log_s, dual = badmm_step(*args)
    return log_s
