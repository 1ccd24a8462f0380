"""Seconds per training epoch of a GNN with each pooling: what the layer costs where it is used.

The harness's own pieces (:class:`~experiments.train.TUTask`, :func:`~experiments.train.train_epoch`) train
one model per pooling on the first fold of a TU config; the poolings take turns epoch by epoch, so that a load
change hits them alike, and each pooling's time is divided by the baseline pooling's in the same round.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

import numpy as np
import torch
from torch.optim import Adam
from torch_geometric import seed_everything
from torch_geometric.loader import DataLoader

from experiments.config import parse_config
from experiments.models import UOT_SOLVERS, parse_label
from experiments.train import TUTask, train_epoch


@dataclass
class TrainingPlan:
    """``epochs`` timed epochs per pooling after ``warmup`` untimed ones, on ``threads`` threads."""

    config: str = "configs/tu/proteins.yaml"
    root: str = "../shared/data/TUDataset"
    cache: str = "~/.cache/uotp_geometric/TUDataset"
    # Pooling names, or UOT variants as experiments.models.run_label names them; the first is the baseline.
    poolings: Sequence[str] = ("mean", "uot", "uot_badmm")
    epochs: int = 6
    warmup: int = 1
    threads: int = 1


def measure_training(plan: TrainingPlan) -> list[dict[str, Any]]:
    """One row per pooling: median seconds per epoch and the median per-round ratio to ``poolings[0]``."""
    config = parse_config(["--config", plan.config, "--root", plan.root, "--cache", plan.cache])
    threads = torch.get_num_threads()
    torch.set_num_threads(plan.threads)
    try:
        task = TUTask(config)
        task.load()
        _, _, (train_idx, _, _) = task.splits()[0]
        loader = DataLoader(task.dataset[train_idx], config.batch_size, shuffle=True)
        runs = {}
        for pooling in plan.poolings:
            name, options = parse_label(pooling)
            pooled = TUTask(replace(config, pooling=name, **asdict(options)))
            pooled.dataset = task.dataset
            seed_everything(config.seed)
            model = pooled.model()
            runs[pooling] = (model, Adam(model.parameters(), lr=config.lr))
        seconds: dict[str, list[float]] = {pooling: [] for pooling in plan.poolings}
        for epoch in range(plan.warmup + plan.epochs):
            for pooling, (model, optimizer) in runs.items():
                seed_everything(epoch)  # the same batches for every pooling
                start = time.perf_counter()
                train_epoch(model, task, loader, optimizer, torch.device("cpu"), world_size=1)
                if epoch >= plan.warmup:
                    seconds[pooling].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    base = np.array(seconds[plan.poolings[0]])
    rows = []
    for pooling, times in seconds.items():
        ratios = np.array(times) / base
        name, options = parse_label(pooling)
        rows.append(dict(section="training", config=f"GIN {config.num_layers}x{config.hidden} on {config.dataset}, "
                                                    f"batch {config.batch_size}, {plan.threads} thread(s)",
                         method=pooling, solver=UOT_SOLVERS.get(name, ""),
                         K=options.num_iters if name in UOT_SOLVERS else 0, N=len(train_idx),
                         epoch_s=float(np.median(times)), baseline=plan.poolings[0],
                         epoch_ratio=float(np.median(ratios)),
                         note=f"ratio {ratios.min():.3g} to {ratios.max():.3g} over {plan.epochs} epochs (after "
                              f"{plan.warmup} warm-up); N = training graphs"))
    return rows
