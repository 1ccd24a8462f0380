r"""BADMM-Q (spec §7) against POT's solver of the same objective, a dense per-set float64 reference written
out here, and its presets and argument checks."""
import math

import numpy as np
import pytest
import torch
from torch_geometric.utils import scatter

from uotp_geometric import UOTAggregation
from uotp_geometric.functional import uot_plan, uot_pool
from tests.uotp_geometric.helpers import ragged_batch
from tests.uotp_geometric.test_numerics import fuzz_case
from tests.uotp_geometric.solvers.test_rot import _priors, dense_similarities, weight

INF = math.inf
SIZES = [2, 5, 9, 20, 3]


def dense_badmm_q(x, p, q, eps, lam_p, lam_q, rho, gw):
    r"""Spec §7 for one set, with spec §6's structure term; every value is a list with one entry per
    iteration."""
    c_n, c_d = dense_similarities(x)
    log_s = q.log()[:, None] + p.log()[None, :]
    dual = torch.zeros_like(log_s)
    for k in range(len(eps)):
        s = log_s.exp()
        g = log_s + (x + gw[k] / 2 * c_n @ s @ c_d - eps[k] / 2 * s - dual) / rho[k]
        log_r = torch.logsumexp(g, dim=1, keepdim=True)
        w_q = 1 - weight(lam_q[k], rho[k])
        log_t = g - log_r + w_q * log_r + (1 - w_q) * q.log()[:, None]
        t = log_t.exp()
        h = log_t + (dual + gw[k] / 2 * c_n @ t @ c_d - eps[k] / 2 * t) / rho[k]
        log_c = torch.logsumexp(h, dim=0, keepdim=True)
        w_p = 1 - weight(lam_p[k], rho[k])
        log_s = h - log_c + w_p * log_c + (1 - w_p) * p.log()[None, :]
        dual = dual + rho[k] * (t - log_s.exp())
    return log_s.exp()


def pot_quadratic_plan(x_set, eps, lam_p, lam_q):
    r"""The optimum of spec §7 for one set with uniform priors, from POT's L-BFGS-B solver (nodes first)."""
    import ot
    x_np = x_set.numpy()
    num_nodes, num_dims = x_np.shape
    return ot.unbalanced.lbfgsb_unbalanced(
        np.full(num_nodes, 1.0 / num_nodes), np.full(num_dims, 1.0 / num_dims), -x_np, eps, (lam_q, lam_p),
        c=np.zeros_like(x_np), reg_div='l2', regm_div='kl', numItermax=100000, stopThr=1e-20)


@pytest.mark.parametrize('eps,lam_p,lam_q', [(1.0, 1.0, 1.0), (2.0, 0.5, 5.0)])
def test_converges_to_pot(eps, lam_p, lam_q):
    # The optima have exact zeros (where T >= 0 binds), which the positive iterates only approach.
    x, index = ragged_batch(SIZES, 5, shuffle=True, seed=7)
    plan = uot_plan(x, index, solver='badmm_q', eps=eps, lam_p=lam_p, lam_q=lam_q, rho=1.0, num_iters=2000)
    for b in range(len(SIZES)):
        expected = pot_quadratic_plan(x[index == b], eps, lam_p, lam_q)
        np.testing.assert_allclose(plan[index == b].numpy(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize('uniform', [True, False])
@pytest.mark.parametrize('lam_p,lam_q', [(INF, 1.0), (0.5, INF), (INF, 0.0), (0.8, 2.0)])
@pytest.mark.parametrize('gw', [0.0, 0.6])
def test_matches_dense_reference(uniform, lam_p, lam_q, gw):
    x, index = ragged_batch(SIZES, 5, shuffle=True, seed=2)
    p, q = _priors(index, 5, uniform)
    num_iters = 9
    eps = torch.linspace(0.6, 1.1, num_iters, dtype=x.dtype)
    rho = torch.linspace(0.7, 1.3, num_iters, dtype=x.dtype)
    plan = uot_plan(x, index, solver='badmm_q', eps=eps, lam_p=lam_p, lam_q=lam_q, rho=rho, gw=gw,
                    num_iters=num_iters, p=None if uniform else p, q=None if uniform else q)
    values = dict(eps=eps.tolist(), rho=rho.tolist(), lam_p=[lam_p] * num_iters, lam_q=[lam_q] * num_iters,
                  gw=[gw] * num_iters)
    for b in range(len(SIZES)):
        rows = index == b
        expected = dense_badmm_q(x[rows], p[b], q[rows], **values)
        torch.testing.assert_close(plan[rows], expected, rtol=1e-12, atol=0)


def test_zero_eps_is_badmm():
    x, index = ragged_batch(SIZES, 5, shuffle=True, seed=3)
    kwargs = dict(eps=0.0, lam_p=2.0, lam_q=0.5, rho=0.9, num_iters=6)
    torch.testing.assert_close(uot_plan(x, index, solver='badmm_q', **kwargs),
                               uot_plan(x, index, solver='badmm', **kwargs), rtol=1e-14, atol=0)


def test_presets():
    x, index = ragged_batch([7, 8, 9, 8], 6, seed=10)
    mean = UOTAggregation.from_preset('mean', solver='badmm_q').double()
    torch.testing.assert_close(mean(x, index), scatter(x, index, 0, 4, 'mean'), rtol=0, atol=1e-5)
    max_pool = UOTAggregation.from_preset('max', solver='badmm_q', num_iters=100).double()
    assert (max_pool(x, index) - scatter(x, index, 0, 4, 'max')).abs().max() < 5e-3


def test_layer_learns_its_values():
    x, index = ragged_batch([3, 6, 2], 4, seed=4, dtype=torch.float32)
    layer = UOTAggregation(solver='badmm_q', eps=0.5, lam_p=1.0, num_iters=3)
    assert {name for name, _ in layer.named_parameters()} == {'eps_raw', 'lam_p_raw', 'lam_q_raw', 'rho_raw'}
    layer(x, index).square().sum().backward()
    assert all(param.grad.abs().sum() > 0 for param in layer.parameters())


@pytest.mark.parametrize('kwargs,match', [
    (dict(eps=-0.1), "'eps' must be non-negative"),
    (dict(rho=0.0), "'rho' must be positive"),
    (dict(lam_q=-1.0), "'lam_q' must be non-negative"),
    (dict(gw=[0.1, INF]), "'gw' must be finite"),
])
def test_functional_rejects(kwargs, match):
    x, index = ragged_batch([3, 2], 4, seed=5)
    kwargs = dict(dict(num_iters=2), **kwargs)
    with pytest.raises(ValueError, match=match):
        uot_pool(x, index, solver='badmm_q', **kwargs)


def test_layer_rejects():
    with pytest.raises(ValueError, match="'eps' must be non-negative for solver='badmm_q'"):
        UOTAggregation(solver='badmm_q', eps=-1.0)
    with pytest.raises(ValueError, match="'rho' must be positive"):
        UOTAggregation(solver='badmm_q', rho=0.0)
    # A quadratic regulariser's low-temperature limit is sparse, not softmax pooling.
    with pytest.raises(ValueError, match="no setting for solver='badmm_q'"):
        UOTAggregation.from_preset('softmax', solver='badmm_q')
    with pytest.raises(ValueError, match="'badmm_q'"):
        uot_plan(torch.randn(3, 2), torch.zeros(3, dtype=torch.long), solver='ipot')


def test_fuzz_stays_finite():
    # The fuzz cases of the hardening tests (extreme scales, eps, lam; empty sets; every prior).
    gen = torch.Generator().manual_seed(2)
    for _ in range(60):
        fuzz_case(gen, 'badmm_q')
