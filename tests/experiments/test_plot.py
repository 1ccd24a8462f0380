import csv
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.data import load_tu
from experiments.plot import dim_ranges, distance_table, logged_values, main, node_names, pooling_distances
from uotp_geometric import UOTAggregation
from tests.uotp_geometric.helpers import ragged_batch

REPO = Path(__file__).resolve().parents[2]
MUTAG_ATOMS = {0: "C", 1: "N", 2: "O", 3: "F", 4: "I", 5: "Cl", 6: "Br"}  # data/MUTAG/raw/README.txt


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("run")
    subprocess.run([sys.executable, "-m", "experiments.train", "--config", str(REPO / "configs/tu/mutag.yaml"),
                    "--root", str(REPO / "data"), "--epochs", "2", "--folds", "3", "--pooling", "uot", "--out",
                    str(out), "--cache", str(cache)], cwd=REPO, check=True, capture_output=True)
    return out


def _rewrite_logs(run, keep):
    for path in run.glob("fold*.csv"):
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        fields = [field for field in rows[0] if keep(field)]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)


def test_plots_a_uot_run(run, cache, tmp_path, capsys):
    out = tmp_path / "pictures"
    main([str(run), "--out", str(out), "--cache", str(cache), "--graphs", "2"])
    printed = capsys.readouterr().out
    assert "no uot_* columns" not in printed and "no checkpoint" not in printed
    plans = sorted(out.glob("plan_*.png"))
    assert len(plans) == 2
    for name in ("parameters.png", "poolings.png", "poolings.md", "README.md"):
        assert (out / name).stat().st_size > 0
    table = (out / "poolings.md").read_text()
    for pooling in ("mean", "max", "sum", "attention", "softmax"):
        assert f"| {pooling} |" in table
    readme = (out / "README.md").read_text()
    assert f"python -m experiments.plot {run}" in readme and "![parameters.png](parameters.png)" in readme


def test_a_run_without_uot_columns_still_gets_its_plans(run, cache, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(run, old)
    _rewrite_logs(old, keep=lambda field: "uot_" not in field)
    out = tmp_path / "pictures"
    main([str(old), "--out", str(out), "--cache", str(cache), "--graphs", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{old}: the per-epoch logs have no uot_* columns (a run from before the harness logged " \
                       f"the UOT values, or not a UOT run), so no parameter trajectories"
    assert not (out / "parameters.png").exists()
    assert len(list(out.glob("plan_*.png"))) == 1 and (out / "poolings.png").exists()


def test_a_committed_run_without_checkpoint(tmp_path, capsys):
    committed = tmp_path / "mutag-uot"
    shutil.copytree(REPO / "docs/tu/runs/mutag-uot", committed, ignore=shutil.ignore_patterns("*.pt"))
    out = tmp_path / "pictures"
    main([str(committed), "--out", str(out)])
    printed = capsys.readouterr().out
    assert f"{committed}: no checkpoint (fold*.pt or seed*.pt; most committed runs carry none)" in printed
    # The per-epoch logs still give the trajectories; only the checkpoint's pictures are missing.
    assert [p.name for p in out.glob("*.png")] == ["parameters.png"]
    assert "no checkpoint" in (out / "README.md").read_text()


def test_mutag_nodes_are_named_by_atom_type(cache):
    dataset = load_tu("MUTAG", REPO / "data", cache)
    raw = REPO / "data/MUTAG/raw"
    labels = [int(v) for v in (raw / "MUTAG_node_labels.txt").read_text().split()]
    graph_of = [int(v) for v in (raw / "MUTAG_graph_indicator.txt").read_text().split()]
    for graph in (0, 5, 187):
        expected = [MUTAG_ATOMS[label] for label, g in zip(labels, graph_of) if g == graph + 1]
        assert node_names(dataset, dataset[graph]) == expected


# Mean: uniform attention weights and a softmax at t = eps = 1e6 are mean pooling too; max: so is a softmax at
# t = eps = 0.02.
@pytest.mark.parametrize("preset,kwargs,expected", [
    ("mean", {}, {"mean", "attention", "softmax"}), ("sum", {}, {"sum"}), ("max", {}, {"max", "softmax"}),
    ("softmax", dict(t=0.5), {"softmax"}), ("attention", dict(channels=6), {"attention"})])
def test_a_preset_layer_is_at_its_pooling(preset, kwargs, expected):
    x, index = ragged_batch([3, 8, 5, 12], 6, seed=7, dtype=torch.float32)
    torch.manual_seed(0)  # the attention gate's initial weights: some draws give nearly uniform weights (= mean)
    names, distances = pooling_distances(UOTAggregation.from_preset(preset, **kwargs), x, index, 4)
    assert names == ["mean", "max", "sum", "attention", "softmax"]
    near = np.array([name in expected for name in names])
    assert distances[near].max() < 3e-2
    assert distances[~near].min() > 0.1


def test_distances_are_rms_over_graphs_in_feature_stds():
    x, index = ragged_batch([4, 6], 3, seed=8, dtype=torch.float64)
    layer = UOTAggregation(eps=0.7, lam_p=math.inf, lam_q=1.0)
    names, distances = pooling_distances(layer, x, index, 2)
    out = layer(x, index, dim_size=2)
    means = torch.stack([x[index == b].mean(dim=0) for b in range(2)])
    expected = ((out - means) ** 2).mean(dim=0).sqrt() / x.std(dim=0)
    np.testing.assert_allclose(distances[names.index("mean")], expected.detach().numpy(), rtol=1e-10)


def test_dim_ranges():
    assert dim_ranges([3, 4, 5, 17, 9, 10]) == "3-5, 9-10, 17"
    assert dim_ranges([]) == ""


def test_a_damaged_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "fold0.pt").write_bytes(b"not a checkpoint")
    main([str(run), "--out", str(tmp_path / "pictures")])
    assert f"{run / 'fold0.pt'} cannot be read" in capsys.readouterr().out


def test_logged_values_from_csv_cells():
    log = {"epoch": ["1", "2", "3"], "train_loss": ["0.5", "0.4", "0.3"], "uot_eps": ["1.0", "0.9", "0.8"],
           "uot_lam_q_1": ["2.0", "2.5", "3.0"], "uot_lam_q_0": ["", "1.5", "1.25"], "uot_lam_p": ["inf"] * 3}
    values = logged_values(log)
    assert sorted(values) == ["eps", "lam_p", "lam_q"]
    np.testing.assert_array_equal(values["eps"], [1.0, 0.9, 0.8])
    np.testing.assert_array_equal(values["lam_p"], [math.inf] * 3)
    np.testing.assert_array_equal(values["lam_q"], [[math.nan, 2.0], [1.5, 2.5], [1.25, 3.0]])  # column k = 0, 1


def test_the_table_names_the_constant_dimensions():
    distances = np.array([[0.1, np.nan, 0.5, np.nan, 0.2],
                          [0.3, np.nan, 0.4, np.nan, 0.1]])
    lines = distance_table(["mean", "max"], distances)
    assert lines[0] == "3 of 5 dimensions compared; 2 constant over the nodes (1, 3) have no distance and are left out."
    assert lines[4] == "| mean | 0.267 | 0.2 | 1 of 3 | 0 |"
    assert lines[5] == "| max | 0.267 | 0.3 | 2 of 3 | 2, 4 |"
    assert distance_table(["mean"], np.ones((1, 2)))[0] == "2 of 2 dimensions compared; none is constant over the nodes."


def test_a_missing_root_is_one_line(run, cache, tmp_path, capsys):
    main([str(run), "--out", str(tmp_path / "pictures"), "--cache", str(cache), "--root", "/nonexistent/root"])
    printed = capsys.readouterr().out
    assert "--root /nonexistent/root does not exist" in printed and "so no plan pictures" in printed
    assert (tmp_path / "pictures/parameters.png").exists()


def test_an_adgcl_run_gets_its_parameters_and_one_line_about_plans(cache, tmp_path):
    run = tmp_path / "adgcl"
    subprocess.run([sys.executable, "-m", "experiments.adgcl", "--root", str(REPO / "data"), "--cache", str(cache),
                    "--pooling", "uot", "--epochs", "2", "--seeds", "0", "--folds", "2", "--out", str(run)], cwd=REPO,
                   check=True, capture_output=True)
    out = tmp_path / "pictures"
    done = subprocess.run([sys.executable, "-m", "experiments.plot", str(run), "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout.splitlines() == [
        f"{run / 'seed0.pt'} is an AD-GCL checkpoint (an encoder trained without labels, no test split), so no plan "
        f"pictures and no pooling comparison: they need a run of experiments.train", f"1 files -> {out}"]
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "parameters.png"]
