"""The UOT readout's options reach the layer from both entry points, are recorded, and name the run."""
import json
import math
import subprocess
import sys

import pytest
import torch

from experiments.adgcl.protocol import parse_config as parse_adgcl
from experiments.config import CommandLineExit, parse_config
from experiments.models import UOTOptions, make_readout, run_label
from tests.experiments.helpers import REPO

FLAGS = ("--num_iters", "--uot_prior", "--uot_per_iteration", "--uot_eps", "--uot_lam_p", "--uot_lam_q",
         "--uot_rho", "--uot_mass_exponent", "--uot_gw")


@pytest.mark.parametrize("module", ["experiments.train", "experiments.adgcl"])
def test_help_lists_every_uot_option(module):
    text = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, check=True, capture_output=True,
                          text=True).stdout
    missing = [flag for flag in FLAGS if flag not in text]
    assert not missing
    assert "{uniform,attention,counting,power}" in text


@pytest.mark.parametrize("parse", [parse_config, parse_adgcl])
def test_flags_set_the_options(parse):
    config = parse(["--uot_prior", "power", "--uot_per_iteration", "true", "--num_iters", "3", "--uot_eps", "0.5",
                    "--uot_lam_q", "2", "--uot_rho", "0.7", "--uot_mass_exponent", "0.25"])
    assert config.uot_options() == UOTOptions(num_iters=3, uot_prior="power", uot_per_iteration=True, uot_eps=0.5,
                                              uot_lam_q=2.0, uot_rho=0.7, uot_mass_exponent=0.25)


@pytest.mark.parametrize("parse", [parse_config, parse_adgcl])
def test_an_unknown_prior_exits_2(parse, capsys):
    with pytest.raises(CommandLineExit):
        parse(["--uot_prior", "gaussian"])
    assert "invalid choice: 'gaussian'" in capsys.readouterr().err


def test_the_layer_computes_what_the_options_say():
    options = UOTOptions(num_iters=3, uot_prior="power", uot_per_iteration=True, uot_eps=0.5, uot_lam_q=2.0,
                         uot_rho=0.7, uot_mass_exponent=0.25)
    layer, width = make_readout("uot_badmm", 8, options)
    assert width == 8 and (layer.solver, layer.num_iters, layer.prior) == ("badmm", 3, "power")
    expected = dict(eps=0.5, lam_p=math.inf, lam_q=2.0, rho=0.7)
    for name, value in expected.items():
        torch.testing.assert_close(layer.value(name), torch.full((3,), value), rtol=1e-6, atol=0)
    assert layer.value("mass_exponent").item() == pytest.approx(0.25)
    assert make_readout("uot_badmm_q", 8, options)[0].solver == "badmm_q"
    attention, _ = make_readout("uot", 8, UOTOptions(uot_prior="attention"))
    assert attention.gate.in_features == 8 and not attention.per_iteration


def test_run_labels_say_the_variant():
    assert run_label("add", {"uot_prior": "power"}) == "add"
    # results.json from before the options existed computed the uniform prior.
    assert run_label("uot", {"num_iters": 4}) == "uot[prior=uniform]"
    assert run_label("uot", {"uot_prior": "power", "uot_mass_exponent": 0.5}) == "uot[prior=power]"
    assert run_label("uot", {"uot_prior": "power", "uot_mass_exponent": 0.2}) == "uot[mass_exponent=0.2, prior=power]"
    assert run_label("uot_badmm", {"uot_per_iteration": True, "uot_rho": 2.0}) == \
        "uot_badmm[per_iteration=True, prior=uniform, rho=2.0]"
    assert run_label("uot", {"uot_rho": 2.0}) == "uot[prior=uniform]"  # Sinkhorn has no rho


def test_a_run_records_its_options(tmp_path):
    out = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "experiments.train", "--config", str(REPO / "configs/tu/mutag.yaml"),
                    "--root", str(REPO / "data"), "--cache", str(tmp_path / "cache"), "--out", str(out), "--folds", "3",
                    "--epochs", "1", "--pooling", "uot", "--uot_prior", "power", "--uot_mass_exponent", "0.25"],
                   cwd=REPO, check=True, capture_output=True)
    config = json.loads((out / "results.json").read_text())["config"]
    assert (config["uot_prior"], config["uot_mass_exponent"], config["uot_per_iteration"]) == ("power", 0.25, False)
    assert run_label("uot", config) == "uot[mass_exponent=0.25, prior=power]"
    header = (out / "fold0.csv").read_text().splitlines()[0].split(",")
    assert "uot_mass_exponent" in header  # the learned exponent is logged per epoch
