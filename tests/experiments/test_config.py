import dataclasses
import typing
from pathlib import Path

import pytest

from experiments.config import Config, parse_config


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
    with pytest.raises(TypeError, match="epochs"):
        parse_config(["--config", str(mistyped)])
    with pytest.raises(SystemExit):
        parse_config(["--epochs", "two"])


def test_shipped_configs_parse():
    configs = sorted(Path(__file__).resolve().parents[2].joinpath("configs", "tu").glob("*.yaml"))
    datasets = {path.stem: parse_config(["--config", str(path)]).dataset for path in configs}
    assert all(stem == dataset.lower() for stem, dataset in datasets.items())
    assert set(datasets.values()) == {"MUTAG", "PTC_MR", "PROTEINS", "NCI1", "NCI109", "ENZYMES", "DD",
                                      "IMDB-BINARY", "IMDB-MULTI", "REDDIT-BINARY"}
