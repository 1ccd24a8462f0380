"""Evaluation protocols: folds, batches, seeds and metrics of PyG's ``benchmark/kernel`` (TU datasets), and the
labelled-entry loss, ``Evaluator`` metric and best-epoch direction of OGB's ``examples/graphproppred/mol``."""
from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

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
    one, and ``world_size`` processes together see exactly the batches that one process sees. A last batch that
    would leave a process fewer than ``min_per_process`` graphs is dropped: under DDP every process needs a graph
    to take part in a step, and a model that batch-normalises over graphs (OGB's virtual node) needs two.
    """

    def __init__(self, num_samples: int, batch_size: int, key: Sequence[int], rank: int = 0,
                 world_size: int = 1, min_per_process: int = 1) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.key = tuple(key)
        self.rank = rank
        self.world_size = world_size
        self.min_size = min_per_process * world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(derive_seed(*self.key, self.epoch))
        perm = torch.randperm(self.num_samples, generator=generator).tolist()
        for start in range(0, self.num_samples, self.batch_size):
            batch = perm[start:start + self.batch_size]
            if len(batch) >= self.min_size:
                yield batch[self.rank::self.world_size]

    def __len__(self) -> int:
        full, rest = divmod(self.num_samples, self.batch_size)
        return full * int(self.batch_size >= self.min_size) + int(rest >= self.min_size)


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


def summarize(values: Sequence[float]) -> tuple[float, Optional[float]]:
    """Mean and sample standard deviation (as ``Tensor.std`` in ``benchmark/kernel``) over folds or seeds; the
    standard deviation of a single value is ``None`` (``null`` in ``results.json``), not 0."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else None


def masked_loss(out: Tensor, y: Tensor, task_type: str) -> tuple[Tensor, Tensor]:
    """The summed loss over the labelled entries of ``y`` and their number, as OGB's ``mol`` example trains.

    OGB marks a missing label as NaN (``y != y``); those entries take no part in the loss. Classification tasks
    (``task_type`` as in OGB's ``master.csv``, e.g. ``"binary classification"``) use binary cross-entropy on
    logits, regression tasks the squared error; all in float32, whatever the label dtype.
    """
    y = y.view(out.shape).to(torch.float32)
    labelled = y == y
    loss = F.binary_cross_entropy_with_logits if "classification" in task_type else F.mse_loss
    return loss(out.to(torch.float32)[labelled], y[labelled], reduction="sum"), labelled.sum()


def better(value: float, than: float, maximize: bool) -> bool:
    """Whether score ``value`` beats ``than``; a tie does not, so the first best epoch is kept, as by
    benchmark/kernel's argmin and OGB's argmax / argmin over validation curves."""
    return value > than if maximize else value < than


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of OGB metric ``metric`` is better: ROC-AUC, AP and accuracy, not RMSE or MAE."""
    if metric in ("rocauc", "ap", "acc"):
        return True
    if metric in ("rmse", "mae"):
        return False
    raise ValueError(f"no known direction for metric {metric!r}")


@torch.no_grad()
def evaluate_ogb(model: torch.nn.Module, loader: DataLoader, evaluator: Any, device: torch.device) -> float:
    """The metric of OGB ``Evaluator`` ``evaluator`` over all graphs of ``loader``, from raw model outputs."""
    model.eval()
    y_true, y_pred = [], []
    for data in loader:
        data = data.to(device)
        out = model(data.x, data.edge_index, data.edge_attr, data.batch, data.num_graphs)
        y_true.append(data.y.view(out.shape).cpu())
        y_pred.append(out.cpu())
    result = evaluator.eval({"y_true": torch.cat(y_true), "y_pred": torch.cat(y_pred)})
    return float(result[evaluator.eval_metric])
