r"""Hardening: finite values and gradients under extreme inputs, NaN isolation, autocast, compile.

The fuzz test runs a seeded, bounded set of cases in the suite; for a longer run:
``python -m tests.uotp_geometric.test_numerics --runs 5000 --seed 1``.
"""
import argparse
import math

import pytest
import torch

from uotp_geometric import UOTAggregation

SOLVERS = ['sinkhorn', 'badmm']


def fuzz_case(gen: torch.Generator, solver: str) -> None:
    r"""One random case; raises AssertionError on a non-finite value or gradient."""
    def uniform(low: float, high: float) -> float:
        return low + (high - low) * torch.rand((), generator=gen).item()

    def log_uniform(low: float, high: float) -> float:
        return math.exp(uniform(math.log(low), math.log(high)))

    num_sets = int(torch.randint(1, 6, (), generator=gen))
    sizes = torch.randint(0, 60, (num_sets, ), generator=gen)
    num_dims = int(torch.randint(1, 17, (), generator=gen))
    index = torch.repeat_interleave(torch.arange(num_sets), sizes)
    index = index[torch.randperm(index.numel(), generator=gen)]
    scale = log_uniform(1e-3, 1e4)
    x = (scale * torch.randn(index.numel(), num_dims, generator=gen))
    x.requires_grad_(True)
    prior = ['uniform', 'attention', 'counting'][int(
        torch.randint(0, 3, (), generator=gen))]
    aggr = UOTAggregation(
        solver=solver, num_iters=int(torch.randint(1, 12, (), generator=gen)),
        eps=log_uniform(1e-4, 1e4), lam_p=log_uniform(1e-4, 1e4),
        lam_q=log_uniform(1e-4, 1e4), learn=True,
        per_iteration=bool(torch.rand((), generator=gen) < 0.5), prior=prior,
        channels=num_dims)
    out = aggr(x, index, dim_size=num_sets + 1)  # the last set is empty
    context = f'{aggr!r}, |x| ~ {scale:.3g}, sizes {sizes.tolist()}'
    assert torch.isfinite(out).all(), context
    assert torch.equal(out[-1], torch.zeros(num_dims)), context
    out.sum().backward()
    assert torch.isfinite(x.grad).all(), context
    for name, param in aggr.named_parameters():
        assert torch.isfinite(param.grad).all(), f'{name}: {context}'


@pytest.mark.parametrize('solver', SOLVERS)
def test_fuzz(solver):
    gen = torch.Generator().manual_seed(0 if solver == 'sinkhorn' else 1)
    for _ in range(120):
        fuzz_case(gen, solver)


@pytest.mark.parametrize('solver', SOLVERS)
@pytest.mark.parametrize('eps', [1e-4, 1e4])
@pytest.mark.parametrize('lam_p', [1e-4, 1e4])
@pytest.mark.parametrize('lam_q', [1e-4, 1e4])
def test_extremes_stay_finite(solver, eps, lam_p, lam_q):
    gen = torch.Generator().manual_seed(0)
    sizes = torch.tensor([0, 1, 1000])
    index = torch.repeat_interleave(torch.arange(3), sizes)
    x = 1e4 * torch.randn(index.numel(), 8, generator=gen)
    x.requires_grad_(True)
    aggr = UOTAggregation(solver=solver, num_iters=50, eps=eps, lam_p=lam_p,
                          lam_q=lam_q, prior='attention', channels=8)
    out = aggr(x, index, dim_size=3)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], torch.zeros(8))
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    for name, param in aggr.named_parameters():
        assert torch.isfinite(param.grad).all(), name


@pytest.mark.parametrize('solver', SOLVERS)
def test_nan_reaches_only_its_own_row(solver):
    gen = torch.Generator().manual_seed(0)
    index = torch.repeat_interleave(torch.arange(4), torch.tensor([3, 5, 2, 4]))
    x = torch.randn(index.numel(), 6, generator=gen)
    x[4, 2] = float('nan')  # a node of set 1
    out = UOTAggregation(solver=solver)(x, index)
    assert torch.isnan(out[1]).any()
    assert torch.isfinite(out[[0, 2, 3]]).all()


@pytest.mark.parametrize('solver', SOLVERS)
@pytest.mark.parametrize('prior', ['uniform', 'attention'])
def test_bf16_autocast(solver, prior):
    gen = torch.Generator().manual_seed(0)
    index = torch.repeat_interleave(torch.arange(3), torch.tensor([4, 7, 2]))
    x = 30 * torch.randn(index.numel(), 16, generator=gen)
    aggr = UOTAggregation(solver=solver, prior=prior, channels=16)
    lin = torch.nn.Linear(16, 16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        h = lin(x)
        assert h.dtype == torch.bfloat16
        out = aggr(h, index)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    if prior == 'uniform':
        # The solver ran in float32 on the bf16 values: the float32 call on them, to the bit.
        assert torch.equal(out, aggr(h.float(), index))


@pytest.mark.parametrize('solver', SOLVERS)
def test_compile_has_no_graph_breaks(solver):
    torch._dynamo.reset()
    aggr = UOTAggregation(solver=solver, prior='attention', channels=8)
    index = torch.repeat_interleave(torch.arange(3), torch.tensor([4, 0, 5]))
    x = torch.randn(index.numel(), 8)
    explanation = torch._dynamo.explain(aggr)(x, index, dim_size=3)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def main() -> None:
    parser = argparse.ArgumentParser(description='Longer fuzz run.')
    parser.add_argument('--runs', type=int, default=2000)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(args.seed)
    for run in range(args.runs):
        fuzz_case(gen, SOLVERS[run % 2])
    print(f'{args.runs} fuzzed runs, 0 non-finite values or gradients')


if __name__ == '__main__':
    main()
