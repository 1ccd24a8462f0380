"""AD-GCL's networks and objective: the GIN encoder with a swappable readout, the edge-dropping view learner,
the relaxed Bernoulli edge weights, the symmetric InfoNCE loss and the view learner's drop penalty."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import BatchNorm1d, Linear, ModuleList, ReLU, Sequential
from torch_geometric.nn import MessagePassing
from torch_geometric.utils import scatter

from experiments.models import UOTOptions, make_readout


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

    Node features are AD-GCL's constant 1 (``in_channels=1``). The readout is :func:`make_readout`'s
    ``pooling`` (``uot`` goes to it) and keeps its own initialisation, so that every pooling starts as
    in the supervised harness.
    """

    def __init__(self, pooling: str, emb_dim: int, num_layers: int, dropout: float,
                 uot: Optional[UOTOptions] = None) -> None:
        super().__init__()
        self.nodes = NodeEncoder(1, emb_dim, num_layers, dropout)
        self.readout, readout_channels = make_readout(pooling, emb_dim, uot)
        self.head = Sequential(Linear(readout_channels, emb_dim), ReLU(), Linear(emb_dim, emb_dim))
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

    def __init__(self, emb_dim: int, num_layers: int, dropout: float, edge_mlp_dim: int) -> None:
        super().__init__()
        self.nodes = NodeEncoder(1, emb_dim, num_layers, dropout)
        self.edge_mlp = Sequential(Linear(2 * emb_dim, edge_mlp_dim), ReLU(), Linear(edge_mlp_dim, 1))
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
