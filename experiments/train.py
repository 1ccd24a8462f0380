"""Graph classification runs: ``python -m experiments.train --config configs/tu/mutag.yaml [--<field> <value>]``.

A TU dataset is trained with k-fold cross-validation (PyG's ``benchmark/kernel``), an ``ogbg-*`` dataset once per
seed on its official split (OGB's ``examples/graphproppred/mol``, e.g. ``--config configs/ogb/molbace.yaml``);
both through the same training loop, checkpoints and files, with a :class:`Task` for what differs.

Each fold or seed keeps a checkpoint in the run directory (``--out``), rewritten every epoch, so running the same
command again continues where a crash or kill stopped it; on CPU (same machine and thread count) it ends with
exactly the numbers of an uninterrupted run, while CUDA's atomic scatter kernels are not deterministic. A finished
fold or seed is read back, never recomputed; ``--restart N`` trains fold or seed ``N`` again from scratch (for a
damaged checkpoint). A run holds a lock on its directory, so a second run on the same ``--out`` stops at once.

The per-epoch CSV logs the losses, scores, learning rate, seconds and the learned values of every UOT layer
(:func:`experiments.records.uot_values`). On a terminal, progress shows as a tqdm bar; otherwise (a log file) as one
plain line per epoch. ``results.json`` has the median seconds per epoch (``seconds_per_epoch``) and the 90th
percentile (``seconds_per_epoch_p90``). ``--threads 1`` keeps several runs on one CPU from slowing each other
down by oversubscription.

Under ``torchrun --nproc_per_node=N`` the model trains with DistributedDataParallel: each global batch of
``batch_size`` graphs is split over the processes, and rank 0 evaluates and writes every file. On CUDA,
BatchNorm becomes SyncBatchNorm; PyTorch has no CPU kernels for it, so on CPU (gloo) each process normalises
with its own share of the batch, and dropout masks differ per process. Without both (``--batch_norm false
--dropout 0``) N processes reproduce one process up to float summation order (tests/experiments/test_train.py,
test_ogb.py).
"""
from __future__ import annotations

import abc
import contextlib
import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Adam, Optimizer
from torch.optim.lr_scheduler import StepLR
from torch_geometric import seed_everything
from torch_geometric.data import Batch, InMemoryDataset
from torch_geometric.loader import DataLoader

from experiments.config import RUNTIME_FIELDS, Config, UsageError, parse_run
from experiments.data import load_ogb, load_tu, ogb_names
from experiments.models import BACKBONES, GIN, OGBGNN
from experiments.protocol import (ShardedBatchSampler, better, derive_seed, evaluate, evaluate_ogb,
                                  higher_is_better, k_fold, masked_loss, summarize)
from experiments.records import (EpochProgress, csv_text, epoch_seconds, git_commit, git_dirty, resume, run_lock,
                                 save_checkpoint, uot_values, write_csv, write_json)


class Task(abc.ABC):
    """What a benchmark defines around the shared loop of :func:`train_split`: its data and splits, the model,
    the training loss, the per-epoch scores, which score picks the best epoch, and the summary over folds or
    seeds. The constructor checks the config (raising :class:`UsageError`), so that a bad one fails before any
    data is loaded."""

    metric: str  # the name of the test score, written to results.json
    unit: str  # what one training run is called: "fold" or "seed"
    scores: tuple[str, ...]  # the per-epoch score columns of the CSV log
    selection: str  # the score that picks the best epoch: the first epoch of its best value
    maximize: bool  # whether the best value of ``selection`` is its largest
    kept: tuple[str, ...]  # the scores kept in results.json for the best epoch
    min_per_process: int = 1  # the fewest training graphs one process may step on

    def __init__(self, config: Config) -> None:
        self.config = config
        self.dataset: InMemoryDataset  # set by load()

    @abc.abstractmethod
    def load(self) -> None:
        """Loads :attr:`dataset`, filling the cache on first use."""

    @abc.abstractmethod
    def splits(self) -> list[tuple[int, tuple[int, ...], tuple[Tensor, Tensor, Tensor]]]:
        """Per fold or seed: its number, the key all its randomness derives from, and its (train, val, test)
        indices."""

    @abc.abstractmethod
    def model(self) -> torch.nn.Module:
        """A freshly initialised model."""

    @abc.abstractmethod
    def loss(self, model: torch.nn.Module, data: Batch) -> tuple[Tensor, Tensor]:
        """The training loss on ``data``, summed, and the number of its terms."""

    @abc.abstractmethod
    def evaluate(self, model: torch.nn.Module, val_loader: DataLoader, test_loader: DataLoader,
                 device: torch.device) -> dict[str, float]:
        """The :attr:`scores` of ``model`` on the validation and test graphs."""

    @abc.abstractmethod
    def summary(self, bests: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
        """The results.json fields over the best epochs of all folds or seeds, and a line to print."""


class TUTask(Task):
    """PyG's ``benchmark/kernel``: GIN, cross-entropy, test accuracy at the lowest validation loss."""

    metric, unit = "accuracy", "fold"
    scores = ("val_loss", "val_acc", "test_acc")
    selection, maximize = "val_loss", False
    kept = ("test_acc", "val_loss", "val_acc")

    def __init__(self, config: Config) -> None:
        if config.backbone != "gin" or config.num_seeds != 1:
            raise UsageError("TU runs train benchmark/kernel's GIN with one seed and k folds: --backbone gin, "
                             "--num_seeds 1 (backbone and num_seeds choices are for ogbg-* datasets)")
        super().__init__(config)

    def load(self) -> None:
        self.dataset = load_tu(self.config.dataset, self.config.root, self.config.cache)

    def splits(self) -> list[tuple[int, tuple[int, ...], tuple[Tensor, Tensor, Tensor]]]:
        return [(fold, (self.config.seed, fold), split)
                for fold, split in enumerate(k_fold(self.dataset.y, self.config.folds))]

    def model(self) -> torch.nn.Module:
        config = self.config
        return GIN(self.dataset.num_features, self.dataset.num_classes, config.pooling, config.hidden,
                   config.num_layers, config.dropout, config.batch_norm, uot=config.uot_options())

    def loss(self, model: torch.nn.Module, data: Batch) -> tuple[Tensor, Tensor]:
        out = model(data.x, data.edge_index, data.batch, data.num_graphs)
        return F.cross_entropy(out, data.y, reduction="sum"), torch.tensor(float(data.num_graphs), device=out.device)

    def evaluate(self, model: torch.nn.Module, val_loader: DataLoader, test_loader: DataLoader,
                 device: torch.device) -> dict[str, float]:
        val_loss, val_acc = evaluate(model, val_loader, device)
        _, test_acc = evaluate(model, test_loader, device)
        return dict(val_loss=val_loss, val_acc=val_acc, test_acc=test_acc)

    def summary(self, bests: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
        mean, std = summarize([best["test_acc"] for best in bests])
        return (dict(folds=bests, mean=mean, std=std),
                f"test accuracy {100 * mean:.2f} ± {100 * std:.2f} over {len(bests)} folds")


class OGBTask(Task):
    """OGB's ``examples/graphproppred/mol``: GIN or GIN-virtual on atom and bond embeddings, the loss on labelled
    entries only, and the test score of the dataset's ``Evaluator`` at the best validation score."""

    unit = "seed"
    scores = ("valid", "test")
    selection = "valid"
    kept = ("valid", "test")
    # OGB's example skips one-graph batches: BatchNorm over graphs (the virtual-node MLP) needs two.
    min_per_process = 2

    def __init__(self, config: Config) -> None:
        try:
            from ogb.graphproppred import Evaluator
        except ImportError:
            raise UsageError(f"{config.dataset} needs the ogb package, the optional extra: "
                             f"pip install -e '.[ogb]'") from None
        if config.dataset not in ogb_names():
            raise UsageError(f"unknown OGB dataset {config.dataset!r}; choose one of {', '.join(ogb_names())}")
        if config.backbone not in BACKBONES:
            raise UsageError(f"unknown backbone {config.backbone!r} for {config.dataset}; choose one of "
                             f"{', '.join(BACKBONES)}")
        if config.folds != Config.folds:
            raise UsageError(f"{config.dataset} comes with its official split; --folds is for TU datasets")
        super().__init__(config)
        self.evaluator = Evaluator(config.dataset)
        self.metric = self.evaluator.eval_metric
        self.maximize = higher_is_better(self.metric)

    def load(self) -> None:
        self.dataset = load_ogb(self.config.dataset, self.config.root, self.config.cache)

    def splits(self) -> list[tuple[int, tuple[int, ...], tuple[Tensor, Tensor, Tensor]]]:
        split = self.dataset.get_idx_split()  # the official (scaffold) split
        seeds = range(self.config.seed, self.config.seed + self.config.num_seeds)
        return [(seed, (seed,), (split["train"], split["valid"], split["test"])) for seed in seeds]

    def model(self) -> torch.nn.Module:
        config = self.config
        return OGBGNN(self.dataset.num_tasks, config.pooling, config.backbone == "gin-virtual", config.hidden,
                      config.num_layers, config.dropout, config.batch_norm,
                      uot=config.uot_options())

    def loss(self, model: torch.nn.Module, data: Batch) -> tuple[Tensor, Tensor]:
        out = model(data.x, data.edge_index, data.edge_attr, data.batch, data.num_graphs)
        return masked_loss(out, data.y, self.dataset.task_type)

    def evaluate(self, model: torch.nn.Module, val_loader: DataLoader, test_loader: DataLoader,
                 device: torch.device) -> dict[str, float]:
        return dict(valid=evaluate_ogb(model, val_loader, self.evaluator, device),
                    test=evaluate_ogb(model, test_loader, self.evaluator, device))

    def summary(self, bests: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
        fields: dict[str, Any] = dict(seeds=bests)
        for split in ("valid", "test"):
            values = [best[split] for best in bests]
            mean, std = summarize(values)  # std is None (null) for one seed
            fields.update({split: mean, f"{split}_std": std})
        spread = "" if fields["test_std"] is None else f" ± {fields['test_std']:.4f}"
        seeds = f"{len(bests)} seeds" if len(bests) > 1 else "1 seed"
        return fields, f"test {self.metric} {fields['test']:.4f}{spread} over {seeds}"


def train_epoch(model: torch.nn.Module, task: Task, loader: DataLoader, optimizer: Optimizer,
                device: torch.device, world_size: int) -> float:
    """One pass over the training graphs; returns the mean loss per term over all processes."""
    model.train()
    total = torch.zeros(2, device=device)  # (summed loss, number of terms)
    for data in loader:
        data = data.to(device)
        optimizer.zero_grad()
        loss, count = task.loss(model, data)
        total += torch.stack([loss.detach(), count.to(total.dtype)])
        count = count.to(loss.dtype)
        if world_size > 1:
            dist.all_reduce(count)
        # DDP averages gradients over processes, so scaling by world_size / (terms in the global batch) yields
        # the gradient of the global batch's mean loss, whatever share of it each process holds. A batch
        # without any label (possible with OGB's missing labels) gives no gradient instead of NaN.
        (loss * world_size / count.clamp(min=1)).backward()
        optimizer.step()
    if world_size > 1:
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


def train_split(config: Config, task: Task, split: tuple[Tensor, Tensor, Tensor], index: int,
                key: tuple[int, ...], device: torch.device, rank: int, world_size: int,
                restart: bool = False) -> tuple[Optional[dict[str, Any]], list[dict[str, Any]]]:
    """Trains fold or seed ``index`` (``task.unit``) on its ``(train, val, test)`` split, from scratch
    (``restart``, or without a checkpoint) or from its checkpoint. All randomness derives from ``key``.

    Returns the result at the first epoch of best ``task.selection`` and the per-epoch log; both are only kept on
    rank 0.
    """
    ckpt_path = Path(config.out) / f"{task.unit}{index}.pt"
    csv_path = ckpt_path.with_suffix(".csv")
    csv_fields = ("epoch", "train_loss", *task.scores, "lr", "seconds")
    seed_everything(derive_seed(*key))  # the initial parameters, equal on every rank
    model = task.model()
    if world_size > 1 and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # no CPU kernels, hence CUDA only
    model = model.to(device)
    optimizer = Adam(model.parameters(), lr=config.lr)
    scheduler = StepLR(optimizer, step_size=config.lr_step, gamma=config.lr_gamma)

    states = dict(model=model, optimizer=optimizer, scheduler=scheduler)
    epoch, best, history = 0, None, []
    if not restart:
        remedy = f"train {task.unit} {index} again with --restart {index}, or move the file aside"
        epoch, best, history = resume(ckpt_path, config, RUNTIME_FIELDS, states, remedy, device)
    if epoch == config.epochs:
        # The checkpoint holds the whole log: a CSV cut short or edited since is written again from it.
        if rank == 0 and (not csv_path.exists() or csv_path.read_bytes().decode(errors="replace")
                          != csv_text(csv_fields, history)):
            write_csv(csv_path, csv_fields, history)
            print(f"{csv_path} did not match the log in {ckpt_path}; written again from it", flush=True)
        return best, history

    train_idx, val_idx, test_idx = split
    dataset = task.dataset
    sampler = ShardedBatchSampler(len(train_idx), config.batch_size, key, rank, world_size, task.min_per_process)
    train_loader = DataLoader(dataset[train_idx], batch_sampler=sampler, num_workers=config.num_workers)
    val_loader = DataLoader(dataset[val_idx], config.batch_size, num_workers=config.num_workers)
    test_loader = DataLoader(dataset[test_idx], config.batch_size, num_workers=config.num_workers)
    ddp = DistributedDataParallel(model) if world_size > 1 else model

    progress = EpochProgress(f"{config.dataset} {config.pooling} {task.unit} {index}", epoch, config.epochs,
                             enabled=rank == 0)
    for epoch in range(epoch + 1, config.epochs + 1):
        start = time.perf_counter()
        # The epoch's randomness (batch order, dropout) is a function of (key, epoch, rank) alone, so a resumed
        # run needs no saved RNG state to draw what an uninterrupted run draws.
        seed_everything(derive_seed(*key, epoch, rank))
        sampler.set_epoch(epoch)
        lr = scheduler.get_last_lr()[0]
        train_loss = train_epoch(ddp, task, train_loader, optimizer, device, world_size)
        scheduler.step()
        if rank != 0:
            continue

        scores = task.evaluate(model, val_loader, test_loader, device)
        seconds = time.perf_counter() - start
        history.append(dict(epoch=epoch, train_loss=train_loss, **scores, lr=lr, seconds=seconds,
                            **uot_values(model)))
        if best is None or better(scores[task.selection], best[task.selection], task.maximize):
            best = {task.unit: index, **{key: scores[key] for key in task.kept}, "best_epoch": epoch}
        progress.update(epoch, dict(train_loss=train_loss, **scores), seconds)
        # The log first: a kill between the two writes only makes the resumed run rewrite the same row.
        write_csv(csv_path, csv_fields, history)
        save_checkpoint(ckpt_path, config, epoch, states, best, history)
    progress.close()
    return best, history


def run(config: Config, restart: Sequence[int] = ()) -> None:
    """Trains every fold or seed of ``config`` not yet finished (and those in ``restart`` from scratch), then
    writes ``results.json``."""
    if config.threads:
        torch.set_num_threads(config.threads)
    world_size = int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun
    device = torch.device(config.device)
    if world_size > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if world_size > 1 else 0

    task = OGBTask(config) if config.is_ogb else TUTask(config)
    # Rank 0 fills the cache first: two processes must not write PyG's processed/ files at once.
    if rank > 0:
        dist.barrier()
    task.load()
    if rank == 0 and world_size > 1:
        dist.barrier()

    splits = task.splits()
    unknown = sorted(set(restart) - {index for index, _, _ in splits})
    if unknown:
        raise UsageError(f"--restart {' '.join(map(str, unknown))}: no such {task.unit} (this run has "
                         f"{', '.join(str(index) for index, _, _ in splits)})")
    # Only now, with the config and the data found good, is the run directory made (and locked).
    out = Path(config.out)
    with run_lock(out) if rank == 0 else contextlib.nullcontext():
        bests, seconds = [], []
        for index, key, split in splits:
            best, history = train_split(config, task, split, index, key, device, rank, world_size,
                                        restart=index in restart)
            bests.append(best)
            seconds += [row["seconds"] for row in history]

        if rank == 0:
            fields, line = task.summary(bests)
            timing = epoch_seconds(seconds)
            results = dict(dataset=config.dataset, pooling=config.pooling, metric=task.metric,
                           config=dataclasses.asdict(config), commit=git_commit(), dirty=git_dirty(), **fields,
                           **timing)
            write_json(out / "results.json", results)
            print(f"{config.dataset} {config.pooling}: {line}, {timing['seconds_per_epoch']:.2f} s per epoch "
                  f"(90th percentile {timing['seconds_per_epoch_p90']:.2f}) -> {out / 'results.json'}", flush=True)
    if world_size > 1:
        dist.destroy_process_group()


def main(argv: Optional[Sequence[str]] = None) -> None:
    config, restart, parser = parse_run(argv)
    try:
        run(config, restart)
    except UsageError as error:  # found only once the task or the data was looked at
        parser.error(str(error))


if __name__ == "__main__":
    main()
