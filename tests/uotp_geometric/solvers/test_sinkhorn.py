import numpy as np
import pytest
import torch

from uotp_geometric.functional import uot_plan
from uotp_geometric.solvers.common import hardness
from tests.uotp_geometric.helpers import pot_plan, ragged_batch

SIZES = [1, 2, 5, 13, 30, 7]


@pytest.mark.parametrize('eps,lam_p,lam_q', [(1, 1, 1), (0.5, 2, 0.3),
                                             (0.2, 10, 0.1), (2, 0.5, 5)])
def test_matches_pot(eps, lam_p, lam_q):
    x, index = ragged_batch(SIZES, 6, shuffle=True)
    plan = uot_plan(x, index, solver='sinkhorn', eps=eps, lam_p=lam_p,
                    lam_q=lam_q, num_iters=3000)
    for b in range(len(SIZES)):
        expected = pot_plan(x[index == b], eps, lam_p, lam_q)
        np.testing.assert_allclose(plan[index == b].numpy(), expected,
                                   rtol=0, atol=1e-7)


def test_matches_pot_with_priors():
    x, index = ragged_batch([4, 9], 5, seed=3)
    gen = np.random.default_rng(0)
    p = gen.uniform(0.1, 1, size=(2, 5))
    q = gen.uniform(0.1, 1, size=13)
    plan = uot_plan(x, index, eps=0.7, lam_p=3.0, lam_q=0.4, num_iters=3000,
                    p=torch.from_numpy(p), q=torch.from_numpy(q))
    for b, rows in enumerate([slice(0, 4), slice(4, 13)]):
        expected = pot_plan(x[rows], 0.7, 3.0, 0.4, p=p[b], q=q[rows])
        np.testing.assert_allclose(plan[rows].numpy(), expected, atol=1e-7)


def test_one_iteration_with_free_node_marginal_is_softmax():
    # lam_p = inf, lam_q = 0: T[n, d] = p_d softmax_n(x_nd / eps), exact after one iteration.
    x, index = ragged_batch([3, 8], 4, seed=1)
    plan = uot_plan(x, index, eps=0.3, lam_p=float('inf'), lam_q=0.0,
                    num_iters=1)
    for b in range(2):
        expected = torch.softmax(x[index == b] / 0.3, dim=0) / 4
        torch.testing.assert_close(plan[index == b], expected, rtol=0,
                                   atol=1e-15)


def test_infinite_eps_gives_product_coupling():
    x, index = ragged_batch([3, 6], 4, seed=2)
    q = torch.rand(9, dtype=torch.float64)
    plan = uot_plan(x, index, eps=float('inf'), lam_p=float('inf'),
                    lam_q=float('inf'), num_iters=1, q=q)
    # T = p q^T with p = 1 / D.
    expected = q.unsqueeze(-1).expand(9, 4) / 4
    torch.testing.assert_close(plan, expected, rtol=0, atol=1e-15)


def test_per_iteration_values_match_pot_at_the_last_value():
    # Whatever the earlier iterations use, the fixed point is the one of the final values.
    x, index = ragged_batch([5, 11], 3, seed=4)
    num_iters = 2000
    eps = torch.full((num_iters, ), 0.8, dtype=torch.float64)
    eps[:10] = 3.0
    plan = uot_plan(x, index, eps=eps, lam_p=2.0, lam_q=1.0,
                    num_iters=num_iters)
    for b in range(2):
        expected = pot_plan(x[index == b], 0.8, 2.0, 1.0)
        np.testing.assert_allclose(plan[index == b].numpy(), expected,
                                   atol=1e-7)


def test_hardness_limits_and_gradients():
    inf = float('inf')
    lam = torch.tensor([inf, 0.0, 2.0, 2.0, inf], dtype=torch.float64)
    scale = torch.tensor([1.0, 1.0, 2.0, inf, inf], dtype=torch.float64,
                         requires_grad=True)
    out = hardness(lam, scale)
    assert out.tolist() == [1.0, 0.0, 0.5, 0.0, 1.0]
    out.sum().backward()
    assert torch.isfinite(scale.grad).all()
    assert scale.grad[2].item() == pytest.approx(-2.0 / 16.0)
