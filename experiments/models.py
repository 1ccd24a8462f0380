"""The readout factory (pooling name -> aggregation) and the backbones it is trained in: the GIN of PyG's
``benchmark/kernel`` for TU datasets, and the GIN / GIN-virtual of OGB's ``examples/graphproppred/mol``."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import BatchNorm1d, Identity, Linear, ModuleList, Parameter, ReLU, Sequential
from torch_geometric.nn import GINConv, GINEConv, MLP, aggr, global_add_pool

from uotp_geometric import UOTAggregation

POOLINGS = ("add", "mean", "max", "mixed", "softmax", "gem", "attention", "gated_attention", "set2set",
            "deepsets", "gmt", "uot", "uot_badmm", "uot_badmm_q", "rot", "rot_badmm")


class MixedAggregation(aggr.Aggregation):
    r"""Mixed mean/max pooling (Lee et al., AISTATS 2016) with one learned mixing weight,
    :math:`\sigma(a) \cdot \mathrm{mean} + (1 - \sigma(a)) \cdot \mathrm{max}`, starting from an even mix."""

    def __init__(self) -> None:
        super().__init__()
        self.logit = Parameter(torch.zeros(1))

    def reset_parameters(self) -> None:
        torch.nn.init.zeros_(self.logit)

    def forward(self, x: Tensor, index: Optional[Tensor] = None, ptr: Optional[Tensor] = None,
                dim_size: Optional[int] = None, dim: int = -2) -> Tensor:
        weight = self.logit.sigmoid()
        mean = self.reduce(x, index, ptr, dim_size, dim, reduce="mean")
        maximum = self.reduce(x, index, ptr, dim_size, dim, reduce="max")
        return weight * mean + (1 - weight) * maximum


class GatedAttentionGate(torch.nn.Module):
    r"""The gate of gated attention pooling (Ilse et al., ICML 2018):
    :math:`w^\top (\tanh(V x) \odot \sigma(U x))`, one score per node."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.V = Linear(channels, channels)
        self.U = Linear(channels, channels)
        self.w = Linear(channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.w(self.V(x).tanh() * self.U(x).sigmoid())


@dataclass
class UOTOptions:
    """What the UOT poolings (:data:`UOT_POOLINGS`) compute: every option of
    :class:`~uotp_geometric.UOTAggregation` that the harness sets. The run configs inherit these fields, so each
    is a ``--<field>`` flag of ``experiments.train`` and ``experiments.adgcl`` and is recorded in ``results.json``.
    """

    num_iters: int = 4  # K, the UOT solver's iterations
    uot_prior: str = "uniform"  # node prior q: uniform (1/N), attention, counting (mass N), power (mass N^a)
    uot_per_iteration: bool = False  # one value of each UOT parameter per solver iteration
    # Initial UOT values (learned from there; inf stays fixed). A hard feature marginal keeps the pooled
    # mass at 1: with the spec's lam_p = 1 the mass grows like exp(|x| / eps) and training diverges.
    uot_eps: float = 1.0
    uot_lam_p: float = float("inf")
    uot_lam_q: float = 1.0
    uot_rho: float = 1.0  # the initial BADMM step (uot_badmm, uot_badmm_q, rot_badmm)
    uot_mass_exponent: float = 0.5  # prior power: the initial exponent a in [0, 1] of the plan mass N^a
    uot_gw: float = 0.1  # rot, rot_badmm: the initial weight of ROT-Pooling's structure term

    def uot_options(self) -> "UOTOptions":
        """These options alone, as a :class:`UOTOptions` (for a subclass such as a run config)."""
        return UOTOptions(**{f.name: getattr(self, f.name) for f in fields(UOTOptions)})

    def check_uot(self, pooling: str) -> None:
        """Raises ``ValueError`` where the layer of ``pooling`` rejects these options, naming the flags
        (``--uot_eps must be positive ...``); nothing for a pooling that is not UOT. A run config calls it when it
        is read, so that a bad value ends the command in one line instead of a traceback once the model is built.
        """
        if pooling not in UOT_POOLINGS:
            return
        try:
            _uot_layer(pooling, 1, self)
        except ValueError as error:
            message = str(error)
            for option in fields(UOTOptions):  # the layer names its arguments, the user typed the flags
                message = message.replace(f"'{option.name.removeprefix('uot_')}'", f"--{option.name}")
            raise ValueError(message) from None


# The UOT poolings and their solvers; rot* add ROT-Pooling's structure term.
UOT_SOLVERS = {"uot": "sinkhorn", "uot_badmm": "badmm", "uot_badmm_q": "badmm_q", "rot": "sinkhorn",
               "rot_badmm": "badmm"}
UOT_POOLINGS = tuple(UOT_SOLVERS)
# What runs computed before these options existed: a results.json without the key had this value.
_BEFORE_OPTIONS = dict(uot_prior="uniform", uot_per_iteration=False, uot_rho=1.0, uot_mass_exponent=0.5)


def run_label(pooling: str, config: dict[str, Any]) -> str:
    """A run's name in tables: the pooling and, for a UOT pooling, its prior and every option of
    :class:`UOTOptions` that differs from the default (from the config dict of its ``results.json``), such as
    ``uot[per_iteration=True, prior=uniform]``."""
    if pooling not in UOT_POOLINGS:
        return pooling
    values = {**asdict(UOTOptions()), **_BEFORE_OPTIONS, **config}
    skip = {"uot_rho"} if UOT_SOLVERS[pooling] == "sinkhorn" else set()
    skip |= {"uot_gw"} if not pooling.startswith("rot") else set()
    skip |= {"uot_mass_exponent"} if values["uot_prior"] != "power" else set()
    shown = {f.name: values[f.name] for f in fields(UOTOptions)
             if f.name not in skip and (f.name == "uot_prior" or values[f.name] != f.default)}
    options = ", ".join(f"{name.removeprefix('uot_')}={value}" for name, value in sorted(shown.items()))
    return f"{pooling}[{options}]"


def parse_label(label: str) -> tuple[str, UOTOptions]:
    """The pooling and options a :func:`run_label` names: ``"uot[per_iteration=True, prior=power]"`` gives
    ``("uot", UOTOptions(uot_per_iteration=True, uot_prior="power"))``; a plain name gives the defaults."""
    name, _, rest = label.partition("[")
    if name not in POOLINGS or (rest and not rest.endswith("]")) or (rest and name not in UOT_POOLINGS):
        raise ValueError(f"{label!r} is not a pooling name, nor a UOT pooling with [option=value, ...]")
    kinds = {f.name: f.type for f in fields(UOTOptions)}
    values: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest[:-1].split(","))):
        key, _, text = item.partition("=")
        field = key if key == "num_iters" else f"uot_{key}"
        if field not in kinds:
            raise ValueError(f"{label!r}: unknown UOT option {key!r}")
        kind = kinds[field]
        values[field] = text == "True" if kind == "bool" else text if kind == "str" else float(text)
        if kind == "int":
            values[field] = int(values[field])
    return name, UOTOptions(**values)


def _uot_layer(name: str, channels: int, options: UOTOptions) -> UOTAggregation:
    extra = dict(mass_exponent=options.uot_mass_exponent) if options.uot_prior == "power" else {}
    return UOTAggregation(solver=UOT_SOLVERS[name], num_iters=options.num_iters,
                          eps=options.uot_eps, lam_p=options.uot_lam_p, lam_q=options.uot_lam_q,
                          rho=options.uot_rho, gw=options.uot_gw if name.startswith("rot") else 0.0,
                          per_iteration=options.uot_per_iteration, prior=options.uot_prior,
                          channels=channels if options.uot_prior == "attention" else None, **extra)


def make_readout(name: str, channels: int,
                 uot: Optional[UOTOptions] = None) -> tuple[aggr.Aggregation, int]:
    """The graph readout called ``name`` for ``channels``-wide node features, and its output width.

    This is the one place a pooling is chosen by name, so that every pooling is trained the same way. ``uot``
    sets what ``uot`` (Sinkhorn), ``uot_badmm`` (BADMM) and ``uot_badmm_q`` (BADMM-Q, whose ``uot_eps`` weighs a
    quadratic instead of the entropy) compute (:class:`UOTOptions`, its defaults when ``None``); ``rot`` and
    ``rot_badmm`` are the same with ROT-Pooling's structure term, its weight learned from ``uot_gw``.
    """
    out_channels = channels
    if name == "add":
        readout = aggr.SumAggregation()
    elif name == "mean":
        readout = aggr.MeanAggregation()
    elif name == "max":
        readout = aggr.MaxAggregation()
    elif name == "mixed":
        readout = MixedAggregation()
    elif name == "softmax":
        readout = aggr.SoftmaxAggregation(learn=True)
    elif name == "gem":
        readout = aggr.PowerMeanAggregation(learn=True)
    elif name == "attention":
        readout = aggr.AttentionalAggregation(gate_nn=Linear(channels, 1))
    elif name == "gated_attention":
        readout = aggr.AttentionalAggregation(gate_nn=GatedAttentionGate(channels),
                                              nn=Sequential(Linear(channels, channels), ReLU()))
    elif name == "set2set":
        readout = aggr.Set2Set(channels, processing_steps=4)  # as in benchmark/kernel's set2set.py
        out_channels = 2 * channels
    elif name == "deepsets":
        readout = aggr.DeepSetsAggregation(local_nn=MLP([channels, channels, channels], norm=None),
                                           global_nn=MLP([channels, channels, channels], norm=None))
    elif name == "gmt":
        readout = aggr.GraphMultisetTransformer(channels, k=16, heads=4)
    elif name in UOT_POOLINGS:
        readout = _uot_layer(name, channels, uot or UOTOptions())
    else:
        raise ValueError(f"unknown pooling {name!r}; choose one of {', '.join(POOLINGS)}")
    return readout, out_channels


class GIN(torch.nn.Module):
    """GIN of PyG's ``benchmark/kernel/gin.py`` with the readout chosen by name.

    Each layer is ``GINConv(Linear-ReLU-Linear-ReLU-BatchNorm, train_eps=True)``; the graph embedding goes
    through ``Linear-ReLU-Dropout-Linear`` to class logits. ``uot`` goes to :func:`make_readout`.
    """

    def __init__(self, in_channels: int, num_classes: int, pooling: str, hidden: int = 64, num_layers: int = 5,
                 dropout: float = 0.5, batch_norm: bool = True, uot: Optional[UOTOptions] = None) -> None:
        super().__init__()
        self.convs = ModuleList()
        for i in range(num_layers):
            mlp = Sequential(
                Linear(in_channels if i == 0 else hidden, hidden), ReLU(),
                Linear(hidden, hidden), ReLU(),
                BatchNorm1d(hidden) if batch_norm else Identity(),
            )
            self.convs.append(GINConv(mlp, train_eps=True))
        self.readout, readout_channels = make_readout(pooling, hidden, uot)
        self.lin1 = Linear(readout_channels, hidden)
        self.lin2 = Linear(hidden, num_classes)
        self.dropout = dropout

    def forward(self, x: Tensor, edge_index: Tensor, batch: Tensor, batch_size: Optional[int] = None) -> Tensor:
        for conv in self.convs:
            x = conv(x, edge_index)
        x = self.readout(x, batch, dim_size=batch_size)
        x = F.relu(self.lin1(x))
        x = F.dropout(x, p=self.dropout, training=self.training)
        return self.lin2(x)


BACKBONES = ("gin", "gin-virtual")  # OGB's names (its --gnn flag)


def _mlp(*channels: int, batch_norm: bool) -> Sequential:
    """``Linear-BatchNorm-ReLU`` blocks and a last ``Linear`` (OGB's GIN and virtual-node MLPs)."""
    layers: list[torch.nn.Module] = []
    for i in range(len(channels) - 1):
        layers.append(Linear(channels[i], channels[i + 1]))
        if i < len(channels) - 2:
            layers += [BatchNorm1d(channels[i + 1]) if batch_norm else Identity(), ReLU()]
    return Sequential(*layers)


class BondGINConv(torch.nn.Module):
    r"""The GIN layer of OGB's ``mol/conv.py``: :class:`~torch_geometric.nn.conv.GINEConv` on ``BondEncoder``
    edge embeddings, :math:`\mathrm{MLP}((1 + \epsilon) x_i + \sum_j \mathrm{ReLU}(x_j + e_{ji}))`, with a
    learned :math:`\epsilon` starting at 0 and the MLP ``Linear-BatchNorm-ReLU-Linear`` of width ``2 * emb_dim``."""

    def __init__(self, emb_dim: int, batch_norm: bool = True) -> None:
        super().__init__()
        from ogb.graphproppred.mol_encoder import BondEncoder  # ogb is an optional dependency

        self.bond_encoder = BondEncoder(emb_dim)
        self.conv = GINEConv(_mlp(emb_dim, 2 * emb_dim, emb_dim, batch_norm=batch_norm), train_eps=True)

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor) -> Tensor:
        return self.conv(x, edge_index, self.bond_encoder(edge_attr))


class OGBGNN(torch.nn.Module):
    """GIN or GIN-virtual of OGB's ``examples/graphproppred/mol`` with the readout chosen by name.

    Atoms are embedded by ``AtomEncoder``; each of the ``num_layers`` :class:`BondGINConv` layers is followed by
    BatchNorm, ReLU (except after the last) and dropout, and the last layer's node embeddings (JK "last") are
    pooled and mapped to one logit or value per task by a linear layer (``uot`` goes to :func:`make_readout`). With ``virtual_node=True`` a virtual
    node, connected to every atom of its molecule, is added to the node embeddings before each layer and updated
    from their sum by an MLP between layers. ``uot`` goes to :func:`make_readout`.
    """

    def __init__(self, num_tasks: int, pooling: str, virtual_node: bool, emb_dim: int = 300, num_layers: int = 5,
                 dropout: float = 0.5, batch_norm: bool = True, uot: Optional[UOTOptions] = None) -> None:
        super().__init__()
        from ogb.graphproppred.mol_encoder import AtomEncoder  # ogb is an optional dependency

        if num_layers < 2:
            raise ValueError(f"OGB's GNN needs at least 2 layers, got {num_layers}")
        self.atom_encoder = AtomEncoder(emb_dim)
        self.convs = ModuleList([BondGINConv(emb_dim, batch_norm) for _ in range(num_layers)])
        self.norms = ModuleList([BatchNorm1d(emb_dim) if batch_norm else Identity() for _ in range(num_layers)])
        if virtual_node:
            # Starts at 0, like OGB's Embedding(1, emb_dim) with constant-0 init.
            self.virtual_node = Parameter(torch.zeros(1, emb_dim))
            self.virtual_mlps = ModuleList([
                Sequential(*_mlp(emb_dim, 2 * emb_dim, emb_dim, batch_norm=batch_norm),
                           BatchNorm1d(emb_dim) if batch_norm else Identity(), ReLU())
                for _ in range(num_layers - 1)
            ])
        else:
            self.virtual_node = self.virtual_mlps = None
        self.readout, readout_channels = make_readout(pooling, emb_dim, uot)
        self.lin = Linear(readout_channels, num_tasks)
        self.dropout = dropout

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor, batch: Tensor,
                batch_size: Optional[int] = None) -> Tensor:
        if batch_size is None:
            batch_size = int(batch.max()) + 1 if batch.numel() > 0 else 0
        h = self.atom_encoder(x)
        if self.virtual_node is not None:
            virtual = self.virtual_node.expand(batch_size, -1)
        for layer, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            if self.virtual_node is not None:
                h = h + virtual[batch]
            out = norm(conv(h, edge_index, edge_attr))
            if layer < len(self.convs) - 1:
                out = out.relu()
            out = F.dropout(out, p=self.dropout, training=self.training)
            if self.virtual_node is not None and layer < len(self.convs) - 1:
                # From the layer's input (with the virtual node added), as OGB's GNN_node_Virtualnode does.
                pooled = global_add_pool(h, batch, batch_size) + virtual
                virtual = F.dropout(self.virtual_mlps[layer](pooled), p=self.dropout, training=self.training)
            h = out
        return self.lin(self.readout(h, batch, dim_size=batch_size))
