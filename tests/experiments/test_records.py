import json
import re

import pytest

from experiments.records import atomic_path, git_commit, write_csv, write_json


def test_atomic_path_keeps_the_old_file_when_a_write_fails(tmp_path):
    path = tmp_path / "results.json"
    write_json(path, {"mean": 0.5})
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text('{"mea')  # killed halfway
            raise RuntimeError
    assert json.loads(path.read_text()) == {"mean": 0.5}


def test_write_csv_replaces_the_log(tmp_path):
    path = tmp_path / "seed0.csv"
    write_csv(path, ["epoch", "loss"], [dict(epoch=1, loss=0.5)])
    write_csv(path, ["epoch", "loss"], [dict(epoch=1, loss=0.5), dict(epoch=2, loss=0.25)])
    assert path.read_text().splitlines() == ["epoch,loss", "1,0.5", "2,0.25"]
    assert not list(tmp_path.glob("*.tmp"))


def test_git_commit_names_this_checkout():
    commit = git_commit()
    assert commit is None or re.fullmatch(r"[0-9a-f]{40}", commit)
