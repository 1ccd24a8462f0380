"""``python -m experiments.table RUN_DIRS... --out DIR``: results.json files to a table and its statistics.

Writes ``DIR/table.md`` and ``DIR/table.png`` (one row per dataset, one column per pooling: the test score, mean
± sample std over the run's folds or seeds, the best per dataset in bold), and ``DIR/stats.md`` and
``DIR/ranks.png`` (:mod:`experiments.stats`: per dataset, each UOT/ROT pooling against the best other
pooling, paired over folds, seeds or seeds x folds, by the Wilcoxon signed-rank test; across datasets, average
ranks, Friedman's test, the Nemenyi post-hoc test and the critical-difference diagram). Each file starts with the
command that made it: a run directory's whole parent given in sorted order (what the shell's ``PARENT/*`` expands
to) is printed as ``PARENT/*``. A quoted pattern (``'docs/tu/runs/*'``) is expanded here, in sorted order.

``--summary`` prints, instead of writing files, one compact Markdown table: per dataset the best other pooling (outside
:data:`CANDIDATES`) against ``uot`` and ``uot_badmm``, as the README shows them.

It reads the three kinds of ``results.json``: TU (``folds``, each with ``test_acc``), AD-GCL (``seeds``, each with
``test_acc`` and, from runs that record it, ``fold_test_acc``) and OGB (``seeds``, each with ``test``). A run's
mean must be the average of its folds or seeds; OGB rows are per dataset and backbone.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import shlex
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from experiments import stats  # noqa: E402
from experiments.models import UOT_POOLINGS, run_label  # noqa: E402
from experiments.protocol import higher_is_better, summarize  # noqa: E402

PERCENT_METRICS = frozenset({"accuracy", "acc", "rocauc", "ap"})  # in [0, 1], shown in percent
CANDIDATES = UOT_POOLINGS  # each variant against the best other pooling of a dataset
SUMMARY_POOLINGS = ("uot", "uot_badmm")  # the variants of these are the columns of --summary


def is_candidate(label: str) -> bool:
    """Whether a run label (:func:`~experiments.models.run_label`) names a UOT or ROT variant."""
    return label.split("[")[0] in CANDIDATES


def load_results(path: Path) -> dict[str, Any]:
    """A run's results, from its directory or its results.json."""
    return json.loads((path / "results.json" if path.is_dir() else path).read_text())


def unit_scores(result: dict[str, Any], fine: bool = False) -> dict[tuple[int, ...], float]:
    """A run's test scores by unit: ``(fold,)`` for TU runs, ``(seed,)`` for seeded runs, and ``(seed, fold)``
    with ``fine`` for AD-GCL runs that record each fold's test accuracy."""
    if "folds" in result:
        return {(fold["fold"],): fold["test_acc"] for fold in result["folds"]}
    key = "test" if "test" in result["seeds"][0] else "test_acc"
    if fine:
        return {(seed["seed"], fold): acc for seed in result["seeds"]
                for fold, acc in enumerate(seed["fold_test_acc"])}
    return {(seed["seed"],): seed[key] for seed in result["seeds"]}


def has_fold_scores(result: dict[str, Any]) -> bool:
    return "seeds" in result and all("fold_test_acc" in seed for seed in result["seeds"])


def unit_name(result: dict[str, Any], fine: bool = False) -> str:
    return "folds" if "folds" in result else "seeds x folds" if fine else "seeds"


def summary(result: dict[str, Any]) -> tuple[float, Optional[float], int]:
    """Mean, sample std (``None`` for one unit) and number of the run's folds or seeds, as the harness computes
    them (:func:`experiments.protocol.summarize`)."""
    values = list(unit_scores(result).values())
    return (*summarize(values), len(values))


def check_summary(result: dict[str, Any], path: Path) -> None:
    """Refuses a run whose recorded mean is not the average of its folds or seeds."""
    mean, _, count = summary(result)
    recorded = result["mean"] if "mean" in result else result["test"]
    if not math.isclose(recorded, mean, rel_tol=0, abs_tol=1e-12):
        raise ValueError(f"{path}: recorded mean {recorded} is not the average {mean} of its {count} "
                         f"{unit_name(result)}")


def metric(result: dict[str, Any]) -> str:
    return result.get("metric", "accuracy")


def orientation(result: dict[str, Any]) -> int:
    """1 where a higher score is better, -1 for errors such as RMSE: TU and AD-GCL runs record ``accuracy``,
    OGB runs their Evaluator's metric, whose direction :func:`experiments.protocol.higher_is_better` knows."""
    name = metric(result)
    return 1 if name == "accuracy" or higher_is_better(name) else -1


def scale(result: dict[str, Any]) -> float:
    return 100.0 if metric(result) in PERCENT_METRICS else 1.0


def fmt(value: float, result: dict[str, Any]) -> str:
    """One decimal in percent, three for other metrics."""
    return f"{scale(result) * value:.{1 if metric(result) in PERCENT_METRICS else 3}f}"


def score_text(result: dict[str, Any], like: dict[str, Any]) -> str:
    """``mean ± std`` of a run (the mean alone for one unit), formatted for the metric of run ``like``."""
    mean, std, _ = summary(result)
    return fmt(mean, like) if std is None else f"{fmt(mean, like)} ± {fmt(std, like)}"


def row_name(result: dict[str, Any]) -> str:
    """The dataset, followed by the backbone for OGB datasets."""
    dataset, backbone = result["dataset"], result.get("config", {}).get("backbone")
    return f"{dataset} {backbone}" if dataset.startswith("ogbg-") and backbone else dataset


def paired_samples(runs: dict[str, dict[str, Any]]) -> tuple[dict[str, np.ndarray], str]:
    """Each pooling's scores over the units all of ``runs`` share, in one order, and what the units are:
    seeds x folds when every run records its folds' scores, else its folds or seeds."""
    fine = all(has_fold_scores(result) for result in runs.values())
    by_unit = {pooling: unit_scores(result, fine) for pooling, result in runs.items()}
    shared = sorted(set.intersection(*(set(scores) for scores in by_unit.values())))
    name = unit_name(next(iter(runs.values())), fine)
    if any(len(scores) != len(shared) for scores in by_unit.values()):
        name += " shared by all runs"
    return {pooling: np.array([scores[unit] for unit in shared]) for pooling, scores in by_unit.items()}, name


def expand(paths: Sequence[Path]) -> list[Path]:
    """``paths`` with each pattern that names no file (a quoted ``'DIR/*'``) replaced by its sorted matches."""
    out: list[Path] = []
    for path in paths:
        matches = sorted(glob.glob(str(path))) if glob.has_magic(str(path)) and not path.exists() else []
        if matches:
            out.extend(Path(match) for match in matches)
        else:
            out.append(path)
    return out


def _shorten(words: Sequence[str]) -> list[str]:
    """``words`` with each run of paths that is its parent's whole sorted listing (what an unquoted ``PARENT/*``
    expands to) replaced by ``PARENT/*``; everything else shell-quoted. Never the same words in another order:
    rows and columns follow the order of the runs."""
    out, i = [], 0
    while i < len(words):
        parent = Path(words[i]).parent
        listing = sorted(glob.glob(str(parent / "*")))
        stop = i
        while stop < len(words) and Path(words[stop]).parent == parent and Path(words[stop]).exists():
            stop += 1
        if (listing and stop > i + 1 and [str(Path(w)) for w in words[i:stop]] == listing
                and shlex.quote(str(parent)) == str(parent)):
            out.append(f"{parent}/*")
            i = stop
        else:
            out.append(shlex.quote(words[i]))
            i += 1
    return out


def _command(argv: Optional[Sequence[str]]) -> str:
    """The command line that made the files, with whole run folders shortened to ``PARENT/*``."""
    return " ".join(["python", "-m", "experiments.table", *_shorten(sys.argv[1:] if argv is None else list(argv))])


def summary_table(cells: dict[tuple[str, str], dict[str, Any]], datasets: Sequence[str]) -> list[str]:
    """One Markdown table: per dataset, the best pooling outside :data:`CANDIDATES` (by mean) and its score, then
    the scores of :data:`SUMMARY_POOLINGS`, mean ± sample std, the best of the row in bold."""
    columns = list(dict.fromkeys(p for _, p in cells if p.split("[")[0] in SUMMARY_POOLINGS))
    lines = ["| dataset | best other pooling | " + " | ".join(f"`{p}`" for p in columns) + " |",
             "|---|---|" + "---:|" * len(columns)]
    for dataset in datasets:
        runs = {p: r for (d, p), r in cells.items() if d == dataset}
        others = {p: r for p, r in runs.items() if not is_candidate(p)}
        shown = [p for p in columns if p in runs]
        if not others or not shown:
            continue
        first = next(iter(runs.values()))
        sign = orientation(first)
        other = max(others, key=lambda p: sign * summary(others[p])[0])
        best = max(sign * summary(runs[p])[0] for p in [other, *shown])

        def cell(pooling: str) -> str:
            if pooling not in runs:
                return ""
            mean = summary(runs[pooling])[0]
            text = score_text(runs[pooling], first)
            return f"**{text}**" if sign * mean == best else text

        lines.append(f"| {dataset} | {other} {cell(other)} | " + " | ".join(cell(p) for p in columns) + " |")
    return lines


def write_table(cells: dict[tuple[str, str], dict[str, Any]], datasets: list[str], poolings: list[str],
                command: str, out: Path) -> None:
    """``table.md`` and ``table.png``."""
    lines = [f"Made by `{command}`.", "",
             "Test score, mean ± sample std over each run's folds or seeds (the column *over*); percent for "
             "accuracy, ROC-AUC and AP. The best mean per dataset is in bold (the best of two or more runs).", "",
             "| dataset | metric | over | " + " | ".join(poolings) + " |", "|---|---|---|" + "---:|" * len(poolings)]
    for dataset in datasets:
        runs = {p: cells[dataset, p] for p in poolings if (dataset, p) in cells}
        first = next(iter(runs.values()))
        sign = orientation(first)
        best = max(sign * summary(r)[0] for r in runs.values())
        counts = {summary(r)[2] for r in runs.values()}
        mixed = len(counts) > 1  # then each cell says its count
        units = unit_name(first)
        over = f"n {units} in cells" if mixed else f"{min(counts)} {units[:-1] if counts == {1} else units}"
        row = []
        for pooling in poolings:
            if pooling not in runs:
                row.append("")
                continue
            mean, _, count = summary(runs[pooling])
            text = score_text(runs[pooling], first) + (f" (n={count})" if mixed else "")
            row.append(f"**{text}**" if sign * mean == best and len(runs) > 1 else text)
        lines.append(f"| {dataset} | {metric(first)} | {over} | " + " | ".join(row) + " |")
    svms: dict[str, list[str]] = {}
    for (dataset, pooling), result in cells.items():
        if result.get("protocol") == "adgcl":
            svms.setdefault(result.get("svm", "not recorded in results.json"), []).append(f"{dataset} {pooling}")
    if svms:
        lines += ["", "SVM of the AD-GCL runs:", ""]
        lines += [f"- {svm}: {', '.join(runs)}" for svm, runs in svms.items()]
    out.joinpath("table.md").write_text("\n".join(lines) + "\n")

    # One panel per dataset: scores of different datasets (and metrics) need their own y axis.
    ncols = min(4, len(datasets))
    nrows = math.ceil(len(datasets) / ncols)
    panel_width = max(3.2, 0.8 + 0.42 * len(poolings))  # room for the title and the rotated names
    fig = Figure(figsize=(panel_width * ncols, 0.6 + 3.4 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, dataset in zip(axes, datasets):
        present = [p for p in poolings if (dataset, p) in cells]
        results = [cells[dataset, p] for p in present]
        sign = orientation(results[0])
        means = np.array([scale(r) * summary(r)[0] for r in results])
        stds = np.array([scale(r) * (summary(r)[1] or 0.0) for r in results])
        colors = ["tab:red" if is_candidate(p) else "tab:blue" for p in present]
        xs = [poolings.index(p) for p in present]
        # Points with error bars, not bars: the y axis need not start at 0, so close scores stay apart.
        for x, mean, std, color in zip(xs, means, stds, colors):
            ax.errorbar(x, mean, yerr=std, fmt="o", color=color, capsize=3)
        best = xs[int(np.argmax(sign * means))]
        ax.axvspan(best - 0.4, best + 0.4, color="gold", alpha=0.3, lw=0)
        ax.set_xticks(range(len(poolings)), poolings, rotation=60, ha="right", fontsize=8)
        ax.set_xlim(-0.6, len(poolings) - 0.4)
        ax.set_title(f"{dataset}\n{metric(results[0])}, over {unit_name(results[0])}", fontsize=9)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[len(datasets):]:
        ax.set_visible(False)
    fig.suptitle(("\n" if ncols == 1 else " ").join(["test score, mean ± std", "(UOT in red, best mean shaded)"]),
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "table.png", dpi=150)


def write_stats(cells: dict[tuple[str, str], dict[str, Any]], datasets: list[str], poolings: list[str],
                compared: list[str], alpha: float, command: str, out: Path) -> None:
    """``stats.md`` and, when Friedman's test applies, ``ranks.png``."""
    lines = [f"Made by `{command}`.", "", "## Per dataset: UOT (and ROT) against the best other pooling", "",
             "Wilcoxon signed-rank test (scipy.stats.wilcoxon: two-sided, pairs with equal scores dropped), "
             "paired over the units both runs share: folds of one split (TU), seeds (OGB, AD-GCL), or seeds x "
             "folds where AD-GCL runs record each fold. The *best other* pooling is the one outside "
             f"{', '.join(CANDIDATES)} with the best mean on that dataset, chosen after seeing the results, and "
             "the p-values are not corrected for the number of tests: read them as descriptive. Seeds x folds "
             "pairs are not independent (the folds of one seed share its encoder), so their p-values are "
             "optimistic. With n differing pairs the smallest possible two-sided p-value is 2 / 2^n (0.25 for 3, "
             "0.0625 for 5). Differences are in points of the metric (percentage points for percent metrics).",
             "", "| dataset | pooling | mean | best other | its mean | difference | pairs (differing) | p |",
             "|---|---|---:|---|---:|---:|---|---:|"]
    for dataset in datasets:
        runs = {p: cells[dataset, p] for p in poolings if (dataset, p) in cells}
        samples, units = paired_samples(runs)
        first = next(iter(runs.values()))
        candidates = [p for p in samples if is_candidate(p)]
        for row in stats.versus_best_other(samples, candidates, orientation(first) == 1):
            p = "—" if row["p"] is None else f"{row['p']:.3g}"
            lines.append(f"| {dataset} | {row['pooling']} | {fmt(row['mean'], first)} | {row['other']} | "
                         f"{fmt(row['other_mean'], first)} | {scale(first) * row['difference']:+.2f} | "
                         f"{row['pairs']} {units} ({row['differing']}) | {p} |")

    complete = [d for d in datasets if all((d, p) in cells for p in compared)]
    left_out = {d: [p for p in compared if (d, p) not in cells] for d in datasets if d not in complete}
    lines += ["", "## Across datasets: average ranks, Friedman, Nemenyi", "",
              f"Poolings compared: {', '.join(compared)}. Each pooling's rank on a dataset by its mean score "
              f"(1 = best, ties share the mean rank), averaged over the {len(complete)} datasets that have all of "
              f"them: {', '.join(complete) or 'none'}."]
    if left_out:
        lines += ["Left out, for lack of runs: " + "; ".join(f"{d} (no {', '.join(m)})" for d, m in left_out.items())
                  + "."]
    ranks_png = out / "ranks.png"
    if not complete:
        ranks_png.unlink(missing_ok=True)
        out.joinpath("stats.md").write_text("\n".join(lines) + "\n")
        return
    # Oriented so that higher is better on every dataset, whatever its metric.
    scores = pd.DataFrame([[orientation(cells[d, p]) * summary(cells[d, p])[0] for p in compared] for d in complete],
                          index=complete, columns=compared)
    ranks = stats.average_ranks(scores)
    lines += ["", "| pooling | average rank |", "|---|---:|"]
    lines += [f"| {p} | {r:.2f} |" for p, r in ranks.sort_values().items()]
    k, n = len(compared), len(complete)
    if k < 3 or n < 2:
        lines += ["", f"Friedman's test and the Nemenyi test need at least 3 poolings and 2 datasets (here {k} "
                      f"and {n}); not computed, and no ranks.png."]
        ranks_png.unlink(missing_ok=True)
        out.joinpath("stats.md").write_text("\n".join(lines) + "\n")
        return
    chi2, p = stats.friedman(scores)
    cd = stats.critical_difference(k, n, alpha)
    pvalues = stats.nemenyi(scores)
    lines += ["", f"Friedman's test (scipy.stats.friedmanchisquare): chi-square = {chi2:.2f} with {k - 1} degrees "
                  f"of freedom, p = {p:.3g} over N = {n} datasets (the chi-square approximation is rough for "
                  f"few datasets).",
              "", f"Nemenyi post-hoc test (scikit_posthocs.posthoc_nemenyi_friedman): two poolings differ at level "
                  f"{alpha} when their average ranks differ by more than the critical difference CD = {cd:.2f} "
                  f"(k = {k}, N = {n}); `ranks.png` draws it. Pairwise p-values:",
              "", "| | " + " | ".join(compared) + " |", "|---|" + "---:|" * k]
    lines += [f"| {a} | " + " | ".join("" if a == b else f"{pvalues.loc[a, b]:.3g}" for b in compared) + " |"
              for a in compared]
    out.joinpath("stats.md").write_text("\n".join(lines) + "\n")
    fig = stats.plot_critical_difference(ranks, pvalues, f"average rank over {n} datasets (1 = best), Friedman p = "
                                         f"{p:.3g}\nbars join poolings with Nemenyi p > {alpha} (CD = {cd:.2f})",
                                         alpha)
    fig.savefig(ranks_png, dpi=150)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path,
                        help="run directories or results.json files (a quoted 'DIR/*' is expanded, sorted)")
    parser.add_argument("--out", type=Path, help="directory for table.md, table.png, stats.md and ranks.png")
    parser.add_argument("--summary", action="store_true",
                        help="print the best other pooling against uot and uot_badmm per dataset (Markdown); "
                             "writes nothing")
    parser.add_argument("--poolings", nargs="+",
                        help="the poolings to rank across datasets (default: all of the runs')")
    parser.add_argument("--alpha", type=float, default=0.05, help="level of the Nemenyi test")
    args = parser.parse_args(argv)
    if args.out is None and not args.summary:
        parser.error("--out is required (or --summary, which writes nothing)")

    cells: dict[tuple[str, str], dict[str, Any]] = {}
    for path in expand(args.runs):
        try:
            result = load_results(path)
        except (OSError, json.JSONDecodeError) as error:
            parser.error(f"cannot read {path}: {error}")
        try:
            check_summary(result, path)
        except KeyError as error:
            parser.error(f"{path}: not the results of experiments.train or experiments.adgcl (no {error})")
        except ValueError as error:
            parser.error(str(error))
        key = (row_name(result), run_label(result["pooling"], result.get("config", {})))
        if key in cells:
            parser.error(f"two runs of {key[1]} on {key[0]}, the second in {path}")
        cells[key] = result
    datasets = list(dict.fromkeys(dataset for dataset, _ in cells))
    poolings = list(dict.fromkeys(pooling for _, pooling in cells))
    unknown = sorted(set(args.poolings or []) - set(poolings))
    if unknown:
        parser.error(f"--poolings names poolings without runs: {', '.join(unknown)}")
    if args.summary:
        print("\n".join(summary_table(cells, datasets)))
        return

    command = _command(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    write_table(cells, datasets, poolings, command, args.out)
    write_stats(cells, datasets, poolings, args.poolings or poolings, args.alpha, command, args.out)
    written = [args.out / name for name in ("table.md", "table.png", "stats.md", "ranks.png")]
    print(f"wrote {', '.join(str(path) for path in written if path.exists())}")


if __name__ == "__main__":
    main()
