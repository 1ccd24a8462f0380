r"""The sorted-segment path that accelerators take (rows grouped by set, reductions by
:func:`torch.segment_reduce`), forced on the CPU and checked against dense per-set float64 references."""
import pytest
import torch

from uotp_geometric.functional import SolverOptions, _uot, uot_pool
from tests.uotp_geometric.helpers import ragged_batch
from tests.uotp_geometric.solvers.test_badmm_q import dense_badmm_q
from tests.uotp_geometric.solvers.test_rot import _priors, dense_badmm, dense_proximal_sinkhorn, weight

SIZES = [3, 0, 7, 1, 12, 5]  # unsorted below, with an empty set and a single node
NUM_ITERS = 5
VALUES = dict(lam_p=1.5, lam_q=0.6, rho=0.8, prox=0.3, inner_iters=3)


def dense_sinkhorn(x, p, q, eps, lam_p, lam_q):
    r"""Spec §2 for one set, one ``eps`` per iteration; the plan is read with the last one."""
    u, v = torch.zeros_like(p), torch.zeros_like(q)
    for k in range(len(eps)):
        c_p, c_q = weight(lam_p, eps[k]), weight(lam_q, eps[k])
        u = c_p * (p.log() - torch.logsumexp(x / eps[k] + v[:, None], dim=0))
        v = c_q * (q.log() - torch.logsumexp(x / eps[k] + u[None, :], dim=1))
    return torch.exp(x / eps[-1] + u[None, :] + v[:, None])


def dense_reference(solver, x, p, q, eps, gw):
    lam_p, lam_q, rho, tau = VALUES['lam_p'], VALUES['lam_q'], VALUES['rho'], VALUES['prox']
    num_iters = len(eps)
    if solver == 'sinkhorn' and gw == 0:
        return dense_sinkhorn(x, p, q, eps, lam_p, lam_q)
    lists = dict(eps=eps, lam_p=[lam_p] * num_iters, lam_q=[lam_q] * num_iters, gw=[gw] * num_iters)
    if solver == 'sinkhorn':
        return dense_proximal_sinkhorn(x, p, q, tau=[tau] * num_iters, inner_iters=VALUES['inner_iters'], **lists)
    dense = dense_badmm if solver == 'badmm' else dense_badmm_q
    return dense(x, p, q, rho=[rho] * num_iters, **lists)


def _solve_sorted(x, index, solver, eps, gw, p, q, memory_efficient, pool):
    options = SolverOptions(solver=solver, num_iters=NUM_ITERS, eps=eps, gw=gw, memory_efficient=memory_efficient,
                            **VALUES)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = _uot(x, index, len(SIZES), options, p, q, None, pool=pool, sort_rows=True)
    # The path under test was taken: the reductions ran as segment reductions.
    assert any(event.name == 'aten::segment_reduce' for event in prof.events())
    return out


@pytest.mark.usefixtures('badmm_backward')
@pytest.mark.parametrize('solver', ['sinkhorn', 'badmm', 'badmm_q'])
@pytest.mark.parametrize('gw', [0.0, 0.5])
@pytest.mark.parametrize('memory_efficient', [True, False])
def test_sorted_segments_match_dense_reference(solver, gw, memory_efficient):
    x, index = ragged_batch(SIZES, 4, shuffle=True, seed=21)
    p, q = _priors(index, 4, uniform=False)
    # One eps per iteration: Sinkhorn runs in the log domain, as it does on accelerators.
    eps = torch.linspace(0.7, 1.2, NUM_ITERS, dtype=x.dtype)
    plan = _solve_sorted(x, index, solver, eps, gw, p, q, memory_efficient, pool=False)
    pooled = _solve_sorted(x, index, solver, eps, gw, p, q, memory_efficient, pool=True)
    for b, size in enumerate(SIZES):
        rows = index == b
        if size == 0:
            assert pooled[b].abs().max() == 0
            continue
        expected = dense_reference(solver, x[rows], p[b], q[rows], eps.tolist(), gw)
        torch.testing.assert_close(plan[rows], expected, rtol=1e-12, atol=0)
        torch.testing.assert_close(pooled[b], x.size(-1) * (x[rows] * expected).sum(0), rtol=1e-12, atol=1e-14)


@pytest.mark.usefixtures('badmm_backward')
@pytest.mark.parametrize('solver', ['sinkhorn', 'badmm', 'badmm_q'])
@pytest.mark.parametrize('gw', [0.0, 0.5])
def test_sorted_segments_gradients_equal_autograd(solver, gw):
    # The lean backward on the sorted path against plain autograd on the scattered one.
    x, index = ragged_batch(SIZES, 4, shuffle=True, seed=22)
    p, q = _priors(index, 4, uniform=False)
    eps = torch.linspace(0.7, 1.2, NUM_ITERS, dtype=x.dtype)
    weight_out = torch.randn(len(SIZES), 4, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
    grads = []
    for sorted_rows in (True, False):
        leaves = [t.clone().requires_grad_(True) for t in (x, eps, p, q)]
        if sorted_rows:
            out = _solve_sorted(leaves[0], index, solver, leaves[1], gw, leaves[2], leaves[3], True, pool=True)
        else:
            out = uot_pool(leaves[0], index, len(SIZES), solver=solver, eps=leaves[1], gw=gw, p=leaves[2],
                           q=leaves[3], num_iters=NUM_ITERS, memory_efficient=False, **VALUES)
        (out * weight_out).sum().backward()
        grads.append([t.grad for t in leaves])
    for lean, plain in zip(*grads):
        assert plain.abs().max() > 0
        torch.testing.assert_close(lean, plain, rtol=0, atol=1e-10 * plain.abs().max().item())
