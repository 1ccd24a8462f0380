import csv
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import Linear
from torch_geometric.nn import GINConv

from sklearn.model_selection import KFold, StratifiedKFold, train_test_split
from sklearn.svm import LinearSVC

from experiments.adgcl.model import WeightedGINConv, drop_regulariser, nt_xent
from experiments.adgcl.protocol import C_GRID, AdgclConfig, main, parse_config, svm_fold_accuracies
from experiments.config import CHOICES
from experiments.data import load_tu
from tests.experiments.helpers import kill_after_checkpoint

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # small and reproducible: the same thread count in every run


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _args(out, cache, *extra):
    return ["--config", str(REPO / "configs/adgcl/mutag.yaml"), "--root", str(REPO / "data"), "--cache", str(cache),
            "--out", str(out), *extra]


def _run(*args):
    # A fresh process, as a user runs it: no state left over from other tests.
    subprocess.run([sys.executable, "-m", "experiments.adgcl", *args], cwd=REPO, env=ENV, check=True,
                   capture_output=True)


def _results(out):
    return json.loads((out / "results.json").read_text())


def _rows(path, drop=("train_seconds", "seconds")):
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(f)]


def test_acceptance(cache, tmp_path):
    """The issue's check: 2 epochs, seed 0, UOT readout, on all of MUTAG with 10 folds."""
    _run(*_args(tmp_path, cache, "--epochs", "2", "--seeds", "0", "--pooling", "uot"))
    results = _results(tmp_path)
    assert (results["dataset"], results["pooling"], results["metric"]) == ("MUTAG", "uot", "accuracy")
    assert [seed["seed"] for seed in results["seeds"]] == [0]
    assert all(0 <= seed["test_acc"] <= 1 and 0 <= seed["val_acc"] <= 1 for seed in results["seeds"])
    assert results["mean"] == results["seeds"][0]["test_acc"]
    assert results["std"] is None  # one seed
    status = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, check=True)
    assert results["dirty"] == bool(status.stdout.strip())  # whether the commit alone gives the code
    assert results["config"]["folds"] == 10 and results["config"]["epochs"] == 2
    rows = _rows(tmp_path / "seed0.csv", drop=())
    assert [int(row["epoch"]) for row in rows] == [1, 2]
    best = int(np.argmax([float(row["val_acc"]) for row in rows]))  # the first epoch of highest validation acc
    assert results["seeds"][0]["best_epoch"] == best + 1
    assert results["seeds"][0]["test_acc"] == float(rows[best]["test_acc"])
    # The seed's score is the mean over the 10 folds' test accuracies at that epoch, each a fraction of a fold.
    folds = results["seeds"][0]["fold_test_acc"]
    assert len(folds) == 10 and np.mean(folds) == pytest.approx(results["seeds"][0]["test_acc"], abs=1e-15)
    assert all(acc * n == pytest.approx(round(acc * n)) for acc, n in zip(folds, [19] * 8 + [18] * 2))
    # The SVM setting is recorded: LinearSVC at its default C, no grid search.
    assert results["config"]["svm_search"] is False
    assert "LinearSVC(dual=False)" in results["svm"] and "GridSearchCV" not in results["svm"]
    # The learned UOT values are logged per epoch, and start from the config's.
    assert float(rows[0]["uot_eps"]) != 1.0 and float(rows[0]["uot_lam_p"]) == math.inf


def test_nt_xent_by_hand():
    # Cosines: s11 = 1, s12 = s22 = 1/sqrt(2), s21 = 0; with 2 graphs each row and column has one negative.
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z_aug = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    s12 = s22 = 1 / math.sqrt(2)
    rows = ((s12 - 1) + (0 - s22)) / 2 / 0.2  # row i: s_ij - s_ii
    cols = ((0 - 1) + (s12 - s22)) / 2 / 0.2  # column j: s_ij - s_jj
    assert nt_xent(z, z_aug, 0.2).item() == pytest.approx((rows + cols) / 2, abs=1e-6)
    assert (rows + cols) / 2 == pytest.approx(-2.5)


def test_nt_xent_matches_adgcl():
    # AD-GCL's GInfoMinMax.calc_loss, written with exp and division.
    z, z_aug = torch.randn(6, 4, generator=torch.Generator().manual_seed(0)).double().chunk(2)
    sim = torch.exp(z @ z_aug.t() / torch.outer(z.norm(dim=1), z_aug.norm(dim=1)) / 0.2)
    pos = sim.diagonal()
    expected = (-torch.log(pos / (sim.sum(0) - pos)).mean() - torch.log(pos / (sim.sum(1) - pos)).mean()) / 2
    assert nt_xent(z, z_aug, 0.2).item() == pytest.approx(expected.item(), rel=1e-12)


def test_weighted_gin_conv():
    x = torch.randn(4, 3)
    edge_index = torch.tensor([[0, 1, 2, 3], [1, 0, 3, 2]])
    conv = WeightedGINConv(Linear(3, 5))
    gin = GINConv(conv.nn)
    assert torch.allclose(conv(x, edge_index), gin(x, edge_index))  # no weights: plain GIN
    keep = torch.tensor([1.0, 0.0, 1.0, 1.0])  # 0/1 weights drop edges
    assert torch.allclose(conv(x, edge_index, keep), gin(x, edge_index[:, keep.bool()]))


def test_drop_regulariser_skips_graphs_without_edges():
    keep = torch.tensor([1.0, 0.5, 0.0])
    edge_batch = torch.tensor([0, 0, 2])  # graph 1 has no edges
    assert drop_regulariser(keep, edge_batch, 3).item() == pytest.approx((0.25 + 1.0) / 2)


def _blobs(n=90, classes=3, dim=6, seed=0):
    # Overlapping classes, so that C matters and accuracies are neither 0 nor 1.
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    return rng.normal(size=(n, dim)) + 1.2 * np.eye(classes, dim)[y], y


def _standardise(train, *parts):
    # StandardScaler by hand: mean and population std of the training rows.
    mean, std = train.mean(axis=0), train.std(axis=0)
    return [(part - mean) / std for part in (train, *parts)]


def _accuracy(svm, x, y):
    return float(np.mean(svm.classes_[svm.decision_function(x).argmax(axis=1)] == y))


def _splits(n, folds, seed):
    # The authors' splits: KFold test folds, then an unstratified 80/20 split of the rest.
    for train_val, test in KFold(folds, shuffle=True, random_state=seed).split(np.zeros(n)):
        train, val = train_test_split(train_val, test_size=0.2, random_state=seed)
        yield train, val, test


def test_svm_default_is_linear_svc_at_c1_without_search():
    x, y = _blobs()
    accs = svm_fold_accuracies(x, y, folds=5, seed=3)
    assert accs.shape == (5, 3)
    for (train, val, test), fold in zip(_splits(len(y), 5, 3), accs):
        assert len(test) == 18 and len(val) == 15 and len(set(train) | set(val) | set(test)) == len(y)
        xs = _standardise(x[train], x[val], x[test])
        svm = LinearSVC(C=1.0, dual=False).fit(xs[0], y[train])
        expected = [_accuracy(svm, part, y[idx]) for part, idx in zip(xs, (train, val, test))]
        assert fold == pytest.approx(expected, abs=1e-12)
    assert np.array_equal(svm_fold_accuracies(x, y, folds=5, seed=3), accs)  # seeded splits


def test_svm_search_picks_c_by_five_fold_cv_on_the_training_graphs():
    x, y = _blobs(seed=1)
    accs = svm_fold_accuracies(x, y, folds=3, seed=0, search=True)
    chosen = set()
    for (train, val, test), fold in zip(_splits(len(y), 3, 0), accs):
        xs = _standardise(x[train], x[val], x[test])
        # 5-fold CV accuracy of each C on the (already standardised) training graphs; the first best C wins.
        cv = [np.mean([_accuracy(LinearSVC(C=c, dual=False).fit(xs[0][fit], y[train][fit]), xs[0][score],
                                 y[train][score])
                       for fit, score in StratifiedKFold(5).split(xs[0], y[train])]) for c in C_GRID]
        c = C_GRID[int(np.argmax(cv))]
        chosen.add(c)
        svm = LinearSVC(C=c, dual=False).fit(xs[0], y[train])
        expected = [_accuracy(svm, part, y[idx]) for part, idx in zip(xs, (train, val, test))]
        assert fold == pytest.approx(expected, abs=1e-12)
    assert chosen != {1.0}  # the search made a difference somewhere, so the test tells the two settings apart


def test_config_flags_and_yaml(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("dataset: PROTEINS\nseeds: 3\nlr: 1\n")
    config = parse_config(["--config", str(path), "--pooling", "uot"])
    assert config.seeds == [3] and config.lr == 1.0 and isinstance(config.lr, float)
    assert config.out == "runs/adgcl-PROTEINS-uot"
    assert parse_config(["--seeds", "0", "2"]).seeds == [0, 2]
    assert parse_config([]).seeds == [0, 1, 2, 3, 4]
    path.write_text("epochs: 2.5\n")
    # experiments.config reports a wrong type in the file as a TypeError or a usage error naming the key.
    with pytest.raises((TypeError, SystemExit)) as error:
        parse_config(["--config", str(path)])
    assert "'epochs' expects int" in str(error.value) + capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(["--pooling", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_defaults_are_the_uot_papers_script():
    # ROT-Pooling's backbones/adgcl.py: emb_dim 32, 5 layers, batch 32, 20 epochs, Adam 1e-3 (model and view),
    # reg_lambda 5, dropout 0.5, edge MLP 64, and LinearSVC without a search over C; seeds 0-4.
    config = parse_config([])
    assert (config.emb_dim, config.num_layers, config.batch_size, config.epochs, config.lr, config.reg_lambda,
            config.drop, config.edge_mlp_dim, config.seeds, config.folds, config.svm_search) == (
        32, 5, 32, 20, 0.001, 5.0, 0.5, 64, [0, 1, 2, 3, 4], 10, False)


@pytest.mark.parametrize("name", ["MUTAG", "PTC_MR", "PROTEINS", "ENZYMES", "NCI1", "NCI109", "IMDB-BINARY",
                                  "IMDB-MULTI"])
def test_configs_hold_the_defaults(name):
    config = parse_config(["--config", str(REPO / "configs/adgcl" / f"{name.lower()}.yaml")])
    assert config.dataset == name
    assert {k: v for k, v in dataclasses.asdict(config).items() if k not in ("dataset", "root", "out")} == {
        k: v for k, v in dataclasses.asdict(AdgclConfig()).items() if k not in ("dataset", "root", "out")}


@pytest.mark.parametrize("field", dataclasses.fields(AdgclConfig), ids=lambda f: f.name)
def test_every_field_has_a_flag(field):
    kind = typing.get_type_hints(AdgclConfig)[field.name]
    value, text = {int: (12, ["12"]), float: (0.125, ["0.125"]), str: ("xyz", ["xyz"]),
                   list[int]: ([1, 2], ["1", "2"]), bool: (True, ["true"])}[kind]
    if field.name in CHOICES:  # a name from a list, not any string
        value = CHOICES[field.name][-1]
        text = [value]
    assert getattr(parse_config([f"--{field.name}", *text]), field.name) == value


# Two seeds of 2 epochs each with 3 SVM folds: small, yet a kill can land inside a seed or between seeds.
SMALL = ("--pooling", "uot", "--epochs", "2", "--seeds", "0", "1", "--folds", "3")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("reference")
    _run(*_args(out, cache, *SMALL))
    return out


def test_resume_after_sigkill_is_exact(reference, cache, tmp_path):
    out = tmp_path / "run"
    kill_after_checkpoint("experiments.adgcl", _args(out, cache, *SMALL), out / "seed0.pt", env=ENV)
    assert not (out / "results.json").exists()  # the kill hit before the end
    log_before = (out / "seed0.csv").read_text().splitlines()

    _run(*_args(out, cache, *SMALL))
    assert _results(out)["seeds"] == _results(reference)["seeds"]  # exactly, not approximately
    assert _results(out)["mean"] == _results(reference)["mean"]
    # The epochs before the kill were kept (with their timings), not trained again.
    assert (out / "seed0.csv").read_text().splitlines()[:len(log_before)] == log_before
    for seed in (0, 1):
        assert _rows(out / f"seed{seed}.csv") == _rows(reference / f"seed{seed}.csv")


def test_finished_seeds_are_not_recomputed(reference, cache):
    stamps = {path.name: path.stat().st_mtime_ns for path in reference.glob("seed*")}
    seeds = _results(reference)["seeds"]
    main(_args(reference, cache, *SMALL))
    assert {path.name: path.stat().st_mtime_ns for path in reference.glob("seed*")} == stamps
    assert _results(reference)["seeds"] == seeds


def test_resume_refuses_another_config(reference, cache):
    with pytest.raises(SystemExit, match="reg_lambda"):
        main(_args(reference, cache, *SMALL, "--reg_lambda", "1"))


def test_log_file_has_one_plain_line_per_epoch(cache, tmp_path):
    # stdout is a pipe here, as a log file is: no progress bar redrawn with carriage returns.
    done = subprocess.run([sys.executable, "-m", "experiments.adgcl", *_args(tmp_path, cache, *SMALL)], cwd=REPO,
                          env=ENV, check=True, capture_output=True, text=True)
    assert "\r" not in done.stdout + done.stderr
    epochs = [line for line in done.stdout.splitlines() if re.search(r" epoch \d+/\d+: ", line)]
    config = parse_config(_args(tmp_path, cache, *SMALL))
    assert len(epochs) == len(config.seeds) * config.epochs
    assert epochs[0].startswith("AD-GCL MUTAG ") and f"epoch 1/{config.epochs}: loss " in epochs[0]


def test_damaged_checkpoint_is_named_in_one_line(reference, cache, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "seed0.pt").write_bytes((reference / "seed0.pt").read_bytes()[:100])  # cut short
    done = subprocess.run([sys.executable, "-m", "experiments.adgcl", *_args(out, cache, *SMALL)], cwd=REPO,
                          env=ENV, capture_output=True, text=True)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [f"{out / 'seed0.pt'} is damaged (RuntimeError); move it aside to "
                                                "train seed 0 again"]


@pytest.mark.parametrize("fresh", [True, False], ids=["fresh cache", "filled cache"])
def test_missing_root_is_one_line_and_exit_2(cache, tmp_path, fresh):
    if not fresh:
        load_tu("MUTAG", REPO / "data", cache)
    args = ["--config", str(REPO / "configs/adgcl/mutag.yaml"), "--root", str(tmp_path / "nowhere"),
            "--cache", str(tmp_path / "cache" if fresh else cache), "--out", str(tmp_path / "out")]
    done = subprocess.run([sys.executable, "-m", "experiments.adgcl", *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert f"--root {tmp_path / 'nowhere'} does not exist" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv,message", [
    (["--epochs", "0"], "--epochs must be at least 1 (got 0)"),
    (["--pooling", "uot", "--uot_eps", "-1"], "--uot_eps must be positive for solver='sinkhorn' (got -1.0)")])
def test_bad_values_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as error:
        main(["--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"), *argv])
    assert error.value.code == 2 and capsys.readouterr().err.endswith(f"error: {message} (see --help)\n")
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
