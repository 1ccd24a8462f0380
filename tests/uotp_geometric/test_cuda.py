r"""The same layer on a CUDA device: equal to the CPU in float64, finite under autocast."""
import pytest
import torch

from uotp_geometric import UOTAggregation
from tests.uotp_geometric.helpers import ragged_batch

pytestmark = pytest.mark.gpu
SOLVERS = ['sinkhorn', 'badmm']


def _run(aggr, x, index, device):
    aggr = aggr.to(device)
    x = x.detach().to(device).requires_grad_(True)
    out = aggr(x, index.to(device), dim_size=5)
    out.pow(2).sum().backward()
    grads = {n: p.grad.cpu() for n, p in aggr.named_parameters()}
    return out.detach().cpu(), x.grad.cpu(), grads


@pytest.mark.parametrize('solver', SOLVERS)
@pytest.mark.parametrize('memory_efficient', [True, False])
def test_cuda_matches_cpu(solver, memory_efficient):
    x, index = ragged_batch([6, 0, 13, 1, 40], 8, shuffle=True)
    torch.manual_seed(0)
    aggr = UOTAggregation(solver=solver, num_iters=6, per_iteration=True,
                          lam_p=1.0, prior='attention', channels=8,
                          memory_efficient=memory_efficient).double()
    cpu = _run(aggr, x, index, 'cpu')
    aggr.zero_grad()
    gpu = _run(aggr, x, index, 'cuda')
    torch.testing.assert_close(gpu[0], cpu[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gpu[1], cpu[1], rtol=1e-9, atol=1e-9)
    for name in cpu[2]:
        torch.testing.assert_close(gpu[2][name], cpu[2][name], rtol=1e-9,
                                   atol=1e-9, msg=name)


@pytest.mark.parametrize('solver', SOLVERS)
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_cuda_autocast_is_finite(solver, dtype):
    x, index = ragged_batch([30, 2, 300], 64, dtype=torch.float32, scale=30.0)
    x, index = x.cuda(), index.cuda()
    lin = torch.nn.Linear(64, 64).cuda()
    aggr = UOTAggregation(solver=solver, prior='attention', channels=64).cuda()
    with torch.autocast('cuda', dtype=dtype):
        out = aggr(lin(x), index, dim_size=4)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert torch.equal(out[3], torch.zeros_like(out[3]))
    if dtype == torch.bfloat16:  # fp16 gradients may overflow by design: that is GradScaler's job
        out.sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in aggr.parameters())
