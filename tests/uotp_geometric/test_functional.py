import math

import pytest
import torch
from torch_geometric.nn.aggr import SumAggregation

from uotp_geometric import UOTAggregation
from uotp_geometric.functional import uot_diagnostics, uot_plan, uot_pool
from uotp_geometric.segment import available_backends, use_backend
from tests.uotp_geometric.helpers import ragged_batch
from tests.uotp_geometric.solvers.test_rot import dense_badmm, weight

SIZES = [4, 1, 9, 6]


@pytest.mark.parametrize('solver', ['sinkhorn', 'badmm'])
def test_node_permutation_only_permutes_plan_rows(solver):
    x, index = ragged_batch(SIZES, 5)
    perm = torch.randperm(x.size(0), generator=torch.Generator().manual_seed(1))
    kwargs = dict(solver=solver, eps=0.5, lam_p=2.0, lam_q=0.3, num_iters=30)
    plan = uot_plan(x, index, **kwargs)
    plan_perm = uot_plan(x[perm], index[perm], **kwargs)
    torch.testing.assert_close(plan_perm, plan[perm], rtol=0, atol=1e-10)


@pytest.mark.parametrize('solver', ['sinkhorn', 'badmm'])
def test_changing_one_set_leaves_the_others_bit_identical(solver):
    x, index = ragged_batch(SIZES, 5, shuffle=True)
    kwargs = dict(solver=solver, eps=0.7, lam_p=1.0, lam_q=1.0, num_iters=10)
    plan = uot_plan(x, index, **kwargs)
    changed = x.clone()
    changed[index == 2] = 10 * torch.randn_like(changed[index == 2])
    plan_changed = uot_plan(changed, index, **kwargs)
    assert torch.equal(plan[index != 2], plan_changed[index != 2])
    assert not torch.equal(plan[index == 2], plan_changed[index == 2])


@pytest.mark.parametrize('solver', ['sinkhorn', 'badmm'])
def test_pool_is_weighted_sum_of_plan(solver):
    x, index = ragged_batch(SIZES, 3)
    plan = uot_plan(x, index, solver=solver)
    out = uot_pool(x, index, solver=solver)
    for b in range(len(SIZES)):
        expected = 3 * (x[index == b] * plan[index == b]).sum(0)
        torch.testing.assert_close(out[b], expected)


@pytest.mark.parametrize('solver', ['sinkhorn', 'badmm'])
def test_empty_sets_give_zero_rows_and_finite_gradients(solver):
    x, index = ragged_batch([3, 0, 2], 4)
    index[index == 2] = 3  # sets 1, 2 and 4 are empty
    x.requires_grad_(True)
    eps = torch.tensor(0.8, dtype=x.dtype, requires_grad=True)
    lam = torch.tensor(1.5, dtype=x.dtype, requires_grad=True)
    out = uot_pool(x, index, 5, solver=solver, eps=eps, lam_p=lam, lam_q=lam)
    assert out.shape == (5, 4)
    assert torch.equal(out[[1, 2, 4]], torch.zeros(3, 4, dtype=x.dtype))
    out.pow(2).sum().backward()
    for grad in (x.grad, eps.grad, lam.grad):
        assert torch.isfinite(grad).all()


def test_diagnostics_show_hard_marginals_converging():
    x, index = ragged_batch(SIZES, 5)
    inf = float('inf')
    errors = []
    for num_iters in (1, 200):
        plan = uot_plan(x, index, eps=0.5, lam_p=inf, lam_q=inf,
                        num_iters=num_iters)
        diag = uot_diagnostics(plan, index)
        errors.append(diag.dim_marginal_error.max().item())
        # v is updated last, so the node marginal is always met exactly.
        assert diag.node_marginal_error.max() < 1e-12
    assert errors[1] < 1e-9 < errors[0]
    torch.testing.assert_close(diag.mass, torch.ones(len(SIZES),
                                                     dtype=x.dtype))


def test_diagnostics_mass_of_a_known_plan():
    index = torch.tensor([0, 0, 1])
    plan = torch.tensor([[0.2, 0.3], [0.1, 0.4], [0.5, 0.5]])
    diag = uot_diagnostics(plan, index)
    torch.testing.assert_close(diag.mass, torch.tensor([1.0, 1.0]))
    # p = (0.5, 0.5): set 0 has column sums (0.3, 0.7); q = (0.5, 0.5): rows sum to (0.5, 0.5).
    torch.testing.assert_close(diag.dim_marginal_error, torch.tensor([0.4, 0.0]))
    torch.testing.assert_close(diag.node_marginal_error, torch.tensor([0.0, 0.0]))


def dense_sinkhorn_plan(x_set, eps, lam_p, lam_q, num_iters):
    r"""Spec §2 on one set with uniform priors, written out densely: the unrolled log-domain iterations."""
    num_nodes, num_dims = x_set.shape
    log_p, log_q = -math.log(num_dims), -math.log(num_nodes)
    c_p, c_q = weight(lam_p, eps), weight(lam_q, eps)
    u, v = x_set.new_zeros(num_dims), x_set.new_zeros(num_nodes)
    for _ in range(num_iters):
        u = c_p * (log_p - torch.logsumexp(x_set / eps + v[:, None], dim=0))
        v = c_q * (log_q - torch.logsumexp(x_set / eps + u[None, :], dim=1))
    return torch.exp(x_set / eps + u[None, :] + v[:, None])


def dense_plan(solver, x_set, eps, lam_p, lam_q, num_iters):
    if solver == 'sinkhorn':
        return dense_sinkhorn_plan(x_set, eps, lam_p, lam_q, num_iters)
    num_nodes, num_dims = x_set.shape
    p = x_set.new_full((num_dims, ), 1.0 / num_dims)
    q = x_set.new_full((num_nodes, ), 1.0 / num_nodes)
    return dense_badmm(x_set, p, q, *([value] * num_iters for value in (eps, lam_p, lam_q, 1.0, 0.0)))


@pytest.mark.parametrize('backend', ['pyg', 'torch_scatter'])
@pytest.mark.parametrize('solver', ['sinkhorn', 'badmm'])
def test_every_scatter_backend_matches_a_dense_reference(backend, solver):
    if backend not in available_backends():
        pytest.skip(f'scatter backend {backend!r} is not installed')
    sizes = [5, 0, 8, 1]
    x, index = ragged_batch(sizes, 4, shuffle=True)
    x.requires_grad_(True)
    kwargs = dict(eps=0.7, lam_p=1.5, lam_q=0.5, num_iters=6)
    with use_backend(backend):  # BADMM's checkpointed backward recomputes with the backend too
        out = uot_pool(x, index, 4, solver=solver, **kwargs)
        weight_out = torch.linspace(-1, 2, out.numel(), dtype=x.dtype).view_as(out)
        grad, = torch.autograd.grad((out * weight_out).sum(), x)
    expected = torch.zeros_like(out)
    for b, size in enumerate(sizes):
        if size > 0:
            x_set = x[index == b]
            expected[b] = 4 * (x_set * dense_plan(solver, x_set, **kwargs)).sum(dim=0)
    grad_expected, = torch.autograd.grad((expected * weight_out).sum(), x)
    assert out.abs().max() > 0.1  # a real output, not zeros on both sides
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, grad_expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('call', [uot_plan, uot_pool])
def test_defaults_are_those_of_the_layer(call):
    x, index = ragged_batch(SIZES, 5)
    layer = UOTAggregation(learn=False).double()
    out = call(x, index)
    expected = layer.plan(x, index) if call is uot_plan else layer(x, index)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # The layer's lam_p = inf, not the paper's 1.
    assert not torch.allclose(out, call(x, index, lam_p=1.0))


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('call', [uot_plan, uot_pool])
def test_half_inputs_are_solved_in_float32_and_keep_their_dtype(dtype, call):
    x, index = ragged_batch(SIZES, 5, dtype=torch.float32)
    x = x.to(dtype)
    out = call(x, index, eps=0.5)
    assert out.dtype == dtype
    # The float32 solve on the same values, rounded once at the end.
    torch.testing.assert_close(out, call(x.float(), index, eps=0.5).to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize('solver', ['sinkhorn', 'badmm'])
def test_no_feature_columns_give_the_empty_result(solver):
    # As PyG's aggregations: (B, 0) for the pooled output, (N, 0) for the plan, and a gradient.
    x, index = torch.randn(5, 0, requires_grad=True), torch.tensor([0, 0, 1, 2, 2])
    out = uot_pool(x, index, 4, solver=solver)
    assert out.shape == SumAggregation()(x, index, dim_size=4).shape == (4, 0)
    assert uot_plan(x, index, solver=solver).shape == (5, 0)
    out.sum().backward()
    assert x.grad.shape == (5, 0)
