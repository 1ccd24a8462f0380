"""The AD-GCL protocol as the UOT paper's script runs it: config, alternating training, SVM evaluation, runs.

After every epoch the frozen encoder embeds all graphs and a linear SVM is scored by 10-fold cross-validation; a
seed's score is the mean test accuracy over folds at the epoch of best mean validation accuracy, and a run reports
the mean and standard deviation over seeds. The SVM is the authors' ``StandardScaler`` + ``LinearSVC(dual=False)``
at sklearn's default ``C = 1`` (their ``param_search=False``); ``svm_search: true`` chooses ``C`` by AD-GCL's
5-fold grid search instead. ``results.json`` records which.

Each seed keeps a checkpoint in the run directory (``--out``), rewritten every epoch, so running the same command
again continues where a crash or kill stopped it, with exactly the numbers of an uninterrupted run on CPU (same
machine and thread count). A finished seed is read back, never recomputed.
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import sklearn
import torch
import torch_geometric.transforms as T
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV, KFold, train_test_split
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC
from torch.optim import Adam, Optimizer
from torch_geometric import seed_everything
from torch_geometric.data import InMemoryDataset
from torch_geometric.loader import DataLoader

from experiments.adgcl.model import ContrastiveEncoder, ViewLearner, drop_regulariser, nt_xent, relaxed_bernoulli
from experiments.config import CHOICES, UsageError, dataclass_parser, parse_dataclass, read_dataclass
from experiments.data import load_tu
from experiments.models import UOTOptions
from experiments.protocol import derive_seed, summarize
from experiments.records import (EpochProgress, epoch_seconds, git_commit, git_dirty, resume, run_lock,
                                 save_checkpoint, uot_values, write_csv, write_json)

CSV_FIELDS = ("epoch", "model_loss", "view_loss", "reg", "train_acc", "val_acc", "test_acc", "train_seconds",
              "seconds")
C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)  # AD-GCL's grid for the SVM's C, with svm_search
EMBED_BATCH_SIZE = 128  # as AD-GCL; in eval mode the embeddings do not depend on it


@dataclass
class AdgclConfig(UOTOptions):
    """One AD-GCL run over several seeds; the defaults are the UOT paper's script (``backbones/adgcl.py``). The
    UOT readout's options are those of :class:`~experiments.models.UOTOptions`."""

    dataset: str = "MUTAG"
    root: str = "data"  # holds <dataset>/raw; only read, never written
    cache: str = "~/.cache/uotp_geometric/TUDataset"  # writable copy where PyG writes processed/
    out: str = "runs/adgcl-{dataset}-{pooling}"  # run directory; {field} takes the field's value
    pooling: str = "add"  # a name known to experiments.models.make_readout
    epochs: int = 20
    batch_size: int = 32
    lr: float = 0.001  # Adam, for the encoder and the view learner alike
    emb_dim: int = 32
    num_layers: int = 5
    drop: float = 0.5  # dropout after every GIN layer, in both GNNs
    edge_mlp_dim: int = 64  # hidden width of the view learner's edge MLP
    temperature: float = 0.2  # of the contrastive loss
    reg_lambda: float = 5.0  # weight of the view learner's penalty on the mean edge-drop probability
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    folds: int = 10  # of the SVM's cross-validation
    svm_search: bool = False  # False: LinearSVC at C = 1, as the UOT paper; True: C by AD-GCL's grid search
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.folds < 2:
            raise ValueError(f"--folds needs at least 2 (got {self.folds})")
        if self.epochs < 1:
            raise ValueError(f"--epochs must be at least 1 (got {self.epochs})")
        self.check_uot(self.pooling)


# Fields that do not change what a seed computes: a seed's checkpoint may be resumed under other values.
RUNTIME_FIELDS = frozenset({"root", "cache", "out", "device", "seeds"})


DESCRIPTION = "AD-GCL encoder trained without labels, linear SVM on its embeddings (the UOT paper's protocol)."


def parse_config(argv: Optional[Sequence[str]] = None) -> AdgclConfig:
    """Reads ``--config FILE`` (optional) and applies every ``--<field> <value>`` flag on top
    (``--seeds 0 1 2`` takes several values)."""
    return parse_dataclass(AdgclConfig, DESCRIPTION, argv, CHOICES)


def train_epoch(model: ContrastiveEncoder, view_learner: ViewLearner, loader: DataLoader,
                model_optimizer: Optimizer, view_optimizer: Optimizer, config: AdgclConfig,
                device: torch.device) -> dict[str, float]:
    """One pass of AD-GCL's alternating updates; returns the losses averaged over graphs.

    Per batch, the view learner first ascends ``contrastive loss - reg_lambda * mean drop probability`` with
    the encoder in eval mode, then the encoder descends the contrastive loss on a fresh view drawn from the view
    learner in eval mode.
    """
    totals = dict(model_loss=0.0, view_loss=0.0, reg=0.0)
    num_graphs = 0
    for data in loader:
        data = data.to(device)
        args = (data.x, data.edge_index, data.batch, data.num_graphs)
        edge_batch = data.batch[data.edge_index[0]]

        model.eval()
        view_learner.train()
        with torch.no_grad():  # the view learner's gradient only flows through the view
            z = model(*args)
        edge_weight = relaxed_bernoulli(view_learner(data.x, data.edge_index))
        reg = drop_regulariser(edge_weight, edge_batch, data.num_graphs)
        view_loss = nt_xent(z, model(*args, edge_weight), config.temperature) - config.reg_lambda * reg
        view_optimizer.zero_grad()
        (-view_loss).backward()
        view_optimizer.step()

        model.train()
        view_learner.eval()
        z = model(*args)
        with torch.no_grad():
            edge_weight = relaxed_bernoulli(view_learner(data.x, data.edge_index))
        model_loss = nt_xent(z, model(*args, edge_weight), config.temperature)
        model_optimizer.zero_grad()  # also clears what the view step left in the encoder's gradients
        model_loss.backward()
        model_optimizer.step()

        for name, value in (("model_loss", model_loss), ("view_loss", view_loss), ("reg", reg)):
            totals[name] += value.item() * data.num_graphs
        num_graphs += data.num_graphs
    return {name: total / num_graphs for name, total in totals.items()}


@torch.no_grad()
def embed(model: ContrastiveEncoder, dataset: InMemoryDataset, device: torch.device) -> np.ndarray:
    """The graph embeddings of all of ``dataset``, in order, from the encoder in eval mode."""
    model.eval()
    out = []
    for data in DataLoader(dataset, EMBED_BATCH_SIZE):
        data = data.to(device)
        out.append(model.embed(data.x, data.edge_index, data.batch, data.num_graphs).cpu())
    return torch.cat(out).numpy()


def make_svm(search: bool) -> Pipeline:
    """AD-GCL's classifier: ``StandardScaler`` then ``LinearSVC(dual=False)``, at sklearn's default ``C = 1``, or
    with ``C`` chosen by a 5-fold grid search over :data:`C_GRID` on the training graphs (``search``)."""
    svm = LinearSVC(dual=False)
    return make_pipeline(StandardScaler(), GridSearchCV(svm, {"C": C_GRID}, cv=5, scoring="accuracy")
                         if search else svm)


def svm_setting(search: bool) -> str:
    """The classifier as ``results.json`` records it: sklearn's own description and version."""
    return f"{' '.join(repr(make_svm(search)).split())} (scikit-learn {sklearn.__version__})"


def svm_fold_accuracies(embeddings: np.ndarray, y: np.ndarray, folds: int, seed: int,
                        search: bool = False) -> np.ndarray:
    """Train, validation and test accuracy of :func:`make_svm` in each of ``folds`` folds, shape ``(folds, 3)``.

    As AD-GCL's ``kf_embedding_evaluation``: ``KFold(shuffle=True)`` test folds, each fold's other graphs split
    80/20 into training and validation graphs (neither stratified); the classifier sees only the training graphs,
    and the validation graphs only serve to choose the epoch. Unlike AD-GCL, whose splits are drawn anew at every
    evaluation, the splits are fixed by ``seed``, so that every epoch and every pooling of a seed is scored on the
    same folds.
    """
    accs = []
    for train_val, test in KFold(folds, shuffle=True, random_state=seed).split(embeddings):
        train, val = train_test_split(train_val, test_size=0.2, random_state=seed)
        classifier = make_svm(search)
        with warnings.catch_warnings():
            # liblinear may stop at its default max_iter on near-separable embeddings, as in AD-GCL; that
            # solution is then scored as it is.
            warnings.simplefilter("ignore", ConvergenceWarning)
            classifier.fit(embeddings[train], y[train])
        accs.append([classifier.score(embeddings[part], y[part]) for part in (train, val, test)])
    return np.asarray(accs)


def run_seed(config: AdgclConfig, dataset: InMemoryDataset, seed: int,
             device: torch.device) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Trains one seed from scratch or from its checkpoint.

    Returns the seed's result (the test accuracy at the first epoch of highest validation accuracy, and the
    test accuracy of each fold at that epoch) and its per-epoch log.
    """
    ckpt_path = Path(config.out) / f"seed{seed}.pt"
    seed_everything(derive_seed(seed))  # the initial parameters
    model = ContrastiveEncoder(config.pooling, config.emb_dim, config.num_layers, config.drop,
                               uot=config.uot_options()).to(device)
    view_learner = ViewLearner(config.emb_dim, config.num_layers, config.drop, config.edge_mlp_dim).to(device)
    model_optimizer = Adam(model.parameters(), lr=config.lr)
    view_optimizer = Adam(view_learner.parameters(), lr=config.lr)

    states = dict(model=model, view_learner=view_learner, model_optimizer=model_optimizer,
                  view_optimizer=view_optimizer)
    epoch, best, history = resume(ckpt_path, config, RUNTIME_FIELDS, states,
                                  f"move it aside to train seed {seed} again", device)

    y = dataset.y.numpy()
    progress = EpochProgress(f"AD-GCL {config.dataset} {config.pooling} seed {seed}", epoch, config.epochs)
    for epoch in range(epoch + 1, config.epochs + 1):
        start = time.perf_counter()
        # The epoch's randomness (batch order, dropout, edge samples) is a function of (seed, epoch) alone, so a
        # resumed run needs no saved RNG state to draw what an uninterrupted run draws.
        seed_everything(derive_seed(seed, epoch))
        perm = torch.randperm(len(dataset)).tolist()
        # A batch of one graph has no negatives for the contrastive loss, so a last batch of one is left out.
        batches = [batch for i in range(0, len(perm), config.batch_size)
                   if len(batch := perm[i:i + config.batch_size]) > 1]
        losses = train_epoch(model, view_learner, DataLoader(dataset, batch_sampler=batches), model_optimizer,
                             view_optimizer, config, device)
        train_seconds = time.perf_counter() - start
        folds = svm_fold_accuracies(embed(model, dataset, device), y, config.folds, seed, config.svm_search)
        train_acc, val_acc, test_acc = (float(acc) for acc in folds.mean(axis=0))
        history.append(dict(epoch=epoch, **losses, train_acc=train_acc, val_acc=val_acc, test_acc=test_acc,
                            train_seconds=train_seconds, seconds=time.perf_counter() - start,
                            **uot_values(model)))
        if best is None or val_acc > best["val_acc"]:  # the first maximum, like AD-GCL's argmax
            best = dict(seed=seed, test_acc=test_acc, val_acc=val_acc, best_epoch=epoch,
                        fold_test_acc=folds[:, 2].tolist())
        progress.update(epoch, dict(loss=losses["model_loss"], val_acc=val_acc, test_acc=test_acc),
                        history[-1]["seconds"])
        # The log first: a kill between the two writes only makes the resumed run rewrite the same row.
        write_csv(ckpt_path.with_suffix(".csv"), CSV_FIELDS, history)
        save_checkpoint(ckpt_path, config, epoch, states, best, history)
    progress.close()
    return best, history


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = dataclass_parser(AdgclConfig, DESCRIPTION, CHOICES)
    args = parser.parse_args(argv)
    try:
        config = read_dataclass(AdgclConfig, parser, args, CHOICES)
    except TypeError as error:  # a value of the wrong type in the YAML file
        parser.error(f"in {args.config}: {error}")
    device = torch.device(config.device)
    try:
        dataset = load_tu(config.dataset, config.root, config.cache)
    except UsageError as error:  # a missing root, an unknown dataset
        parser.error(str(error))
    # AD-GCL ignores node labels and load_tu's degree features alike: every node's feature is 1.
    dataset.transform = T.Constant(cat=False)

    out = Path(config.out)
    with run_lock(out):  # two runs in one directory would overwrite each other's checkpoints
        seeds, seconds = [], []
        for seed in config.seeds:
            best, history = run_seed(config, dataset, seed, device)
            seeds.append(best)
            seconds += [row["seconds"] for row in history]
        mean, std = summarize([result["test_acc"] for result in seeds])
        results = dict(dataset=config.dataset, pooling=config.pooling, metric="accuracy", protocol="adgcl",
                       svm=svm_setting(config.svm_search), config=dataclasses.asdict(config), commit=git_commit(),
                       dirty=git_dirty(), seeds=seeds, mean=mean, std=std, **epoch_seconds(seconds))
        write_json(out / "results.json", results)
    spread = "" if std is None else f" ± {100 * std:.2f}"
    count = f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''}"
    print(f"AD-GCL {config.dataset} {config.pooling}: test accuracy {100 * mean:.2f}{spread} over {count}, "
          f"{results['seconds_per_epoch']:.2f} s per epoch -> {out / 'results.json'}")
