import json
import math
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from experiments.records import (atomic_path, csv_text, epoch_seconds, git_commit, run_lock, uot_columns, uot_values, write_csv,
                                 write_json)
from uotp_geometric import UOTAggregation


def test_atomic_path_keeps_the_old_file_when_a_write_fails(tmp_path):
    path = tmp_path / "results.json"
    write_json(path, {"mean": 0.5})
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text('{"mea')  # killed halfway
            raise RuntimeError
    assert json.loads(path.read_text()) == {"mean": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # the half-written file is gone


def test_atomic_paths_are_unique(tmp_path):
    path = tmp_path / "fold0.pt"
    with atomic_path(path) as first, atomic_path(path) as second:
        assert first != second and first.parent == second.parent == tmp_path
        first.write_text("first")
        second.write_text("second")
    assert path.read_text() == "first"  # the last to finish wins, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fold0.pt"]


def test_write_csv_replaces_the_log(tmp_path):
    path = tmp_path / "seed0.csv"
    write_csv(path, ["epoch", "loss"], [dict(epoch=1, loss=0.5)])
    write_csv(path, ["epoch", "loss"], [dict(epoch=1, loss=0.5), dict(epoch=2, loss=0.25)])
    assert path.read_text().splitlines() == ["epoch,loss", "1,0.5", "2,0.25"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seed0.csv"]


def test_csv_text_appends_columns_that_appear_later():
    rows = [dict(epoch=1, loss=0.5), dict(epoch=2, loss=0.25, uot_eps=0.75)]
    assert csv_text(["epoch", "loss"], rows).splitlines() == ["epoch,loss,uot_eps", "1,0.5,", "2,0.25,0.75"]


def test_epoch_seconds_median_and_90th_percentile():
    seconds = [10.0, 1.0, 2.0, 9.0, 3.0, 8.0, 4.0, 7.0, 5.0, 6.0]
    # Sorted 1..10: the median halfway between 5 and 6; the 90th percentile at rank 0.9 * 9 = 8.1, linearly
    # between the 9th and 10th smallest.
    assert epoch_seconds(seconds) == dict(seconds_per_epoch=5.5, seconds_per_epoch_p90=pytest.approx(9.1))


def test_run_lock_refuses_a_second_holder_and_frees_on_exit(tmp_path):
    folder = tmp_path / "run"
    with run_lock(folder):
        assert (folder / ".lock").read_text().strip() == str(os.getpid())
        with pytest.raises(SystemExit, match=rf"{folder} is in use by another run \(PID {os.getpid()}, lock "):
            with run_lock(folder):
                pass
    with run_lock(folder):  # released
        pass


def test_run_lock_is_released_when_its_process_is_killed(tmp_path):
    folder = tmp_path / "run"
    code = ("import sys, time; from pathlib import Path; from experiments.records import run_lock\n"
            f"with run_lock(Path({str(folder)!r})):\n    print('locked', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "locked\n"
    with pytest.raises(SystemExit, match=f"PID {proc.pid}"):
        with run_lock(folder):
            pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with run_lock(folder):
        pass


def _softplus(x):
    return math.log1p(math.exp(x))


def test_uot_values_reads_every_learned_and_fixed_value():
    layer = UOTAggregation(solver="badmm", eps=0.5, lam_p=float("inf"), lam_q=2.0, rho=3.0)
    with torch.no_grad():
        layer.lam_q_raw.fill_(0.25)  # as after some training
    values = uot_values(torch.nn.Sequential(torch.nn.Linear(2, 2), layer))
    assert values == dict(uot_eps=pytest.approx(0.5), uot_lam_p=math.inf, uot_lam_q=pytest.approx(_softplus(0.25)),
                          uot_rho=pytest.approx(3.0))
    assert uot_values(torch.nn.Linear(2, 2)) == {}


def test_uot_values_per_iteration_and_several_layers():
    model = torch.nn.Module()
    model.first = UOTAggregation(num_iters=3, eps=0.5, per_iteration=True)
    model.second = torch.nn.Sequential(UOTAggregation(lam_p=1.0, learn=False))
    with torch.no_grad():
        model.first.eps_raw.copy_(torch.tensor([0.1, -2.0, 3.0]))
    values = uot_values(model)
    expected = {"first.uot_eps_0": _softplus(0.1), "first.uot_eps_1": _softplus(-2.0),
                "first.uot_eps_2": _softplus(3.0), "first.uot_lam_p_0": math.inf, "first.uot_lam_p_1": math.inf,
                "first.uot_lam_p_2": math.inf, "second.0.uot_eps": 1.0, "second.0.uot_lam_p": 1.0,
                "second.0.uot_lam_q": 1.0}
    assert set(values) >= set(expected)  # and the lam_q values
    for key, value in expected.items():
        assert values[key] == pytest.approx(value, rel=1e-6), key


def test_uot_columns_read_back_uot_values():
    model = torch.nn.Module()
    model.first = UOTAggregation(num_iters=2, per_iteration=True, prior="power")
    model.second = UOTAggregation(solver="badmm", gw=0.5)
    columns = ["epoch", *uot_values(model), "lam_q"]
    assert uot_columns(columns) == {
        "first.eps": {0: "first.uot_eps_0", 1: "first.uot_eps_1"},
        "first.lam_p": {0: "first.uot_lam_p_0", 1: "first.uot_lam_p_1"},
        "first.lam_q": {0: "first.uot_lam_q_0", 1: "first.uot_lam_q_1"},
        "first.mass_exponent": {None: "first.uot_mass_exponent"},
        **{f"second.{name}": {None: f"second.uot_{name}"} for name in ("eps", "lam_p", "lam_q", "rho", "gw")}}


def test_uot_columns_of_older_logs():
    columns = ["uot_eps", "uot_lam_q_0", "uot_lam_q_10", "readout.uot_rho_1", "uot_readout_eps", "uot_other"]
    assert uot_columns(columns) == {
        "eps": {None: "uot_eps"}, "lam_q": {0: "uot_lam_q_0", 10: "uot_lam_q_10"}, "readout.rho": {1: "readout.uot_rho_1"},
        "readout.eps": {None: "uot_readout_eps"}, "other": {None: "uot_other"}}


def test_git_commit_names_this_checkout():
    commit = git_commit()
    assert commit is None or re.fullmatch(r"[0-9a-f]{40}", commit)
