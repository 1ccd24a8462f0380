r"""The memory-lean backward against plain autograd through the unrolled iterations (spec §5)."""
import pytest
import torch

from uotp_geometric import UOTAggregation
from uotp_geometric.functional import uot_pool
from tests.uotp_geometric.helpers import ragged_batch

INF = float('inf')


def _grads(solver, memory_efficient, x, index, values, p, q):
    leaves = [x, p, q, *values.values()]
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    x_, p_, q_, *vals = leaves
    out = uot_pool(x_, index, 6, solver=solver, p=p_, q=q_, num_iters=5,
                   memory_efficient=memory_efficient,
                   **dict(zip(values, vals)))
    weight = torch.linspace(-1, 2, out.numel(), dtype=out.dtype).view_as(out)
    (out * weight).sum().backward()
    return out, [t.grad for t in leaves]


@pytest.mark.usefixtures('badmm_backward')
@pytest.mark.parametrize('solver', ['sinkhorn', 'badmm'])
@pytest.mark.parametrize('hard', [False, True])
def test_memory_efficient_gradients_equal_autograd(solver, hard):
    # Sets 1 and 4 are empty; one set has a single node.
    x, index = ragged_batch([4, 0, 9, 1, 0, 6], 5, shuffle=True, seed=3)
    num_iters = 5
    values = dict(eps=torch.linspace(0.4, 1.3, num_iters, dtype=x.dtype),
                  lam_p=torch.tensor(INF if hard else 2.0, dtype=x.dtype),
                  lam_q=torch.tensor(0.7, dtype=x.dtype))
    if solver == 'badmm':
        values['rho'] = torch.tensor(0.8, dtype=x.dtype)
    gen = torch.Generator().manual_seed(0)
    p = torch.rand(6, 5, generator=gen, dtype=x.dtype) + 0.1
    q = torch.rand(x.size(0), generator=gen, dtype=x.dtype) + 0.1
    out_lean, grads_lean = _grads(solver, True, x, index, values, p, q)
    out_plain, grads_plain = _grads(solver, False, x, index, values, p, q)
    torch.testing.assert_close(out_lean, out_plain, rtol=0, atol=1e-12)
    names = ['x', 'p', 'q', *values]
    for name, lean, plain in zip(names, grads_lean, grads_plain):
        if hard and name == 'lam_p':
            assert plain is None or torch.all(plain == 0)
            continue
        assert lean is not None, name
        assert plain.abs().max() > 0, name  # the comparison is not vacuous
        torch.testing.assert_close(lean, plain, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.usefixtures('badmm_backward')
@pytest.mark.parametrize('solver', ['sinkhorn', 'badmm'])
def test_gradcheck(solver):
    x, index = ragged_batch([3, 0, 4], 3, seed=5)
    x.requires_grad_(True)
    eps = torch.tensor([0.9, 0.6, 0.7], dtype=x.dtype, requires_grad=True)
    lam_p = torch.tensor(1.5, dtype=x.dtype, requires_grad=True)
    lam_q = torch.tensor(0.5, dtype=x.dtype, requires_grad=True)
    rho = torch.tensor(1.2, dtype=x.dtype, requires_grad=True)
    q = (torch.rand(x.size(0), dtype=x.dtype) + 0.2).requires_grad_(True)

    def pool(x, eps, lam_p, lam_q, rho, q):
        return uot_pool(x, index, 3, solver=solver, eps=eps, lam_p=lam_p,
                        lam_q=lam_q, rho=rho, q=q, num_iters=3)

    assert torch.autograd.gradcheck(pool, (x, eps, lam_p, lam_q, rho, q))


@pytest.mark.usefixtures('badmm_backward')
@pytest.mark.parametrize('solver', ['sinkhorn', 'badmm'])
def test_module_parameters_get_the_same_gradients(solver):
    x, index = ragged_batch([5, 2, 7], 4, seed=6)
    grads = []
    for memory_efficient in (True, False):
        torch.manual_seed(0)
        aggr = UOTAggregation(solver=solver, num_iters=3, per_iteration=True,
                              lam_p=1.0, prior='attention', channels=4,
                              memory_efficient=memory_efficient).double()
        aggr(x, index).pow(2).sum().backward()
        grads.append({n: p.grad for n, p in aggr.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-10,
                                   atol=1e-12, msg=name)
