r"""ROT-Pooling in the layer: gw = 0 is UOT-Pooling, gw is learned like the other values, its checks,
and the fuzz of the UOT layer with the structure term."""
import math

import pytest
import torch

import tests.uotp_geometric.test_numerics as test_numerics
from uotp_geometric import UOTAggregation
from uotp_geometric.functional import uot_pool
from tests.uotp_geometric.helpers import ragged_batch
from tests.uotp_geometric.solvers.test_rot import dense_badmm, dense_proximal_sinkhorn

SOLVERS = ['sinkhorn', 'badmm']
INF = math.inf


@pytest.mark.parametrize('solver', SOLVERS)
def test_zero_gw_layer_is_the_uot_layer(solver):
    x, index = ragged_batch([4, 1, 7], 6, seed=1)
    layers = []
    for kwargs in ({}, dict(gw=0.0, prox=0.5, inner_iters=2)):
        torch.manual_seed(0)
        layers.append(UOTAggregation(solver=solver, prior='attention', channels=6, **kwargs).double())
    plain, zero = layers
    assert plain.state_dict().keys() == zero.state_dict().keys()
    assert repr(plain) == repr(zero)
    assert torch.equal(plain(x, index), zero(x, index))


@pytest.mark.parametrize('solver', SOLVERS)
def test_layer_matches_dense_reference(solver):
    sizes = [3, 8, 1, 12]
    x, index = ragged_batch(sizes, 4, shuffle=True, seed=2)
    num_iters = 5
    aggr = UOTAggregation(solver=solver, num_iters=num_iters, eps=0.7, lam_p=INF, lam_q=0.8, gw=0.6,
                          prox=0.4, rho=0.9, inner_iters=3).double()
    out = aggr(x, index)
    # The values as the layer holds them (rounded to float32 before .double()).
    values = {name: aggr.value(name).expand(num_iters).tolist()
              for name in ('eps', 'lam_p', 'lam_q', 'gw')}
    step = aggr.value('prox' if solver == 'sinkhorn' else 'rho').expand(num_iters).tolist()
    p = torch.full((4,), 0.25, dtype=x.dtype)
    for b, size in enumerate(sizes):
        rows = index == b
        q = torch.full((size,), 1.0 / size, dtype=x.dtype)
        if solver == 'sinkhorn':
            plan = dense_proximal_sinkhorn(x[rows], p, q, tau=step, inner_iters=3, **values)
        else:
            plan = dense_badmm(x[rows], p, q, rho=step, **values)
        expected = 4 * (x[rows] * plan).sum(0)
        torch.testing.assert_close(out[b], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize('solver', SOLVERS)
def test_gw_is_learned_per_iteration(solver):
    aggr = UOTAggregation(solver=solver, num_iters=3, eps=1.0, lam_p=2.0, lam_q=1.0, gw=0.3, prox=0.5,
                          per_iteration=True)
    expected = {'eps_raw', 'lam_p_raw', 'lam_q_raw', 'gw_raw'}
    expected |= {'prox_raw'} if solver == 'sinkhorn' else {'rho_raw'}
    assert {name for name, _ in aggr.named_parameters()} == expected
    torch.testing.assert_close(aggr.value('gw'), torch.full((3,), 0.3))
    assert 'gw=0.3' in repr(aggr)
    x, index = ragged_batch([5, 2, 9], 4, seed=3, dtype=torch.float32)
    aggr(x, index).square().sum().backward()
    for name, param in aggr.named_parameters():
        assert param.grad.shape == (3,) and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().min() > 0, name  # every iteration's value takes part
    fixed = UOTAggregation(solver=solver, gw=0.3, learn=False)
    assert not list(fixed.parameters()) and fixed.value('gw').item() == pytest.approx(0.3)


@pytest.mark.parametrize('solver', SOLVERS)
def test_module_parameters_get_the_same_gradients(solver):
    x, index = ragged_batch([5, 2, 7], 4, seed=6)
    grads = []
    for memory_efficient in (True, False):
        torch.manual_seed(0)
        aggr = UOTAggregation(solver=solver, num_iters=3, per_iteration=True, prior='attention',
                              channels=4, gw=0.5, memory_efficient=memory_efficient).double()
        aggr(x, index).pow(2).sum().backward()
        grads.append({n: p.grad for n, p in aggr.named_parameters()})
    assert 'gw_raw' in grads[0] and grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize('solver', SOLVERS)
def test_nan_reaches_only_its_own_row(solver):
    # The similarities and their products are per set: a NaN spoils its own graph only.
    x, index = ragged_batch([3, 5, 2, 4], 6, dtype=torch.float32)
    x[4, 2] = math.nan  # a node of set 1
    out = UOTAggregation(solver=solver, gw=0.5)(x, index)
    assert torch.isnan(out[1]).any() and torch.isfinite(out[[0, 2, 3]]).all()


@pytest.mark.parametrize('gw', [-1.0, INF, math.nan])
def test_bad_gw_is_refused(gw):
    with pytest.raises(ValueError, match="'gw' must be"):
        UOTAggregation(gw=gw)
    x, index = ragged_batch([3], 2)
    with pytest.raises(ValueError, match="'gw' must be"):
        uot_pool(x, index, gw=torch.tensor(gw))


def test_bad_structure_arguments_are_refused():
    x, index = ragged_batch([3, 2], 2)
    with pytest.raises(ValueError, match="'inner_iters' must be an integer >= 1"):
        UOTAggregation(gw=0.1, inner_iters=0)
    with pytest.raises(ValueError, match="'inner_iters' must be an integer >= 1"):
        uot_pool(x, index, gw=0.1, inner_iters=1.5)
    with pytest.raises(ValueError, match="'prox' must be non-negative"):
        uot_pool(x, index, gw=0.1, prox=-1.0)
    with pytest.raises(ValueError, match=r"'gw' must be a scalar or have shape \(4,\)"):
        uot_pool(x, index, gw=[0.1, 0.2], num_iters=4)


@pytest.mark.parametrize('solver', SOLVERS)
def test_fuzz_with_structure(solver, monkeypatch):
    # The cases of the UOT layer's fuzz test (test_numerics.fuzz_case), each with gw drawn from [0, 10].
    gw_gen = torch.Generator().manual_seed(2)

    def layer(**kwargs):
        return UOTAggregation(gw=10 * torch.rand((), generator=gw_gen).item(), **kwargs)

    monkeypatch.setattr(test_numerics, 'UOTAggregation', layer)
    gen = torch.Generator().manual_seed(10 if solver == 'sinkhorn' else 11)
    for _ in range(40 if solver == 'sinkhorn' else 20):  # BADMM's checkpointed backward costs more
        test_numerics.fuzz_case(gen, solver)
