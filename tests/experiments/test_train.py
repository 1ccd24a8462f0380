import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.train import main
from tests.experiments.helpers import kill_after_checkpoint

REPO = Path(__file__).resolve().parents[2]
EPOCHS = 6  # with lr_step 2: three learning rates


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _args(out, cache, *extra):
    return ["--config", str(REPO / "configs/tu/mutag.yaml"), "--root", str(REPO / "data"), "--cache", str(cache),
            "--out", str(out), "--folds", "3", "--epochs", str(EPOCHS), "--batch_size", "32", "--lr_step", "2",
            "--pooling", "uot", *extra]


def _train(*args):
    # A fresh process, as a user runs it: no state left over from other tests.
    subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=REPO, check=True, capture_output=True)


def _results(out):
    return json.loads((out / "results.json").read_text())


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("reference")
    _train(*_args(out, cache))
    return out


def test_results_and_logs(reference):
    results = _results(reference)
    assert (results["dataset"], results["pooling"], results["metric"]) == ("MUTAG", "uot", "accuracy")
    assert results["config"]["folds"] == 3 and results["config"]["epochs"] == EPOCHS
    assert [fold["fold"] for fold in results["folds"]] == [0, 1, 2]
    accs = [fold["test_acc"] for fold in results["folds"]]
    assert all(0 <= acc <= 1 for acc in accs)
    assert results["mean"] == pytest.approx(sum(accs) / 3, abs=1e-12)
    assert results["std"] == pytest.approx(statistics.stdev(accs), abs=1e-12)
    assert results["seconds_per_epoch"] > 0
    for fold in results["folds"]:
        rows = _rows(reference / f"fold{fold['fold']}.csv")
        assert [int(row["epoch"]) for row in rows] == list(range(1, EPOCHS + 1))
        assert [float(row["lr"]) for row in rows] == [0.01] * 2 + [0.005] * 2 + [0.0025] * 2  # StepLR
        val_losses = [float(row["val_loss"]) for row in rows]
        best = int(np.argmin(val_losses))  # the first epoch of lowest validation loss
        assert fold["best_epoch"] == best + 1
        assert fold["val_loss"] == val_losses[best]
        assert fold["test_acc"] == float(rows[best]["test_acc"])
        assert (reference / f"fold{fold['fold']}.pt").is_file()


def test_resume_after_sigkill_is_exact(reference, cache, tmp_path):
    out = tmp_path / "run"
    kill_after_checkpoint("experiments.train", _args(out, cache), out / "fold0.pt")
    killed_at = torch.load(out / "fold0.pt")["epoch"]
    assert killed_at < EPOCHS and not (out / "results.json").exists()  # the kill hit fold 0
    log_before = (out / "fold0.csv").read_text().splitlines()[:1 + killed_at]

    _train(*_args(out, cache))
    assert _results(out)["folds"] == _results(reference)["folds"]  # exactly, not approximately
    assert _results(out)["mean"] == _results(reference)["mean"]
    # The epochs before the kill were kept (with their timings), not trained again.
    assert (out / "fold0.csv").read_text().splitlines()[:1 + killed_at] == log_before
    for fold in range(3):
        drop_seconds = [{k: v for k, v in row.items() if k != "seconds"} for row in _rows(out / f"fold{fold}.csv")]
        expected = [{k: v for k, v in row.items() if k != "seconds"} for row in _rows(reference / f"fold{fold}.csv")]
        assert drop_seconds == expected


def test_finished_folds_are_not_recomputed(reference, cache):
    stamps = {path.name: path.stat().st_mtime_ns for path in reference.glob("fold*")}
    folds = _results(reference)["folds"]
    main(_args(reference, cache))
    assert {path.name: path.stat().st_mtime_ns for path in reference.glob("fold*")} == stamps
    assert _results(reference)["folds"] == folds


def test_resume_refuses_another_config(reference, cache):
    with pytest.raises(SystemExit, match="lr"):
        main(_args(reference, cache, "--lr", "0.02"))


def test_two_processes_match_one(cache, tmp_path):
    """DDP with 2 processes trains like 1 process on the same global batches.

    Only without dropout (each process draws its own masks) and BatchNorm (per-process statistics: CPU has
    no SyncBatchNorm) is the computation the same; the rest differs by float summation order (losses agree to
    1e-4 relative, accuracies exactly).
    """
    args = ("--pooling", "add", "--epochs", "3", "--dropout", "0", "--batch_norm", "false")
    _train(*_args(tmp_path / "one", cache, *args))
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    "-m", "experiments.train", *_args(tmp_path / "two", cache, *args)],
                   cwd=REPO, check=True, capture_output=True)
    one, two = _results(tmp_path / "one"), _results(tmp_path / "two")
    assert [fold["best_epoch"] for fold in one["folds"]] == [fold["best_epoch"] for fold in two["folds"]]
    assert one["mean"] == two["mean"]
    for fold in range(3):
        for row_one, row_two in zip(_rows(tmp_path / "one" / f"fold{fold}.csv"),
                                    _rows(tmp_path / "two" / f"fold{fold}.csv"), strict=True):
            for key in ("train_loss", "val_loss"):
                assert float(row_two[key]) == pytest.approx(float(row_one[key]), rel=1e-4)
            for key in ("epoch", "val_acc", "test_acc", "lr"):
                assert row_two[key] == row_one[key]
