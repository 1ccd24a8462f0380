import numpy as np
import pytest
import torch
from torch_geometric.utils import scatter

from uotp_geometric.functional import uot_plan, uot_pool
from tests.uotp_geometric.helpers import pot_plan, ragged_batch

SIZES = [2, 5, 9, 20, 3]


@pytest.mark.parametrize('eps,lam_p,lam_q,rho,num_iters,rtol', [(1, 1, 1, 1.0, 8000, 1e-7),
                                                                  (0.5, 2, 0.3, 30.0, 20000, 2e-5),
                                                                  (2, 0.5, 5, 1.0, 5000, 1e-7)])
def test_matches_pot(eps, lam_p, lam_q, rho, num_iters, rtol):
    # Relative error on every entry. BADMM converges linearly, at a rate that depends on rho: the first
    # and last cases reach ~1e-9 and below; the second, with a small lam_q, is the slowest (1.1e-5 after
    # 20000 iterations with the best step found, rho = 30).
    x, index = ragged_batch(SIZES, 5, shuffle=True, seed=7)
    plan = uot_plan(x, index, solver='badmm', eps=eps, lam_p=lam_p,
                    lam_q=lam_q, rho=rho, num_iters=num_iters)
    for b in range(len(SIZES)):
        expected = pot_plan(x[index == b], eps, lam_p, lam_q)
        np.testing.assert_allclose(plan[index == b].numpy(), expected,
                                   rtol=rtol, atol=0)


def test_marginal_penalties_act():
    # The published BADMM ignores lam_p and lam_q; here they change the plan.
    x, index = ragged_batch(SIZES, 5, seed=8)
    plans = [
        uot_plan(x, index, solver='badmm', eps=1.0, lam_p=1.0, lam_q=lam_q,
                 num_iters=20) for lam_q in (0.1, 10.0)
    ]
    assert (plans[0] - plans[1]).abs().max() > 1e-3
    plans = [
        uot_plan(x, index, solver='badmm', eps=1.0, lam_p=lam_p, lam_q=1.0,
                 num_iters=20) for lam_p in (0.1, 10.0)
    ]
    assert (plans[0] - plans[1]).abs().max() > 1e-3


def test_dimension_marginal_of_the_plan_is_exact_when_hard():
    x, index = ragged_batch(SIZES, 5, seed=9)
    plan = uot_plan(x, index, solver='badmm', eps=0.5, lam_p=float('inf'),
                    lam_q=1.0, num_iters=7)
    col_sums = scatter(plan, index, 0, len(SIZES), 'sum')
    torch.testing.assert_close(col_sums, torch.full_like(col_sums, 0.2),
                               rtol=0, atol=1e-12)


def test_zero_eps_reaches_max_pooling():
    x, index = ragged_batch([7, 8, 9, 8], 6, seed=10)
    out = uot_pool(x, index, solver='badmm', eps=0.0, lam_p=float('inf'),
                   lam_q=0.0, rho=1.0, num_iters=100)
    expected = scatter(x, index, 0, 4, 'max')
    assert (out - expected).abs().max() < 5e-3


@pytest.mark.usefixtures('badmm_backward')
@pytest.mark.parametrize('num_iters', [4, 9, 10])
def test_segmented_checkpoints_give_autograd_gradients(num_iters):
    # K = 9 and 10 run as outer checkpoints of 3 and 4 iterations (the last one shorter), K = 4 as one
    # checkpoint per iteration: all must backpropagate what plain autograd through the iterations does.
    x, index = ragged_batch([3, 0, 6, 1], 4, shuffle=True, seed=11)
    grads = []
    for memory_efficient in (True, False):
        leaves = [t.clone().requires_grad_(True) for t in
                  (x, torch.tensor(0.6, dtype=x.dtype), torch.tensor(1.3, dtype=x.dtype))]
        out = uot_pool(leaves[0], index, 4, solver='badmm', eps=leaves[1], rho=leaves[2], lam_p=2.0,
                       lam_q=0.5, num_iters=num_iters, memory_efficient=memory_efficient)
        out.pow(2).sum().backward()
        grads.append([t.grad for t in leaves])
    for lean, plain in zip(*grads):
        assert plain.abs().max() > 0
        torch.testing.assert_close(lean, plain, rtol=0, atol=1e-10)


@pytest.mark.usefixtures('badmm_backward')
@pytest.mark.parametrize('solver', ['badmm', 'badmm_q'])
@pytest.mark.parametrize('gw', [0.0, 0.4])
@pytest.mark.parametrize('num_iters', [1, 4, 10, 17])
def test_adjoint_equals_autograd(solver, gw, num_iters):
    # Every value per iteration and learned, a (B, D) dimension prior and a log node prior, empty sets
    # and a single-node set. K = 10 recomputes spans of 4, 4 and 2 iterations; K = 17 spans of 7, 7 and
    # 3, each in spans of 3 (three levels).
    x, index = ragged_batch([4, 0, 9, 1, 6], 5, shuffle=True, seed=12)
    gen = torch.Generator().manual_seed(1)
    inputs = dict(x=x, p=torch.rand(5, 5, generator=gen, dtype=x.dtype) + 0.1,
                  log_q=torch.randn(x.size(0), generator=gen, dtype=x.dtype),
                  eps=torch.linspace(0.4, 1.3, num_iters, dtype=x.dtype),
                  lam_p=torch.linspace(2.0, 0.5, num_iters, dtype=x.dtype),
                  lam_q=torch.linspace(0.7, 3.0, num_iters, dtype=x.dtype),
                  rho=torch.linspace(0.8, 1.5, num_iters, dtype=x.dtype))
    if gw:
        inputs['gw'] = torch.linspace(gw, gw / 4, num_iters, dtype=x.dtype)
    weight = torch.randn(5, 5, generator=gen, dtype=x.dtype)
    grads = []
    for memory_efficient in (True, False):
        leaves = {name: t.clone().requires_grad_(True) for name, t in inputs.items()}
        out = uot_pool(index=index, dim_size=5, solver=solver, num_iters=num_iters,
                       memory_efficient=memory_efficient, **leaves)
        (out * weight).sum().backward()
        grads.append({name: t.grad for name, t in leaves.items()})
    for name, plain in grads[1].items():
        assert plain.abs().max() > 0, name
        torch.testing.assert_close(grads[0][name], plain, rtol=0, atol=1e-10 * plain.abs().max().item(),
                                   msg=name)
