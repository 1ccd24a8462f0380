import numpy as np
import pytest
import torch

from uotp_geometric.functional import uot_plan, uot_pool
from uotp_geometric.solvers.common import MAX_LOG_MASS, hardness
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


def _pool_and_grads(x, index, num_sets, memory_efficient, **kwargs):
    leaves = {name: torch.as_tensor(value, dtype=x.dtype).clone().requires_grad_(True)
              for name, value in kwargs.items()}
    x = x.detach().clone().requires_grad_(True)
    out = uot_pool(x, index, num_sets, num_iters=4, memory_efficient=memory_efficient, **leaves)
    weight = torch.linspace(-1, 2, out.numel(), dtype=out.dtype).view_as(out)
    (out * weight).sum().backward()
    return out, [x.grad, *(leaf.grad for leaf in leaves.values())]


@pytest.mark.parametrize('scale', [1.0, 60.0])
@pytest.mark.parametrize('lam_p,lam_q', [(2.0, 0.7), (float('inf'), 0.0), (0.5, float('inf'))])
def test_one_eps_scaling_domain_equals_plain_autograd(scale, lam_p, lam_q):
    # One eps for all iterations runs in the scaling domain (one kernel exponential); memory_efficient=False
    # is the log-domain iteration under plain autograd. scale = 60 with eps = 0.5 spans e^240 within a set:
    # past float32's range, within float64's.
    x, index = ragged_batch([4, 0, 9, 1, 6], 5, shuffle=True, seed=12, scale=scale)
    kwargs = dict(eps=0.5, lam_p=lam_p, lam_q=lam_q)
    out_scaling, grads_scaling = _pool_and_grads(x, index, 5, True, **kwargs)
    out_plain, grads_plain = _pool_and_grads(x, index, 5, False, **kwargs)
    torch.testing.assert_close(out_scaling, out_plain, rtol=1e-12, atol=1e-12)
    for name, lean, plain in zip(['x', *kwargs], grads_scaling, grads_plain):
        if plain is None or not plain.abs().max() > 0:  # a hard or free marginal's lam has no gradient
            assert lean is None or lean.abs().max() == 0, name
            continue
        torch.testing.assert_close(lean, plain, rtol=1e-10, atol=1e-10, msg=name)


def test_scaling_domain_falls_back_beyond_the_float_range():
    # In float32, sets spanning e^600 underflow the kernel's sums: the log domain must take over and give
    # what the float64 computation gives.
    x, index = ragged_batch([5, 3, 8], 6, seed=13, scale=300.0)
    kwargs = dict(eps=1.0, lam_p=1.0, lam_q=1.0)
    out, grads = _pool_and_grads(x.float(), index, 3, True, **kwargs)
    expected, expected_grads = _pool_and_grads(x, index, 3, False, **kwargs)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(grads[0].double(), expected_grads[0], rtol=1e-4, atol=1e-3)


def test_pool_matches_pot():
    # One eps: the pooled vectors are read from the scaling-domain kernel, never from a formed plan.
    x, index = ragged_batch(SIZES, 6, shuffle=True, seed=6)
    out = uot_pool(x, index, eps=0.6, lam_p=2.0, lam_q=0.4, num_iters=3000)
    for b in range(len(SIZES)):
        x_set = x[index == b]
        expected = 6 * (x_set.numpy() * pot_plan(x_set, 0.6, 2.0, 0.4)).sum(axis=0)
        np.testing.assert_allclose(out[b].numpy(), expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize('scale', [3.0, 5.0])
def test_pool_with_free_marginals_is_closed_form(scale):
    # lam_p = lam_q = 0: u = v = 0, so T = exp(x / eps), capped at e^MAX_LOG_MASS. At scale 5 entries pass
    # the cap, which the pooled path must notice (and hand to the capped log domain); at scale 3 none do.
    x, index = ragged_batch([4, 0, 9, 1, 6], 5, seed=12, scale=scale)
    eps = 0.5
    out, grads = _pool_and_grads(x, index, 5, True, eps=eps, lam_p=0.0, lam_q=0.0)
    logits = x / eps
    capped = logits > MAX_LOG_MASS
    assert bool(capped.any()) == (scale == 5.0)
    plan = logits.clamp(max=MAX_LOG_MASS).exp()
    expected = 5 * torch.zeros(5, 5, dtype=x.dtype).index_add_(0, index, x * plan)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=0)
    # d z / d x = D w T (1 + x / eps) below the cap and D w T above it; d z / d eps = -D w x T x / eps^2.
    weight = 5 * torch.linspace(-1, 2, out.numel(), dtype=x.dtype).view_as(out)[index]
    grad_x = weight * plan * (1 + logits.masked_fill(capped, 0.0))
    grad_eps = -(weight * x * plan * logits.masked_fill(capped, 0.0) / eps).sum()
    torch.testing.assert_close(grads[0], grad_x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[1], grad_eps, rtol=1e-12, atol=1e-12)


def test_one_eps_gradcheck():
    x, index = ragged_batch([3, 0, 4], 3, seed=5)
    x.requires_grad_(True)
    eps, lam_p, lam_q = (torch.tensor(v, dtype=x.dtype, requires_grad=True) for v in (0.8, 1.5, 0.5))
    q = (torch.rand(x.size(0), dtype=x.dtype) + 0.2).requires_grad_(True)

    def pool(x, eps, lam_p, lam_q, q):
        return uot_pool(x, index, 3, eps=eps, lam_p=lam_p, lam_q=lam_q, q=q, num_iters=3)

    assert torch.autograd.gradcheck(pool, (x, eps, lam_p, lam_q, q))
