import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import chi2, studentized_range

from experiments.stats import (average_ranks, critical_difference, friedman, nemenyi, plot_critical_difference,
                               versus_best_other, wilcoxon)


def test_wilcoxon_exact_p_by_hand():
    # Differences 1, 2, -3, 4, 5: W- = 3; of the 32 equally likely sign patterns, 5 have W- <= 3 ({}, {1}, {2},
    # {3}, {1, 2}), so the two-sided p-value is 2 * 5 / 32.
    p, differing = wilcoxon([1, 2, -3, 4, 5], [0, 0, 0, 0, 0])
    assert (p, differing) == (pytest.approx(10 / 32), 5)
    # All five differences positive: only the all-positive and all-negative patterns are as extreme.
    assert wilcoxon([0.9, 0.8, 0.7, 0.85, 0.95], [0.1, 0.2, 0.3, 0.4, 0.5])[0] == pytest.approx(2 / 32)
    # A pair with equal scores is dropped, leaving the first example.
    assert wilcoxon([1, 2, -3, 4, 5, 7], [0, 0, 0, 0, 0, 7]) == (pytest.approx(10 / 32), 5)


def test_wilcoxon_without_differences_and_unpaired():
    assert wilcoxon([0.5, 0.6], [0.5, 0.6]) == (None, 0)
    with pytest.raises(ValueError, match="same length"):
        wilcoxon([1, 2, 3], [1, 2])


def test_versus_best_other():
    samples = {"add": [0.70, 0.72, 0.74], "mean": [0.80, 0.81, 0.79], "uot": [0.85, 0.82, 0.86],
               "uot_badmm": [0.60, 0.61, 0.62]}
    rows = versus_best_other(samples, ("uot", "uot_badmm"))
    assert [(r["pooling"], r["other"]) for r in rows] == [("uot", "mean"), ("uot_badmm", "mean")]
    assert rows[0]["difference"] == pytest.approx(np.mean([0.85, 0.82, 0.86]) - 0.80)
    assert rows[0]["pairs"] == 3 and rows[0]["p"] == pytest.approx(2 / 8)
    # Lower is better (an error such as RMSE): the best other is the smallest.
    assert versus_best_other(samples, ("uot", "uot_badmm"), higher_is_better=False)[0]["other"] == "add"
    assert versus_best_other({"uot": [1.0], "uot_badmm": [2.0]}, ("uot", "uot_badmm")) == []


def test_average_ranks_by_hand():
    scores = pd.DataFrame({"a": [0.9, 0.5, 0.7], "b": [0.8, 0.6, 0.9], "c": [0.7, 0.6, 0.8]})
    # Ranks per dataset (1 = best): (1, 2, 3), (3, 1.5, 1.5) with b and c tied, (3, 1, 2).
    expected = {"a": (1 + 3 + 3) / 3, "b": (2 + 1.5 + 1) / 3, "c": (3 + 1.5 + 2) / 3}
    assert average_ranks(scores).to_dict() == pytest.approx(expected)
    # With lower better, the ranks are mirrored: k + 1 - rank.
    assert average_ranks(scores, higher_is_better=False).to_dict() == pytest.approx(
        {name: 4 - rank for name, rank in expected.items()})


def test_friedman_closed_form():
    # No ties: chi2 = 12 / (N k (k + 1)) * sum_j R_j^2 - 3 N (k + 1), with R_j the rank sums (Demsar 2006, eq. 1).
    scores = pd.DataFrame({"a": [0.9, 0.7, 0.8, 0.6], "b": [0.8, 0.9, 0.7, 0.5], "c": [0.7, 0.8, 0.6, 0.4]})
    rank_sums = np.array([1 + 3 + 1 + 1, 2 + 1 + 2 + 2, 3 + 2 + 3 + 3])
    n, k = 4, 3
    expected = 12 / (n * k * (k + 1)) * (rank_sums ** 2).sum() - 3 * n * (k + 1)
    statistic, p = friedman(scores)
    assert statistic == pytest.approx(expected)
    assert p == pytest.approx(chi2.sf(expected, k - 1))
    with pytest.raises(ValueError, match="at least 2 datasets and 3 poolings"):
        friedman(scores[["a", "b"]])


def test_nemenyi_against_the_studentized_range():
    rng = np.random.default_rng(0)
    scores = pd.DataFrame(rng.random((8, 4)), columns=list("abcd"))
    ranks = average_ranks(scores)
    pvalues = nemenyi(scores)
    n, k = scores.shape
    for a in scores.columns:
        for b in scores.columns:
            if a != b:
                q = abs(ranks[a] - ranks[b]) / math.sqrt(k * (k + 1) / (6 * n))
                assert pvalues.loc[a, b] == pytest.approx(studentized_range.sf(q * math.sqrt(2), k, np.inf), rel=1e-3)


@pytest.mark.parametrize("k, q", [(2, 1.960), (3, 2.343), (4, 2.569), (5, 2.728), (6, 2.850), (7, 2.949),
                                  (8, 3.031), (9, 3.102), (10, 3.164)])
def test_critical_difference_matches_demsars_table(k, q):
    # Demsar (2006), Table 5(a): critical values q_0.05 of the two-tailed Nemenyi test.
    assert critical_difference(k, 8) / math.sqrt(k * (k + 1) / 48) == pytest.approx(q, abs=1e-3)  # 3 decimals


def test_plot_critical_difference(tmp_path):
    scores = pd.DataFrame({"a": [0.9, 0.7, 0.8], "b": [0.8, 0.9, 0.7], "c": [0.7, 0.8, 0.6]})
    fig = plot_critical_difference(average_ranks(scores), nemenyi(scores), "title")
    fig.savefig(tmp_path / "cd.png")
    assert (tmp_path / "cd.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
