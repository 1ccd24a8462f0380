r"""Bad input gets an error that names the problem."""
import pytest
import torch
import torch_geometric

from uotp_geometric import UOTAggregation
from uotp_geometric.functional import uot_plan, uot_pool

INF = float('inf')


@pytest.mark.parametrize('kwargs,match', [
    (dict(eps=-1.0), "'eps' must be positive"),
    (dict(eps=0.0), "'eps' must be positive for solver='sinkhorn'"),
    (dict(solver='badmm', eps=-0.1), "'eps' must be non-negative"),
    (dict(lam_p=-2.0), "'lam_p' must be non-negative"),
    (dict(lam_q=float('nan')), "'lam_q' must be non-negative"),
    (dict(solver='badmm', rho=0.0), "'rho' must be positive"),
    (dict(num_iters=0), "'num_iters' must be an integer >= 1"),
    (dict(num_iters=2.5), "'num_iters' must be an integer >= 1"),
    (dict(solver='ipot'), "Unknown solver 'ipot'"),
    (dict(prior='gaussian'), "Unknown prior 'gaussian'"),
    (dict(prior='attention'), "needs 'channels'"),
    (dict(compile='yes'), "'compile' must be a bool"),
])
def test_constructor_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UOTAggregation(**kwargs)


@pytest.mark.parametrize('call', [uot_plan, uot_pool])
@pytest.mark.parametrize('solver', ['badmm', 'badmm_q'])
def test_compile_is_sinkhorns_only(call, solver):
    # BADMM's iterations have no compiled kernels: compile=True is refused, not silently ignored.
    x, index = torch.randn(5, 3), torch.tensor([0, 1, 1, 2, 2])
    message = (rf"compile=True is implemented for solver='sinkhorn' only \(got solver='{solver}'\); "
               r"BADMM's iterations run eager")
    with pytest.raises(ValueError, match=message):
        call(x, index, solver=solver, compile=True)
    with pytest.raises(ValueError, match=message):
        UOTAggregation(solver=solver, compile=True)
    assert UOTAggregation(solver=solver, compile=False).compile is False


def test_badmm_accepts_zero_eps():
    assert UOTAggregation(solver='badmm', eps=0.0).value('eps').item() == 0.0


def test_module_rejects_bad_input():
    aggr = UOTAggregation()
    index = torch.tensor([0, 0, 1])
    with pytest.raises(TypeError, match='floating-point'):
        aggr(torch.ones(3, 4, dtype=torch.long), index)
    with pytest.raises(ValueError, match=r"'index' must have shape \(4,\)"):
        aggr(torch.randn(4, 3), index)
    with pytest.raises(ValueError, match='dim_size'):
        aggr(torch.randn(3, 4), index, dim_size=1)
    with pytest.raises(ValueError, match='last'):
        aggr(torch.randn(3, 4), index, dim=1)


@pytest.mark.parametrize('call', [uot_plan, uot_pool])
def test_functional_rejects_bad_input(call):
    x, index = torch.randn(5, 3), torch.tensor([0, 1, 1, 2, 2])
    with pytest.raises(TypeError, match="'x' must be a floating-point"):
        call(x.long(), index)
    with pytest.raises(TypeError, match="'index' must be a torch.long"):
        call(x, index.int())
    with pytest.raises(ValueError, match=r"'x' must have shape \(num_nodes"):
        call(x.unsqueeze(0), index)
    with pytest.raises(ValueError, match=r"'index' must have shape \(5,\)"):
        call(x, index[:4])
    with pytest.raises(ValueError, match=r'out of range for dim_size=2'):
        call(x, index, 2)
    with pytest.raises(ValueError, match=r'out of range'):
        call(x, torch.tensor([0, -1, 1, 2, 2]), 3)
    with pytest.raises(ValueError, match=r"'p' must have shape"):
        call(x, index, p=torch.ones(4))
    with pytest.raises(ValueError, match=r"'p' must have shape \(3, 3\)"):
        call(x, index, p=torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"'q' must have shape \(5,\)"):
        call(x, index, q=torch.ones(3))
    with pytest.raises(ValueError, match="'q' must be non-negative"):
        call(x, index, q=torch.tensor([1.0, -1, 1, 1, 1]))
    with pytest.raises(ValueError, match="'log_q' must have shape"):
        call(x, index, log_q=torch.zeros(2))
    with pytest.raises(ValueError, match="not both"):
        call(x, index, q=torch.ones(5), log_q=torch.zeros(5))
    with pytest.raises(ValueError, match=r"'eps' must be a scalar or have "
                       r"shape \(4,\)"):
        call(x, index, eps=torch.ones(3), num_iters=4)
    with pytest.raises(ValueError, match="'lam_p' must be non-negative"):
        call(x, index, lam_p=torch.tensor([1.0, -1.0]), num_iters=2)
    with pytest.raises(ValueError, match="Unknown solver"):
        call(x, index, solver='exact')


def test_nan_input_is_an_error_in_debug_mode():
    x = torch.randn(4, 3)
    x[1, 1] = float('nan')
    with torch_geometric.debug():
        with pytest.raises(ValueError, match="'x' holds NaN"):
            uot_pool(x, torch.tensor([0, 0, 1, 1]))


@pytest.mark.parametrize('kwargs', [
    dict(eps=0.0), dict(solver='badmm', rho=-1.0), dict(lam_q=[1.0, -1.0, 1.0, 1.0]),
    dict(eps=[1.0, 2.0]), dict(gw=INF), dict(inner_iters=0), dict(solver='ipot'), dict(compile=1),
    dict(solver='badmm', compile=True), dict(solver='badmm_q', compile=True),
])
def test_layer_and_functional_refuse_alike(kwargs):
    # One set of checks (SolverOptions.validate) serves both forms: the same message.
    with pytest.raises(ValueError) as layer_error:
        UOTAggregation(**kwargs)
    with pytest.raises(ValueError) as functional_error:
        uot_pool(torch.randn(3, 2), torch.tensor([0, 0, 1]), **kwargs)
    assert str(layer_error.value) == str(functional_error.value)
