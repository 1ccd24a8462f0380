import pytest
import torch

from uotp_geometric.segment import (Segments, available_backends,
                                    segment_count, segment_exp,
                                    segment_logsumexp,
                                    segment_sum, sorted_segments, use_backend)
from tests.uotp_geometric.helpers import ragged_batch


@pytest.fixture(params=['pyg', 'torch_scatter'])
def backend(request):
    r"""Each scatter backend in turn; the tests compare it with dense per-set computations."""
    if request.param not in available_backends():
        pytest.skip(f'scatter backend {request.param!r} is not installed')
    with use_backend(request.param):
        yield request.param


def layouts(x, index, num_sets):
    r"""The same batch as scattered rows, and grouped by set with CSR offsets."""
    yield x, Segments(index, num_sets)
    perm, segments = sorted_segments(index, num_sets)
    yield x[perm], segments


@pytest.mark.parametrize('csr', [False, True])
def test_logsumexp_matches_dense_per_set(backend, csr):
    sizes = [3, 0, 1, 17, 5]
    x, index = ragged_batch(sizes, 6, shuffle=True, scale=30.0)
    x, segments = list(layouts(x, index, len(sizes)))[csr]
    out = segment_logsumexp(x, segments)
    for b, size in enumerate(sizes):
        if size == 0:
            continue
        expected = torch.logsumexp(x[segments.index == b], dim=0)
        torch.testing.assert_close(out[b], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize('csr', [False, True])
def test_logsumexp_empty_set_gradient_is_finite(backend, csr):
    x, index = ragged_batch([2, 0, 3], 4, shuffle=True)
    x, segments = list(layouts(x, index, 4))[csr]  # sets 1 and 3 are empty
    x.requires_grad_(True)
    out = segment_logsumexp(x, segments)
    assert torch.isfinite(out).all()
    # Weighting the empty rows too must not put a NaN anywhere.
    (out * torch.arange(1.0, 5.0, dtype=x.dtype).view(-1, 1)).sum().backward()
    assert torch.isfinite(x.grad).all()
    # d/dx LSE is the per-set softmax of x, columnwise.
    rows = segments.index == 2
    soft = torch.softmax(x.detach()[rows], dim=0) * 3
    torch.testing.assert_close(x.grad[rows], soft)


@pytest.mark.parametrize('csr', [False, True])
def test_logsumexp_handles_minus_inf_and_large_values(backend, csr):
    index = torch.tensor([0, 0, 1, 1])
    x = torch.tensor([[-float('inf')], [1e4], [-float('inf')], [-float('inf')]],
                     dtype=torch.float64)
    x, segments = list(layouts(x, index, 2))[csr]
    out = segment_logsumexp(x, segments)
    assert out[0].item() == 1e4
    assert out[1].item() < -700  # an all -inf set gives log(tiny), not NaN


@pytest.mark.parametrize('csr', [False, True])
def test_sum_and_count(backend, csr):
    sizes = [4, 0, 2]
    x, index = ragged_batch(sizes, 3, shuffle=True)
    x, segments = list(layouts(x, index, 3))[csr]
    out = segment_sum(x, segments)
    for b in range(3):
        torch.testing.assert_close(out[b], x[segments.index == b].sum(0))
    assert segment_count(segments).tolist() == [4.0, 0.0, 2.0]


def test_sorted_segments_groups_rows_by_set():
    index = torch.tensor([2, 0, 2, 1, 0, 2])
    perm, segments = sorted_segments(index, 4)
    assert segments.index.tolist() == [0, 0, 1, 2, 2, 2]
    assert perm.tolist() == [1, 4, 3, 0, 2, 5]  # stable
    assert segments.ptr.tolist() == [0, 2, 3, 6, 6]


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match='Unknown scatter backend'):
        with use_backend('numpy'):
            pass


@pytest.mark.parametrize('csr', [False, True])
def test_segment_exp_gives_softmax_and_logsumexp(backend, csr):
    sizes = [4, 0, 1, 9]
    x, index = ragged_batch(sizes, 3, shuffle=True, scale=20.0)
    x, segments = list(layouts(x, index, len(sizes)))[csr]
    e, total, shift = segment_exp(x, segments)
    softmax = e / segments.gather(total)
    for b, size in enumerate(sizes):
        rows = segments.index == b
        if size == 0:
            assert total[b].eq(torch.finfo(x.dtype).tiny).all() and shift[b].eq(0).all()
            continue
        torch.testing.assert_close(softmax[rows], torch.softmax(x[rows], dim=0), rtol=0, atol=1e-14)
        torch.testing.assert_close(total[b].log() + shift[b], torch.logsumexp(x[rows], dim=0), rtol=0,
                                   atol=1e-12)
