r"""``compile=True``: the solvers' compiled kernels give eager's values and gradients, with no graph breaks and
no recompilation for new batch sizes.

Eager is the reference here (it is checked against dense float64 references and POT elsewhere). The kernels
are compiled with ``fullgraph=True``, so a graph break would raise; the counters of dynamo are checked too.
``compile=True`` covers Sinkhorn only (BADMM and BADMM-Q refuse it: ``test_validation.py``). Each kernel
compiles once per process (a few seconds to half a minute on a CPU), so the cases are few and small; all but
Sinkhorn's scaling domain are marked slow in ``tests/conftest.py``.
"""
import pytest
import torch
from torch._dynamo.utils import counters

from uotp_geometric import UOTAggregation
from uotp_geometric.functional import SolverOptions, _uot, uot_plan, uot_pool
from uotp_geometric.solvers import compiled as compiled_kernels

from .helpers import ragged_batch

# Batches of other N, B and D: the first compiles, the others must reuse its graphs. The last has N and
# B D beyond 4096, where the compiler accumulates float32 sums in chunks (a guard, were the kernels to sum
# over N or N D: compiled.dot).
BATCHES = [([3, 5, 0, 7], 8), ([4, 1, 6, 2, 9, 3], 8), ([10, 2, 7], 6), ([1, 3] * 1050, 3)]


def _graphs() -> int:
    return counters['stats']['unique_graphs']


def _breaks() -> int:
    return sum(counters['graph_break'].values())


def _run(layer: UOTAggregation, sizes, num_dims: int, seed: int):
    x, index = ragged_batch(sizes, num_dims, seed=seed, dtype=torch.float32, shuffle=True)
    x.requires_grad_()
    layer.zero_grad(set_to_none=True)
    out = layer(x, index, dim_size=len(sizes))
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1))
    (out * weight).sum().backward()
    with torch.no_grad():
        out_no_grad = layer(x, index, dim_size=len(sizes))
    params = {name: p.grad.clone() for name, p in layer.named_parameters()}
    return out.detach(), out_no_grad, x.grad, params


def _close(actual, expected, rtol):
    # Relative to the largest entry: a fused kernel sums in another order.
    scale = expected.abs().max().clamp_min(1e-12)
    assert float((actual - expected).abs().max() / scale) <= rtol


# Each case: the layer's arguments, and the kernels (module.function) it must have compiled.
SCALING = ['sinkhorn_scaling._kernel', 'sinkhorn_scaling._scaling_step', 'sinkhorn_scaling._scaling_adjoint_step']
CASES = {
    'sinkhorn': (dict(solver='sinkhorn'), SCALING),  # the scaling domain (one eps, on the CPU)
    'sinkhorn_gw': (dict(solver='sinkhorn', gw=0.3), SCALING),  # proximal Sinkhorn's inner iterations
}
SLOW_CASES = {  # each compiles kernels of its own, for a few seconds (warm cache) to half a minute
    'sinkhorn_log': (dict(solver='sinkhorn', eps=(1.0, 0.7, 0.5, 0.5)),  # one eps per iteration: the log domain
                     ['sinkhorn.sinkhorn_step', 'sinkhorn._adjoint_step']),
}


@pytest.mark.parametrize('case', list(CASES))
def test_compiled_matches_eager(case):
    _check(*CASES[case])


@pytest.mark.parametrize('case', list(SLOW_CASES))
def test_compiled_log_domain_matches_eager(case):
    _check(*SLOW_CASES[case])


def _check(layer_kwargs, kernels):
    kwargs = dict(num_iters=4, lam_p=2.0, lam_q=1.5, **layer_kwargs)
    eager, compiled = UOTAggregation(**kwargs), UOTAggregation(compile=True, **kwargs)
    breaks = _breaks()
    graphs = []
    for seed, (sizes, num_dims) in enumerate(BATCHES):
        expected, got = _run(eager, sizes, num_dims, seed), _run(compiled, sizes, num_dims, seed)
        graphs.append(_graphs())
        _close(got[0], expected[0], 1e-5)
        _close(got[1], expected[1], 1e-5)  # without gradients: the in-place paths
        _close(got[2], expected[2], 1e-5)  # x
        assert got[3].keys() == expected[3].keys() and expected[3]
        for name, grad in expected[3].items():  # the learned values: sums over all entries
            _close(got[3][name], grad, 1e-4)
    assert _breaks() == breaks
    assert graphs == graphs[:1] * len(BATCHES)  # the first batch compiles, dynamic from the start
    made = {f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}" for fn in compiled_kernels._COMPILED}
    assert made.issuperset(kernels), made


def test_repr_shows_the_option_where_on():
    assert 'compile' not in repr(UOTAggregation())
    assert repr(UOTAggregation(compile=True)).endswith(', compile=True)')


def test_functional_form_takes_the_option():
    x, index = ragged_batch([3, 4], 5, dtype=torch.float32)
    _close(uot_pool(x, index, eps=0.5, compile=True), uot_pool(x, index, eps=0.5), 1e-5)


def test_rows_grouped_by_set():
    # Accelerators group the rows by set and reduce with segment_reduce (CSR offsets): inside the kernels too.
    x, index = ragged_batch([3, 0, 6, 2], 5, dtype=torch.float32, shuffle=True)
    results = []
    for compile in (False, True):
        leaf = x.clone().requires_grad_()
        out = _uot(leaf, index, 4, SolverOptions(eps=0.5, compile=compile), None, None, None, pool=True,
                   sort_rows=True)
        out.pow(2).sum().backward()
        results.append((out.detach(), leaf.grad))
    _close(results[1][0], results[0][0], 1e-5)
    _close(results[1][1], results[0][1], 1e-5)


def test_compiled_plan_matches_eager():
    # The plan itself (no pooling): the adjoint starts from the plan's gradient instead of the pooling's.
    x, index = ragged_batch([4, 0, 3, 6], 5, dtype=torch.float32, shuffle=True)
    weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    results = []
    for compile in (False, True):
        leaf, eps = x.clone().requires_grad_(), torch.tensor(0.5, requires_grad=True)
        plan = uot_plan(leaf, index, eps=eps, lam_q=2.0, compile=compile)
        (plan * weight).sum().backward()
        results.append((plan.detach(), leaf.grad, eps.grad))
    for got, expected, rtol in zip(results[1], results[0], (1e-5, 1e-5, 1e-4)):
        _close(got, expected, rtol)
