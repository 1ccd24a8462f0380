"""k-fold graph classification: ``python -m experiments.train --config configs/tu/mutag.yaml [--<field> <value>]``.

Each fold keeps a checkpoint in the run directory (``--out``), rewritten every epoch, so running the same command
again continues where a crash or kill stopped it; on CPU (same machine and thread count) it ends with exactly the
numbers of an uninterrupted run, while CUDA's atomic scatter kernels are not deterministic. A finished fold is
read back, never recomputed.

Under ``torchrun --nproc_per_node=N`` the model trains with DistributedDataParallel: each global batch of
``batch_size`` graphs is split over the processes, and rank 0 evaluates and writes every file. On CUDA,
BatchNorm becomes SyncBatchNorm; PyTorch has no CPU kernels for it, so on CPU (gloo) each process normalises
with its own share of the batch, and dropout masks differ per process. Without both (``--batch_norm false
--dropout 0``) N processes reproduce one process up to float summation order (tests/experiments/test_train.py).
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Adam, Optimizer
from torch.optim.lr_scheduler import StepLR
from torch_geometric import seed_everything
from torch_geometric.data import InMemoryDataset
from torch_geometric.loader import DataLoader
from tqdm import tqdm

from experiments.config import RUNTIME_FIELDS, Config, parse_config
from experiments.data import load_tu
from experiments.models import GIN
from experiments.protocol import ShardedBatchSampler, derive_seed, evaluate, k_fold, summarize

CSV_FIELDS = ("epoch", "train_loss", "val_loss", "val_acc", "test_acc", "lr", "seconds")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path to write to; it replaces ``path`` only once the write has finished."""
    tmp = path.with_name(path.name + ".tmp")
    yield tmp
    os.replace(tmp, path)


def git_commit() -> Optional[str]:
    """The commit checked out where this file lives, or ``None`` outside a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def train_epoch(model: torch.nn.Module, loader: DataLoader, optimizer: Optimizer, device: torch.device,
                world_size: int) -> float:
    """One pass over the training graphs; returns the mean cross-entropy over all processes."""
    model.train()
    total = torch.zeros(2, device=device)  # (summed loss, number of graphs)
    for data in loader:
        data = data.to(device)
        optimizer.zero_grad()
        out = model(data.x, data.edge_index, data.batch, data.num_graphs)
        loss = F.cross_entropy(out, data.y, reduction="sum")
        num_graphs = torch.tensor(float(data.num_graphs), device=device)
        if world_size > 1:
            dist.all_reduce(num_graphs)
        # DDP averages gradients over processes, so scaling by world_size / (graphs in the global batch) yields
        # the gradient of the global batch's mean loss, whatever share of it each process holds.
        (loss * world_size / num_graphs).backward()
        optimizer.step()
        total += torch.stack([loss.detach(), torch.tensor(float(data.num_graphs), device=device)])
    if world_size > 1:
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


def _check_resumable(saved: dict[str, Any], config: Config, path: Path) -> None:
    current = dataclasses.asdict(config)
    changed = sorted(key for key in current if key not in RUNTIME_FIELDS and saved.get(key) != current[key])
    if changed:
        raise SystemExit(f"{path} belongs to a run with other {', '.join(changed)}; choose another --out")


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def run_fold(config: Config, dataset: InMemoryDataset, split: tuple[torch.Tensor, ...], fold: int,
             device: torch.device, rank: int,
             world_size: int) -> tuple[Optional[dict[str, Any]], list[dict[str, Any]]]:
    """Trains one fold from scratch or from its checkpoint.

    Returns the fold's result (the test accuracy at the first epoch of lowest validation loss) and its
    per-epoch log; both are only kept on rank 0.
    """
    ckpt_path = Path(config.out) / f"fold{fold}.pt"
    seed_everything(derive_seed(config.seed, fold))  # the fold's initial parameters, equal on every rank
    model = GIN(dataset.num_features, dataset.num_classes, config.pooling, config.hidden, config.num_layers,
                config.dropout, config.batch_norm, num_iters=config.num_iters, eps=config.uot_eps,
                lam_p=config.uot_lam_p, lam_q=config.uot_lam_q)
    if world_size > 1 and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # no CPU kernels, hence CUDA only
    model = model.to(device)
    optimizer = Adam(model.parameters(), lr=config.lr)
    scheduler = StepLR(optimizer, step_size=config.lr_step, gamma=config.lr_gamma)

    epoch, best, history = 0, None, []
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device)
        _check_resumable(ckpt["config"], config, ckpt_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        epoch, best, history = ckpt["epoch"], ckpt["best"], ckpt["history"]
    if epoch == config.epochs:
        return best, history

    train_idx, val_idx, test_idx = split
    sampler = ShardedBatchSampler(len(train_idx), config.batch_size, (config.seed, fold), rank, world_size)
    train_loader = DataLoader(dataset[train_idx], batch_sampler=sampler, num_workers=config.num_workers)
    val_loader = DataLoader(dataset[val_idx], config.batch_size, num_workers=config.num_workers)
    test_loader = DataLoader(dataset[test_idx], config.batch_size, num_workers=config.num_workers)
    ddp = DistributedDataParallel(model) if world_size > 1 else model

    progress = tqdm(range(epoch + 1, config.epochs + 1), initial=epoch, total=config.epochs,
                    desc=f"{config.dataset} {config.pooling} fold {fold}", disable=rank != 0)
    for epoch in progress:
        start = time.perf_counter()
        # The epoch's randomness (batch order, dropout) is a function of (seed, fold, epoch, rank) alone, so a
        # resumed run needs no saved RNG state to draw what an uninterrupted run draws.
        seed_everything(derive_seed(config.seed, fold, epoch, rank))
        sampler.set_epoch(epoch)
        lr = scheduler.get_last_lr()[0]
        train_loss = train_epoch(ddp, train_loader, optimizer, device, world_size)
        scheduler.step()
        if rank != 0:
            continue

        val_loss, val_acc = evaluate(model, val_loader, device)
        _, test_acc = evaluate(model, test_loader, device)
        history.append(dict(epoch=epoch, train_loss=train_loss, val_loss=val_loss, val_acc=val_acc,
                            test_acc=test_acc, lr=lr, seconds=time.perf_counter() - start))
        if best is None or val_loss < best["val_loss"]:  # the first minimum, like benchmark/kernel's argmin
            best = dict(fold=fold, test_acc=test_acc, val_loss=val_loss, best_epoch=epoch)
        progress.set_postfix(val_loss=f"{val_loss:.4f}", test_acc=f"{test_acc:.3f}")
        # The log first: a kill between the two writes only makes the resumed run rewrite the same row.
        _write_csv(ckpt_path.with_suffix(".csv"), history)
        with atomic_path(ckpt_path) as tmp:
            torch.save(dict(config=dataclasses.asdict(config), epoch=epoch, model=model.state_dict(),
                            optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), best=best,
                            history=history), tmp)
    return best, history


def main(argv: Optional[Sequence[str]] = None) -> None:
    config = parse_config(argv)
    world_size = int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun
    device = torch.device(config.device)
    if world_size > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if world_size > 1 else 0

    # Rank 0 fills the cache first: two processes must not write PyG's processed/ files at once.
    if rank > 0:
        dist.barrier()
    dataset = load_tu(config.dataset, config.root, config.cache)
    if rank == 0 and world_size > 1:
        dist.barrier()

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    folds, seconds = [], []
    for fold, split in enumerate(k_fold(dataset.y, config.folds)):
        best, history = run_fold(config, dataset, split, fold, device, rank, world_size)
        folds.append(best)
        seconds += [row["seconds"] for row in history]

    if rank == 0:
        mean, std = summarize([result["test_acc"] for result in folds])
        results = dict(dataset=config.dataset, pooling=config.pooling, metric="accuracy",
                       config=dataclasses.asdict(config), commit=git_commit(), folds=folds, mean=mean, std=std,
                       seconds_per_epoch=statistics.median(seconds))  # robust to a busy machine
        with atomic_path(out / "results.json") as tmp:
            tmp.write_text(json.dumps(results, indent=2) + "\n")
        print(f"{config.dataset} {config.pooling}: test accuracy {100 * mean:.2f} ± {100 * std:.2f} "
              f"over {config.folds} folds, {results['seconds_per_epoch']:.2f} s per epoch -> {out / 'results.json'}")
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
