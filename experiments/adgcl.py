"""The UOT paper's protocol: an AD-GCL encoder trained without labels, then a linear SVM on its embeddings.

``python -m experiments.adgcl --config configs/adgcl/mutag.yaml [--<field> <value>]``

AD-GCL (Suresh et al., NeurIPS 2021, github.com/susheels/adgcl, ``test_minmax_tu.py``) trains a GIN encoder
with a contrastive loss between each graph and a view of it whose edges a second GNN, the view learner, drops
adversarially. The UOT paper keeps this protocol and swaps the encoder's readout, here any pooling name of
:func:`experiments.models.make_readout`. After every epoch the frozen encoder embeds all graphs and a linear
SVM is scored by 10-fold cross-validation; a seed's score is the mean test accuracy over folds at the epoch of
best mean validation accuracy, and a run reports the mean and standard deviation over seeds.

Each seed keeps a checkpoint in the run directory (``--out``), rewritten every epoch, so running the same command
again continues where a crash or kill stopped it, with exactly the numbers of an uninterrupted run on CPU (same
machine and thread count). A finished seed is read back, never recomputed.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torch_geometric.transforms as T
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV, StratifiedKFold, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC
from torch import Tensor
from torch.nn import BatchNorm1d, Linear, ModuleList, ReLU, Sequential
from torch.optim import Adam, Optimizer
from torch_geometric import seed_everything
from torch_geometric.data import InMemoryDataset
from torch_geometric.loader import DataLoader
from torch_geometric.nn import MessagePassing
from torch_geometric.utils import scatter
from tqdm import tqdm

from experiments.config import parse_dataclass
from experiments.data import load_tu
from experiments.models import make_readout
from experiments.protocol import derive_seed, summarize
from experiments.records import atomic_path, git_commit, write_csv, write_json

CSV_FIELDS = ("epoch", "model_loss", "view_loss", "reg", "train_acc", "val_acc", "test_acc", "train_seconds",
              "seconds")
C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)  # AD-GCL's grid for the SVM's C
EMBED_BATCH_SIZE = 128  # as AD-GCL; in eval mode the embeddings do not depend on it


@dataclass
class AdgclConfig:
    """One AD-GCL run over several seeds; the defaults are AD-GCL's TU settings as the UOT paper runs them."""

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
    num_iters: int = 4  # K, the UOT solver's iterations
    uot_eps: float = 1.0  # initial UOT values, as in experiments.config.Config
    uot_lam_p: float = float("inf")
    uot_lam_q: float = 1.0
    device: str = "cpu"


# Fields that do not change what a seed computes: a seed's checkpoint may be resumed under other values.
RUNTIME_FIELDS = frozenset({"root", "cache", "out", "device", "seeds"})


def parse_config(argv: Optional[Sequence[str]] = None) -> AdgclConfig:
    """Reads ``--config FILE`` (optional) and applies every ``--<field> <value>`` flag on top
    (``--seeds 0 1 2`` takes several values)."""
    return parse_dataclass(AdgclConfig, __doc__.splitlines()[0], argv)


class WeightedGINConv(MessagePassing):
    r"""GIN layer with per-edge message weights, :math:`h_\Theta(x_i + \sum_{j \to i} w_{ji} x_j)`.

    AD-GCL's ``WGINConv`` (with :math:`\epsilon = 0`): PyG's ``GINConv`` takes no edge weights, and the view
    learner's soft edge drops reach the encoder only as such weights. Without weights it is ``GINConv``.
    """

    def __init__(self, nn: torch.nn.Module) -> None:
        super().__init__(aggr="add")
        self.nn = nn

    def forward(self, x: Tensor, edge_index: Tensor, edge_weight: Optional[Tensor] = None) -> Tensor:
        return self.nn(x + self.propagate(edge_index, x=x, edge_weight=edge_weight))

    def message(self, x_j: Tensor, edge_weight: Optional[Tensor]) -> Tensor:
        return x_j if edge_weight is None else edge_weight.view(-1, 1) * x_j


class NodeEncoder(torch.nn.Module):
    """AD-GCL's ``TUEncoder`` up to its readout: node embeddings after ``num_layers`` GIN layers.

    Each layer is ``WeightedGINConv(Linear-ReLU-Linear)``, BatchNorm, ReLU (not after the last layer) and
    dropout.
    """

    def __init__(self, in_channels: int, emb_dim: int, num_layers: int, dropout: float) -> None:
        super().__init__()
        self.convs = ModuleList(
            WeightedGINConv(Sequential(Linear(in_channels if i == 0 else emb_dim, emb_dim), ReLU(),
                                       Linear(emb_dim, emb_dim)))
            for i in range(num_layers))
        self.norms = ModuleList(BatchNorm1d(emb_dim) for _ in range(num_layers))
        self.dropout = dropout

    def forward(self, x: Tensor, edge_index: Tensor, edge_weight: Optional[Tensor] = None) -> Tensor:
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x = norm(conv(x, edge_index, edge_weight))
            if i < len(self.convs) - 1:
                x = x.relu()
            x = F.dropout(x, self.dropout, training=self.training)
        return x


def _xavier_init(module: torch.nn.Module) -> None:
    # AD-GCL's init_emb: Xavier-uniform weights and zero biases for every Linear layer.
    for layer in module.modules():
        if isinstance(layer, Linear):
            torch.nn.init.xavier_uniform_(layer.weight)
            torch.nn.init.zeros_(layer.bias)


class ContrastiveEncoder(torch.nn.Module):
    """AD-GCL's ``GInfoMinMax``: node encoder, readout (the graph embedding) and projection head.

    The readout keeps its own initialisation, so that every pooling starts as in the supervised harness.
    """

    def __init__(self, config: AdgclConfig) -> None:
        super().__init__()
        self.nodes = NodeEncoder(1, config.emb_dim, config.num_layers, config.drop)
        self.readout, readout_channels = make_readout(config.pooling, config.emb_dim, config.num_iters,
                                                      config.uot_eps, config.uot_lam_p, config.uot_lam_q)
        self.head = Sequential(Linear(readout_channels, config.emb_dim), ReLU(),
                               Linear(config.emb_dim, config.emb_dim))
        _xavier_init(self.nodes)
        _xavier_init(self.head)

    def embed(self, x: Tensor, edge_index: Tensor, batch: Tensor, num_graphs: int,
              edge_weight: Optional[Tensor] = None) -> Tensor:
        """The graph embeddings the SVM is trained on."""
        return self.readout(self.nodes(x, edge_index, edge_weight), batch, dim_size=num_graphs)

    def forward(self, x: Tensor, edge_index: Tensor, batch: Tensor, num_graphs: int,
                edge_weight: Optional[Tensor] = None) -> Tensor:
        return self.head(self.embed(x, edge_index, batch, num_graphs, edge_weight))


class ViewLearner(torch.nn.Module):
    """AD-GCL's ``ViewLearner``: a GNN of its own and an MLP on the two end embeddings give a logit per edge."""

    def __init__(self, config: AdgclConfig) -> None:
        super().__init__()
        self.nodes = NodeEncoder(1, config.emb_dim, config.num_layers, config.drop)
        self.edge_mlp = Sequential(Linear(2 * config.emb_dim, config.edge_mlp_dim), ReLU(),
                                   Linear(config.edge_mlp_dim, 1))
        _xavier_init(self)

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        h = self.nodes(x, edge_index)
        return self.edge_mlp(torch.cat([h[edge_index[0]], h[edge_index[1]]], dim=-1)).view(-1)


def relaxed_bernoulli(logits: Tensor, temperature: float = 1.0, bias: float = 1e-4) -> Tensor:
    """Edge keep weights in (0, 1) from a Gumbel-sigmoid sample of ``Bernoulli(sigmoid(logits))``.

    As AD-GCL: the uniform noise is kept in ``[bias, 1 - bias]`` so that its logit stays finite.
    """
    u = torch.rand_like(logits) * (1 - 2 * bias) + bias
    return torch.sigmoid((u.log() - (-u).log1p() + logits) / temperature)


def nt_xent(z: Tensor, z_aug: Tensor, temperature: float = 0.2) -> Tensor:
    r"""AD-GCL's symmetric InfoNCE between graphs ``z[i]`` and their views ``z_aug[i]``.

    With cosine similarities :math:`s_{ij} = \cos(z_i, z'_j) / \tau`, the loss is the mean over ``i`` of
    :math:`-s_{ii} + \log \sum_{j \ne i} e^{s_{ij}}`, averaged with the same over columns, :math:`s_{ji}`. As in
    AD-GCL (and GraphCL), the positive pair is left out of the denominator. Needs at least 2 graphs.
    """
    sim = F.normalize(z, dim=-1) @ F.normalize(z_aug, dim=-1).t() / temperature
    positive = sim.diagonal()
    negatives = sim.masked_fill(torch.eye(len(sim), dtype=torch.bool, device=sim.device), float("-inf"))
    rows = negatives.logsumexp(dim=1) - positive
    cols = negatives.logsumexp(dim=0) - positive
    return (rows.mean() + cols.mean()) / 2


def drop_regulariser(edge_weight: Tensor, edge_batch: Tensor, num_graphs: int) -> Tensor:
    """The mean over graphs with edges of each graph's mean edge-drop probability, ``1 - edge_weight``."""
    per_graph = scatter(1 - edge_weight, edge_batch, dim_size=num_graphs, reduce="mean")
    has_edges = torch.bincount(edge_batch, minlength=num_graphs) > 0
    return per_graph[has_edges].mean()


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


def svm_accuracies(embeddings: np.ndarray, y: np.ndarray, folds: int, seed: int) -> tuple[float, float, float]:
    """Train, validation and test accuracy of a linear SVM, each the mean over ``folds`` seeded folds.

    Each fold's training part is split 80/20 into training and validation graphs; as AD-GCL's
    ``EmbeddingEvaluation``, ``StandardScaler`` and a 5-fold grid search over ``C`` run on the training graphs
    alone, and the validation graphs only serve to choose the epoch.
    """
    accs = []
    skf = StratifiedKFold(folds, shuffle=True, random_state=seed)
    for train_val, test in skf.split(embeddings, y):
        train, val = train_test_split(train_val, test_size=0.2, random_state=seed, stratify=y[train_val])
        classifier = make_pipeline(StandardScaler(), GridSearchCV(LinearSVC(dual=False), {"C": C_GRID}, cv=5,
                                                                  scoring="accuracy"))
        with warnings.catch_warnings():
            # liblinear stops at its default max_iter for the largest C on near-separable embeddings, as in
            # AD-GCL; the grid search then simply scores that solution.
            warnings.simplefilter("ignore", ConvergenceWarning)
            classifier.fit(embeddings[train], y[train])
        accs.append([classifier.score(embeddings[part], y[part]) for part in (train, val, test)])
    train_acc, val_acc, test_acc = np.mean(accs, axis=0)
    return float(train_acc), float(val_acc), float(test_acc)


def run_seed(config: AdgclConfig, dataset: InMemoryDataset, seed: int,
             device: torch.device) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Trains one seed from scratch or from its checkpoint.

    Returns the seed's result (the test accuracy at the first epoch of highest validation accuracy) and its
    per-epoch log.
    """
    ckpt_path = Path(config.out) / f"seed{seed}.pt"
    seed_everything(derive_seed(seed))  # the initial parameters
    model = ContrastiveEncoder(config).to(device)
    view_learner = ViewLearner(config).to(device)
    model_optimizer = Adam(model.parameters(), lr=config.lr)
    view_optimizer = Adam(view_learner.parameters(), lr=config.lr)

    epoch, best, history = 0, None, []
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device)
        current = dataclasses.asdict(config)
        changed = sorted(key for key in current if key not in RUNTIME_FIELDS and ckpt["config"][key] != current[key])
        if changed:
            raise SystemExit(f"{ckpt_path} belongs to a run with other {', '.join(changed)}; choose another --out")
        model.load_state_dict(ckpt["model"])
        view_learner.load_state_dict(ckpt["view_learner"])
        model_optimizer.load_state_dict(ckpt["model_optimizer"])
        view_optimizer.load_state_dict(ckpt["view_optimizer"])
        epoch, best, history = ckpt["epoch"], ckpt["best"], ckpt["history"]

    y = dataset.y.numpy()
    progress = tqdm(range(epoch + 1, config.epochs + 1), initial=epoch, total=config.epochs,
                    desc=f"AD-GCL {config.dataset} {config.pooling} seed {seed}")
    for epoch in progress:
        start = time.perf_counter()
        # The epoch's randomness (batch order, dropout, edge samples) is a function of (seed, epoch) alone, so a
        # resumed run needs no saved RNG state to draw what an uninterrupted run draws.
        seed_everything(derive_seed(seed, epoch))
        perm = torch.randperm(len(dataset)).tolist()
        # A batch of one graph has no negatives for the contrastive loss (as BatchNorm has no statistics), so a
        # last batch of one is left out.
        batches = [batch for i in range(0, len(perm), config.batch_size)
                   if len(batch := perm[i:i + config.batch_size]) > 1]
        losses = train_epoch(model, view_learner, DataLoader(dataset, batch_sampler=batches), model_optimizer,
                             view_optimizer, config, device)
        train_seconds = time.perf_counter() - start
        train_acc, val_acc, test_acc = svm_accuracies(embed(model, dataset, device), y, config.folds, seed)
        history.append(dict(epoch=epoch, **losses, train_acc=train_acc, val_acc=val_acc, test_acc=test_acc,
                            train_seconds=train_seconds, seconds=time.perf_counter() - start))
        if best is None or val_acc > best["val_acc"]:  # the first maximum, like AD-GCL's argmax
            best = dict(seed=seed, test_acc=test_acc, val_acc=val_acc, best_epoch=epoch)
        progress.set_postfix(loss=f"{losses['model_loss']:.4f}", val_acc=f"{val_acc:.3f}",
                             test_acc=f"{test_acc:.3f}")
        # The log first: a kill between the two writes only makes the resumed run rewrite the same row.
        write_csv(ckpt_path.with_suffix(".csv"), CSV_FIELDS, history)
        with atomic_path(ckpt_path) as tmp:
            torch.save(dict(config=dataclasses.asdict(config), epoch=epoch, model=model.state_dict(),
                            view_learner=view_learner.state_dict(), model_optimizer=model_optimizer.state_dict(),
                            view_optimizer=view_optimizer.state_dict(), best=best, history=history), tmp)
    return best, history


def main(argv: Optional[Sequence[str]] = None) -> None:
    config = parse_config(argv)
    device = torch.device(config.device)
    dataset = load_tu(config.dataset, config.root, config.cache)
    dataset.transform = T.Constant(cat=False)  # AD-GCL ignores node labels: every node's feature is 1

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds, seconds = [], []
    for seed in config.seeds:
        best, history = run_seed(config, dataset, seed, device)
        seeds.append(best)
        seconds += [row["seconds"] for row in history]

    accs = [result["test_acc"] for result in seeds]
    mean, std = summarize(accs)
    results = dict(dataset=config.dataset, pooling=config.pooling, metric="accuracy", protocol="adgcl",
                   config=dataclasses.asdict(config), commit=git_commit(), seeds=seeds, mean=mean, std=std,
                   seconds_per_epoch=statistics.median(seconds))  # robust to a busy machine
    write_json(out / "results.json", results)
    spread = "" if std is None else f" ± {100 * std:.2f}"
    count = f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''}"
    print(f"AD-GCL {config.dataset} {config.pooling}: test accuracy {100 * mean:.2f}{spread} over {count}, "
          f"{results['seconds_per_epoch']:.2f} s per epoch -> {out / 'results.json'}")


if __name__ == "__main__":
    main()
