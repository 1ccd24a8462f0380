import numpy as np
import pytest
import torch
from sklearn.model_selection import StratifiedKFold

from experiments.protocol import ShardedBatchSampler, derive_seed, k_fold, summarize


@pytest.fixture
def labels():
    # Imbalanced, three classes, not a multiple of the fold count.
    perm = torch.randperm(103, generator=torch.Generator().manual_seed(1))
    return torch.tensor([0] * 61 + [1] * 30 + [2] * 12)[perm]


@pytest.mark.parametrize("folds", [3, 10])
def test_folds_partition_the_data(labels, folds):
    splits = k_fold(labels, folds)
    assert len(splits) == folds
    tests = [test for _, _, test in splits]
    assert sorted(torch.cat(tests).tolist()) == list(range(len(labels)))  # every graph is tested once
    for i, (train, val, test) in enumerate(splits):
        assert torch.equal(val, tests[i - 1])  # validation is the previous test fold
        parts = [set(train.tolist()), set(val.tolist()), set(test.tolist())]
        assert sum(map(len, parts)) == len(labels) == len(set().union(*parts))  # disjoint and complete


def test_folds_are_stratified_and_match_benchmark_kernel(labels):
    splits = k_fold(labels, 10)
    for cls in range(3):
        counts = [int((labels[test] == cls).sum()) for _, _, test in splits]
        assert max(counts) - min(counts) <= 1
    skf = StratifiedKFold(10, shuffle=True, random_state=12345)
    expected = [idx for _, idx in skf.split(np.zeros(len(labels)), labels.numpy())]
    assert all(np.array_equal(test.numpy(), idx) for (_, _, test), idx in zip(splits, expected))


def test_two_folds_are_refused(labels):
    with pytest.raises(ValueError, match="3 folds"):
        k_fold(labels, 2)


def _epoch(num_samples, batch_size, epoch, world_size):
    samplers = [ShardedBatchSampler(num_samples, batch_size, (0, 1), rank, world_size) for rank in range(world_size)]
    for sampler in samplers:
        sampler.set_epoch(epoch)
    steps = [list(sampler) for sampler in samplers]
    assert all(len(s) == len(sampler) for s, sampler in zip(steps, samplers))
    return steps


def test_sampler_shards_the_one_process_batches():
    (single,) = _epoch(103, 16, epoch=3, world_size=1)
    assert sorted(i for batch in single for i in batch) == list(range(103))
    assert [len(batch) for batch in single] == [16] * 6 + [7]
    rank0, rank1 = _epoch(103, 16, epoch=3, world_size=2)
    assert [sorted(a + b) for a, b in zip(rank0, rank1)] == [sorted(batch) for batch in single]
    assert [len(batch) for batch in rank0] == [8] * 6 + [4] and [len(batch) for batch in rank1] == [8] * 6 + [3]


def test_sampler_order_depends_on_epoch_only():
    assert _epoch(50, 8, epoch=1, world_size=1) == _epoch(50, 8, epoch=1, world_size=1)
    assert _epoch(50, 8, epoch=1, world_size=1) != _epoch(50, 8, epoch=2, world_size=1)


def test_sampler_drops_a_last_batch_smaller_than_the_world():
    (single,) = _epoch(33, 16, epoch=0, world_size=1)
    assert len(single) == 3  # one process keeps the last graph
    rank0, rank1 = _epoch(33, 16, epoch=0, world_size=2)
    assert len(rank0) == len(rank1) == 2  # two processes cannot share one graph


def test_derive_seed():
    assert derive_seed(0, 1, 2) == derive_seed(0, 1, 2)
    assert len({derive_seed(0, fold, epoch) for fold in range(10) for epoch in range(100)}) == 1000


def test_summarize():
    mean, std = summarize([0.5, 0.75, 1.0])
    assert mean == pytest.approx(0.75)
    assert std == pytest.approx(0.25)  # the sample standard deviation
    assert summarize([0.8]) == (pytest.approx(0.8), None)  # one seed has no spread
