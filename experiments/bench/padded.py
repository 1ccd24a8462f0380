"""The padded reference: the same UOT iterations on ``to_dense_batch`` and a mask, as in the published layer."""
from __future__ import annotations

import math
from typing import Union

import torch
from torch import Tensor
from torch_geometric.utils import to_dense_batch

from uotp_geometric import UOTAggregation
from uotp_geometric.solvers.common import hardness


def padded_uot_pool(x: Tensor, index: Tensor, dim_size: int, *, solver: str = "sinkhorn",
                    eps: Union[float, Tensor] = 1.0, lam_p: Union[float, Tensor] = 1.0,
                    lam_q: Union[float, Tensor] = 1.0, rho: Union[float, Tensor] = 1.0,
                    num_iters: int = 4) -> Tensor:
    """:func:`uotp_geometric.uot_pool` (uniform priors) computed on the padded layout ``(B, M, D)``.

    Every set is padded to the largest one, ``M`` nodes, and the padding enters each log-sum-exp over the
    nodes of a set as ``-inf``. ``index`` must be sorted and every set non-empty. ``eps``, ``lam_p``,
    ``lam_q`` and ``rho`` are scalars or tensors of shape ``(1,)`` or ``(num_iters,)``.
    """
    dense, mask = to_dense_batch(x, index, batch_size=dim_size)  # (B, M, D), (B, M)
    pad = torch.zeros_like(mask, dtype=x.dtype).masked_fill(~mask, -math.inf).unsqueeze(-1)
    log_p = -math.log(x.size(-1))  # p = 1 / D
    log_q = -mask.sum(1).to(x.dtype).log().view(-1, 1, 1)  # q = 1 / N_b
    eps, lam_p, lam_q, rho = (torch.as_tensor(v, dtype=x.dtype, device=x.device).expand(num_iters)
                              for v in (eps, lam_p, lam_q, rho))
    if solver == "sinkhorn":  # spec §2; u is (B, 1, D), v is (B, M, 1)
        v = dense.new_zeros(dense.shape[:2]).unsqueeze(-1)
        for k in range(num_iters):
            scores = dense / eps[k]
            u = hardness(lam_p[k], eps[k]) * (log_p - torch.logsumexp(scores + (v + pad), 1, keepdim=True))
            v = hardness(lam_q[k], eps[k]) * (log_q - torch.logsumexp(scores + u, 2, keepdim=True))
        log_plan = dense / eps[-1] + u + (v + pad)
    elif solver == "badmm":  # spec §3, read out of S
        log_s, dual = log_q + log_p, torch.zeros_like(dense)
        for k in range(num_iters):
            g = log_s + (dense - dual) / rho[k]
            log_r = torch.logsumexp(g, 2, keepdim=True)
            h_q = hardness(lam_q[k], rho[k])
            log_t = g + ((1 - h_q) * log_r + h_q * log_q - log_r)
            h = (dual + rho[k] * log_t) / (eps[k] + rho[k])
            log_c = torch.logsumexp(h + pad, 1, keepdim=True)
            h_p = hardness(lam_p[k], eps[k] + rho[k])
            log_s = h + ((1 - h_p) * log_c + h_p * log_p - log_c)
            dual = dual + rho[k] * (log_t.exp() - log_s.exp())
        log_plan = log_s + pad
    else:
        raise ValueError(f"Unknown solver '{solver}'")
    return x.size(-1) * (dense * log_plan.exp()).sum(1)


class PaddedUOT(torch.nn.Module):
    """:func:`padded_uot_pool` with the learned parameters of a :class:`UOTAggregation`."""

    def __init__(self, solver: str, num_iters: int) -> None:
        super().__init__()
        self.params = UOTAggregation(solver, num_iters=num_iters, learn=True)

    def forward(self, x: Tensor, index: Tensor, dim_size: int) -> Tensor:
        p = self.params
        return padded_uot_pool(x, index, dim_size, solver=p.solver, num_iters=p.num_iters,
                               eps=p.value("eps"), lam_p=p.value("lam_p"), lam_q=p.value("lam_q"),
                               rho=p.value("rho") if p.solver == "badmm" else 1.0)

