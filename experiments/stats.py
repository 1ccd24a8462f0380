"""Significance tests for comparing poolings, as Demšar (JMLR 2006) recommends for classifiers.

Within one dataset, two poolings are compared paired over the units they share (folds, seeds, or seeds x folds)
by the Wilcoxon signed-rank test (:func:`wilcoxon`, :func:`versus_best_other`). Across datasets, every pooling
gets its rank on each dataset (1 = best, ties share the mean rank) and the average of those ranks
(:func:`average_ranks`); Friedman's test asks whether the poolings differ at all (:func:`friedman`), and the
Nemenyi post-hoc test which pairs do (:func:`nemenyi`): two poolings differ at level ``alpha`` when their
average ranks differ by more than the critical difference (:func:`critical_difference`), drawn as a
critical-difference diagram (:func:`plot_critical_difference`). The tests are scipy's and scikit-posthocs'.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import scikit_posthocs
from matplotlib.figure import Figure
from scipy import stats


def wilcoxon(x: Sequence[float], y: Sequence[float]) -> tuple[Optional[float], int]:
    """The two-sided p-value of the Wilcoxon signed-rank test of ``x - y`` and the number of pairs that differ.

    scipy's defaults: pairs with equal values are dropped, the p-value is exact for up to 50 pairs without ties
    in ``|x - y|`` and otherwise from the normal approximation. With no differing pair the p-value is ``None``.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired samples need the same length, got {x.shape} and {y.shape}")
    differing = int(np.count_nonzero(x != y))
    if differing == 0:
        return None, 0
    return float(stats.wilcoxon(x, y).pvalue), differing


def versus_best_other(samples: Mapping[str, Sequence[float]], candidates: Sequence[str],
                      higher_is_better: bool = True) -> list[dict]:
    """Each pooling of ``candidates`` in ``samples`` against the best pooling outside ``candidates``.

    ``samples`` maps a pooling to its paired scores (the same units in the same order for every pooling); the
    best other pooling is the one with the best mean. Returns one dict per candidate: ``pooling``, ``other``,
    their means, ``difference`` (candidate minus other, positive when the candidate is better if higher is
    better), ``pairs``, ``differing`` and the Wilcoxon ``p`` (:func:`wilcoxon`). Empty when either side is
    missing.
    """
    means = {pooling: float(np.mean(values)) for pooling, values in samples.items()}
    others = [pooling for pooling in samples if pooling not in candidates]
    if not others:
        return []
    sign = 1 if higher_is_better else -1
    other = max(others, key=lambda pooling: sign * means[pooling])  # the first of equal bests
    rows = []
    for pooling in candidates:
        if pooling in samples:
            p, differing = wilcoxon(samples[pooling], samples[other])
            rows.append(dict(pooling=pooling, mean=means[pooling], other=other, other_mean=means[other],
                             difference=means[pooling] - means[other], pairs=len(samples[pooling]),
                             differing=differing, p=p))
    return rows


def average_ranks(scores: pd.DataFrame, higher_is_better: bool = True) -> pd.Series:
    """The mean over datasets (rows) of each pooling's (column's) rank on that dataset, 1 = best; tied scores
    share the mean of their ranks."""
    ranks = scores.rank(axis=1, ascending=not higher_is_better, method="average")
    return ranks.mean(axis=0)


def friedman(scores: pd.DataFrame) -> tuple[float, float]:
    """Friedman's chi-square statistic and p-value over datasets (rows) and poolings (columns, at least 3)."""
    if scores.shape[1] < 3 or scores.shape[0] < 2:
        raise ValueError(f"Friedman's test needs at least 2 datasets and 3 poolings, got {scores.shape}")
    result = stats.friedmanchisquare(*(scores[column].to_numpy() for column in scores.columns))
    return float(result.statistic), float(result.pvalue)


def nemenyi(scores: pd.DataFrame) -> pd.DataFrame:
    """The Nemenyi post-hoc p-value of every pair of poolings (columns), datasets as blocks (rows)."""
    return scikit_posthocs.posthoc_nemenyi_friedman(scores)


def critical_difference(poolings: int, datasets: int, alpha: float = 0.05) -> float:
    """Nemenyi's critical difference of average ranks, ``q_alpha * sqrt(k (k + 1) / (6 N))``, where ``q_alpha``
    is the studentized range quantile for ``k`` poolings (infinite degrees of freedom) divided by ``sqrt(2)``."""
    q = stats.studentized_range.ppf(1 - alpha, poolings, np.inf) / math.sqrt(2)
    return float(q * math.sqrt(poolings * (poolings + 1) / (6 * datasets)))


def plot_critical_difference(ranks: pd.Series, pvalues: pd.DataFrame, title: str, alpha: float = 0.05) -> Figure:
    """The critical-difference diagram: average ranks on an axis (1 = best, on the left), and poolings that the
    Nemenyi test at ``alpha`` does not tell apart (``pvalues``, :func:`nemenyi`) joined by a bar."""
    fig = Figure(figsize=(7.5, 1.5 + 0.28 * len(ranks)))
    ax = fig.subplots()
    scikit_posthocs.critical_difference_diagram(ranks, pvalues, alpha=alpha, ax=ax,
                                                label_fmt_left="{label} ({rank:.2f})",
                                                label_fmt_right="({rank:.2f}) {label}",
                                                label_props=dict(fontsize=9))
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig
