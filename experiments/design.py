"""Applies the selection rule of ``docs/uot-design/README.md`` to design runs: validation scores only.

``python -m experiments.design RUN_DIR... --out DIR`` writes ``DIR/design.md``: per development cell (dataset x
protocol) every UOT variant's validation score, the ranks, the average rank and the variant the rule chooses;
then the test scores, printed beside but never read by the rule. Runs of other poolings are listed as references
and not ranked. A variant is named by :func:`experiments.models.run_label`.

Validation score: TU, the mean over folds of the validation accuracy at the epoch the harness selected (lowest
validation loss); AD-GCL, the mean over the chosen seeds of each seed's validation accuracy.
"""
from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from scipy.stats import rankdata

from experiments.models import UOT_POOLINGS, UOT_SOLVERS, make_readout, parse_label, run_label


@dataclass
class Scores:
    label: str
    cell: str  # "<dataset> <protocol>"
    val: float
    test: float
    units: int  # folds or seeds averaged


def _fold_val_acc(run: Path, fold: dict[str, Any]) -> float:
    if "val_acc" in fold:
        return fold["val_acc"]
    # Runs from before results.json kept it: the fold's log row at the selected epoch.
    with open(run / f"fold{fold['fold']}.csv", newline="") as f:
        rows = {int(row["epoch"]): row for row in csv.DictReader(f)}
    return float(rows[fold["best_epoch"]]["val_acc"])


def scores(run: Path, seeds: Sequence[int]) -> Scores:
    """The validation and test scores of one run directory."""
    result = json.loads((run / "results.json").read_text())
    label = run_label(result["pooling"], result["config"])
    if result.get("protocol") == "adgcl":
        units = [s for s in result["seeds"] if s["seed"] in seeds]
        missing = sorted(set(seeds) - {s["seed"] for s in units})
        if missing:
            raise SystemExit(f"{run}: no result for seeds {missing}")
        val, test = [s["val_acc"] for s in units], [s["test_acc"] for s in units]
        protocol = "AD-GCL"
    else:
        units = result["folds"]
        val, test = [_fold_val_acc(run, fold) for fold in units], [fold["test_acc"] for fold in units]
        protocol = "TU"
    return Scores(label, f"{result['dataset']} {protocol}", float(np.mean(val)), float(np.mean(test)), len(units))


def learned_count(label: str) -> int:
    """How many values the readout a run label names learns (a tie-break of the rule)."""
    name, options = parse_label(label)
    readout, _ = make_readout(name, 64, options)
    return sum(p.numel() for p in readout.parameters())


def choose(table: dict[str, dict[str, float]], cells: list[str],
           cost: dict[str, tuple[int, int]]) -> tuple[str, dict[str, float], dict[str, float]]:
    """The rule: lowest average rank of the validation score over ``cells`` (each variant must have them all);
    ties by the best worst-cell gap to the cell's best score, then ``cost`` (solver, learned values)."""
    ranks = {label: [] for label in table}
    best = {cell: max(table[label][cell] for label in table) for cell in cells}
    for cell in cells:
        labels = list(table)
        for label, rank in zip(labels, rankdata([-table[label][cell] for label in labels])):
            ranks[label].append(float(rank))
    average = {label: float(np.mean(r)) for label, r in ranks.items()}
    worst_gap = {label: min(table[label][cell] - best[cell] for cell in cells) for label in table}
    chosen = min(table, key=lambda label: (average[label], -worst_gap[label], cost[label]))
    return chosen, average, worst_gap


def _pct(value: Optional[float]) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _rows(scores_: list[Scores], field: str) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    for s in scores_:
        if s.cell in table.get(s.label, {}):
            raise SystemExit(f"two runs of {s.label} on {s.cell}")
        table.setdefault(s.label, {})[s.cell] = getattr(s, field)
    return table


def report(all_scores: list[Scores], command: str) -> str:
    cells = sorted({s.cell for s in all_scores})
    val, test = _rows(all_scores, "val"), _rows(all_scores, "test")
    variants = {label: row for label, row in val.items() if label.split("[")[0] in UOT_POOLINGS}
    incomplete = sorted(label for label, row in variants.items() if not all(cell in row for cell in cells))
    chosen, average, gap = None, {}, {}
    if variants and not incomplete:
        candidates = variants
        cost = {label: (UOT_SOLVERS[label.split("[")[0]] != "sinkhorn", learned_count(label))
                for label in candidates}
        chosen, average, gap = choose(candidates, cells, cost)

    def rank(label: str) -> str:
        if label in average:
            return f"{average[label]:.2f}"
        if label not in variants:
            return "reference, not ranked"
        return "incomplete" if label in incomplete else "pending"

    header = ["| run | " + " | ".join(cells) + " |", "|---|" + "---:|" * len(cells)]
    lines = [f"Made by `{command}`.", "", "## Validation accuracy (%), the only score the rule reads", "",
             header[0][:-1] + "| average rank |", header[1] + "---:|"]
    order = [*variants, *(label for label in val if label not in variants)]
    lines += [f"| {label} | " + " | ".join(_pct(val[label].get(c)) for c in cells) + f" | {rank(label)} |"
              for label in order]
    lines.append("")
    if chosen is None:
        lines.append(f"Nothing is chosen until every variant has every cell; missing cells: {', '.join(incomplete)}.")
    else:
        lines.append(f"**Chosen by the rule: `{chosen}`** (average rank {average[chosen]:.2f} over {len(cells)} "
                     f"cells; in its worst cell it is {100 * -gap[chosen]:.2f} points below the best variant).")
    lines += ["", "## Test accuracy (%), printed beside, never read by the rule", "", *header]
    lines += [f"| {label} | " + " | ".join(_pct(test[label].get(c)) for c in cells) + " |" for label in order]
    units = sorted({f"{s.cell}: {s.units}" for s in all_scores})
    lines += ["", f"Each score is the mean over folds (TU) or seeds (AD-GCL): {'; '.join(units)}."]
    return "\n".join(lines) + "\n"


def find_runs(paths: Sequence[Path], datasets: Optional[Sequence[str]]) -> list[Path]:
    """The run directories among ``paths`` and their subfolders, on ``datasets`` (all when ``None``)."""
    runs = []
    for path in paths:
        for run in ([path] if (path / "results.json").exists() else sorted(path.iterdir())):
            if (run / "results.json").exists() and (
                    datasets is None or json.loads((run / "results.json").read_text())["dataset"] in datasets):
                runs.append(run)
    return runs


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path,
                        help="run directories (each with a results.json) or folders of them")
    parser.add_argument("--datasets", nargs="+", help="keep the runs on these datasets (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the AD-GCL seeds to average")
    parser.add_argument("--out", type=Path, required=True, help="folder for design.md")
    args = parser.parse_args(argv)
    runs = find_runs(args.runs, args.datasets)
    all_scores = [scores(run, args.seeds) for run in runs]
    command = "python -m experiments.design " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "design.md").write_text(report(all_scores, command))
    print(f"wrote {args.out / 'design.md'}")


if __name__ == "__main__":
    main()
