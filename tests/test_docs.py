"""The API reference builds with the command the README gives, warnings as errors, and documents the public API."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_api_reference_builds_without_warnings(tmp_path):
    out = tmp_path / "html"
    # As the README's command, into a temporary folder; -E: no saved environment, so every docstring is read.
    done = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q", "-b", "html",
                           str(ROOT / "docs" / "api"), str(out)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == ""  # -q leaves only warnings and errors on stderr

    def names(page):
        return (out / page).read_text()

    for page, objects in {"layer.html": ["UOTAggregation", "from_preset"],
                          "functional.html": ["uot_plan", "uot_pool", "uot_diagnostics"],
                          "solvers.html": ["sinkhorn_log_plan", "badmm_log_plan", "rot_sinkhorn_log_plan"],
                          "segment.html": ["segment_logsumexp"], "plot.html": ["plot_plan", "plot_parameters"],
                          "index.html": ["register", "__version__"]}.items():
        for name in objects:
            assert f'<span class="pre">{name}</span>' in names(page), f"{name} missing from {page}"


def test_readme_gives_the_build_command():
    command = "python -m sphinx -W --keep-going -b html docs/api docs/api/_build/html"
    assert command in (ROOT / "README.md").read_text()
    assert command in (ROOT / "docs" / "api" / "conf.py").read_text()


def test_version_is_single_sourced():
    import uotp_geometric
    from setuptools.config.pyprojecttoml import read_configuration

    config = read_configuration(ROOT / "pyproject.toml")
    assert "version" in config["project"]["dynamic"]  # not written twice
    assert config["project"]["version"] == uotp_geometric.__version__
