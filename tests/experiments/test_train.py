import csv
import json
import math
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.data import load_tu
from experiments.models import POOLINGS
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
    # A fresh process, as a user runs it: no state left over from other tests. Its stdout is a pipe, as a log
    # file is: no progress bar.
    return subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=REPO, check=True,
                          capture_output=True, text=True)


def _git(*args):
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


def _results(out):
    return json.loads((out / "results.json").read_text())


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("reference")
    (out / "stdout.txt").write_text(_train(*_args(out, cache)).stdout)
    return out


def test_results_and_logs(reference):
    results = _results(reference)
    assert (results["dataset"], results["pooling"], results["metric"]) == ("MUTAG", "uot", "accuracy")
    assert results["config"]["folds"] == 3 and results["config"]["epochs"] == EPOCHS
    assert results["commit"] == _git("rev-parse", "HEAD")
    assert results["dirty"] == bool(_git("status", "--porcelain"))
    assert [fold["fold"] for fold in results["folds"]] == [0, 1, 2]
    accs = [fold["test_acc"] for fold in results["folds"]]
    assert all(0 <= acc <= 1 for acc in accs)
    assert results["mean"] == pytest.approx(sum(accs) / 3, abs=1e-12)
    assert results["std"] == pytest.approx(statistics.stdev(accs), abs=1e-12)
    seconds = [float(row["seconds"]) for fold in range(3) for row in _rows(reference / f"fold{fold}.csv")]
    assert results["seconds_per_epoch"] == statistics.median(seconds)
    assert results["seconds_per_epoch_p90"] == pytest.approx(float(np.quantile(seconds, 0.9)), rel=1e-12)
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
    assert not any(key.startswith("uot") for key in _rows(tmp_path / "one" / "fold0.csv")[0])  # no UOT layer
    assert [fold["best_epoch"] for fold in one["folds"]] == [fold["best_epoch"] for fold in two["folds"]]
    assert one["mean"] == two["mean"]
    for fold in range(3):
        for row_one, row_two in zip(_rows(tmp_path / "one" / f"fold{fold}.csv"),
                                    _rows(tmp_path / "two" / f"fold{fold}.csv"), strict=True):
            for key in ("train_loss", "val_loss"):
                assert float(row_two[key]) == pytest.approx(float(row_one[key]), rel=1e-4)
            for key in ("epoch", "val_acc", "test_acc", "lr"):
                assert row_two[key] == row_one[key]


def test_a_log_file_gets_one_plain_line_per_epoch(reference):
    text = (reference / "stdout.txt").read_text()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 3 * EPOCHS + 1  # and the summary
    for fold in range(3):
        rows = _rows(reference / f"fold{fold}.csv")
        for row, line in zip(rows, lines[fold * EPOCHS:(fold + 1) * EPOCHS], strict=True):
            numbers = {key: float(row[key]) for key in ("train_loss", "val_loss", "val_acc", "test_acc", "seconds")}
            assert line == (f"MUTAG uot fold {fold} epoch {row['epoch']}/{EPOCHS}: "
                            f"train_loss {numbers['train_loss']:.4f} val_loss {numbers['val_loss']:.4f} "
                            f"val_acc {numbers['val_acc']:.4f} test_acc {numbers['test_acc']:.4f}, "
                            f"{numbers['seconds']:.2f} s")
    assert lines[-1].startswith("MUTAG uot: test accuracy ")


def test_the_log_has_the_learned_uot_values(reference):
    for fold in range(3):
        rows = _rows(reference / f"fold{fold}.csv")
        state = torch.load(reference / f"fold{fold}.pt")["model"]
        raw = {name: state[f"readout.{name}_raw"].item() for name in ("eps", "lam_q")}
        # After the last epoch the log holds the checkpoint's values: softplus of the raw parameters.
        assert float(rows[-1]["uot_eps"]) == pytest.approx(math.log1p(math.exp(raw["eps"])), rel=1e-6)
        assert float(rows[-1]["uot_lam_q"]) == pytest.approx(math.log1p(math.exp(raw["lam_q"])), rel=1e-6)
        assert {row["uot_lam_p"] for row in rows} == {"inf"}  # a hard marginal stays fixed
        assert len({row["uot_eps"] for row in rows}) > 1  # learned: it moved during training


def test_two_runs_on_one_folder(reference, cache, tmp_path):
    """The second run stops at once with the lock's message; the first ends as a solo run."""
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "experiments.train", *_args(out, cache)], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / ".lock").is_file() or not (out / ".lock").read_text().strip():
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    first.send_signal(signal.SIGSTOP)  # so that it still holds the lock however slow the second one starts
    try:
        second = subprocess.run([sys.executable, "-m", "experiments.train", *_args(out, cache)], cwd=REPO,
                                capture_output=True, text=True)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 1 and second.stdout == ""
    assert second.stderr == (f"{out} is in use by another run (PID {first.pid}, lock {out / '.lock'}); wait for it "
                             f"to end or choose another --out\n")
    assert first.wait() == 0 and "Traceback" not in first.stderr.read()
    assert _results(out)["folds"] == _results(reference)["folds"]
    for fold in range(3):
        assert [{k: v for k, v in row.items() if k != "seconds"} for row in _rows(out / f"fold{fold}.csv")] == \
            [{k: v for k, v in row.items() if k != "seconds"} for row in _rows(reference / f"fold{fold}.csv")]
    assert sorted(path.name for path in out.iterdir()) == sorted(path.name for path in reference.iterdir()
                                                                 if path.name != "stdout.txt")


@pytest.fixture
def finished_copy(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    return out


@pytest.mark.parametrize("damage", ["truncated", "empty", "random"])
def test_a_damaged_checkpoint_is_named(finished_copy, cache, damage):
    path = finished_copy / "fold1.pt"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[:len(data) // 2], "empty": b"",
                      "random": np.random.default_rng(0).bytes(len(data))}[damage])
    with pytest.raises(SystemExit) as error:
        main(_args(finished_copy, cache))
    assert re.fullmatch(rf"{re.escape(str(path))} is damaged \(\w+\); train fold 1 again with --restart 1, or move "
                        rf"the file aside", str(error.value))


def test_restart_trains_a_damaged_fold_again(reference, finished_copy, cache):
    """As a user runs it: one line naming the file, then --restart retrains that fold alone, to the same numbers."""
    (finished_copy / "results.json").unlink()
    path = finished_copy / "fold1.pt"
    path.write_bytes(path.read_bytes()[:1000])
    failed = subprocess.run([sys.executable, "-m", "experiments.train", *_args(finished_copy, cache)], cwd=REPO,
                            capture_output=True, text=True)
    assert failed.returncode == 1 and failed.stderr.count("\n") == 1 and str(path) in failed.stderr
    assert "--restart 1" in failed.stderr and "Traceback" not in failed.stderr and "pickle" not in failed.stderr
    stamps = {name: (finished_copy / name).stat().st_mtime_ns for name in ("fold0.pt", "fold2.pt")}
    _train(*_args(finished_copy, cache), "--restart", "1")
    assert _results(finished_copy)["folds"] == _results(reference)["folds"]
    assert {name: (finished_copy / name).stat().st_mtime_ns for name in stamps} == stamps  # not recomputed


def test_a_cut_log_of_a_finished_fold_is_written_again(reference, finished_copy, cache, capsys):
    path = finished_copy / "fold0.csv"
    path.write_bytes(path.read_bytes()[:-50])
    main(_args(finished_copy, cache))
    assert path.read_bytes() == (reference / "fold0.csv").read_bytes()
    assert f"{path} did not match the log in {finished_copy / 'fold0.pt'}; written again from it" in \
        capsys.readouterr().out


def test_threads_may_change_on_resume(reference, cache):
    threads = torch.get_num_threads()
    try:
        main(_args(reference, cache, "--threads", "2"))  # a finished run: nothing to retrain, nothing refused
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("mistake", [["--pooling", "uott"], ["--epoch", "2"], ["--folds", "2"],
                                     ["--dataset", "ogbg-molnothing"], ["--root", "/nonexistent/root"],
                                     ["--restart", "3"], ["--epochs", "0"], ["--uot_eps", "-1"]])
def test_command_line_mistakes_exit_2_and_write_nothing(tmp_path, mistake, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache"
    with pytest.raises(SystemExit) as error:
        main(_args(out, cache, *mistake))
    err = capsys.readouterr().err
    assert error.value.code == 2 and err.count("\n") == 1 and not out.exists()
    assert not cache.exists() or mistake[0] == "--restart"  # which is checked against the data's folds
    if mistake[0] == "--pooling":
        assert all(f"'{name}'" in err for name in POOLINGS)
    if mistake[0] == "--root":
        assert "--root /nonexistent/root does not exist" in err
    if mistake[0] == "--restart":
        assert "--restart 3: no such fold (this run has 0, 1, 2)" in err
    if mistake[0] == "--epochs":
        assert "--epochs must be at least 1 (got 0)" in err
    if mistake[0] == "--uot_eps":
        assert "--uot_eps must be positive for solver='sinkhorn' (got -1.0)" in err


def test_a_missing_root_is_an_error_with_a_filled_cache_too(cache, tmp_path, capsys):
    out = tmp_path / "out"
    load_tu("MUTAG", REPO / "data", cache)  # the cache holds MUTAG
    with pytest.raises(SystemExit) as error:
        main(_args(out, cache, "--root", "/nonexistent/root"))
    err = capsys.readouterr().err
    assert error.value.code == 2 and err.count("\n") == 1 and not out.exists()
    assert "--root /nonexistent/root does not exist; point --root at a folder that holds MUTAG/raw/MUTAG_A.txt" in err


def test_unknown_pooling_as_a_user_sees_it(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "experiments.train", *_args(tmp_path / "out", tmp_path / "cache"),
                           "--pooling", "uott"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.count("\n") == 1
    assert "invalid choice: 'uott'" in proc.stderr and not (tmp_path / "out").exists()
