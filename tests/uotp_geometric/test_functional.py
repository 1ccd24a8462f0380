import pytest
import torch

from uotp_geometric.functional import uot_diagnostics, uot_plan, uot_pool
from uotp_geometric.segment import available_backends, use_backend
from tests.uotp_geometric.helpers import ragged_batch

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


@pytest.mark.parametrize('backend', available_backends())
@pytest.mark.parametrize('solver', ['sinkhorn', 'badmm'])
def test_every_scatter_backend_gives_the_same_pooling(backend, solver):
    x, index = ragged_batch([5, 0, 8, 1], 4, shuffle=True)
    x.requires_grad_(True)
    expected = uot_pool(x, index, 4, solver=solver, num_iters=6)
    grad_expected, = torch.autograd.grad(expected.sum(), x)
    with use_backend(backend):
        out = uot_pool(x, index, 4, solver=solver, num_iters=6)
        grad, = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, grad_expected, rtol=0, atol=1e-12)
