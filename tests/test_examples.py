"""Every script in examples/ runs as it is, on the bundled MUTAG data, in under a minute of CPU time."""
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = {  # script -> the files it writes into the folder given as its argument
    "gin_uot_readout.py": ["gin_uot.pt"],
    "uot_message_passing.py": ["uot_message_passing.json"],
    "plan_picture.py": ["plan.png", "parameters.png"],
}


def _cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def test_every_example_is_tested():
    assert sorted(path.name for path in (REPO / "examples").glob("*.py")) == sorted(EXAMPLES)


@pytest.mark.parametrize("script", sorted(EXAMPLES))
def test_example_runs(script, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    start = _cpu_seconds()
    # From another folder, as a user would; a generous wall-clock limit only guards against a hang on a busy machine.
    result = subprocess.run([sys.executable, str(REPO / "examples" / script), str(out)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    cpu = _cpu_seconds() - start
    assert result.returncode == 0, result.stderr[-2000:]
    assert cpu < 60, f"{script} took {cpu:.0f} s of CPU time"
    for name in EXAMPLES[script]:
        assert (out / name).stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing written beside it
    assert not (REPO / "data/MUTAG/processed").exists()  # nor into the bundled data


def test_without_out_an_example_writes_into_examples_out(tmp_path):
    # A copy of the repository's layout, so that the default folder is made there and not in this checkout.
    (tmp_path / "repo").mkdir()
    shutil.copytree(REPO / "examples", tmp_path / "repo/examples", ignore=shutil.ignore_patterns("out"))
    (tmp_path / "repo/data").symlink_to(REPO / "data")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    result = subprocess.run([sys.executable, str(tmp_path / "repo/examples/gin_uot_readout.py")], cwd=cwd,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "repo/examples/out/gin_uot.pt").stat().st_size > 0
    assert list(cwd.iterdir()) == []


def test_examples_out_is_ignored_by_git():
    ignored = subprocess.run(["git", "check-ignore", "-q", "examples/out/plan.png"], cwd=REPO)
    assert ignored.returncode == 0
