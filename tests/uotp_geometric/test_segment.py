import pytest
import torch

from uotp_geometric.segment import (available_backends, segment_count,
                                    segment_logsumexp, segment_sum,
                                    use_backend)
from tests.uotp_geometric.helpers import ragged_batch


@pytest.fixture(params=available_backends())
def backend(request):
    with use_backend(request.param):
        yield request.param


def test_logsumexp_matches_dense_per_set(backend):
    sizes = [3, 0, 1, 17, 5]
    x, index = ragged_batch(sizes, 6, shuffle=True, scale=30.0)
    out = segment_logsumexp(x, index, len(sizes))
    for b, size in enumerate(sizes):
        if size == 0:
            continue
        expected = torch.logsumexp(x[index == b], dim=0)
        torch.testing.assert_close(out[b], expected, rtol=0, atol=1e-12)


def test_logsumexp_empty_set_gradient_is_finite(backend):
    x, index = ragged_batch([2, 0, 3], 4)
    x.requires_grad_(True)
    out = segment_logsumexp(x, index, 4)  # sets 1 and 3 are empty
    assert torch.isfinite(out).all()
    # Weighting the empty rows too must not put a NaN anywhere.
    (out * torch.arange(1.0, 5.0, dtype=x.dtype).view(-1, 1)).sum().backward()
    assert torch.isfinite(x.grad).all()
    # d/dx LSE is the per-set softmax of x, columnwise.
    soft = torch.softmax(x.detach()[index == 2], dim=0) * 3
    torch.testing.assert_close(x.grad[index == 2], soft)


def test_logsumexp_handles_minus_inf_and_large_values(backend):
    index = torch.tensor([0, 0, 1, 1])
    x = torch.tensor([[-float('inf')], [1e4], [-float('inf')], [-float('inf')]],
                     dtype=torch.float64)
    out = segment_logsumexp(x, index, 2)
    assert out[0].item() == 1e4
    assert out[1].item() < -700  # an all -inf set gives log(tiny), not NaN


def test_sum_and_count(backend):
    sizes = [4, 0, 2]
    x, index = ragged_batch(sizes, 3, shuffle=True)
    out = segment_sum(x, index, 3)
    for b in range(3):
        torch.testing.assert_close(out[b], x[index == b].sum(0))
    assert segment_count(index, 3).tolist() == [4.0, 0.0, 2.0]


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match='Unknown scatter backend'):
        with use_backend('numpy'):
            pass
