"""The README says what is true: its snippets run, its numbers come from committed results, its links resolve."""
import dataclasses
import inspect
import json
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
WORDS = " ".join(README.split())  # the prose with its line breaks undone
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks(language: str, text: str = README) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", text, flags=re.M | re.S)


def test_every_python_snippet_runs(tmp_path, monkeypatch, capsys):
    # In order and in one namespace, as a reader pasting them into one session would; in a temporary folder, since
    # the pictures are written to the current one.
    snippets = blocks("python")
    assert len(snippets) >= 5
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for i, code in enumerate(snippets):
        exec(compile(code, f"README.md python block {i + 1}", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "True" in printed and "False" not in printed  # the preset check prints True
    assert (tmp_path / "plan.png").stat().st_size > 0 and (tmp_path / "parameters.png").stat().st_size > 0


def test_snippets_of_the_docs_pages_run(tmp_path, monkeypatch):
    # Each page's snippets continue the README's quick tour (they use its x, batch and pool).
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for code in blocks("python"):
        exec(code, namespace)
    ran = 0
    for page in PAGES[1:]:
        for i, code in enumerate(blocks("python", page.read_text())):
            exec(compile(code, f"{page.name} python block {i + 1}", "exec"), dict(namespace))
            ran += 1
    assert ran >= 2


def test_defaults_are_the_layers():
    from uotp_geometric import UOTAggregation

    # Stated once: the starting values in the first snippet's comment, the rest in the line after it.
    comment = re.search(r"^pool = UOTAggregation\(\) +# starts at (.*)$", README, flags=re.M).group(1)
    stated = dict(re.findall(r"(\w+)=([^,\s]+)", comment))
    line = re.search(r"^Its other defaults: (.*?)\.(?: |$)", README, flags=re.M | re.S).group(1)
    stated.update(re.findall(r"`(\w+)=([^`]+)`", line))
    assert {"eps", "lam_p", "lam_q", "solver", "num_iters"} <= set(stated)
    signature = inspect.signature(UOTAggregation.__init__).parameters
    for name, text in stated.items():
        value = float(text) if text == "inf" else eval(text)  # noqa: S307 - the README's own literals
        assert signature[name].default == value, f"README says {name}={text}, the layer {signature[name].default!r}"


@pytest.mark.parametrize("protocol", ["tu", "adgcl"])
def test_results_tables_are_what_the_command_prints(protocol, capsys):
    from experiments.table import main

    command = f"python -m experiments.table docs/{protocol}/runs/* --summary"
    assert f"`{command}`" in README or f"`docs/{protocol}/runs/*`" in README
    main([str(path) for path in sorted((ROOT / "docs" / protocol / "runs").glob("*"))] + ["--summary"])
    table = capsys.readouterr().out.strip()
    assert len(table.splitlines()) == 2 + 8  # header, rule, eight datasets
    assert f"\n{table}\n" in README
    assert f"[`docs/{protocol}/table.md`](docs/{protocol}/table.md)" in README


def test_result_settings_are_the_runs():
    # "the results below train for 100" epochs, over 10 folds; AD-GCL over 5 seeds.
    tu = [json.loads(p.read_text()) for p in (ROOT / "docs/tu/runs").glob("*/results.json")]
    assert {r["config"]["epochs"] for r in tu} == {100} and "train for 100" in WORDS
    assert {len(r["folds"]) for r in tu} == {10} and "GIN, 10-fold cross-validation, 100 epochs" in WORDS
    adgcl = [json.loads(p.read_text()) for p in (ROOT / "docs/adgcl/runs").glob("*/results.json")]
    assert {len(r["seeds"]) for r in adgcl} == {5} and "linear SVM, 5 seeds" in WORDS


def _main_job() -> list[str]:
    (line,) = [line for line in blocks("bash")[1].splitlines() if "experiments.train" in line]
    words = shlex.split(line.split("&&")[-1])
    return words[words.index("experiments.train") + 1:]


def test_main_job_prints_the_committed_result():
    from experiments.config import RUNTIME_FIELDS, Config, parse_dataclass

    argv = _main_job()
    out = argv[argv.index("--out") + 1]
    recorded = json.loads((ROOT / "docs/main-job" / Path(out).name / "results.json").read_text())
    mean, std = 100 * recorded["mean"], 100 * recorded["std"]
    assert f"MUTAG uot: test accuracy {mean:.2f} ± {std:.2f} over 10 folds" in README
    assert f"-> {out}/results.json" in README
    # The record is of this command with today's defaults: a change of default makes it stale (run it again).
    config = dataclasses.asdict(parse_dataclass(Config, "main job", argv))
    stale = {k: (v, recorded["config"].get(k)) for k, v in config.items()
             if k not in RUNTIME_FIELDS and v != recorded["config"].get(k)}
    assert not stale, f"docs/main-job is stale (now, recorded): {stale}"


def test_two_commands_are_ci():
    ci = (ROOT / ".ci" / "run").read_text()
    (torch,) = [line for line in blocks("bash")[0].splitlines() if line.startswith("pip install torch")]
    (pin,) = [word for word in torch.split() if word.startswith("torch==")]
    assert f"python -m pip install --quiet {pin}\n" in ci  # the README's version (CI's pip has a local CPU wheel)
    assert 'pip install -e ".[dev]" && python -m pytest' in README
    assert ci.rstrip().splitlines()[-1] == "python -m pytest"  # the full suite, as the README's test command


def test_readme_is_a_front_page():
    assert len(README.splitlines()) <= 175
    assert README.count("@article{") == 2 and "2201.09191" in README and "10.1109/TPAMI.2023.3314661" in README


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    text = re.sub(r"^```.*?^```$", "", page.read_text(), flags=re.M | re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        if path:
            assert (page.parent / path).exists(), f"{page.name} links to missing {target}"
        if anchor and (not path or path.endswith(".md")):
            heading = anchor.replace("-", " ")
            linked = (page.parent / path).read_text() if path else page.read_text()
            titles = [re.sub(r"[^\w\s-]", "", t).strip().lower().replace("-", " ")
                      for t in re.findall(r"^#+ (.*)$", linked, flags=re.M)]
            assert heading in titles, f"{page.name} links to missing heading #{anchor}"



def test_slow_marks_name_existing_tests():
    # The quick subset of the README (-m "not slow") leaves out what tests/conftest.py names: a renamed test would
    # silently join it.
    from tests.conftest import SLOW_FILES, SLOW_TESTS

    for path in SLOW_FILES:
        assert (ROOT / path).is_file(), path
    for node in SLOW_TESTS:
        path, name = node.split("::")
        assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), flags=re.M), node
    assert '-m "not slow"' in README
