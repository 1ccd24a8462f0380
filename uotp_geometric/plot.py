r"""Pictures of what a UOT layer computes: the transport plan of one set, and the parameters per
iteration or over training (from values the caller recorded, such as :func:`learned_values` after
each epoch).

Needs matplotlib, the optional extra ``pip install "uotp_geometric[plot]"``. Each function builds and
returns a :class:`matplotlib.figure.Figure` without pyplot, so no global state changes; save it with
``fig.savefig(path)``.
"""
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from uotp_geometric.aggr import UOTAggregation
from uotp_geometric.functional import uot_plan
from uotp_geometric.segment import Segments, segment_sum

try:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("uotp_geometric.plot needs matplotlib, the optional extra: "
                      "pip install \"uotp_geometric[plot]\"") from error

__all__ = ['plot_plan', 'plot_parameters', 'learned_values', 'layer_plan', 'describe_layer',
           'PARAMETERS']

#: The layer's parameters, in the order they are drawn.
PARAMETERS = ('eps', 'lam_p', 'lam_q', 'rho', 'gw', 'prox', 'mass_exponent')
_SYMBOLS = dict(eps='ε', lam_p='λ_p', lam_q='λ_q', rho='ρ', gw='γ', prox='τ', mass_exponent='a')
_MAX_NODE_TICKS = 60  # more node names than this would overlap; ticks are thinned instead

#: Recorded values of one run: parameter name -> array ``(num_steps,)`` or ``(num_steps, num_iters)``.
Values = Mapping[str, Any]


def layer_plan(layer: UOTAggregation, x: Tensor, index: Tensor,
               num_sets: int) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    r"""The plan of :obj:`layer` on ``(x, index)``, shape ``(N, D)``, and its priors ``p`` and ``q``
    (``None`` where uniform), checked against the layer's own output, so that a layer option this
    function does not pass on fails loudly instead of giving another plan."""
    if x.dim() != 2:
        raise ValueError(f"plot_plan draws sets of node vectors: 'x' must have shape "
                         f"(num_nodes, num_features) (got {tuple(x.shape)})")
    p, log_q = layer.priors(x, index, num_sets)
    plan = layer.plan(x, index, num_sets)
    pooled = x.size(-1) * segment_sum(x * plan, Segments(index, num_sets))
    if not torch.allclose(pooled, layer(x, index, dim_size=num_sets), rtol=1e-4, atol=1e-5):
        raise ValueError(f"the plan recomputed from {layer!r} does not reproduce the layer's "
                         f"output; plot_plan does not know one of its options")
    return plan, p, None if log_q is None else log_q.exp()


def _check_args(x: Tensor, index: Optional[Tensor], graph: int) -> Tuple[Tensor, int]:
    if not isinstance(x, Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"'x' must be a floating-point tensor of shape (num_nodes, "
                         f"num_features) (got {getattr(x, 'shape', type(x))})")
    if index is None:
        index = torch.zeros(x.size(0), dtype=torch.long, device=x.device)
    if index.shape != (x.size(0), ):
        raise ValueError(f"'index' must have shape ({x.size(0)},), one set per row of 'x' "
                         f"(got {tuple(index.shape)})")
    num_sets = int(index.max()) + 1 if index.numel() > 0 else 0
    if not 0 <= graph < num_sets or not bool((index == graph).any()):
        raise ValueError(f"'graph' must be a non-empty set of 'index' in [0, {num_sets}) "
                         f"(got {graph})")
    return index, num_sets


def plot_plan(
    x: Tensor,
    index: Optional[Tensor] = None,
    graph: int = 0,
    *,
    plan: Optional[Tensor] = None,
    layer: Optional[UOTAggregation] = None,
    p: Optional[Tensor] = None,
    q: Optional[Tensor] = None,
    node_labels: Optional[Sequence[str]] = None,
    title: Optional[str] = None,
    **solver_kwargs: Any,
) -> Figure:
    r"""Draws the transport plan :math:`T` of set :obj:`graph` as a nodes x dimensions heatmap, with
    its node marginal :math:`T \mathbf{1}` against the prior :math:`q` on the right, its dimension
    marginal :math:`T^\top \mathbf{1}` against :math:`p` below, and the pooled vector
    :math:`z = D \sum_n x_n \odot T_n` (with the set's mean and max for reference) at the bottom.

    The plan comes from one of three sources:

    - :obj:`plan`: the output of :func:`~uotp_geometric.functional.uot_plan` on ``(x, index)``; pass
      the priors :obj:`p` and :obj:`q` it was solved with, if not the uniform default;
    - :obj:`layer`: a :class:`~uotp_geometric.UOTAggregation`, with its learned values and priors;
    - otherwise :func:`~uotp_geometric.functional.uot_plan` with :obj:`p`, :obj:`q` and
      :obj:`solver_kwargs` (``solver``, ``eps``, ``lam_p``, ``lam_q``, ``num_iters``, ...).

    Args:
        x (Tensor): Node features of all sets, shape ``(N, D)``.
        index (Tensor, optional): The set of each row (default: one set).
        graph (int): The set to draw.
        node_labels (sequence of str, optional): A name per node of the set (e.g. atom types).
        title (str, optional): Goes first in the figure's title.

    Returns:
        Figure: its axes carry the labels ``"plan"``, ``"node marginal"``, ``"dim marginal"`` and
        ``"pooled"``.
    """
    index, num_sets = _check_args(x, index, graph)
    if plan is not None and layer is not None:
        raise ValueError("Give the plan either as 'plan' or as 'layer', not both")
    if (plan is not None or layer is not None) and solver_kwargs:
        raise ValueError(f"Solver arguments {sorted(solver_kwargs)} apply only when "
                         f"plot_plan solves the plan itself (no 'plan', no 'layer')")
    if layer is not None and (p is not None or q is not None):
        raise ValueError("A layer brings its own priors; do not pass 'p' or 'q' with 'layer'")
    with torch.no_grad():
        if layer is not None:
            plan, p, q = layer_plan(layer, x, index, num_sets)
        elif plan is None:
            plan = uot_plan(x, index, num_sets, p=p, q=q, **solver_kwargs)
        elif plan.shape != x.shape:
            raise ValueError(f"'plan' must have the shape of 'x', {tuple(x.shape)}, as "
                             f"uot_plan returns it (got {tuple(plan.shape)})")
    rows = (index == graph).nonzero().view(-1)
    x_set = x.detach()[rows].double().cpu().numpy()
    plan_set = plan.detach()[rows].double().cpu().numpy()
    num_nodes, num_dims = plan_set.shape
    p_set = _dim_prior(p, graph, num_dims)
    q_set = np.full(num_nodes, 1.0 / num_nodes) if q is None else q.detach()[rows].double().cpu().numpy()
    if node_labels is not None and len(node_labels) != num_nodes:
        raise ValueError(f"'node_labels' must name the {num_nodes} nodes of set {graph} "
                         f"(got {len(node_labels)})")
    pooled = num_dims * (x_set * plan_set).sum(axis=0)

    height = min(max(2.5, 0.16 * num_nodes), 14.0)
    fig = Figure(figsize=(11, height + 4.6), layout='constrained')
    grid = fig.add_gridspec(3, 3, width_ratios=[8, 2, 0.25], height_ratios=[height, 1.5, 1.8])
    ax_plan = fig.add_subplot(grid[0, 0], label='plan')
    ax_node = fig.add_subplot(grid[0, 1], sharey=ax_plan, label='node marginal')
    ax_bar = fig.add_subplot(grid[0, 2])
    ax_dim = fig.add_subplot(grid[1, 0], sharex=ax_plan, label='dim marginal')
    ax_pool = fig.add_subplot(grid[2, 0], sharex=ax_plan, label='pooled')

    image = ax_plan.imshow(plan_set, aspect='auto', interpolation='nearest', cmap='viridis')
    fig.colorbar(image, cax=ax_bar, label='plan entry T[n, d]')
    ax_plan.set_ylabel('node n')
    ax_plan.tick_params(labelbottom=False)
    if node_labels is not None and num_nodes <= _MAX_NODE_TICKS:
        ax_plan.set_yticks(range(num_nodes), [f'{n} {name}' for n, name in enumerate(node_labels)],
                           fontsize=7 if num_nodes > 30 else 9)
    else:
        ax_plan.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax_plan.set_title(f'plan T: {num_nodes} nodes x {num_dims} dims, total mass {plan_set.sum():.3g}')

    node_mass = plan_set.sum(axis=1)
    ax_node.barh(range(num_nodes), node_mass, height=0.8, color='tab:blue', label='T 1')
    ax_node.plot(q_set, range(num_nodes), ls='none', marker='|', ms=9, mew=2, color='black',
                 label='prior q')
    ax_node.set_xlabel('node mass')
    ax_node.tick_params(labelleft=False)
    ax_node.set_xlim(0, 1.15 * max(node_mass.max(), q_set.max()))
    ax_node.xaxis.set_major_locator(MaxNLocator(3))
    ax_node.legend(loc='lower left', bbox_to_anchor=(0, 1), fontsize=8, frameon=False)

    ax_dim.bar(range(num_dims), plan_set.sum(axis=0), width=0.8, color='tab:blue', label='T^T 1')
    ax_dim.plot(range(num_dims), p_set, ls='none', marker='_', ms=7, mew=2, color='black',
                label='prior p')
    ax_dim.set_ylabel('dim mass')
    ax_dim.tick_params(labelbottom=False)
    # Legends of the lower panels sit in the empty space under the node panel, outside the layout.
    ax_dim.legend(loc='upper left', bbox_to_anchor=(1.01, 1), fontsize=8).set_in_layout(False)

    ax_pool.bar(range(num_dims), pooled, width=0.8, color='tab:green', label='pooled z')
    ax_pool.plot(range(num_dims), x_set.max(axis=0), ls='none', marker='v', ms=3, color='tab:red',
                 label='max')
    ax_pool.plot(range(num_dims), x_set.mean(axis=0), ls='none', marker='o', ms=3,
                 color='black', label='mean')
    ax_pool.axhline(0, color='grey', lw=0.5)
    ax_pool.set_ylabel('z_d')
    ax_pool.set_xlabel('feature dimension d')
    ax_pool.xaxis.set_major_locator(MaxNLocator(16, integer=True))
    ax_pool.legend(loc='upper left', bbox_to_anchor=(1.01, 1), fontsize=8).set_in_layout(False)

    parts = [title or f'set {graph}']
    if layer is not None:
        parts.append(describe_layer(layer))
    elif solver_kwargs:
        parts.append(', '.join(f'{k}={_short(v)}' for k, v in solver_kwargs.items()))
    fig.suptitle(' | '.join(parts), fontsize=10)
    return fig


def _dim_prior(p: Optional[Tensor], graph: int, num_dims: int) -> np.ndarray:
    if p is None:
        return np.full(num_dims, 1.0 / num_dims)
    p = p.detach().double().cpu()
    return (p if p.dim() == 1 else p[graph]).numpy()


def _short(value: Any) -> str:
    if isinstance(value, Tensor):
        value = value.detach().cpu().tolist()
    if isinstance(value, (list, tuple)):
        return '[' + ', '.join(_short(v) for v in value) + ']'
    return f'{value:.3g}' if isinstance(value, float) else str(value)


def learned_values(layer: UOTAggregation) -> Dict[str, List[float]]:
    r"""The current value of each parameter :obj:`layer` has (``eps``, ``lam_p``, ``lam_q``, and
    ``rho``, ``gw``, ``prox``, ``mass_exponent`` where present), as a list: one value per solver
    iteration for a per-iteration value, else a single value. Recorded after each epoch, they are
    what :func:`plot_parameters` draws over training."""
    return {name: layer.value(name).detach().cpu().tolist() for name in layer.init_values}


def describe_layer(layer: UOTAggregation) -> str:
    r"""The layer's solver, prior and current values, e.g. ``"sinkhorn, K=4, prior=uniform: eps=0.4,
    lam_p=inf, lam_q=2.1"``."""
    values = ', '.join(f'{name}={_short(value[0] if len(value) == 1 else value)}'
                       for name, value in learned_values(layer).items())
    return f'{layer.solver}, K={layer.num_iters}, prior={layer.prior}: {values}'


def _series(runs: Sequence[Values], steps: Optional[Any]) -> Dict[Tuple[str, str], Dict[Optional[int], list]]:
    series: Dict[Tuple[str, str], Dict[Optional[int], list]] = {}
    for number, run in enumerate(runs):
        for name, value in run.items():
            value = np.asarray(value, dtype=float)
            if value.ndim not in (1, 2):
                raise ValueError(f"'{name}' of run {number} must have shape (num_steps,) or "
                                 f"(num_steps, num_iters) (got {value.shape})")
            x = np.arange(1, len(value) + 1, dtype=float) if steps is None else np.asarray(steps, float)
            if len(x) != len(value):
                raise ValueError(f"'steps' has {len(x)} entries, '{name}' of run {number} has "
                                 f"{len(value)}")
            module, _, short = name.rpartition('.')
            by_k = series.setdefault((module, short), {})
            # A 2-D value holds one column per solver iteration k.
            columns = {None: value} if value.ndim == 1 else dict(enumerate(value.T))
            for k, y in columns.items():
                by_k.setdefault(k, []).append((x, y))
    return series


def plot_parameters(source: Union[UOTAggregation, Values, Sequence[Values]], *,
                    steps: Optional[Any] = None, xlabel: str = 'epoch',
                    title: Optional[str] = None) -> Figure:
    r"""Draws the UOT parameters (``eps``, ``lam_p``, ``lam_q``, and ``rho``, ``gw``, ``prox``,
    ``mass_exponent`` when present), one panel each.

    Args:
        source: A :class:`~uotp_geometric.UOTAggregation`, whose current values
            (:func:`learned_values`) are drawn per solver iteration; or values recorded over
            training, a mapping from parameter name to an array of shape ``(num_steps,)`` or, for
            per-iteration values, ``(num_steps, num_iters)`` (NaN leaves a gap); or a list of such
            mappings (one per fold or seed), drawn as one thin line each and their median. A name
            ``"<module>.<name>"`` (``"convs.0.aggr.eps"``) tells the layers of a model apart.
        steps (array, optional): The x position of each step, shared by all runs (default:
            ``1, 2, ...``, epoch numbers).
        xlabel (str): The x axis's label for recorded values.
        title (str, optional): The figure's title.

    A value fixed at ``inf`` (a hard marginal) is written in its panel instead of drawn.
    """
    if isinstance(source, UOTAggregation):
        iterations = np.arange(source.num_iters, dtype=float)  # k = 0, 1, ...
        # A value shared by all iterations is drawn as a constant over them.
        runs = [{name: np.broadcast_to(value, iterations.shape)
                 for name, value in learned_values(source).items()}]
        steps, xlabel = iterations, 'solver iteration k'
        title = title or (f'UOT parameters per iteration ({source.solver}, K={source.num_iters}, '
                          f'prior={source.prior}, per_iteration={source.per_iteration})')
    else:
        runs = [source] if isinstance(source, Mapping) else list(source)
    series = _series(runs, steps)
    if not series:
        raise ValueError("plot_parameters needs a layer or at least one recorded value")

    keys = sorted(series, key=lambda key: (key[0], PARAMETERS.index(key[1])
                                           if key[1] in PARAMETERS else len(PARAMETERS), key[1]))
    num_cols = min(len(keys), 3)
    num_rows = math.ceil(len(keys) / num_cols)
    fig = Figure(figsize=(4.2 * num_cols, 3.2 * num_rows + 0.5), layout='constrained')
    axes = fig.subplots(num_rows, num_cols, squeeze=False).reshape(-1)
    for ax in axes[len(keys):]:
        ax.remove()
    for ax, key in zip(axes, keys):
        _draw_parameter(ax, key, series[key], xlabel)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _draw_parameter(ax, key: Tuple[str, str], by_k: Dict[Optional[int], list], xlabel: str) -> None:
    module, name = key
    ax.set_title(f'{module}: ' * bool(module) + f'{_SYMBOLS.get(name, name)} ({name})', fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_label(f'{module}.{name}' if module else name)
    values = np.concatenate([y for runs in by_k.values() for _, y in runs])
    values = values[~np.isnan(values)]
    if values.size and np.isinf(values).all():
        ax.text(0.5, 0.5, f'{values[0]:g} (fixed)', ha='center', va='center',
                transform=ax.transAxes, fontsize=12)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    colours = {k: f'C{i}' for i, k in enumerate(sorted(by_k, key=lambda k: -1 if k is None else k))}
    for k, runs in sorted(by_k.items(), key=lambda item: -1 if item[0] is None else item[0]):
        label = f'k = {k}' if k is not None else None
        for x, y in runs:
            ax.plot(x, np.where(np.isinf(y), np.nan, y), color=colours[k], marker='.' * (len(x) < 12),
                    lw=0.8 if len(runs) > 1 else 1.5, alpha=0.35 if len(runs) > 1 else 1.0,
                    label=None if len(runs) > 1 else label)
        if len(runs) > 1 and len({len(x) for x, _ in runs}) == 1:
            median = np.median(np.stack([y for _, y in runs]), axis=0)
            ax.plot(runs[0][0], median, color=colours[k], lw=2,
                    label=f'median of {len(runs)}' + (f', k = {k}' if k is not None else ''))
    finite = values[np.isfinite(values)]
    if finite.size and finite.min() > 0 and finite.max() / finite.min() > 10:
        ax.set_yscale('log')
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
