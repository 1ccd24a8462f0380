"""``python -m experiments.plot RUN_DIR --out DIR``: what the UOT layers of a run learned, as pictures and a table.

From a run directory of ``experiments.train`` it writes into ``DIR``:

- ``parameters.png``: the learned UOT values over training, from the per-epoch logs (``fold*.csv`` or
  ``seed*.csv``; columns ``uot_<name>`` or ``uot_<name>_<k>``, see :func:`experiments.records.uot_columns`),
  one thin line per fold or seed and their median;
- ``plan_<graph>.png``: the transport plans of a few test graphs of one fold under its checkpoint
  (``fold0.pt`` by default), nodes named by their label where the dataset's README names them (MUTAG: atom types);
- ``poolings.md`` and ``poolings.png``: where the trained readout sits between the classic poolings of the same node
  embeddings (:func:`pooling_distances`);
- ``README.md``: the command that made them, the table, and a line for each picture that could not be made (a run
  from before the harness logged the UOT values has no trajectories; most committed runs carry no checkpoint, so
  they have no plans until they are run again).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch_geometric.data import Batch
from torch_geometric.nn import aggr

from experiments.config import Config, UsageError
from experiments.records import CHECKPOINT_ERRORS, uot_columns
from experiments.train import OGBTask, Task, TUTask
from uotp_geometric import UOTAggregation
from uotp_geometric.plot import Figure, describe_layer, layer_plan, plot_parameters, plot_plan

MAX_NODES = 40  # plan pictures prefer test graphs this small, so that every node can be named


def read_logs(run: Path) -> dict[str, dict[str, list[str]]]:
    """The per-epoch logs of a run, ``{"fold0": {column: values}, ...}``, in fold or seed order."""
    paths = [p for p in run.iterdir() if re.fullmatch(r"(fold|seed)\d+\.csv", p.name)]
    logs = {}
    for path in sorted(paths, key=lambda p: (p.stem.rstrip("0123456789"), int(re.sub(r"\D", "", p.stem)))):
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        columns = list(rows[0]) if rows else []
        logs[path.stem] = {column: [row[column] for row in rows] for column in columns}
    return logs


def logged_values(log: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """The UOT values of a per-epoch log (:func:`read_logs`) as :func:`~uotp_geometric.plot.plot_parameters`
    takes them: ``{name: array}``, of shape ``(epochs,)``, or ``(epochs, num_iters)`` for a per-iteration
    value. An empty cell (a row logged before the column existed) is NaN, a gap in the line."""
    def column(name: str) -> np.ndarray:
        return np.array([float(cell) if cell else np.nan for cell in log[name]])

    values = {}
    for name, by_k in uot_columns(list(log)).items():
        if list(by_k) == [None]:
            values[name] = column(by_k[None])
        else:
            values[name] = np.stack([column(by_k[k]) for k in sorted(by_k)], axis=1)
    return values


def classic_poolings(layer: UOTAggregation, x: Tensor, index: Tensor, num_graphs: int) -> dict[str, Tensor]:
    """Mean, max, sum, attention and softmax pooling of ``x`` (PyG's aggregations), shape ``(num_graphs, D)`` each.

    *attention* is :math:`\\sum_n a_n x_n` with the node weights :math:`a` of ``layer``: for an attention prior,
    its gate's softmax (the prior :math:`q` itself); otherwise (uniform or counting prior, no gate) the plan's node
    marginal :math:`T \\mathbf{1}` normalised to sum 1 in each graph, i.e. the attention pooling that weighs nodes as
    the layer does but gives every dimension the same weights. With a hard node marginal it is mean pooling.
    *softmax* is :math:`\\sum_n \\mathrm{softmax}_n(x_{nd} / \\varepsilon) x_{nd}`, at the temperature ``eps`` of the
    layer (of its last iteration; 1 where ``eps = 0``): the layer's own limit for a free node marginal
    (``lam_q = 0``, ``lam_p = inf``).
    """
    with torch.no_grad():
        plan, _, q = layer_plan(layer, x, index, num_graphs)
        if layer.prior == "attention":
            weights = q
        else:
            mass = plan.sum(dim=-1)
            weights = mass / aggr.SumAggregation()(mass.unsqueeze(-1), index, dim_size=num_graphs)[index, 0]
        eps = float(layer.value("eps")[-1])
        return dict(
            mean=aggr.MeanAggregation()(x, index, dim_size=num_graphs),
            max=aggr.MaxAggregation()(x, index, dim_size=num_graphs),
            sum=aggr.SumAggregation()(x, index, dim_size=num_graphs),
            attention=aggr.SumAggregation()(weights.unsqueeze(-1) * x, index, dim_size=num_graphs),
            # PyG's t multiplies x: the inverse temperature.
            softmax=aggr.SoftmaxAggregation(t=1 / eps if eps > 0 else 1.0)(x, index, dim_size=num_graphs),
        )


def pooling_distances(layer: UOTAggregation, x: Tensor, index: Tensor,
                      num_graphs: int) -> tuple[list[str], np.ndarray]:
    """The distance of ``layer``'s output to each classic pooling (:func:`classic_poolings`) per dimension, as the
    pooling names and an array ``(num_poolings, D)``: the root mean square over the graphs of the difference,
    divided by the dimension's standard deviation over all nodes (NaN for a dimension constant over the nodes),
    so that dimensions of different scales compare and 0.1 means "a tenth of the feature's spread"."""
    with torch.no_grad():
        out = layer(x, index, dim_size=num_graphs).double()
        poolings = classic_poolings(layer, x, index, num_graphs)
        scale = x.double().std(dim=0)
        scale = torch.where(scale > 0, scale, torch.nan)
        distances = [((out - z.double()).pow(2).mean(dim=0).sqrt() / scale).numpy() for z in poolings.values()]
    return list(poolings), np.stack(distances)


def dim_ranges(dims: Sequence[int]) -> str:
    """``[3, 4, 5, 9]`` -> ``"3-5, 9"``."""
    parts: list[str] = []
    for d in sorted(dims):
        if parts and int(parts[-1].split("-")[-1]) == d - 1:
            parts[-1] = f"{parts[-1].split('-')[0]}-{d}"
        else:
            parts.append(str(d))
    return ", ".join(parts)


def distance_table(names: list[str], distances: np.ndarray) -> list[str]:
    """Markdown: a line naming the dimensions left out (constant over the nodes, so without a distance), then per
    pooling its mean and median distance over the other dimensions, and the dimensions it is the closest pooling
    on."""
    valid = ~np.isnan(distances).any(axis=0)
    closest = np.where(valid, np.nanargmin(np.where(valid, distances, 0.0), axis=0), -1)
    constant = np.flatnonzero(~valid).tolist()
    lines = [f"{int(valid.sum())} of {len(valid)} dimensions compared; "
             + (f"{len(constant)} constant over the nodes ({dim_ranges(constant)}) have no distance and are left out."
                if constant else "none is constant over the nodes."), "",
             "| pooling | mean distance | median distance | closest on | dims where closest |",
             "|---|---:|---:|---:|---|"]
    for i, name in enumerate(names):
        dims = np.flatnonzero(closest == i).tolist()
        lines.append(f"| {name} | {np.nanmean(distances[i]):.3g} | {np.nanmedian(distances[i]):.3g} | "
                     f"{len(dims)} of {int(valid.sum())} | {dim_ranges(dims) or '-'} |")
    return lines


def plot_distances(names: list[str], distances: np.ndarray, title: str) -> Figure:
    """The per-dimension distances as a poolings x dimensions heatmap (log colour scale), the closest pooling of
    each dimension marked."""
    from matplotlib.colors import LogNorm

    num_dims = distances.shape[1]
    fig = Figure(figsize=(max(8.0, 0.16 * num_dims + 2.5), 3.4), layout="constrained")
    ax = fig.add_subplot(label="distances")
    positive = distances[np.isfinite(distances) & (distances > 0)]
    norm = LogNorm(positive.min(), positive.max()) if positive.size else None
    image = ax.imshow(np.where(distances > 0, distances, np.nan), aspect="auto", interpolation="nearest",
                      cmap="magma_r", norm=norm)
    fig.colorbar(image, ax=ax, label="RMS distance / std of x_d", pad=0.01)
    valid = ~np.isnan(distances).any(axis=0)
    dims = np.flatnonzero(valid)
    ax.plot(dims, np.nanargmin(distances[:, valid], axis=0), ls="none", marker="o", ms=4, mfc="white",
            mec="black")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("feature dimension d    (o: the closest pooling; blank: a dimension constant over the nodes)")
    ax.set_xticks(range(0, num_dims, 4 if num_dims > 32 else 1))
    ax.set_title(title, fontsize=10)
    return fig


def label_names(dataset) -> dict[int, str]:
    """The names of a TU dataset's node labels from the ``Node labels:`` section of its README (MUTAG: atom types),
    ``{}`` where there is none."""
    readme = Path(getattr(dataset, "raw_dir", "")) / "README.txt"
    names: dict[int, str] = {}
    if not readme.is_file():
        return names
    section = False
    for line in readme.read_text(errors="replace").splitlines():
        if line.strip().lower().startswith("node labels"):
            section = True
        elif section and (match := re.fullmatch(r"\s*(\d+)\s+(\S.*?)\s*", line)):
            names[int(match[1])] = match[2]
        elif section and names and not line.strip():
            break
    return names


def node_names(dataset, data) -> Optional[list[str]]:
    """The node labels of graph ``data`` of a TU dataset, by name where :func:`label_names` has one and as
    ``label <number>`` otherwise; ``None`` for a dataset without node labels."""
    num_labels = getattr(dataset, "num_node_labels", 0)
    if not num_labels:
        return None
    names = label_names(dataset)
    # PyG one-hot encodes label - min(label), so column j is label min + j.
    offset = min(int(v) for v in (Path(dataset.raw_dir) / f"{dataset.name}_node_labels.txt").read_text().split())
    labels = (data.x[:, -num_labels:].argmax(dim=-1) + offset).tolist()
    return [names.get(label, f"label {label}") for label in labels]


def pick_graphs(labels: Tensor, sizes: Tensor, count: int) -> list[int]:
    """``count`` positions in the test batch, taking the classes in turn, each time its first graph of at most
    :data:`MAX_NODES` nodes (any size where there is none)."""
    small = [i for i in range(len(sizes)) if sizes[i] <= MAX_NODES] or list(range(len(sizes)))
    by_class: dict[int, list[int]] = {}
    for i in small:
        by_class.setdefault(int(labels[i]), []).append(i)
    picked: list[int] = []
    while len(picked) < min(count, len(small)):
        for members in by_class.values():
            if members and len(picked) < count:
                picked.append(members.pop(0))
    return sorted(picked)


def _run_name(run: Path) -> str:
    """``"MUTAG uot"`` from the run's results.json, or the directory's name."""
    results = run / "results.json"
    if results.is_file():
        fields = json.loads(results.read_text())
        return f"{fields.get('dataset', run.name)} {fields.get('pooling', '')}".strip()
    return run.name


def load_fold(run: Path, fold: Optional[int], root: Optional[str],
              cache: Optional[str]) -> tuple[Path, Config, Task, torch.nn.Module, Tensor] | str:
    """The checkpoint of fold or seed ``fold`` (the first one found if ``None``): its path, config, task (data
    loaded), model (trained, in eval mode) and test indices; or the reason why there is none."""
    checkpoints = sorted((p for p in run.iterdir() if re.fullmatch(r"(fold|seed)\d+\.pt", p.name)),
                         key=lambda p: int(re.sub(r"\D", "", p.stem)))
    if fold is not None:
        checkpoints = [p for p in checkpoints if int(re.sub(r"\D", "", p.stem)) == fold]
    if not checkpoints:
        which = "fold*.pt or seed*.pt" if fold is None else f"fold{fold}.pt or seed{fold}.pt"
        return (f"{run}: no checkpoint ({which}; most committed runs carry none), so no plan pictures and no "
                f"pooling comparison: run the training command of {run / 'results.json'} again to get one")
    path = checkpoints[0]
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        saved = ckpt["config"]
    except CHECKPOINT_ERRORS as error:
        return f"{path} cannot be read ({type(error).__name__}), so no plan pictures and no pooling comparison"
    if "view_learner" in ckpt:
        return (f"{path} is an AD-GCL checkpoint (an encoder trained without labels, no test split), so no plan "
                f"pictures and no pooling comparison: they need a run of experiments.train")
    fields = {f.name for f in dataclasses.fields(Config)}
    config = Config(**{k: v for k, v in saved.items() if k in fields})
    config.root, config.cache = root or config.root, cache or config.cache
    task = OGBTask(config) if config.is_ogb else TUTask(config)
    try:
        task.load()
    except UsageError as error:  # such as the run's root missing on this machine
        return f"{error}, so no plan pictures and no pooling comparison"
    number = int(re.sub(r"\D", "", path.stem))
    test = next(split[2] for index, _, split in task.splits() if index == number)
    model = task.model()
    model.load_state_dict(ckpt["model"])
    return path, config, task, model.eval(), test


def readout_input(model: torch.nn.Module, config: Config, data: Batch) -> tuple[Tensor, Tensor]:
    """The node embeddings the readout pools for ``data``, and the model's output."""
    captured = {}

    def hook(module, args, kwargs):
        captured["x"] = args[0]

    handle = model.readout.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            if config.is_ogb:
                out = model(data.x, data.edge_index, data.edge_attr, data.batch, data.num_graphs)
            else:
                out = model(data.x, data.edge_index, data.batch, data.num_graphs)
    finally:
        handle.remove()
    return captured["x"], out


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("run", type=Path, help="a run directory of experiments.train")
    parser.add_argument("--out", type=Path, required=True, help="folder for the pictures, table and README.md")
    parser.add_argument("--fold", type=int, help="the fold or seed whose checkpoint to use (default: the first)")
    parser.add_argument("--graphs", type=int, default=3, help="how many test graphs to draw plans of")
    parser.add_argument("--root", help="dataset root (default: the run's)")
    parser.add_argument("--cache", help="writable dataset cache (default: the run's)")
    args = parser.parse_args(argv)
    if not args.run.is_dir():
        parser.error(f"{args.run} is not a run directory")
    args.out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "-m", "experiments.plot", *(sys.argv[1:] if argv is None else argv)])
    notes: list[str] = []
    files: list[str] = []
    table: list[str] = []

    def note(line: str) -> None:
        print(line, flush=True)
        notes.append(line)

    def save(fig: Figure, name: str) -> None:
        fig.savefig(args.out / name, dpi=100)
        files.append(name)

    logs = read_logs(args.run)
    if not logs:
        note(f"{args.run}: no per-epoch logs (fold*.csv or seed*.csv), so no parameter trajectories")
    elif not any(uot_columns(list(log)) for log in logs.values()):
        note(f"{args.run}: the per-epoch logs have no uot_* columns (a run from before the harness logged the UOT "
             f"values, or not a UOT run), so no parameter trajectories")
    else:
        logged = [logged_values(log) for log in logs.values() if uot_columns(list(log))]
        unit = next(iter(logs)).rstrip("0123456789")
        save(plot_parameters(logged, title=f"{_run_name(args.run)}: learned UOT values over training, "
                                           f"{len(logged)} {unit}s"), "parameters.png")

    loaded = load_fold(args.run, args.fold, args.root, args.cache)
    if isinstance(loaded, str):
        note(loaded)
    elif not isinstance(loaded[3].readout, UOTAggregation):
        note(f"{loaded[0]}: the readout is {type(loaded[3].readout).__name__}, not a UOT layer, so no plan "
             f"pictures and no pooling comparison")
    else:
        path, config, task, model, test = loaded
        layer = model.readout
        data = Batch.from_data_list([task.dataset[int(i)] for i in test])
        x, out = readout_input(model, config, data)
        sizes = torch.bincount(data.batch, minlength=data.num_graphs)
        if getattr(task.dataset, "num_node_labels", 0) and not label_names(task.dataset):
            note(f"{config.dataset}: its README names no node labels (no 'Node labels' section), so nodes show "
                 f"their label numbers")
        labels_y = torch.nan_to_num(data.y.view(data.num_graphs, -1)[:, 0].float(), nan=-1.0)
        for position in pick_graphs(labels_y, sizes, args.graphs):
            graph = data.get_example(position)
            labels = node_names(task.dataset, graph)
            prediction = "" if config.is_ogb else f", predicted {int(out[position].argmax())}"
            index = int(test[position])
            save(plot_plan(x, data.batch, graph=position, layer=layer, node_labels=labels,
                           title=f"{config.dataset} graph {index} ({path.stem} test set), class "
                                 f"{int(graph.y.view(-1)[0])}{prediction}"), f"plan_{index}.png")
        pooling_names, distances = pooling_distances(layer, x, data.batch, data.num_graphs)
        heading = (f"{config.dataset} {config.pooling}, {path.stem}: its {data.num_graphs} test graphs; readout "
                   f"{describe_layer(layer)}")
        table = [heading, "",
                 "Distance: root mean square over the test graphs of (UOT output - pooling), per dimension, divided "
                 "by the dimension's standard deviation over the nodes. *attention*: the node weights of the "
                 "layer's plan (its node marginal, normalised per graph; its gate for an attention prior); "
                 "*softmax*: per-dimension softmax over the nodes at temperature eps (see "
                 "`experiments.plot.classic_poolings`).", "",
                 *distance_table(pooling_names, distances)]
        (args.out / "poolings.md").write_text(f"Made by `{command}`.\n\n" + "\n".join(table) + "\n")
        files.append("poolings.md")
        save(plot_distances(pooling_names, distances, heading.replace("; ", "\n")), "poolings.png")

    readme = [f"# What {_run_name(args.run)} learned", "", f"Made by `{command}`.", ""]
    readme += [f"- {line}" for line in notes] + [""] * bool(notes)
    for name in files:  # one paragraph each
        readme += [f"![{name}]({name})" if name.endswith(".png") else f"[{name}]({name})", ""]
    readme += table
    (args.out / "README.md").write_text("\n".join(readme) + "\n")
    print(f"{len(files)} files -> {args.out}")


if __name__ == "__main__":
    main()
