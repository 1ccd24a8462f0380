import json

import numpy as np
import pytest
from scipy.stats import wilcoxon

from experiments.models import run_label
from experiments.table import main

PNG = b"\x89PNG\r\n\x1a\n"


def _write(path, **result):
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps(result))
    return path


def _tu(tmp_path, dataset, pooling, accs, **extra):
    # A TU run as experiments.train writes it: per-fold test accuracies, their mean and sample std.
    folds = [dict(fold=i, test_acc=acc) for i, acc in enumerate(accs)]
    return _write(tmp_path / f"{dataset}-{pooling}", dataset=dataset, pooling=pooling, metric="accuracy",
                  folds=folds, mean=float(np.mean(accs)), std=float(np.std(accs, ddof=1)), **extra)


def _adgcl(tmp_path, dataset, pooling, folds, record_folds=True, **extra):
    # An AD-GCL run: per seed the mean test accuracy over its folds, and (newer runs) each fold's.
    seeds = [dict(seed=s, test_acc=float(np.mean(accs)), **({"fold_test_acc": list(accs)} if record_folds else {}))
             for s, accs in enumerate(folds)]
    accs = [seed["test_acc"] for seed in seeds]
    return _write(tmp_path / f"adgcl-{dataset}-{pooling}", dataset=dataset, pooling=pooling, metric="accuracy",
                  protocol="adgcl", seeds=seeds, mean=float(np.mean(accs)), std=float(np.std(accs, ddof=1)),
                  **extra)


def _lines(path):
    return path.read_text().splitlines()


def test_table_means_are_the_average_of_the_folds(tmp_path):
    rng = np.random.default_rng(0)
    mutag = {p: rng.integers(12, 19, 10) / 19 for p in ("add", "mean", "uot")}
    runs = [_tu(tmp_path, "MUTAG", p, accs, seconds_per_epoch=0.5) for p, accs in mutag.items()]
    runs.append(_tu(tmp_path, "PROTEINS", "uot", [0.7, 0.8, 0.75]))
    out = tmp_path / "docs" / "tu"
    main([str(run) for run in runs[:3]] + [str(runs[3] / "results.json"), "--out", str(out)])

    lines = _lines(out / "table.md")
    assert lines[0].startswith("Made by `python -m experiments.table ") and lines[0].endswith(f"--out {out}`.")
    assert "| dataset | metric | over | add | mean | uot[prior=uniform] |" in lines  # its prior named
    cells = [f"{100 * np.mean(a):.1f} ± {100 * np.std(a, ddof=1):.1f}" for a in mutag.values()]
    best = int(np.argmax([np.mean(a) for a in mutag.values()]))
    cells[best] = f"**{cells[best]}**"
    assert f"| MUTAG | accuracy | 10 folds | {' | '.join(cells)} |" in lines
    assert "| PROTEINS | accuracy | 3 folds |  |  | 75.0 ± 5.0 |" in lines  # one run: nothing to bold
    assert not any("econds" in line for line in lines)  # no timings in the table
    assert (out / "table.png").read_bytes()[:8] == PNG


def test_stats_pair_folds_and_rank_complete_datasets(tmp_path):
    rng = np.random.default_rng(1)
    accs = {(d, p): rng.random(10) for d in ("A", "B", "C") for p in ("add", "max", "mean", "uot", "uot_badmm")}
    accs["A", "uot"] = accs["A", "max"] + 0.05  # A: uot beats every fold of max, the best other
    accs["A", "max"] += 1.0
    accs["A", "uot"] += 1.0
    del accs["C", "max"]  # C lacks max: it takes no part in the ranks
    runs = [str(_tu(tmp_path, d, p, list(a))) for (d, p), a in accs.items()]
    out = tmp_path / "out"
    main(runs + ["--out", str(out)])

    lines = _lines(out / "stats.md")
    p = wilcoxon(accs["A", "uot"], accs["A", "max"]).pvalue
    assert any(line.startswith("| A | uot[prior=uniform] | ") and "| max |" in line and line.endswith(f"| 10 folds (10) | {p:.3g} |")
               for line in lines)
    assert "Left out, for lack of runs: C (no max)." in lines
    assert any("averaged over the 2 datasets that have all of them: A, B." in line for line in lines)
    # Average ranks over A and B, by hand from the means.
    for pooling in ("add", "max", "mean", "uot", "uot_badmm"):
        rank = np.mean([1 + sum(np.mean(accs[d, q]) > np.mean(accs[d, pooling])
                                for q in ("add", "max", "mean", "uot", "uot_badmm")) for d in ("A", "B")])
        assert f"| {run_label(pooling, {})} | {rank:.2f} |" in lines
    assert (out / "ranks.png").read_bytes()[:8] == PNG

    # Two poolings cannot be ranked by Friedman's test: stats.md says so and no stale ranks.png stays behind.
    main(runs + ["--out", str(out), "--poolings", "mean", "uot[prior=uniform]"])
    assert any("need at least 3 poolings and 2 datasets (here 2 and 3)" in line for line in _lines(out / "stats.md"))
    assert not (out / "ranks.png").exists()


def test_adgcl_pairs_seeds_by_folds_when_recorded(tmp_path):
    rng = np.random.default_rng(2)
    folds = {p: rng.random((5, 10)) for p in ("add", "mean", "uot")}
    runs = [str(_adgcl(tmp_path, "MUTAG", p, folds[p], svm="LinearSVC(C=1)")) for p in folds]
    out = tmp_path / "out"
    main(runs + ["--out", str(out)])
    other = max(("add", "mean"), key=lambda p: folds[p].mean())
    p = wilcoxon(folds["uot"].ravel(), folds[other].ravel()).pvalue
    assert any(line.startswith("| MUTAG | uot[prior=uniform] |") and f"| 50 seeds x folds (50) | {p:.3g} |" in line
               for line in _lines(out / "stats.md"))
    table = _lines(out / "table.md")
    assert any(line.startswith("| MUTAG | accuracy | 5 seeds |") for line in table)
    assert "- LinearSVC(C=1): MUTAG add, MUTAG mean, MUTAG uot[prior=uniform]" in table

    # An older run without per-fold scores: the pairs fall back to seeds, and its SVM is said to be unrecorded.
    old = _adgcl(tmp_path, "MUTAG", "max", rng.random((5, 10)), record_folds=False)
    main(runs + [str(old), "--out", str(out)])
    assert any(line.startswith("| MUTAG | uot[prior=uniform] |") and "| 5 seeds (5) |" in line for line in _lines(out / "stats.md"))
    assert "- not recorded in results.json: MUTAG max" in _lines(out / "table.md")


def test_ogb_rows_and_lower_is_better(tmp_path):
    def ogb(name, pooling, metric, tests, backbone="gin-virtual"):
        seeds = [dict(seed=s, test=t) for s, t in enumerate(tests)]
        return str(_write(tmp_path / f"{name}-{pooling}-{backbone}", dataset=name, pooling=pooling, metric=metric,
                          config=dict(backbone=backbone), seeds=seeds, test=float(np.mean(tests)),
                          test_std=float(np.std(tests, ddof=1)) if len(tests) > 1 else None))

    runs = [ogb("ogbg-molesol", "mean", "rmse", [1.5, 1.7]), ogb("ogbg-molesol", "uot", "rmse", [1.2, 1.3]),
            ogb("ogbg-molesol", "uot", "rmse", [1.0], backbone="gin")]
    main(runs + ["--out", str(tmp_path / "out")])
    lines = _lines(tmp_path / "out" / "table.md")
    assert "| ogbg-molesol gin-virtual | rmse | 2 seeds | 1.600 ± 0.141 | **1.250 ± 0.071** |" in lines
    assert "| ogbg-molesol gin | rmse | 1 seed |  | 1.000 |" in lines  # one seed: no std


def test_bad_runs_are_refused(tmp_path, capsys):
    a = _tu(tmp_path, "MUTAG", "add", [0.8, 0.9])
    b = _write(tmp_path / "b", dataset="MUTAG", pooling="add", folds=[dict(fold=0, test_acc=0.9)], mean=0.9, std=None)
    with pytest.raises(SystemExit):
        main([str(a), str(b), "--out", str(tmp_path / "t")])
    assert "two runs of add on MUTAG" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()

    c = _write(tmp_path / "c", dataset="MUTAG", pooling="uot", folds=[dict(fold=0, test_acc=0.8),
                                                                   dict(fold=1, test_acc=0.9)], mean=0.9, std=0.07)
    with pytest.raises(SystemExit):
        main([str(c), "--out", str(tmp_path / "t")])
    assert "recorded mean 0.9 is not the average 0.85" in capsys.readouterr().err

    d = _write(tmp_path / "d", dataset="MUTAG", pooling="max", mean=0.9, std=0.1)  # no folds or seeds
    with pytest.raises(SystemExit):
        main([str(d), "--out", str(tmp_path / "t")])
    assert "not the results of experiments.train or experiments.adgcl" in capsys.readouterr().err


def test_made_by_line_prints_a_whole_folder_as_its_glob(tmp_path, capsys):
    runs = tmp_path / "runs"
    paths = [str(_tu(runs, "MUTAG", p, [0.8, 0.9, 0.7])) for p in ("add", "mean", "uot")]
    out = tmp_path / "out"
    main(paths + ["--out", str(out)])  # what the shell passes for runs/*
    made_by = f"Made by `python -m experiments.table {runs}/* --out {out}`."
    assert _lines(out / "table.md")[0] == made_by
    assert _lines(out / "stats.md")[0] == made_by
    table = _lines(out / "table.md")

    main([str(runs / "*"), "--out", str(out)])  # the same pattern, quoted: expanded here, in sorted order
    assert _lines(out / "table.md")[1:] == table[1:]
    assert _lines(out / "table.md")[0] == f"Made by `python -m experiments.table '{runs}/*' --out {out}`."

    # Part of a folder, or another order (rows and columns follow it): every path is printed.
    main(paths[:2] + ["--out", str(out)])
    assert _lines(out / "table.md")[0] == f"Made by `python -m experiments.table {paths[0]} {paths[1]} --out {out}`."
    main(paths[::-1] + ["--out", str(out)])
    assert _lines(out / "table.md")[0].startswith(f"Made by `python -m experiments.table {paths[2]} {paths[1]} ")


def test_summary_prints_best_other_against_uot(tmp_path, capsys):
    accs = {("MUTAG", "add"): [0.80, 0.90], ("MUTAG", "max"): [0.84, 0.88], ("MUTAG", "uot"): [0.90, 0.90],
            ("MUTAG", "uot_badmm"): [0.70, 0.80], ("MUTAG", "rot"): [0.95, 0.95],  # rot is no "other" pooling
            ("PROTEINS", "mean"): [0.75, 0.77], ("PROTEINS", "uot"): [0.70, 0.74],
            ("ENZYMES", "mean"): [0.3, 0.4]}  # no UOT run: no row
    runs = [str(_tu(tmp_path, d, p, a)) for (d, p), a in accs.items()]
    main(runs + ["--summary"])
    assert capsys.readouterr().out.splitlines() == [
        "| dataset | best other pooling | `uot[prior=uniform]` | `uot_badmm[prior=uniform]` |",
        "|---|---|---:|---:|",
        "| MUTAG | max 86.0 ± 2.8 | **90.0 ± 0.0** | 75.0 ± 7.1 |",
        "| PROTEINS | mean **76.0 ± 1.4** | 72.0 ± 2.8 |  |",
    ]
    assert not (tmp_path / "table.md").exists()


def test_lower_is_better_comes_from_the_protocol(tmp_path):
    from experiments import table
    assert table.orientation(dict(metric="accuracy")) == 1
    assert table.orientation(dict(metric="rocauc")) == 1
    assert table.orientation(dict(metric="rmse")) == -1
    with pytest.raises(ValueError, match="no known direction"):
        table.orientation(dict(metric="f1"))
