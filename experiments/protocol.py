"""The evaluation protocol of PyG's ``benchmark/kernel``: folds, batches, seeds, metrics."""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import StratifiedKFold
from torch import Tensor
from torch.utils.data import Sampler
from torch_geometric.loader import DataLoader


def k_fold(y: Tensor, folds: int) -> list[tuple[Tensor, Tensor, Tensor]]:
    """``(train, val, test)`` indices per fold, as ``k_fold`` in PyG's ``benchmark/kernel``.

    The test folds come from ``StratifiedKFold(folds, shuffle=True, random_state=12345)``; each fold's
    validation set is the previous test fold, and the remaining graphs are its training set.
    """
    if folds < 3:
        raise ValueError(f"need at least 3 folds (validation is the previous test fold), got {folds}")
    skf = StratifiedKFold(folds, shuffle=True, random_state=12345)
    tests = [torch.from_numpy(idx) for _, idx in skf.split(np.zeros(len(y)), y.numpy())]
    splits = []
    for i, test in enumerate(tests):
        val = tests[i - 1]
        train = torch.ones(len(y), dtype=torch.bool)
        train[test] = False
        train[val] = False
        splits.append((train.nonzero().view(-1), val, test))
    return splits


def derive_seed(*key: int) -> int:
    """A well-mixed 32-bit seed from non-negative integers, e.g. ``(seed, fold, epoch)``."""
    return int(np.random.SeedSequence(list(key)).generate_state(1)[0])


class ShardedBatchSampler(Sampler[list[int]]):
    """Shuffled global batches of ``batch_size`` indices, each split over ``world_size`` processes.

    An epoch's order depends only on ``(key, epoch)``, so a resumed run sees the batches of an uninterrupted
    one, and ``world_size`` processes together see exactly the batches that one process sees. Under DDP, a last
    batch smaller than ``world_size`` is dropped, since every process needs a graph to take part in a step.
    """

    def __init__(self, num_samples: int, batch_size: int, key: Sequence[int], rank: int = 0,
                 world_size: int = 1) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.key = tuple(key)
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(derive_seed(*self.key, self.epoch))
        perm = torch.randperm(self.num_samples, generator=generator).tolist()
        for start in range(0, self.num_samples, self.batch_size):
            batch = perm[start:start + self.batch_size]
            if len(batch) >= self.world_size:
                yield batch[self.rank::self.world_size]

    def __len__(self) -> int:
        full, rest = divmod(self.num_samples, self.batch_size)
        return full + int(rest >= self.world_size)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, device: torch.device) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over all graphs of ``loader``."""
    model.eval()
    loss = correct = 0.0
    for data in loader:
        data = data.to(device)
        out = model(data.x, data.edge_index, data.batch, data.num_graphs)
        loss += F.cross_entropy(out, data.y, reduction="sum").item()
        correct += int((out.argmax(dim=-1) == data.y).sum())
    return loss / len(loader.dataset), correct / len(loader.dataset)


def summarize(accs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (as ``Tensor.std`` in ``benchmark/kernel``) over folds."""
    values = np.asarray(accs, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1))
