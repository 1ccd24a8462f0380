"""Every script in examples/ runs as it is, on the bundled MUTAG data, in under a minute of CPU time."""
import resource
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

