import dataclasses
import inspect
import math
import sys
import typing
from pathlib import Path

import pytest

from experiments.config import CHOICES, RUNTIME_FIELDS, Config, parse_config
from experiments.models import POOLINGS
from uotp_geometric import UOTAggregation


def test_yaml_then_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("dataset: PROTEINS\nepochs: 7\nlr: 1\nbatch_norm: false\npooling: mean\n")
    config = parse_config(["--config", str(path), "--epochs", "2", "--pooling", "uot", "--lr_gamma", "0.25"])
    assert config.dataset == "PROTEINS"  # from the file
    assert config.epochs == 2 and config.pooling == "uot"  # flags win over the file
    assert config.lr == 1.0 and isinstance(config.lr, float)  # a YAML int is a valid float
    assert config.batch_norm is False
    assert config.lr_gamma == 0.25
    assert config.folds == Config.folds  # untouched fields keep their defaults
    assert config.out == "runs/PROTEINS-uot-seed0"  # {field}s in out are filled in


@pytest.mark.parametrize("field", dataclasses.fields(Config), ids=lambda f: f.name)
def test_every_field_has_a_flag(field):
    kind = typing.get_type_hints(Config)[field.name]
    value, text = {int: (12, "12"), float: (0.125, "0.125"), bool: (False, "false"), str: ("xyz", "xyz")}[kind]
    if field.name in CHOICES:  # a name from a list
        value = text = CHOICES[field.name][1]
    assert getattr(parse_config([f"--{field.name}", text]), field.name) == value


def test_bool_flag_accepts_words():
    assert parse_config(["--batch_norm", "False"]).batch_norm is False
    assert parse_config(["--batch_norm", "true"]).batch_norm is True
    with pytest.raises(SystemExit):
        parse_config(["--batch_norm", "maybe"])


def test_bad_files_are_refused(tmp_path):
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("epochz: 3\n")
    with pytest.raises(SystemExit):
        parse_config(["--config", str(unknown)])
    mistyped = tmp_path / "mistyped.yaml"
    mistyped.write_text("epochs: 2.5\n")
    with pytest.raises(SystemExit, match="'epochs' expects int"):
        parse_config(["--config", str(mistyped)])
    with pytest.raises(SystemExit):
        parse_config(["--epochs", "two"])


def test_shipped_configs_parse():
    configs = sorted(Path(__file__).resolve().parents[2].joinpath("configs", "tu").glob("*.yaml"))
    datasets = {path.stem: parse_config(["--config", str(path)]).dataset for path in configs}
    assert all(stem == dataset.lower() for stem, dataset in datasets.items())
    assert set(datasets.values()) == {"MUTAG", "PTC_MR", "PROTEINS", "NCI1", "NCI109", "ENZYMES", "DD",
                                      "IMDB-BINARY", "IMDB-MULTI", "REDDIT-BINARY"}


def _usage_error(capsys, argv):
    """The exit status and stderr of a command line that must fail in the parser."""
    with pytest.raises(SystemExit) as error:
        parse_config(argv)
    return error.value.code, capsys.readouterr().err


def test_mistakes_exit_2_with_one_line(capsys, tmp_path):
    code, err = _usage_error(capsys, ["--epoch", "2"])  # no prefix matching: not --epochs
    assert code == 2 and err.count("\n") == 1 and "unrecognized arguments: --epoch 2" in err
    code, err = _usage_error(capsys, ["--config", str(tmp_path / "missing.yaml")])
    assert code == 2 and err.count("\n") == 1 and "missing.yaml" in err and "Traceback" not in err
    code, err = _usage_error(capsys, ["--pooling", "uott"])
    assert code == 2 and err.count("\n") == 1 and "'uott'" in err
    assert all(name in err for name in POOLINGS)
    bad = tmp_path / "bad.yaml"
    for text, words in [("pooling: uott\n", ["'uott'", *POOLINGS]), ("epochz: 3\n", ["unknown keys", "epochz"]),
                        ("epochs: [3\n", ["cannot read config"]), ("- 3\n", ["must map field names"])]:
        bad.write_text(text)
        code, err = _usage_error(capsys, ["--config", str(bad)])
        assert code == 2 and err.count("\n") == 1 and str(bad) in err, text
        assert all(word in err for word in words), (text, err)


@pytest.mark.parametrize("folds", ["2", "0"])
def test_folds_need_three(capsys, folds):
    code, err = _usage_error(capsys, ["--folds", folds])
    assert code == 2 and "--folds needs at least 3" in err
    assert parse_config(["--folds", "3"]).folds == 3


@pytest.mark.parametrize("argv,message", [
    (["--epochs", "0"], "--epochs must be at least 1 (got 0)"),
    (["--pooling", "uot", "--uot_eps", "-1"], "--uot_eps must be positive for solver='sinkhorn' (got -1.0)"),
    (["--pooling", "uot", "--uot_eps", "0"], "--uot_eps must be positive for solver='sinkhorn' (got 0.0)"),
    (["--pooling", "uot_badmm", "--uot_rho", "0"], "--uot_rho must be positive for solver='badmm' (got 0.0)"),
    (["--pooling", "rot", "--uot_gw", "-1"], "--uot_gw must be finite and non-negative for solver='sinkhorn' (got -1.0)"),
    (["--pooling", "uot", "--uot_prior", "power", "--uot_mass_exponent", "2"],
     "--uot_mass_exponent must lie in [0, 1] (got 2.0)"),
    (["--pooling", "uot", "--num_iters", "0"], "--num_iters must be an integer >= 1 (got 0)"),
])
def test_bad_values_are_refused_when_read(capsys, argv, message):
    code, err = _usage_error(capsys, argv)
    assert code == 2 and err == f"{Path(sys.argv[0]).name}: error: {message} (see --help)\n"


@pytest.mark.parametrize("argv", [["--pooling", "uot_badmm", "--uot_eps", "0"],  # BADMM may drop the entropy
                                  ["--pooling", "add", "--uot_eps", "-1"]])  # not a UOT pooling: not read
def test_values_a_layer_accepts(argv):
    assert parse_config(argv).uot_eps == float(argv[-1])


def test_help_documents_the_limits(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--folds FOLDS int, default 10: TU only, at least 3" in text
    assert "--threads THREADS int, default 0: torch's CPU threads; 0: torch's choice" in text
    assert "--restart N [N ...]" in text
    assert "{" + ",".join(POOLINGS) + "}" in text


def test_threads_is_a_runtime_field():
    assert parse_config([]).threads == 0 and parse_config(["--threads", "1"]).threads == 1
    assert "threads" in RUNTIME_FIELDS
    with pytest.raises(SystemExit):
        parse_config(["--threads", "-1"])


def test_layer_readout_and_harness_start_from_the_same_values():
    layer = inspect.signature(UOTAggregation).parameters
    for name in ("eps", "lam_p", "lam_q", "rho", "prior", "per_iteration", "mass_exponent"):
        assert layer[name].default == getattr(Config, f"uot_{name}"), name
    assert layer["num_iters"].default == Config.num_iters
    assert Config.uot_gw == 0.1  # the starting weight of rot and rot_badmm (the layer's gw = 0 is plain UOT)
    assert layer["lam_p"].default == math.inf
    # The README's first snippet builds the layer with its defaults for these values.
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    snippet = readme.split("```python")[1].split("```")[0]
    line = next(line for line in snippet.splitlines() if "UOTAggregation(" in line)
    code, comment = line.split("#")
    assert not any(f"{name}=" in code for name in ("eps", "lam_p", "lam_q"))
    assert comment.strip() == "starts at eps=1, lam_p=inf, lam_q=1"
    layer = UOTAggregation()
    assert [layer.value(name).item() for name in ("eps", "lam_p", "lam_q")] == [1.0, math.inf, 1.0]
