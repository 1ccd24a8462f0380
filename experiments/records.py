"""What a run leaves on disk: files replaced atomically (a killed run never leaves half a file), per-epoch CSV
logs, the checkpoints a run resumes from, ``results.json``, the commit that produced them and whether the tree
had changes, the lock that keeps a second run out of a run directory, and the learned UOT values logged per
epoch."""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import fcntl
import io
import json
import os
import pickle
import re
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from uotp_geometric import UOTAggregation
from uotp_geometric.plot import PARAMETERS, learned_values


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path to write to; it replaces ``path`` only once the write has finished.

    The temporary name is unique, so that two writers never share it; a failed write removes it.
    """
    # Not tempfile.mkstemp: its files are private (0600), and the results should keep the usual permissions.
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def csv_text(fields: Sequence[str], rows: list[dict[str, Any]]) -> str:
    """``rows`` as CSV: the columns ``fields``, then any other keys of the rows in the order they first appear
    (such as :func:`uot_values`); a row without a column leaves it empty."""
    fields = list(dict.fromkeys([*fields, *(key for row in rows for key in row)]))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fields)
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def write_csv(path: Path, fields: Sequence[str], rows: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        f.write(csv_text(fields, rows))


def write_json(path: Path, value: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(value, indent=2) + "\n")


def epoch_seconds(seconds: Sequence[float]) -> dict[str, float]:
    """The ``results.json`` timing fields: the median seconds per epoch (``seconds_per_epoch``), robust to a
    few slow epochs, and the 90th percentile (``seconds_per_epoch_p90``), which shows a run slowed throughout
    by a busy machine."""
    return dict(seconds_per_epoch=float(np.median(seconds)),
                seconds_per_epoch_p90=float(np.percentile(seconds, 90)))


@contextlib.contextmanager
def run_lock(folder: Path) -> Iterator[None]:
    """Creates ``folder`` and holds an exclusive lock on it (``folder/.lock``, holding the PID) for the
    duration; the OS releases it when the process ends, even when it is killed. A second run on the same
    folder ends at once with a message naming the folder and the first run's PID."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".lock"
    # The file is never deleted: a lock on a deleted file would let a third run lock a new one.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise SystemExit(f"{folder} is in use by another run (PID {pid}, lock {path}); wait for it to end "
                             f"or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


# What torch.load and load_state_dict raise for a file cut short, overwritten or from another program.
CHECKPOINT_ERRORS = (RuntimeError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError)


def check_resumable(saved: dict[str, Any], config: Any, runtime_fields: frozenset, path: Path) -> None:
    """Stops with one line if the checkpoint at ``path``, written under the config dict ``saved``, belongs to a
    run whose dataclass ``config`` differs in a field outside ``runtime_fields``. A field added to the config
    class after the checkpoint was written was then its default."""
    current = dataclasses.asdict(config)
    saved = {**dataclasses.asdict(type(config)()), **saved}
    changed = sorted(key for key in current if key not in runtime_fields and saved[key] != current[key])
    if changed:
        raise SystemExit(f"{path} belongs to a run with other {', '.join(changed)}; choose another --out")


def damaged(path: Path, error: Exception, remedy: str) -> SystemExit:
    """The one-line exit for a checkpoint that cannot be read: the file, the kind of error and what to do.
    The error's own text is left out: torch's is pickling advice, misleading for a file that is cut short."""
    return SystemExit(f"{path} is damaged ({type(error).__name__}); {remedy}")


def resume(path: Path, config: Any, runtime_fields: frozenset, states: dict[str, Any], remedy: str,
           device: torch.device) -> tuple[int, Optional[dict[str, Any]], list[dict[str, Any]]]:
    """Loads the checkpoint at ``path`` into ``states`` (each model, optimiser or scheduler under its key in the
    checkpoint) and returns its epoch, best result and per-epoch log; ``(0, None, [])`` where there is none.

    A checkpoint of another run (:func:`check_resumable`) or one that cannot be read (:func:`damaged`, naming
    ``remedy``) ends the run with one line.
    """
    if not path.exists():
        return 0, None, []
    try:
        ckpt = torch.load(path, map_location=device)
        saved = ckpt["config"]
    except CHECKPOINT_ERRORS as error:
        raise damaged(path, error, remedy) from None
    check_resumable(saved, config, runtime_fields, path)
    try:
        for key, state in states.items():
            state.load_state_dict(ckpt[key])
        return ckpt["epoch"], ckpt["best"], ckpt["history"]
    except CHECKPOINT_ERRORS as error:
        raise damaged(path, error, remedy) from None


def save_checkpoint(path: Path, config: Any, epoch: int, states: dict[str, Any], best: Optional[dict[str, Any]],
                    history: list[dict[str, Any]]) -> None:
    """Replaces the checkpoint at ``path`` with what :func:`resume` reads: the config dataclass, the epoch, the
    state of each object of ``states`` under its key, the best result and the per-epoch log."""
    with atomic_path(path) as tmp:
        torch.save(dict(config=dataclasses.asdict(config), epoch=epoch,
                        **{key: state.state_dict() for key, state in states.items()}, best=best, history=history),
                   tmp)


class EpochProgress:
    """Progress over the epochs of one fold or seed: a tqdm bar on a terminal; otherwise (a log file) one plain
    line per epoch, since a bar redrawn with carriage returns reads badly in a file."""

    def __init__(self, name: str, done: int, total: int, enabled: bool = True) -> None:
        self.name, self.total, self.enabled = name, total, enabled
        self.bar = tqdm(total=total, initial=done, desc=name, disable=not (enabled and sys.stdout.isatty()))

    def update(self, epoch: int, scores: dict[str, float], seconds: float) -> None:
        if not self.bar.disable:
            self.bar.set_postfix({key: f"{value:.4f}" for key, value in scores.items()}, refresh=False)
            self.bar.update()
        elif self.enabled:
            values = " ".join(f"{key} {value:.4f}" for key, value in scores.items())
            print(f"{self.name} epoch {epoch}/{self.total}: {values}, {seconds:.2f} s", flush=True)

    def close(self) -> None:
        self.bar.close()


def uot_values(model: torch.nn.Module) -> dict[str, float]:
    """The current value of every parameter of every :class:`UOTAggregation` in ``model``
    (:func:`uotp_geometric.plot.learned_values`), for the per-epoch log.

    A value is ``uot_<name>`` (``eps``, ``lam_p``, ... as the layer has them), or ``uot_<name>_<k>`` for
    iteration ``k = 0, 1, ...`` of a ``per_iteration`` layer; with several UOT layers, each column starts with
    the layer's module path (``convs.0.aggr.uot_eps``). A model without a UOT layer gives ``{}``.
    :func:`uot_columns` reads the names back.
    """
    layers = [(path, module) for path, module in model.named_modules() if isinstance(module, UOTAggregation)]
    values = {}
    for path, layer in layers:
        prefix = f"{path}.uot_" if len(layers) > 1 else "uot_"
        for name, value in learned_values(layer).items():
            if len(value) > 1:  # per_iteration
                values.update({f"{prefix}{name}_{k}": v for k, v in enumerate(value)})
            else:
                values[f"{prefix}{name}"] = value[0]
    return values


# A column of uot_values: [<module path>.]uot_<name>[_<k>]. Logs of an earlier version put the module path
# after the prefix (uot_<module path>_<name>).
_COLUMN = re.compile(r"(?:(?P<path>.+)\.)?uot_(?P<module>.*?)(?P<name>" + "|".join(PARAMETERS) +
                     r")(?:_(?P<k>\d+))?")


def uot_columns(columns: Sequence[str]) -> dict[str, dict[Optional[int], str]]:
    """The columns of :func:`uot_values` among ``columns``, grouped as ``{name: {k or None: column}}``.

    ``name`` is the parameter's name (``eps``), prefixed by the layer's module path where a model has several UOT
    layers (``convs.0.aggr.eps``); ``k`` is the iteration of a per-iteration value and ``None`` for a single
    value. Other columns are ignored; one that starts with ``uot_`` but names no parameter of
    :data:`uotp_geometric.plot.PARAMETERS` is kept under the rest of its name.
    """
    groups: dict[str, dict[Optional[int], str]] = {}
    for column in columns:
        match = _COLUMN.fullmatch(column)
        if match is not None:
            module = (match["path"] or match["module"]).strip("._/-")
            name, k = f"{module}.{match['name']}".lstrip("."), None if match["k"] is None else int(match["k"])
        elif column.startswith("uot_"):
            name, k = column[len("uot_"):], None
        else:
            continue
        groups.setdefault(name, {})[k] = column
    return groups


def _git(*args: str) -> Optional[str]:
    try:
        return subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def git_commit() -> Optional[str]:
    """The commit checked out where this file lives, or ``None`` outside a git checkout."""
    return _git("rev-parse", "HEAD")


def git_dirty() -> Optional[bool]:
    """Whether the checkout where this file lives has changes not committed (untracked files included, as the
    benchmark's ``tree dirty``), so that ``results.json`` says when its commit alone does not give its code;
    ``None`` outside a git checkout."""
    status = _git("status", "--porcelain")
    return None if status is None else bool(status)
