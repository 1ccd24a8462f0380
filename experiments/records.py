"""What a run leaves on disk: files replaced atomically (a killed run never leaves half a file), per-epoch CSV
logs, ``results.json``, and the commit that produced them."""
from __future__ import annotations

import contextlib
import csv
import json
import os
import subprocess
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path to write to; it replaces ``path`` only once the write has finished."""
    tmp = path.with_name(path.name + ".tmp")
    yield tmp
    os.replace(tmp, path)


def write_csv(path: Path, fields: Sequence[str], rows: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)


def write_json(path: Path, value: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(value, indent=2) + "\n")


def git_commit() -> Optional[str]:
    """The commit checked out where this file lives, or ``None`` outside a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
