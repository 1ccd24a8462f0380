"""``python -m experiments.table RUN_DIRS... --out docs/NAME``: results.json files to NAME.md and NAME.png.

The markdown table has one row per dataset (per dataset and backbone for OGB, whose leaderboards list GIN and
GIN-virtual apart) and one column per pooling, mean ± std over folds or seeds, in the order the runs are given,
and starts with the command that made it. It reads results with ``mean`` and ``std`` (TU: over folds) and OGB
results with ``metric``, ``test`` and ``test_std`` (over seeds; null for one seed).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

PERCENT_METRICS = frozenset({"accuracy", "acc", "rocauc", "ap"})  # in [0, 1], shown in percent


def load_results(path: Path) -> dict[str, Any]:
    """A run's results, from its directory or its results.json."""
    return json.loads((path / "results.json" if path.is_dir() else path).read_text())


def score(result: dict[str, Any]) -> tuple[float, Optional[float]]:
    """``(mean, std)`` of the test metric, in percent for metrics in [0, 1]; ``std`` is ``None`` for one seed."""
    mean, std = (result["mean"], result["std"]) if "mean" in result else (result["test"], result["test_std"])
    scale = 100.0 if result.get("metric", "accuracy") in PERCENT_METRICS else 1.0
    return scale * mean, None if std is None else scale * std


def cell(result: dict[str, Any]) -> str:
    """``mean ± std`` (``mean`` alone for one seed) with one decimal in percent, three otherwise."""
    digits = 1 if result.get("metric", "accuracy") in PERCENT_METRICS else 3
    mean, std = score(result)
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def row_name(result: dict[str, Any]) -> str:
    """The dataset, followed by the backbone for OGB datasets."""
    dataset, backbone = result["dataset"], result.get("config", {}).get("backbone")
    return f"{dataset} {backbone}" if dataset.startswith("ogbg-") and backbone else dataset


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories or results.json files")
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.md and OUT.png")
    args = parser.parse_args(argv)

    cells: dict[tuple[str, str], dict[str, Any]] = {}
    for path in args.runs:
        result = load_results(path)
        key = (row_name(result), result["pooling"])
        if key in cells:
            parser.error(f"two runs of {key[1]} on {key[0]}, the second in {path}")
        cells[key] = result
    datasets = list(dict.fromkeys(dataset for dataset, _ in cells))
    poolings = list(dict.fromkeys(pooling for _, pooling in cells))
    metrics = {dataset: next(r.get("metric", "accuracy") for (d, _), r in cells.items() if d == dataset)
               for dataset in datasets}

    command = shlex.join(["python", "-m", "experiments.table",
                          *(sys.argv[1:] if argv is None else argv)])
    lines = [f"Made by `{command}`.", "",
             "Test score, mean ± std over folds (or seeds); percent for accuracy, ROC-AUC and AP.", "",
             "| dataset | metric | " + " | ".join(poolings) + " |",
             "|---|---|" + "---:|" * len(poolings)]
    for dataset in datasets:
        row = [cell(cells[dataset, p]) if (dataset, p) in cells else "" for p in poolings]
        lines.append(f"| {dataset} | {metrics[dataset]} | " + " | ".join(row) + " |")
    timed = {key: r["seconds_per_epoch"] for key, r in cells.items() if "seconds_per_epoch" in r}
    if timed:
        lines += ["", "Seconds per epoch (median over epochs, training and evaluation).", "",
                  "| dataset | " + " | ".join(poolings) + " |", "|---|" + "---:|" * len(poolings)]
        for dataset in datasets:
            row = [f"{timed[dataset, p]:.2f}" if (dataset, p) in timed else "" for p in poolings]
            lines.append(f"| {dataset} | " + " | ".join(row) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(2 + 0.3 * len(datasets) * len(poolings), 3.5))
    width = 0.8 / len(poolings)
    for i, pooling in enumerate(poolings):
        xs = [j + (i - (len(poolings) - 1) / 2) * width for j, d in enumerate(datasets) if (d, pooling) in cells]
        scores = [score(cells[d, pooling]) for d in datasets if (d, pooling) in cells]
        # Points, not bars: the y axis need not start at 0, so close scores stay apart.
        ax.errorbar(xs, [m for m, _ in scores], yerr=[s or 0.0 for _, s in scores], fmt="o", capsize=3,
                    label=pooling)
    ax.set_xticks(range(len(datasets)), [f"{d}\n({metrics[d]})" for d in datasets])
    ax.set_ylabel("test score (mean ± std)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", ncol=min(len(poolings), 4), loc="lower center", bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=150)
    plt.close(fig)
    print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
