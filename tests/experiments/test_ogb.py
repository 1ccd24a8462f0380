"""OGB molecular property prediction on the shared harness: data, model, loss, metric direction, runs, resume."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("ogb")

from experiments.config import parse_config  # noqa: E402
from experiments.data import DatasetNotFound, load_ogb  # noqa: E402
from experiments.models import BACKBONES, POOLINGS, OGBGNN, UOTOptions  # noqa: E402
from experiments.protocol import ShardedBatchSampler, better, higher_is_better, masked_loss  # noqa: E402
from experiments.table import main as table  # noqa: E402
from experiments.train import main  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
needs_data = pytest.mark.skipif(not (SHARED / "ogb" / "ogbg_molbace").is_dir(),
                                reason="needs the offline OGB files in ../shared/data")
# A small model: these tests check the harness, not the recipe's accuracy.
TINY = ("--hidden", "16", "--num_layers", "2", "--pooling", "mean")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ogb-cache")


def _args(config, out, cache, *extra):
    return ["--config", str(REPO / "configs" / "ogb" / f"{config}.yaml"), "--root", str(SHARED / "ogb"),
            "--cache", str(cache), "--out", str(out), *extra]


def _results(out):
    return json.loads((out / "results.json").read_text())


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _without_seconds(path):
    return [{key: value for key, value in row.items() if key != "seconds"} for row in _rows(path)]


def test_shipped_configs_parse_and_name_their_root():
    configs = sorted((REPO / "configs" / "ogb").glob("*.yaml"))
    assert {path.stem for path in configs} == {"molhiv", "molbace", "molbbbp", "moltox21", "molesol",
                                               "molfreesolv", "mollipo", "molsider"}
    for path in configs:
        config = parse_config(["--config", str(path)])
        assert config.dataset == f"ogbg-{path.stem}" and config.is_ogb
        assert (config.backbone, config.hidden, config.num_layers, config.dropout) == ("gin-virtual", 300, 5, 0.5)
        assert (config.batch_size, config.lr, config.lr_gamma, config.epochs) == (32, 0.001, 1.0, 100)
        if SHARED.is_dir():  # the default root is the one that holds the dataset
            assert (REPO / config.root / f"ogbg_{path.stem}" / "RELEASE_v1.txt").is_file(), path.name


@needs_data
def test_load_ogb_leaves_the_root_untouched(tmp_path):
    root = SHARED / "ogb"
    before = sorted((str(path), path.stat().st_mtime_ns) for path in root.rglob("*"))
    dataset = load_ogb("ogbg-molfreesolv", root, tmp_path)
    assert sorted((str(path), path.stat().st_mtime_ns) for path in root.rglob("*")) == before
    assert (tmp_path / "ogbg_molfreesolv" / "processed" / "geometric_data_processed.pt").is_file()
    assert len(dataset) == 642 and dataset.eval_metric == "rmse"
    assert [len(idx) for idx in dataset.get_idx_split().values()] == [513, 64, 65]
    assert len(load_ogb("ogbg-molfreesolv", root, tmp_path)) == 642  # from the cache
    with pytest.raises(DatasetNotFound, match=f"--root {tmp_path / 'elsewhere'} does not exist"):
        load_ogb("ogbg-molfreesolv", tmp_path / "elsewhere", tmp_path)  # a mistyped root, even with the cache filled


def test_masked_loss_ignores_missing_labels():
    out = torch.randn(4, 3, requires_grad=True)
    y = torch.tensor([[1.0, float("nan"), 0.0], [float("nan")] * 3, [0.0, 1.0, 1.0], [1.0, 0.0, float("nan")]])
    loss, count = masked_loss(out, y, "binary classification")
    labelled = ~y.isnan()
    assert count == 7
    expected = F.binary_cross_entropy_with_logits(out[labelled], y[labelled], reduction="sum")
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert torch.isfinite(out.grad).all()
    assert (out.grad[~labelled] == 0).all() and (out.grad[labelled] != 0).all()

    out = torch.randn(3, 1)
    loss, count = masked_loss(out, torch.tensor([[2.0], [float("nan")], [-1.0]]), "regression")
    torch.testing.assert_close(loss, (out[0, 0] - 2) ** 2 + (out[2, 0] + 1) ** 2)
    assert count == 2
    # Integer labels (datasets without missing ones) train the same in float32.
    loss, count = masked_loss(out, torch.tensor([[1], [0], [1]]), "binary classification")
    assert loss.dtype == torch.float32 and count == 3


def test_metric_direction():
    assert higher_is_better("rocauc") and higher_is_better("ap")
    assert not higher_is_better("rmse")
    with pytest.raises(ValueError, match="direction"):
        higher_is_better("f1")
    assert better(0.8, 0.7, maximize=True) and not better(0.8, 0.7, maximize=False)
    assert better(1.1, 1.3, maximize=False) and not better(1.3, 1.1, maximize=False)
    assert not better(0.7, 0.7, maximize=True) and not better(0.7, 0.7, maximize=False)  # ties keep the first


def test_sampler_keeps_two_graphs_per_process():
    def sizes(num_samples, world_size):
        samplers = [ShardedBatchSampler(num_samples, 32, (0,), rank, world_size, min_per_process=2)
                    for rank in range(world_size)]
        batches = [list(sampler) for sampler in samplers]
        assert all(len(b) == len(sampler) for b, sampler in zip(batches, samplers))
        return [[len(batch) for batch in b] for b in batches]

    assert sizes(65, 1) == [[32, 32]]  # OGB's example skips a one-graph batch
    assert sizes(66, 1) == [[32, 32, 2]]
    assert sizes(67, 2) == [[16, 16], [16, 16]]  # 3 graphs cannot give both processes two
    assert sizes(68, 2) == [[16, 16, 2], [16, 16, 2]]


def _molecules(num_graphs=4):
    """A batch of random molecules with features in the ranges of OGB's atom and bond vocabularies."""
    from ogb.utils.features import get_atom_feature_dims, get_bond_feature_dims

    generator = torch.Generator().manual_seed(0)
    sizes = torch.tensor([5, 1, 9, 3])[:num_graphs]
    batch = torch.repeat_interleave(torch.arange(num_graphs), sizes)
    start = torch.cumsum(sizes, 0) - sizes
    edges = [(s + i, s + i + 1) for s, n in zip(start.tolist(), sizes.tolist()) for i in range(n - 1)]  # chains
    edge_index = torch.tensor(edges).t()
    edge_index = torch.cat([edge_index, edge_index.flip(0)], dim=1)
    x = torch.stack([torch.randint(dim, (int(sizes.sum()),), generator=generator)
                     for dim in get_atom_feature_dims()], dim=1)
    edge_attr = torch.stack([torch.randint(dim, (edge_index.size(1),), generator=generator)
                             for dim in get_bond_feature_dims()], dim=1)
    return x, edge_index, edge_attr, batch


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("pooling", POOLINGS)
def test_ogb_model_trains_with_every_readout(backbone, pooling):
    torch.manual_seed(0)
    x, edge_index, edge_attr, batch = _molecules()
    model = OGBGNN(3, pooling, backbone == "gin-virtual", emb_dim=16, num_layers=3, uot=UOTOptions(num_iters=2))
    out = model(x, edge_index, edge_attr, batch, 4)
    assert out.shape == (4, 3)
    out.square().sum().backward()
    # DDP requires every parameter to take part in the loss.
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


def test_virtual_node_changes_the_embeddings():
    x, edge_index, edge_attr, batch = _molecules()
    torch.manual_seed(0)
    plain = OGBGNN(1, "mean", False, emb_dim=16, num_layers=3).eval()
    torch.manual_seed(0)
    virtual = OGBGNN(1, "mean", True, emb_dim=16, num_layers=3).eval()
    # The shared layers start equal, and the virtual node starts at zero: only its MLPs make a difference.
    virtual.load_state_dict(plain.state_dict(), strict=False)
    assert not torch.allclose(plain(x, edge_index, edge_attr, batch, 4), virtual(x, edge_index, edge_attr, batch, 4))
    with torch.no_grad():
        for mlp in virtual.virtual_mlps:
            mlp[-3].weight.zero_()  # its last Linear: then the virtual node stays at zero
            mlp[-3].bias.zero_()
    torch.testing.assert_close(plain(x, edge_index, edge_attr, batch, 4), virtual(x, edge_index, edge_attr, batch, 4))


def test_config_mismatches_are_refused(tmp_path, cache):
    with pytest.raises(SystemExit, match="backbone"):
        main(["--config", str(REPO / "configs/tu/mutag.yaml"), "--backbone", "gin-virtual", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="folds"):
        main(_args("molbace", tmp_path, cache, "--folds", "3"))
    with pytest.raises(SystemExit, match="unknown backbone"):
        main(_args("molbace", tmp_path, cache, "--backbone", "gcn"))


@needs_data
def test_acceptance_command(tmp_path, cache):
    """The issue's check, as a user runs it (one seed of the config's three, to stay fast)."""
    out = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "experiments.train", "--config", "configs/ogb/molbace.yaml",
                    "--root", "../shared/data/ogb", "--epochs", "1", "--seed", "0", "--pooling", "uot",
                    "--out", str(out), "--cache", str(cache), "--num_seeds", "1"], cwd=REPO, check=True,
                   capture_output=True)
    results = _results(out)
    assert results["metric"] == "rocauc"
    assert isinstance(results["test"], float) and 0 <= results["test"] <= 1
    assert results["seeds"] == [dict(seed=0, valid=results["valid"], test=results["test"], best_epoch=1)]
    assert results["test_std"] is None  # one seed
    assert (results["dataset"], results["pooling"]) == ("ogbg-molbace", "uot")
    assert results["config"]["backbone"] == "gin-virtual" and results["config"]["hidden"] == 300
    assert [row["epoch"] for row in _rows(out / "seed0.csv")] == ["1"]


@needs_data
@pytest.mark.parametrize("config, metric, pick", [("molesol", "rmse", np.argmin), ("molbace", "rocauc", np.argmax)])
def test_test_score_at_best_validation_epoch(tmp_path, cache, config, metric, pick):
    out = tmp_path / config
    main(_args(config, out, cache, *TINY, "--epochs", "4", "--num_seeds", "2", "--backbone", "gin"))
    results = _results(out)
    assert results["metric"] == metric
    assert [seed["seed"] for seed in results["seeds"]] == [0, 1]
    for seed in results["seeds"]:
        rows = _rows(out / f"seed{seed['seed']}.csv")
        best = int(pick([float(row["valid"]) for row in rows]))  # the first best, as OGB's example picks it
        assert seed["best_epoch"] == best + 1
        assert (seed["valid"], seed["test"]) == (float(rows[best]["valid"]), float(rows[best]["test"]))
    assert results["test"] == pytest.approx(np.mean([seed["test"] for seed in results["seeds"]]), abs=1e-12)
    assert results["test_std"] == pytest.approx(np.std([seed["test"] for seed in results["seeds"]], ddof=1),
                                                abs=1e-12)
    table([str(out), "--out", str(tmp_path / "table")])
    digits = 1 if metric == "rocauc" else 3
    scale = 100 if metric == "rocauc" else 1
    cell = f"{scale * results['test']:.{digits}f} ± {scale * results['test_std']:.{digits}f}"
    table_md = (tmp_path / "table" / "table.md").read_text().splitlines()
    assert f"| ogbg-{config} gin | {metric} | 2 seeds | {cell} |" in table_md


@needs_data
def test_resume_and_more_seeds(tmp_path, cache, monkeypatch):
    args = (*TINY, "--epochs", "2")
    main(_args("molbace", tmp_path / "reference", cache, *args, "--num_seeds", "2"))
    reference = _results(tmp_path / "reference")

    # A crash right after the first checkpoint (seed 0, epoch 1), then the same command again.
    replace = os.replace

    def crash_after_checkpoint(src, dst):
        replace(src, dst)
        if Path(dst).suffix == ".pt":
            raise KeyboardInterrupt

    out = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", crash_after_checkpoint)
        with pytest.raises(KeyboardInterrupt):
            main(_args("molbace", out, cache, *args, "--num_seeds", "2"))
    assert torch.load(out / "seed0.pt")["epoch"] == 1 and not (out / "results.json").exists()
    main(_args("molbace", out, cache, *args, "--num_seeds", "2"))
    assert _results(out)["seeds"] == reference["seeds"]  # exactly
    for seed in (0, 1):
        assert _without_seconds(out / f"seed{seed}.csv") == _without_seconds(tmp_path / "reference" / f"seed{seed}.csv")

    # A finished seed is read back, never recomputed; more seeds extend a finished run.
    stamps = {path.name: path.stat().st_mtime_ns for path in out.glob("seed*")}
    main(_args("molbace", out, cache, *args, "--num_seeds", "3"))
    assert {name: (out / name).stat().st_mtime_ns for name in stamps} == stamps
    extended = _results(out)
    assert extended["seeds"][:2] == reference["seeds"] and extended["seeds"][2]["seed"] == 2
    with pytest.raises(SystemExit, match="lr"):
        main(_args("molbace", out, cache, *args, "--lr", "0.01"))


@needs_data
def test_two_processes_match_one(tmp_path, cache):
    """DDP with 2 processes trains like 1 process on the same global batches; without dropout and BatchNorm
    (see experiments/train.py) up to float summation order."""
    args = (*TINY, "--epochs", "2", "--num_seeds", "1", "--dropout", "0", "--batch_norm", "false")
    for name, launcher in (("one", []), ("two", ["-m", "torch.distributed.run", "--standalone",
                                                 "--nproc_per_node=2"])):
        subprocess.run([sys.executable, *launcher, "-m", "experiments.train",
                        *_args("molbace", tmp_path / name, cache, *args)], cwd=REPO, check=True, capture_output=True)
    one, two = _results(tmp_path / "one"), _results(tmp_path / "two")
    assert one["seeds"][0]["best_epoch"] == two["seeds"][0]["best_epoch"]
    for row_one, row_two in zip(_rows(tmp_path / "one" / "seed0.csv"), _rows(tmp_path / "two" / "seed0.csv"),
                                strict=True):
        for key in ("train_loss", "valid", "test"):
            assert float(row_two[key]) == pytest.approx(float(row_one[key]), rel=1e-4)
