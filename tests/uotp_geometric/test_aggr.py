import math

import numpy as np
import pytest
import torch
from torch_geometric.nn import GATConv, GraphConv, SAGEConv
from torch_geometric.nn.aggr import MultiAggregation, SumAggregation
from torch_geometric.utils import scatter, softmax

import uotp_geometric
from uotp_geometric import UOTAggregation
from tests.uotp_geometric.helpers import pot_plan, ragged_batch

SOLVERS = ['sinkhorn', 'badmm']
INF = float('inf')


def relative_error(out, expected):
    return ((out - expected).abs() / (1 + expected.abs())).max().item()


def test_matches_pot_pooling_in_float64():
    sizes = [3, 8, 1]
    x, index = ragged_batch(sizes, 4, shuffle=True)
    aggr = UOTAggregation(num_iters=3000, eps=0.6, lam_p=2.0, lam_q=0.5).double()
    out = aggr(x, index)
    for b in range(len(sizes)):
        plan = pot_plan(x[index == b], 0.6, 2.0, 0.5)
        expected = 4 * (x[index == b].numpy() * plan).sum(0)
        np.testing.assert_allclose(out[b].detach().numpy(), expected, atol=1e-7)


def test_plan_matches_pot_in_float64():
    sizes = [3, 8, 1]
    x, index = ragged_batch(sizes, 4, shuffle=True)
    aggr = UOTAggregation(num_iters=3000, eps=0.6, lam_p=2.0, lam_q=0.5).double()
    plan = aggr.plan(x, index)
    for b in range(len(sizes)):
        np.testing.assert_allclose(plan[index == b].detach().numpy(), pot_plan(x[index == b], 0.6, 2.0, 0.5),
                                   atol=1e-7)


def test_plan_and_priors_with_an_attention_gate():
    # With lam_q = inf the node marginal is the gate's softmax over each set: the prior q itself.
    x, index = ragged_batch([3, 8, 1], 4, shuffle=True)
    aggr = UOTAggregation(num_iters=50, eps=0.5, lam_p=INF, lam_q=INF, prior='attention', channels=4).double()
    p, log_q = aggr.priors(x, index, 3)
    q = softmax(aggr.gate(x).squeeze(-1), index)
    assert p is None
    torch.testing.assert_close(log_q.exp(), q, rtol=1e-12, atol=1e-12)
    plan = aggr.plan(x, index)
    torch.testing.assert_close(plan.sum(-1), q, rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="shape \\(num_nodes, num_features\\)"):
        aggr.plan(x.unsqueeze(0), index)


def test_learnable_values_start_at_their_initial_values():
    aggr = UOTAggregation(eps=0.3, lam_p=INF, lam_q=2.5)
    names = {name for name, _ in aggr.named_parameters()}
    assert names == {'eps_raw', 'lam_q_raw'}  # inf stays fixed; rho is BADMM's
    assert aggr.value('eps').item() == pytest.approx(0.3)
    assert aggr.value('lam_p').item() == INF
    assert aggr.value('lam_q').item() == pytest.approx(2.5)
    badmm = UOTAggregation(solver='badmm', eps=0.0, lam_p=1.0, rho=2.0)
    assert {n for n, _ in badmm.named_parameters()} == {
        'lam_p_raw', 'lam_q_raw', 'rho_raw'}
    assert list(UOTAggregation(learn=False).parameters()) == []


def test_per_iteration_and_reset_parameters():
    aggr = UOTAggregation(num_iters=5, eps=0.5, per_iteration=True)
    assert aggr.value('eps').shape == (5, )
    with torch.no_grad():
        aggr.eps_raw.add_(1.0)
    assert not torch.allclose(aggr.value('eps'), torch.full((5, ), 0.5))
    aggr.reset_parameters()
    torch.testing.assert_close(aggr.value('eps'), torch.full((5, ), 0.5))


def test_values_receive_gradients():
    x, index = ragged_batch([4, 6], 3, dtype=torch.float32)
    aggr = UOTAggregation(solver='badmm', num_iters=3, per_iteration=True,
                          lam_p=1.0, prior='attention', channels=3)
    aggr(x, index).pow(2).sum().backward()
    for name, param in aggr.named_parameters():
        if name == 'gate.bias':  # a softmax over the set does not see a shared shift
            torch.testing.assert_close(param.grad, torch.zeros(1))
            continue
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_repr():
    assert repr(UOTAggregation(prior='attention', channels=8)) == (
        'UOTAggregation(solver=sinkhorn, num_iters=4, eps=1, lam_p=inf, '
        'lam_q=1, learn=True, per_iteration=False, prior=attention, '
        'channels=8)')
    assert 'rho=0.5' in repr(UOTAggregation(solver='badmm', rho=0.5))


def test_repr_shows_the_learned_values():
    aggr = UOTAggregation(num_iters=3, eps=1.0, lam_q=1.0)
    with torch.no_grad():  # softplus(log(e^v - 1)) = v: as if training had moved eps and lam_q
        aggr.eps_raw.fill_(math.log(math.expm1(0.964)))
        aggr.lam_q_raw.fill_(math.log(math.expm1(0.918)))
    assert repr(aggr).startswith(
        'UOTAggregation(solver=sinkhorn, num_iters=3, eps=0.964, lam_p=inf, lam_q=0.918, ')
    per_iteration = UOTAggregation(num_iters=3, eps=[0.5, 0.25, 2.0])
    assert 'eps=[0.5, 0.25, 2], lam_p=inf, lam_q=1, ' in repr(per_iteration)


@pytest.mark.parametrize('solver', SOLVERS)
def test_values_per_iteration_at_construction(solver):
    eps = torch.tensor([1.0, 0.5, 0.5, 0.5])
    lam_q = [2.0, 1.0, 0.5, 0.25]  # a sequence works too
    aggr = UOTAggregation(solver=solver, eps=eps, lam_q=lam_q, lam_p=2.0)
    assert aggr.per_iteration  # implied
    assert {name for name, _ in aggr.named_parameters()} >= {'eps_raw', 'lam_q_raw', 'lam_p_raw'}
    torch.testing.assert_close(aggr.value('eps'), eps)
    torch.testing.assert_close(aggr.value('lam_q'), torch.tensor(lam_q))
    torch.testing.assert_close(aggr.value('lam_p'), torch.full((4, ), 2.0))
    with torch.no_grad():
        aggr.eps_raw.add_(1.0)
    aggr.reset_parameters()
    torch.testing.assert_close(aggr.value('eps'), eps)
    # The layer is the functional form with those schedules (which test_functional checks densely);
    # fixed values hold them exactly.
    fixed = UOTAggregation(solver=solver, eps=eps, lam_q=lam_q, lam_p=2.0, learn=False).double()
    x, index = ragged_batch([3, 6, 1], 5, seed=4)
    expected = uotp_geometric.uot_pool(x, index, solver=solver, eps=eps.double(), lam_q=lam_q,
                                       lam_p=2.0, num_iters=4)
    torch.testing.assert_close(fixed(x, index), expected, rtol=1e-12, atol=1e-12)
    # An entry of 0 or inf cannot be learned through the softplus: that value stays fixed.
    fixed = UOTAggregation(solver=solver, lam_p=[INF, 1.0, 1.0, 1.0])
    assert 'lam_p_raw' not in dict(fixed.named_parameters())
    assert fixed.value('lam_p').tolist() == [INF, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match=r"'eps' must be a scalar or have shape \(4,\)"):
        UOTAggregation(solver=solver, eps=[1.0, 0.5])
    with pytest.raises(ValueError, match="'lam_q' must be non-negative"):
        UOTAggregation(solver=solver, lam_q=[1.0, -1.0, 1.0, 1.0])


@pytest.mark.parametrize('prior', ['uniform', 'attention', 'power'])
@pytest.mark.parametrize('solver', SOLVERS)
def test_bfloat16_model_trains_a_step(solver, prior):
    # model.to(torch.bfloat16): the readout returns bf16, so the next bf16 Linear composes.
    torch.manual_seed(0)
    x, index = ragged_batch([3, 5, 2, 4], 6, dtype=torch.float32)
    y = torch.tensor([0, 1, 1, 0])
    model = torch.nn.ModuleDict(dict(
        lin=torch.nn.Linear(6, 8),
        pool=UOTAggregation(solver=solver, prior=prior, channels=8, lam_p=1.0),
        out=torch.nn.Linear(8, 2))).to(torch.bfloat16)
    before = model['out'].weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pooled = model['pool'](model['lin'](x.to(torch.bfloat16)), index)
    assert pooled.dtype == torch.bfloat16 and torch.isfinite(pooled).all()
    loss = torch.nn.functional.cross_entropy(model['out'](pooled), y)
    loss.backward()
    optimizer.step()
    for name, param in model.named_parameters():
        assert param.dtype == torch.bfloat16 and torch.isfinite(param).all(), name
        assert torch.isfinite(param.grad).all(), name
    assert model['pool'].eps_raw.grad.abs().sum() > 0  # the readout's values learn too
    assert not torch.equal(model['out'].weight, before)


@pytest.mark.parametrize('solver', SOLVERS)
def test_no_feature_columns_give_the_empty_result(solver):
    x = torch.randn(5, 0, requires_grad=True)
    index = torch.tensor([0, 0, 1, 2, 2])
    aggr = UOTAggregation(solver=solver)
    out = aggr(x, index, dim_size=4)
    assert out.shape == SumAggregation()(x, index, dim_size=4).shape == (4, 0)
    assert aggr.plan(x, index).shape == (5, 0)
    assert aggr(torch.randn(7, 3, 0), torch.tensor([0, 1, 1, 0, 2, 2, 2]), dim=0).shape == (3, 3, 0)
    out.sum().backward()
    assert x.grad.shape == (5, 0)


@pytest.mark.parametrize('solver', SOLVERS)
def test_index_and_ptr_agree(solver):
    x, index = ragged_batch([3, 0, 5], 4, dtype=torch.float32)
    aggr = UOTAggregation(solver=solver)
    ptr = torch.tensor([0, 3, 3, 8])
    torch.testing.assert_close(aggr(x, ptr=ptr), aggr(x, index, dim_size=3))


@pytest.mark.parametrize('solver', SOLVERS)
def test_empty_set_row_is_exactly_zero(solver):
    x, index = ragged_batch([3, 5], 4, dtype=torch.float32)
    out = UOTAggregation(solver=solver)(x, index, dim_size=4)
    assert torch.equal(out[2:], torch.zeros(2, 4))
    assert out[:2].abs().sum() > 0


@pytest.mark.parametrize('solver', SOLVERS)
def test_extra_axes_are_pooled_independently(solver):
    # [E, heads, C], aggregated over dim 0, as in GATConv.
    x = torch.randn(9, 3, 4)
    index = torch.tensor([0, 2, 1, 0, 2, 2, 1, 0, 0])
    aggr = UOTAggregation(solver=solver, prior='attention', channels=4)
    out = aggr(x, index, dim=0)
    assert out.shape == (3, 3, 4)
    for head in range(3):
        torch.testing.assert_close(out[:, head], aggr(x[:, head], index))
    # A leading batch axis, aggregated over dim -2.
    y = torch.randn(2, 9, 4)
    out = aggr(y, index, dim=-2)
    assert out.shape == (2, 3, 4)
    torch.testing.assert_close(out[1], aggr(y[1], index))


def test_rejects_the_feature_axis_as_set_axis():
    with pytest.raises(ValueError, match='last'):
        UOTAggregation()(torch.randn(4, 3), torch.tensor([0, 0, 1]), dim=-1)


def test_resolver_registration_is_idempotent():
    uotp_geometric.register()
    uotp_geometric.register()
    from torch_geometric.nn.resolver import aggregation_resolver
    aggr = aggregation_resolver('uot', solver='badmm', num_iters=2)
    assert isinstance(aggr, UOTAggregation) and aggr.solver == 'badmm'


@pytest.mark.parametrize('layer', [
    lambda: SAGEConv(16, 32, aggr='uot'),
    lambda: GraphConv(16, 32, aggr='uot'),
    lambda: SAGEConv(16, 32, aggr='uot',
                     aggr_kwargs=dict(solver='badmm', num_iters=3)),
    lambda: GATConv(16, 8, heads=2, aggr='uot'),
])
def test_message_passing_layers(layer):
    torch.manual_seed(0)
    conv = layer()
    x = torch.randn(10, 16, requires_grad=True)
    edge_index = torch.randint(0, 10, (2, 40))
    out = conv(x, edge_index)
    assert out.shape[0] == 10 and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    uot = [m for m in conv.modules() if isinstance(m, UOTAggregation)]
    assert len(uot) == 1
    assert all(p.grad is not None for p in uot[0].parameters())


def test_multi_aggregation():
    aggr = MultiAggregation(['mean', 'uot'])
    x, index = ragged_batch([2, 4], 6, dtype=torch.float32)
    out = aggr(x, index, dim_size=3)
    assert out.shape == (3, 12)
    torch.testing.assert_close(out[:2, :6], scatter(x, index, 0, 2, 'mean'))
    assert torch.equal(out[2], torch.zeros(12))


# Presets (spec §4) ###########################################################

@pytest.fixture
def batch():
    x, index = ragged_batch([1, 7, 30, 3, 12, 55], 16, dtype=torch.float32,
                            shuffle=True, scale=2.0)
    return x, index, 6


@pytest.mark.parametrize('solver', SOLVERS)
@pytest.mark.parametrize('name,reduce,tol', [('mean', 'mean', 1e-4),
                                             ('sum', 'sum', 1e-3),
                                             ('max', 'max', 2e-2)])
def test_presets_reproduce_scatter(batch, solver, name, reduce, tol):
    x, index, num_sets = batch
    aggr = UOTAggregation.from_preset(name, solver=solver)
    assert list(aggr.parameters()) == []
    out = aggr(x, index, dim_size=num_sets)
    assert relative_error(out, scatter(x, index, 0, num_sets, reduce)) <= tol


@pytest.mark.parametrize('solver', SOLVERS)
def test_softmax_preset(batch, solver):
    x, index, num_sets = batch
    aggr = UOTAggregation.from_preset('softmax', solver=solver, t=0.7)
    expected = scatter(softmax(x / 0.7, index) * x, index, 0, num_sets)
    out = aggr(x, index, dim_size=num_sets)
    assert (out - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize('solver', SOLVERS)
def test_attention_preset(batch, solver):
    x, index, num_sets = batch
    aggr = UOTAggregation.from_preset('attention', solver=solver, channels=16)
    q = softmax(aggr.gate(x).squeeze(-1), index)
    expected = scatter(q.unsqueeze(-1) * x, index, 0, num_sets)
    out = aggr(x, index, dim_size=num_sets)
    assert (out - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize('name', ['softmax', 'max', 'attention'])
def test_learning_from_a_preset_moves_away_from_it(batch, name):
    x, index, num_sets = batch
    kwargs = dict(channels=16) if name == 'attention' else {}
    aggr = UOTAggregation.from_preset(name, learn=True, **kwargs)
    start = aggr(x, index, dim_size=num_sets).detach()
    # The softplus moves small values multiplicatively, so max needs a few steps to leave eps ~ 0.
    optimizer = torch.optim.Adam(aggr.parameters(), lr=0.3)
    for _ in range(20):
        optimizer.zero_grad()
        loss = (aggr(x, index, dim_size=num_sets) - 1.0).pow(2).mean()
        loss.backward()
        optimizer.step()
    assert (aggr(x, index, dim_size=num_sets) - start).abs().max() > 1e-2


def test_preset_errors():
    with pytest.raises(ValueError, match='Unknown preset'):
        UOTAggregation.from_preset('median')
    with pytest.raises(ValueError, match='channels'):
        UOTAggregation.from_preset('attention')
    with pytest.raises(ValueError, match="'t'"):
        UOTAggregation.from_preset('mean', t=0.5)


# The power prior (spec §8): a plan of mass N^a with a learned exponent a.

def _per_set(x, index, reduce):
    r"""A dense per-set float64 reference: ``reduce`` applied to each set's rows."""
    return torch.stack([reduce(x[index == b]) for b in range(int(index.max()) + 1)])


# The mean limit: Sinkhorn at eps = inf is exact, BADMM's rho = 1e6 is a limit.
MEAN_LIMIT = [('sinkhorn', dict(eps=INF), 1e-12), ('badmm', dict(eps=0.0, rho=1e6), 1e-5)]


@pytest.mark.parametrize('solver,setting,tol', MEAN_LIMIT)
@pytest.mark.parametrize('a', [0.0, 0.25, 1.0])
def test_power_prior_in_the_mean_limit_is_size_to_the_a_times_mean(solver, setting, tol, a):
    x, index = ragged_batch([3, 8, 1, 5], 4, shuffle=True)
    aggr = UOTAggregation(solver, num_iters=1, lam_p=INF, lam_q=INF, prior='power', mass_exponent=a,
                          learn=False, **setting).double()
    sizes = torch.tensor([3., 8., 1., 5.], dtype=torch.float64)
    expected = sizes.pow(a).unsqueeze(-1) * _per_set(x, index, lambda s: s.mean(0))
    assert relative_error(aggr(x, index), expected) < tol


def test_power_prior_in_the_softmax_limit():
    x, index = ragged_batch([3, 8, 1, 5], 4, shuffle=True)
    aggr = UOTAggregation(num_iters=1, eps=0.5, lam_p=INF, lam_q=0.0, prior='power', mass_exponent=0.375,
                          learn=False).double()
    sizes = torch.tensor([3., 8., 1., 5.], dtype=torch.float64)
    expected = sizes.pow(0.375).unsqueeze(-1) * _per_set(x, index, lambda s: (s.div(0.5).softmax(0) * s).sum(0))
    assert relative_error(aggr(x, index), expected) < 1e-12


@pytest.mark.parametrize('solver,num_iters', [('sinkhorn', 3000), ('badmm', 3000)])
def test_power_prior_with_a_soft_marginal_matches_pot(solver, num_iters):
    # With a finite lam_p the mass N^a also reshapes the plan, so it is no rescaled uniform plan.
    sizes, a = [3, 8, 1], 0.3
    x, index = ragged_batch(sizes, 4, shuffle=True)
    aggr = UOTAggregation(solver, num_iters=num_iters, eps=0.6, lam_p=2.0, lam_q=0.5, prior='power',
                          mass_exponent=a, learn=False).double()
    plan = aggr.plan(x, index)
    for b, n in enumerate(sizes):
        expected = pot_plan(x[index == b], 0.6, 2.0, 0.5, p=np.full(4, n ** a / 4), q=np.full(n, n ** (a - 1)))
        np.testing.assert_allclose(plan[index == b].detach().numpy(), expected, rtol=1e-6, atol=1e-12)


def test_power_prior_exponent_gets_the_closed_form_gradient():
    # Mean limit: z_b = N_b^a mean_b(x), so d(sum z)/da = sum_b log(N_b) N_b^a sum_d mean_b(x)_d.
    x, index = ragged_batch([3, 8, 1, 5], 4, shuffle=True)
    aggr = UOTAggregation(num_iters=1, eps=INF, lam_p=INF, lam_q=INF, prior='power', mass_exponent=0.3).double()
    aggr(x, index).sum().backward()
    a = aggr.value('mass_exponent').detach()
    sizes = torch.tensor([3., 8., 1., 5.], dtype=torch.float64)
    grad_a = (sizes.log() * sizes.pow(a) * _per_set(x, index, lambda s: s.mean(0)).sum(-1)).sum()
    expected = grad_a * a * (1 - a)  # through the sigmoid that keeps a in [0, 1]
    torch.testing.assert_close(aggr.mass_exponent_raw.grad, expected.reshape(1), rtol=1e-12, atol=0)


def test_power_prior_values_and_errors():
    aggr = UOTAggregation(prior='power', mass_exponent=0.25)
    assert 'mass_exponent_raw' in dict(aggr.named_parameters())
    assert aggr.value('mass_exponent').item() == pytest.approx(0.25)
    assert 'mass_exponent=0.25' in repr(aggr)
    for end in (0.0, 1.0):  # the ends are the uniform and counting priors, and stay fixed
        fixed = UOTAggregation(prior='power', mass_exponent=end)
        assert 'mass_exponent_raw' not in dict(fixed.named_parameters())
        assert fixed.value('mass_exponent').item() == end
    for bad in (-0.1, 1.5, float('nan')):
        with pytest.raises(ValueError, match="'mass_exponent' must lie in \\[0, 1\\]"):
            UOTAggregation(prior='power', mass_exponent=bad)
    assert 'mass_exponent' not in UOTAggregation().init_values  # only the power prior has it
