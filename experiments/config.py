"""The typed schema of a run: a YAML file read into :class:`Config`, then ``--<field> <value>`` overrides."""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

T = TypeVar("T")


@dataclass
class Config:
    """One run: TU graph classification or, for a dataset named ``ogbg-*``, OGB graph property prediction.

    The defaults are PyG's ``benchmark/kernel`` protocol for TU datasets (k-fold cross-validation, one seed);
    ``configs/ogb/*.yaml`` set OGB's ``examples/graphproppred/mol`` recipe (official split, one run per seed).
    """

    dataset: str = "MUTAG"  # a TUDataset name, or an OGB name such as ogbg-molhiv
    root: str = "data"  # holds <dataset>/raw (TU) or ogbg_<name>/ (OGB); only read, never written
    cache: str = "~/.cache/uotp_geometric/TUDataset"  # writable copy where PyG writes processed/
    out: str = "runs/{dataset}-{pooling}-seed{seed}"  # run directory; {field} takes the field's value
    pooling: str = "add"  # a name known to experiments.models.make_readout
    folds: int = 10  # TU only; OGB datasets come with their own split
    epochs: int = 100
    batch_size: int = 128  # the global batch, split over DDP processes
    lr: float = 0.01
    lr_step: int = 50
    lr_gamma: float = 0.5
    backbone: str = "gin"  # TU: gin (benchmark/kernel); OGB: gin or gin-virtual (examples/graphproppred/mol)
    hidden: int = 64  # node embedding width (OGB's emb_dim)
    num_layers: int = 5
    dropout: float = 0.5
    batch_norm: bool = True
    num_iters: int = 4  # K, the UOT solver's iterations
    # Initial UOT values (learned from there; inf stays fixed). A hard feature marginal keeps the pooled
    # mass at 1: with the spec's lam_p = 1 the mass grows like exp(|x| / eps) and training diverges.
    uot_eps: float = 1.0
    uot_lam_p: float = float("inf")
    uot_lam_q: float = 1.0
    seed: int = 0  # TU: the run's seed; OGB: the first of num_seeds consecutive seeds
    num_seeds: int = 1  # OGB only: one run per seed, seed, seed + 1, ...
    device: str = "cpu"
    num_workers: int = 0

    @property
    def is_ogb(self) -> bool:
        """Whether :attr:`dataset` names an OGB graph property prediction dataset."""
        return self.dataset.startswith("ogbg-")


# Fields that no checkpoint depends on, so a run may resume under other values: where and how a run executes,
# and how many seeds an OGB run has (each seed trains alone, so 3 seeds can be extended to 10).
RUNTIME_FIELDS = frozenset({"root", "cache", "out", "device", "num_workers", "num_seeds"})


def _bool(text: str) -> bool:
    if text.lower() in {"true", "1", "yes"}:
        return True
    if text.lower() in {"false", "0", "no"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _typed(name: str, value: Any, kind: type) -> Any:
    if kind is float and type(value) is int:
        return float(value)
    if type(value) is not kind:
        raise TypeError(f"config key {name!r} expects {kind.__name__}, got {value!r}")
    return value


def parse_dataclass(cls: type[T], description: str, argv: Sequence[str] | None = None) -> T:
    """Reads ``--config FILE`` (optional) into the dataclass ``cls`` and applies every ``--<field> <value>``
    flag on top. A ``list[...]`` field takes several values (``--seeds 0 1 2``), and a list or a single item
    in YAML. A ``{field}`` in the ``out`` field takes that field's value."""
    kinds = typing.get_type_hints(cls)
    defaults = dataclasses.asdict(cls())
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", type=Path, help="YAML file with any of the fields below")
    for name, kind in kinds.items():
        item = typing.get_args(kind)[0] if typing.get_origin(kind) is list else None
        scalar = item or kind
        parser.add_argument(f"--{name}", type=_bool if scalar is bool else scalar, nargs="+" if item else None,
                            help=f"{kind if item else kind.__name__}, default {defaults[name]!r}")
    args = parser.parse_args(argv)

    values = (yaml.safe_load(args.config.read_text()) or {}) if args.config else {}
    unknown = sorted(set(values) - set(kinds))
    if unknown:
        parser.error(f"unknown keys in {args.config}: {', '.join(unknown)}")
    for name, value in values.items():
        if typing.get_origin(kinds[name]) is list:
            item = typing.get_args(kinds[name])[0]
            values[name] = [_typed(name, v, item) for v in (value if isinstance(value, list) else [value])]
        else:
            values[name] = _typed(name, value, kinds[name])
    values.update({name: value for name, value in vars(args).items() if name != "config" and value is not None})
    config = cls(**values)
    config.out = config.out.format(**dataclasses.asdict(config))
    return config


def parse_config(argv: Sequence[str] | None = None) -> Config:
    """Reads ``--config FILE`` (optional) and applies every ``--<field> <value>`` flag on top."""
    return parse_dataclass(Config, "Graph classification on TU datasets (PyG benchmark/kernel protocol) and OGB "
                                   "molecules (OGB's examples/graphproppred/mol).", argv)
