import importlib
import math
import sys

import numpy as np
import pytest
import torch

from uotp_geometric import UOTAggregation
from uotp_geometric.functional import uot_plan
from uotp_geometric.plot import learned_values, plot_parameters, plot_plan
from tests.uotp_geometric.helpers import pot_plan, ragged_batch

SIZES = [3, 7, 5]
GRAPH = 1  # the set drawn


def _axes(fig):
    return {ax.get_label(): ax for ax in fig.axes}


def _bar_sizes(ax, horizontal=False):
    return np.array([patch.get_width() if horizontal else patch.get_height() for patch in ax.patches])


def _inverse_softplus(value):
    return math.log(math.expm1(value))


def test_heatmap_is_pots_plan():
    x, index = ragged_batch(SIZES, 6, seed=1, shuffle=True)
    fig = plot_plan(x, index, graph=GRAPH, eps=0.5, lam_p=2.0, lam_q=0.3, num_iters=3000)
    drawn = np.asarray(_axes(fig)['plan'].images[0].get_array())
    np.testing.assert_allclose(drawn, pot_plan(x[index == GRAPH], 0.5, 2.0, 0.3), rtol=0, atol=1e-7)


def test_marginals_priors_and_pooled_vector_from_a_given_plan():
    x, index = ragged_batch(SIZES, 6, seed=2, shuffle=True)
    q = torch.rand(x.size(0), generator=torch.Generator().manual_seed(0), dtype=x.dtype) + 0.1
    plan = uot_plan(x, index, eps=0.7, lam_p=1.0, lam_q=2.0, q=q, num_iters=20)
    fig = plot_plan(x, index, graph=GRAPH, plan=plan, q=q)
    axes = _axes(fig)
    rows = (index == GRAPH).numpy()
    x_set, t_set, q_set = x.numpy()[rows], plan.numpy()[rows], q.numpy()[rows]
    np.testing.assert_array_equal(np.asarray(axes['plan'].images[0].get_array()), t_set)
    np.testing.assert_allclose(_bar_sizes(axes['node marginal'], horizontal=True), t_set.sum(axis=1), rtol=1e-12)
    np.testing.assert_allclose(axes['node marginal'].lines[0].get_xdata(), q_set, rtol=1e-12)
    np.testing.assert_allclose(_bar_sizes(axes['dim marginal']), t_set.sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(axes['dim marginal'].lines[0].get_ydata(), np.full(6, 1 / 6), rtol=1e-12)
    pooled = axes['pooled']
    np.testing.assert_allclose(_bar_sizes(pooled), 6 * (x_set * t_set).sum(axis=0), rtol=1e-10)
    np.testing.assert_allclose(pooled.lines[0].get_ydata(), x_set.max(axis=0))
    np.testing.assert_allclose(pooled.lines[1].get_ydata(), x_set.mean(axis=0))


def test_readable_figure():
    x, index = ragged_batch(SIZES, 6, seed=3)
    names = ['C', 'N', 'O', 'C', 'C', 'Cl', 'Br']
    fig = plot_plan(x, index, graph=GRAPH, node_labels=names, title='a molecule')
    axes = _axes(fig)
    colorbar = axes['plan'].images[0].colorbar
    assert colorbar is not None and colorbar.ax.get_ylabel() == 'plan entry T[n, d]'
    assert [t.get_text() for t in axes['plan'].get_yticklabels()] == [f'{n} {a}' for n, a in enumerate(names)]
    assert axes['plan'].get_ylabel() and axes['plan'].get_title()
    assert axes['pooled'].get_xlabel() == 'feature dimension d'
    assert all(axes[name].get_ylabel() for name in ('dim marginal', 'pooled'))
    assert axes['node marginal'].get_xlabel() == 'node mass'
    assert fig.get_suptitle().startswith('a molecule')


def test_mean_and_softmax_presets_give_their_closed_form_plans():
    x, index = ragged_batch(SIZES, 4, seed=4)
    rows = (index == GRAPH).numpy()
    num_nodes = int(rows.sum())
    fig = plot_plan(x, index, graph=GRAPH, layer=UOTAggregation.from_preset('mean'))
    drawn = np.asarray(_axes(fig)['plan'].images[0].get_array())
    np.testing.assert_allclose(drawn, np.full((num_nodes, 4), 1 / (4 * num_nodes)), rtol=1e-5)

    fig = plot_plan(x, index, graph=GRAPH, layer=UOTAggregation.from_preset('softmax', t=0.5))
    x_set = x.numpy()[rows]
    weights = np.exp(x_set / 0.5) / np.exp(x_set / 0.5).sum(axis=0)
    np.testing.assert_allclose(np.asarray(_axes(fig)['plan'].images[0].get_array()), weights / 4, rtol=1e-9)


def test_attention_layer_draws_its_gate_as_the_node_prior():
    torch.manual_seed(0)
    x, index = ragged_batch(SIZES, 5, seed=5, dtype=torch.float32)
    layer = UOTAggregation(eps=0.6, lam_p=math.inf, lam_q=2.0, prior='attention', channels=5)
    fig = plot_plan(x, index, graph=GRAPH, layer=layer)
    rows = index == GRAPH
    with torch.no_grad():
        score = layer.gate(x[rows]).double().view(-1)
    q_set = torch.softmax(score, dim=0)
    q = torch.zeros(x.size(0), dtype=torch.float64)
    q[rows] = q_set
    q[~rows] = 1.0  # the other sets do not matter for this one
    expected = uot_plan(x.double(), index, eps=0.6, lam_p=math.inf, lam_q=2.0, q=q)[rows]
    axes = _axes(fig)
    np.testing.assert_allclose(axes['node marginal'].lines[0].get_xdata(), q_set.numpy(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(axes['plan'].images[0].get_array()), expected.numpy(), rtol=1e-4,
                               atol=1e-7)


@pytest.mark.parametrize('kwargs,match', [
    (dict(graph=3), "'graph'"),
    (dict(plan=torch.zeros(15, 4), layer=UOTAggregation()), 'not both'),
    (dict(plan=torch.zeros(15, 3)), "'plan' must have the shape"),
    (dict(plan=torch.zeros(15, 4), eps=0.3), 'Solver arguments'),
    (dict(layer=UOTAggregation(), q=torch.ones(15)), "'p' or 'q'"),
    (dict(node_labels=['C']), "'node_labels'"),
])
def test_bad_arguments(kwargs, match):
    x, index = ragged_batch(SIZES, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match=match):
        plot_plan(x, index, **{'graph': GRAPH, **kwargs})


def test_a_layer_the_plot_cannot_reproduce_is_an_error():
    class Scaled(UOTAggregation):
        def forward(self, *args, **kwargs):
            return 2 * super().forward(*args, **kwargs)

    x, index = ragged_batch(SIZES, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match='does not reproduce'):
        plot_plan(x, index, layer=Scaled())


def test_missing_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, 'matplotlib.figure', None)
    monkeypatch.delitem(sys.modules, 'uotp_geometric.plot')
    with pytest.raises(ImportError, match=r'uotp_geometric\[plot\]'):
        importlib.import_module('uotp_geometric.plot')


def test_parameters_of_a_per_iteration_layer():
    layer = UOTAggregation(solver='badmm', num_iters=3, eps=0.5, lam_p=math.inf, lam_q=1.0, per_iteration=True)
    eps, lam_q, rho = [0.3, 0.5, 0.8], [2.0, 1.0, 0.25], [1.0, 1.5, 2.0]
    with torch.no_grad():
        layer.eps_raw.copy_(torch.tensor([_inverse_softplus(v) for v in eps]))
        layer.lam_q_raw.copy_(torch.tensor([_inverse_softplus(v) for v in lam_q]))
        layer.rho_raw.copy_(torch.tensor([_inverse_softplus(v) for v in rho]))
    axes = _axes(plot_parameters(layer))
    assert set(axes) == {'eps', 'lam_p', 'lam_q', 'rho'}
    for name, values in dict(eps=eps, lam_q=lam_q, rho=rho).items():
        line = axes[name].lines[0]
        np.testing.assert_array_equal(line.get_xdata(), [0, 1, 2])
        np.testing.assert_allclose(line.get_ydata(), values, rtol=1e-6)
        assert axes[name].get_xlabel() == 'solver iteration k'
    assert not axes['lam_p'].lines and axes['lam_p'].texts[0].get_text() == 'inf (fixed)'


def test_parameters_over_training():
    epochs = [1, 2, 3, 4]
    runs = [{'eps': [1.0, 0.8 - f, 0.6, 0.5], 'lam_q': np.array([[1, 1], [2, 1], [3, 1], [4 + f, 1]]),
             'lam_p': [math.nan, math.inf, math.inf, math.inf], 'convs.0.aggr.eps': [2, 2, 3, 3]}
            for f in (0.0, 0.1, 0.3)]
    axes = _axes(plot_parameters(runs))
    assert set(axes) == {'eps', 'lam_p', 'lam_q', 'convs.0.aggr.eps'}
    assert axes['convs.0.aggr.eps'].get_title().startswith('convs.0.aggr')
    assert axes['eps'].get_xlabel() == 'epoch'
    lines = [line for line in axes['eps'].lines if line.get_label().startswith('_')]
    for line, run in zip(lines, runs):
        np.testing.assert_array_equal(line.get_xdata(), epochs)
        np.testing.assert_allclose(line.get_ydata(), run['eps'])
    median = next(line for line in axes['eps'].lines if line.get_label() == 'median of 3')
    np.testing.assert_allclose(median.get_ydata(), [1.0, 0.7, 0.6, 0.5])
    labels = [line.get_label() for line in axes['lam_q'].lines if not line.get_label().startswith('_')]
    assert labels == ['median of 3, k = 0', 'median of 3, k = 1']
    k0 = next(line for line in axes['lam_q'].lines if line.get_label() == 'median of 3, k = 0')
    np.testing.assert_allclose(k0.get_ydata(), [1, 2, 3, 4.1])
    assert axes['lam_p'].texts[0].get_text() == 'inf (fixed)'


def test_parameters_at_given_steps():
    fig = plot_parameters({'mass_exponent': [0.5, 0.6, 0.7]}, steps=[10, 20, 30], xlabel='step')
    ax = _axes(fig)['mass_exponent']
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), [10, 20, 30])
    assert ax.get_xlabel() == 'step' and ax.get_title() == 'a (mass_exponent)'


@pytest.mark.parametrize('kwargs,match', [
    (dict(source={}), 'at least one recorded value'),
    (dict(source={'eps': [1.0, 2.0]}, steps=[1, 2, 3]), "'steps' has 3 entries"),
    (dict(source={'eps': np.zeros((2, 2, 2))}), r"shape \(num_steps,\)"),
])
def test_bad_parameter_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plot_parameters(**kwargs)


def test_learned_values_are_the_layers_values():
    layer = UOTAggregation(solver='badmm', num_iters=3, eps=0.5, lam_q=2.0, per_iteration=True,
                           prior='power', mass_exponent=0.25)
    with torch.no_grad():
        layer.eps_raw.copy_(torch.tensor([0.1, -2.0, 3.0]))
    values = learned_values(layer)
    assert list(values) == ['eps', 'lam_p', 'lam_q', 'rho', 'mass_exponent']
    np.testing.assert_allclose(values['eps'], [math.log1p(math.exp(v)) for v in (0.1, -2.0, 3.0)], rtol=1e-6)
    assert values['lam_q'] == pytest.approx([2.0] * 3) and values['mass_exponent'] == pytest.approx([0.25])
    assert values['lam_p'] == [math.inf] * 3  # fixed: a hard marginal
