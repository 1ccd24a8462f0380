r"""Bregman ADMM for unbalanced optimal transport over a ragged batch of sets (spec §3)."""
import math
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from uotp_geometric.segment import Segments, segment_exp
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
    score: Optional[Callable[[Tensor], Tensor]] = None,
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

    An optional :obj:`score` adds a plan-dependent term to each block: :math:`X + \mathrm{score}(S)` in
    :math:`G` and :math:`Z + \mathrm{score}(T)` in :math:`H` (the structure term of spec §6).

    Args:
        x (Tensor): Features of shape ``(N, D)``.
        segments (Segments): The set of each row, ``B`` sets.
        log_s (Tensor): :math:`\log S`, shape ``(N, D)``.
        dual (Tensor): :math:`Z`, shape ``(N, D)``.
        eps, lam_p, lam_q, rho (Tensor): Scalar tensors, ``eps >= 0``, ``rho > 0``.
        log_p (Tensor): Log dimension prior, shape ``(B, D)``.
        log_q (Tensor): Log node prior, shape ``(N,)``.
        score (callable, optional): Maps a plan ``(N, D)`` to an extra score ``(N, D)``.
    """
    if score is not None:
        x = x + score(log_s.exp())
    g = torch.addcdiv(log_s, x - dual, rho)
    # One exponential per block serves both its log-sum-exp and its plan: T = exp(g - m) eta / r', with
    # m the (detached) row maximum and r' = r / exp(m); likewise S from the per-set column softmax.
    shift_r = g.detach().amax(dim=-1, keepdim=True)
    shift_r = torch.where(torch.isfinite(shift_r), shift_r, torch.zeros_like(shift_r))
    e_t = (g - shift_r).exp()
    row_total = e_t.sum(dim=-1, keepdim=True)
    log_row_total = row_total.log()
    log_r = log_row_total + shift_r
    h_q = hardness(lam_q, rho)
    log_eta = ((1 - h_q) * log_r + h_q * log_q.unsqueeze(-1)).clamp(max=MAX_LOG_MASS)
    plan_t = e_t * (log_eta - log_row_total).exp()
    if score is not None:  # Z + score(T) in H: it joins the X that G put into rho log T
        x = x + score(plan_t)

    # H = (Z + rho log T) / (eps + rho), with log T = g - log r + log eta: Z cancels.
    h = torch.addcmul(x / (eps + rho), log_s + (log_eta - log_r), rho / (eps + rho))
    e_s, col_total, shift_c = segment_exp(h, segments)
    log_col_total = col_total.log()
    log_c = log_col_total + shift_c
    h_p = hardness(lam_p, eps + rho)
    log_mu = ((1 - h_p) * log_c + h_p * log_p).clamp(max=MAX_LOG_MASS)
    log_s = h + segments.gather(log_mu - log_c)
    plan_s = e_s * segments.gather((log_mu - log_col_total).exp())

    dual = torch.addcmul(dual, plan_t - plan_s, rho)
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
    scores: Optional[Sequence[Callable[[Tensor], Tensor]]] = None,
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

    With :obj:`memory_efficient`, the iterations are checkpointed: the backward keeps the state
    ``(log S, Z)``, ``2 N D`` values, entering each iteration (:func:`_checkpoint_stride`) and recomputes
    the rest. :obj:`scores`, one per iteration, are the extra scores of :func:`badmm_step`.
    """
    log_s = log_q.unsqueeze(-1) + segments.gather(log_p)
    dual = torch.zeros_like(log_s)
    num_iters = eps.numel()
    values = (eps, lam_p, lam_q, rho)
    scores = [None] * num_iters if scores is None else scores
    if not (memory_efficient and torch.is_grad_enabled()):
        return _iterate(x, segments, log_s, dual, values, log_p, log_q, 0, num_iters, False, scores)[0]
    stride = _checkpoint_stride(num_iters)
    for start in range(0, num_iters, stride):
        stop = min(start + stride, num_iters)
        if stop - start == 1:
            args = (x, segments, log_s, dual, *(v[start] for v in values), log_p, log_q)
            log_s, dual = checkpoint(badmm_step, *args, score=scores[start], use_reentrant=False)
        else:  # its backward recomputes the segment, keeping the state entering each of its iterations
            log_s, dual = checkpoint(_iterate, x, segments, log_s, dual, values, log_p, log_q, start, stop,
                                     True, scores, use_reentrant=False)
    return log_s


def _checkpoint_stride(num_iters: int) -> int:
    r"""How many iterations one outer checkpoint spans.

    Checkpointing every iteration keeps ``2 N D`` values per iteration, ``2 K N D`` in all. Segments of
    ``L`` iterations, each recomputed once more in the backward with its iterations checkpointed, keep
    ``2 (K / L + L) N D``, least at ``L = sqrt(K)``; that saves memory only beyond ``K = 4``, so up to
    there every iteration is its own checkpoint (and nothing is computed three times).
    """
    return 1 if num_iters <= 4 else math.ceil(math.sqrt(num_iters))


def _iterate(x: Tensor, segments: Segments, log_s: Tensor, dual: Tensor,
             values: Tuple[Tensor, Tensor, Tensor, Tensor], log_p: Tensor,
             log_q: Tensor, start: int, stop: int, lean: bool,
             scores: Sequence[Optional[Callable[[Tensor], Tensor]]]) -> Tuple[Tensor, Tensor]:
    r"""Iterations ``start`` to ``stop - 1`` from ``(log S, Z)``; each checkpointed if :obj:`lean`."""
    for k in range(start, stop):
        args = (x, segments, log_s, dual, *(v[k] for v in values), log_p,
                log_q)
        if lean:
            log_s, dual = checkpoint(badmm_step, *args, score=scores[k], use_reentrant=False)
        else:
            log_s, dual = badmm_step(*args, score=scores[k])
    return log_s, dual
