"""The authors' published layers, timed beside ours in one process (``--authors-code DIR``).

Cheng & Xu publish their UOT-Pooling layer in https://github.com/SDS-Lab/ROT-Pooling: ``UOTPooling`` in
``pooling/rotpooling.py``, which pads the batch with ``to_dense_batch`` and runs ``f_method`` (``"badmm-e"``,
their BADMM with the entropic regulariser, or ``"sinkhorn"``) for ``num`` iterations from
``pooling/rotlayers.py``. Their code is not part of this repository: ``--authors-code`` names a checkout of it,
and these two files are imported from there when the benchmark runs. The package's ``__init__`` is not run: it
imports their baselines and plotting helpers too (``torch_scatter``, ``matplotlib``, ``seaborn``), which the
layer does not need. A checkout that cannot be imported leaves its rows with a note instead of times.

Each of their layers is built at its defaults (``UOTPooling(dim, num=K, f_method=...)``: learned parameters,
one per iteration, initialised as ``softplus(0.1 * randn)`` under a fixed seed; fixed uniform priors) and
divided, repeat by repeat, by ours (:class:`~uotp_geometric.UOTAggregation` at its defaults, the same solver,
``K`` and backward as the batch tables' "UOT" rows), so a ratio above 1 is how many times faster ours is.
"""
from __future__ import annotations

import functools
import importlib
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import pandas as pd
import torch
from torch import Tensor

from experiments.bench.cases import DEFAULT_MODE, SKEWED, Batch, Method

AUTHORS_REPO = "https://github.com/SDS-Lab/ROT-Pooling"
PACKAGE = "pooling"  # the name their files import each other by (``from pooling.rotlayers import ...``)
LAYER_FILES = ("rotlayers.py", "rotpooling.py")
F_METHODS = {"badmm": "badmm-e", "sinkhorn": "sinkhorn"}  # our solver: the authors' f_method
TARGET_BATCH = Batch(128, 30, "uniform")  # issue 26: ours at least twice as fast as their BADMM-E here
TARGET = ">= 2 (26)"
SECTION = "authors"


class AuthorsCodeError(RuntimeError):
    """The authors' checkout is missing or its layer cannot be imported."""


def check_checkout(code: Union[str, Path]) -> Path:
    """The resolved checkout, once it holds ``pooling/rotlayers.py`` and ``pooling/rotpooling.py``."""
    root = Path(code).expanduser().resolve()
    missing = [f"{PACKAGE}/{name}" for name in LAYER_FILES if not (root / PACKAGE / name).is_file()]
    if missing:
        raise AuthorsCodeError(f"{root} is not a checkout of {AUTHORS_REPO}: {', '.join(missing)} missing "
                               f"(git clone {AUTHORS_REPO} DIR, then --authors-code DIR)")
    return root


@functools.lru_cache(maxsize=None)
def _load(root: Path) -> types.ModuleType:
    saved = {name: module for name, module in sys.modules.items()
             if name == PACKAGE or name.startswith(PACKAGE + ".")}
    for name in saved:  # another package of that name (or another checkout) is set aside meanwhile
        del sys.modules[name]
    package = types.ModuleType(PACKAGE)  # a bare package: their __init__ is not run
    package.__path__ = [str(root / PACKAGE)]
    sys.modules[PACKAGE] = package
    try:
        return importlib.import_module(f"{PACKAGE}.rotpooling")
    except Exception as error:  # noqa: BLE001 - a missing dependency, or an API their code no longer finds
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise AuthorsCodeError(f"importing {root / PACKAGE / 'rotpooling.py'} failed: {type(error).__name__}: "
                               f"{first_line}") from error
    finally:  # their modules live on in the classes taken from them, not under the generic name
        for name in [name for name in sys.modules if name == PACKAGE or name.startswith(PACKAGE + ".")]:
            del sys.modules[name]
        sys.modules.update(saved)


def load_rotpooling(code: Union[str, Path]) -> types.ModuleType:
    """The authors' ``pooling/rotpooling.py`` from the checkout ``code`` (imported once per checkout)."""
    return _load(check_checkout(code))


class AuthorsUOT(torch.nn.Module):
    """The authors' ``UOTPooling(dim, num=num_iters, f_method=f_method)`` at its defaults, called as the
    benchmark calls every module: ``(x, index, dim_size)`` with ``index`` sorted and every set non-empty."""

    def __init__(self, code: Union[str, Path], dim: int, f_method: str = "badmm-e", num_iters: int = 4,
                 seed: int = 0) -> None:
        super().__init__()
        layer = load_rotpooling(code).UOTPooling
        with torch.random.fork_rng(devices=[]):  # their initial values are random: the same ones every run
            torch.manual_seed(seed)
            self.layer = layer(dim=dim, num=num_iters, f_method=f_method)

    def forward(self, x: Tensor, index: Tensor, dim_size: int) -> Tensor:
        out = self.layer(x, index)  # (B, D), B inferred from index by their to_dense_batch
        if out.size(0) != dim_size:
            raise ValueError(f"the authors' layer pooled {out.size(0)} sets, not {dim_size}: empty sets?")
        return out


@dataclass(frozen=True)
class AuthorsMethod(Method):
    """The authors' layer with our solver ``solver`` (their ``F_METHODS[solver]``), divided by ours."""

    name: str = "authors' UOTPooling"
    code: str = ""  # the checkout

    @property
    def label(self) -> str:
        return f"authors' UOTPooling {F_METHODS[self.solver]} K={self.num_iters}"

    @property
    def baseline(self) -> Method:
        return Method("UOT", self.solver, self.num_iters, DEFAULT_MODE)

    def build(self, dim: int, device: torch.device) -> torch.nn.Module:
        return AuthorsUOT(self.code, dim, F_METHODS[self.solver], self.num_iters).to(device)


@dataclass
class AuthorsPlan:
    """The section "against the authors' layers": on each batch, ours and theirs per solver, round-robin."""

    code: str  # a checkout of AUTHORS_REPO
    batches: Sequence[Batch] = (TARGET_BATCH, *SKEWED)
    solvers: Sequence[str] = ("badmm", "sinkhorn")
    num_iters: int = 4

    def methods(self) -> list[Method]:
        theirs = [AuthorsMethod(solver=s, num_iters=self.num_iters, code=str(self.code)) for s in self.solvers]
        return [*(method.baseline for method in theirs), *theirs]


def headline_rows(df: pd.DataFrame) -> list[tuple[str, float, str, str]]:
    """The headline's rows: each BADMM-E row of the section over ours, the target on :data:`TARGET_BATCH`."""
    rows = []
    for row in df[(df.section == SECTION) & df.method.str.startswith("authors' UOTPooling badmm-e")].itertuples():
        spread = (row.note if isinstance(row.note, str) and row.note else
                  f"{row.fwdbwd_ratio_min:.3g} to {row.fwdbwd_ratio_max:.3g}")
        rows.append((f"authors' BADMM-E / ours (badmm K={row.K}), fwd+bwd, {row.config}", row.fwdbwd_ratio,
                     spread, TARGET if row.config == TARGET_BATCH.name else "none"))
    return rows


HOW = ("The authors' `UOTPooling` (" + AUTHORS_REPO + ", imported from the checkout given to `--authors-code`) "
       "at its defaults: learned values, one per iteration, from `softplus(0.1 * randn)`; uniform priors. It pads "
       "the batch with `to_dense_batch`; `badmm-e` is their BADMM with the entropic regulariser, `sinkhorn` their "
       "Sinkhorn (simultaneous updates). Each is timed round-robin with ours at its defaults (same solver, K and "
       "backward as the batch tables); its ratios are the median, least and largest over repeats of (theirs / "
       "ours) in the same repeat: above 1, ours is faster.")
ABSENT = ("Not measured in this run: add `--authors-code DIR`, `DIR` a checkout of " + AUTHORS_REPO +
          " (`git clone " + AUTHORS_REPO + " DIR`; their layer needs only torch and torch_geometric), to time "
          "their `UOTPooling` (BADMM-E and Sinkhorn) beside ours on " + TARGET_BATCH.name + " and the skewed "
          "batches, with the headline row \"authors' BADMM-E / ours\" (target " + TARGET + ").")


def checkout_commit(code: Union[str, Path]) -> str:
    """The commit checked out in ``code``, or why there is none to tell."""
    try:
        done = subprocess.run(["git", "-C", str(code), "rev-parse", "--show-toplevel", "HEAD"], capture_output=True,
                              text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    top, commit = done.stdout.split()
    return commit if Path(top).resolve() == Path(code).resolve() else "unknown (not a git checkout)"


def section_parts(df: pd.DataFrame, table: Any, plan: Optional[AuthorsPlan] = None) -> list[str]:
    """The README's section, each batch a table made by ``table`` (the report's), or how to get it."""
    authors = df[df.section == SECTION]
    parts = ["## Against the authors' layers"]
    if not len(authors):
        return [*parts, ABSENT]
    where = f" Their code: `{plan.code}`, commit {checkout_commit(plan.code)}." if plan is not None else ""
    parts.append(HOW + where)
    for config, group in authors.groupby("config", sort=False):
        first = group.iloc[0]
        ours = ~group.method.str.startswith("authors' ")  # the baselines: no ratio of their own here
        parts += [f"### {config}: N={first.N}, largest set {first.max_set} (their padding stores "
                  f"{first.B * first.max_set / first.N:.1f}x the nodes)",
                  table(group.assign(baseline=group.baseline.mask(ours, "")))]
    return parts

