"""The typed schema of a run: a YAML file read into :class:`Config`, then ``--<field> <value>`` overrides.

A mistake in the command line or the YAML file (a missing file, an unknown key or pooling, a wrong type) ends
the run before anything is written, with one line and exit status 2, as argparse reports its own errors.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import sys
import tokenize
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, NoReturn, Optional, Sequence, TypeVar

import yaml

from experiments.models import POOLINGS, UOTOptions
from uotp_geometric.aggr import PRIORS

T = TypeVar("T")


@dataclass
class Config(UOTOptions):
    """One run: TU graph classification or, for a dataset named ``ogbg-*``, OGB graph property prediction.

    The defaults are PyG's ``benchmark/kernel`` protocol for TU datasets (k-fold cross-validation, one seed);
    ``configs/ogb/*.yaml`` set OGB's ``examples/graphproppred/mol`` recipe (official split, one run per seed).
    The UOT readout's options are those of :class:`~experiments.models.UOTOptions`.
    """

    dataset: str = "MUTAG"  # a TUDataset name, or an OGB name such as ogbg-molhiv
    root: str = "data"  # holds <dataset>/raw (TU) or ogbg_<name>/ (OGB); only read, never written
    cache: str = "~/.cache/uotp_geometric/TUDataset"  # writable copy where PyG writes processed/
    out: str = "runs/{dataset}-{pooling}-seed{seed}"  # run directory; {field} takes the field's value
    pooling: str = "add"  # the readout (experiments.models.make_readout)
    folds: int = 10  # TU only, at least 3 (a fold's validation set is the previous test fold); OGB has its split
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
    seed: int = 0  # TU: the run's seed; OGB: the first of num_seeds consecutive seeds
    num_seeds: int = 1  # OGB only: one run per seed, seed, seed + 1, ...
    device: str = "cpu"
    num_workers: int = 0
    threads: int = 0  # torch's CPU threads; 0: torch's choice. Use 1 for each of several runs sharing a CPU

    def __post_init__(self) -> None:
        if self.folds < 3:
            raise ValueError(f"--folds needs at least 3, since a fold's validation set is the previous test "
                             f"fold (got {self.folds})")
        if self.threads < 0:
            raise ValueError(f"--threads must be 0 (torch's choice) or positive (got {self.threads})")
        if self.epochs < 1:
            raise ValueError(f"--epochs must be at least 1 (got {self.epochs})")
        self.check_uot(self.pooling)

    @property
    def is_ogb(self) -> bool:
        """Whether :attr:`dataset` names an OGB graph property prediction dataset."""
        return self.dataset.startswith("ogbg-")


# Fields that no checkpoint depends on, so a run may resume under other values: where and how a run executes,
# and how many seeds an OGB run has (each seed trains alone, so 3 seeds can be extended to 10).
RUNTIME_FIELDS = frozenset({"root", "cache", "out", "device", "num_workers", "threads", "num_seeds"})


class UsageError(Exception):
    """A mistake in the command line that shows only once the task or the data is looked at (an unknown
    dataset, a missing root); the command prints it in one line and exits with status 2."""


class CommandLineExit(SystemExit):
    """Exit status 2, as argparse's errors, with the message as the exception's text for a caller in the same
    process (the message itself has gone to stderr)."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the usage of several dozen flags would bury the one line that matters."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise CommandLineExit(message)


def _bool(text: str) -> bool:
    if text.lower() in {"true", "1", "yes"}:
        return True
    if text.lower() in {"false", "0", "no"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _comments(cls: type) -> dict[str, str]:
    """The comment that ends each ``name: type = default  # comment`` line of ``cls`` and of the dataclasses it
    inherits from: the field's help."""
    comments = {}
    for base in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):
        name = None
        for token in tokenize.generate_tokens(io.StringIO(inspect.getsource(base)).readline):
            if token.type == tokenize.NL or token.type == tokenize.NEWLINE:
                name = None
            elif token.type == tokenize.NAME and name is None and token.start[1] == 4:
                name = token.string  # the first name of a line in the class body
            elif token.type == tokenize.COMMENT and name is not None:
                comments[name] = token.string.lstrip("# ")
    return comments


def dataclass_parser(cls: type, description: str,
                     choices: Optional[Mapping[str, Sequence[str]]] = None) -> argparse.ArgumentParser:
    """An argument parser with ``--config FILE`` and one ``--<field>`` per field of the dataclass ``cls``, its
    help taken from the field's comment; ``choices`` restricts fields to the names given. No abbreviations:
    ``--epoch 2`` is an error, not ``--epochs 2``."""
    kinds = typing.get_type_hints(cls)
    defaults = dataclasses.asdict(cls())
    comments = _comments(cls)
    parser = _Parser(description=description, allow_abbrev=False)
    parser.add_argument("--config", type=Path, help="YAML file with any of the fields below")
    own_first = sorted(kinds, key=lambda name: name not in vars(cls).get("__annotations__", {}))
    for name, kind in ((name, kinds[name]) for name in own_first):
        item = typing.get_args(kind)[0] if typing.get_origin(kind) is list else None
        scalar = item or kind
        about = f"{kind if item else kind.__name__}, default {defaults[name]!r}"
        parser.add_argument(f"--{name}", type=_bool if scalar is bool else scalar, nargs="+" if item else None,
                            choices=(choices or {}).get(name),
                            help=f"{about}: {comments[name]}" if name in comments else about)
    return parser


def _typed(name: str, value: Any, kind: type) -> Any:
    if kind is float and type(value) is int:
        return float(value)
    if type(value) is not kind:
        raise TypeError(f"config key {name!r} expects {kind.__name__}, got {value!r}")
    return value


def read_dataclass(cls: type[T], parser: argparse.ArgumentParser, args: argparse.Namespace,
                   choices: Optional[Mapping[str, Sequence[str]]] = None) -> T:
    """The dataclass ``cls`` from the YAML file ``args.config`` (if any) with the flags in ``args`` on top.

    A file that cannot be read, an unknown key, a name outside ``choices`` or a value the dataclass rejects
    (``ValueError``) goes to ``parser.error`` (one line, exit status 2); a value of the wrong type in the file
    raises ``TypeError`` naming its key. A ``list[...]`` field takes a list or a single item in YAML. A
    ``{field}`` in the ``out`` field takes that field's value.
    """
    kinds = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    if args.config:
        try:
            values = yaml.safe_load(args.config.read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            parser.error(f"cannot read config {args.config}: {' '.join(str(error).split())}")
        if not isinstance(values, dict):
            parser.error(f"config {args.config} must map field names to values")
        unknown = sorted(set(values) - set(kinds))
        if unknown:
            parser.error(f"unknown keys in {args.config}: {', '.join(map(str, unknown))}")
        for name, value in values.items():
            if typing.get_origin(kinds[name]) is list:
                item = typing.get_args(kinds[name])[0]
                values[name] = [_typed(name, v, item) for v in (value if isinstance(value, list) else [value])]
            else:
                values[name] = _typed(name, value, kinds[name])
        for name, allowed in (choices or {}).items():
            if name in values and values[name] not in allowed:
                parser.error(f"in {args.config}: invalid {name} {values[name]!r} (choose from "
                             f"{', '.join(allowed)})")
    values.update({name: value for name, value in vars(args).items() if name in kinds and value is not None})
    try:
        config = cls(**values)
    except ValueError as error:  # the dataclass's own checks
        parser.error(str(error))
    config.out = config.out.format(**dataclasses.asdict(config))
    return config


def parse_dataclass(cls: type[T], description: str, argv: Sequence[str] | None = None,
                    choices: Optional[Mapping[str, Sequence[str]]] = None) -> T:
    """Reads ``--config FILE`` (optional) into the dataclass ``cls`` and applies every ``--<field> <value>``
    flag on top (:func:`dataclass_parser`, :func:`read_dataclass`)."""
    parser = dataclass_parser(cls, description, choices)
    return read_dataclass(cls, parser, parser.parse_args(argv), choices)


DESCRIPTION = ("Graph classification on TU datasets (PyG benchmark/kernel protocol) and OGB molecules (OGB's "
               "examples/graphproppred/mol).")
CHOICES = dict(pooling=POOLINGS, uot_prior=PRIORS)


def parse_run(argv: Sequence[str] | None = None) -> tuple[Config, list[int], argparse.ArgumentParser]:
    """The command line of ``experiments.train``: the :class:`Config`, the folds or seeds to train again from
    scratch (``--restart``), and the parser, whose ``error`` reports later mistakes the same way."""
    parser = dataclass_parser(Config, DESCRIPTION, CHOICES)
    parser.add_argument("--restart", type=int, nargs="+", default=[], metavar="N",
                        help="folds (TU) or seeds (OGB) to train again from scratch, ignoring their checkpoints")
    args = parser.parse_args(argv)
    try:
        return read_dataclass(Config, parser, args, CHOICES), args.restart, parser
    except TypeError as error:
        parser.error(f"in {args.config}: {error}")


def parse_config(argv: Sequence[str] | None = None) -> Config:
    """Reads ``--config FILE`` (optional) and applies every ``--<field> <value>`` flag on top."""
    return parse_run(argv)[0]
