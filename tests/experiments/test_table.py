import json

import pytest

from experiments.table import main


def _write(path, **result):
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps(result))
    return path


def test_table_and_plot(tmp_path):
    runs = [
        _write(tmp_path / "a", dataset="MUTAG", pooling="add", mean=0.8512, std=0.0731, seconds_per_epoch=0.03),
        _write(tmp_path / "b", dataset="MUTAG", pooling="uot", mean=0.9004, std=0.05, seconds_per_epoch=0.5),
        _write(tmp_path / "c", dataset="PROTEINS", pooling="uot", mean=0.75, std=0.04),
        _write(tmp_path / "d", dataset="ogbg-molhiv", pooling="add", metric="rocauc", test=0.7712, test_std=0.0123),
        _write(tmp_path / "e", dataset="ogbg-molesol", pooling="uot", metric="rmse", test=1.2341, test_std=0.05),
        _write(tmp_path / "f", dataset="ogbg-molesol", pooling="add", metric="rmse", test=1.5, test_std=None,
               config={"backbone": "gin"}),  # one seed, and a backbone: a row of its own
    ]
    out = tmp_path / "docs" / "tu"
    main([str(run) for run in runs[:2]] + [str(runs[2] / "results.json")] + [str(run) for run in runs[3:]]
         + ["--out", str(out)])
    lines = (tmp_path / "docs" / "tu.md").read_text().splitlines()
    assert lines[0].startswith("Made by `python -m experiments.table ") and lines[0].endswith(f"--out {out}`.")
    assert "| dataset | metric | add | uot |" in lines
    assert "| MUTAG | accuracy | 85.1 ± 7.3 | 90.0 ± 5.0 |" in lines
    assert "| PROTEINS | accuracy |  | 75.0 ± 4.0 |" in lines
    assert "| ogbg-molhiv | rocauc | 77.1 ± 1.2 |  |" in lines
    assert "| ogbg-molesol | rmse |  | 1.234 ± 0.050 |" in lines  # not a percentage
    assert "| ogbg-molesol gin | rmse | 1.500 |  |" in lines
    assert "| MUTAG | 0.03 | 0.50 |" in lines  # seconds per epoch
    assert (tmp_path / "docs" / "tu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_duplicate_runs_are_refused(tmp_path, capsys):
    a = _write(tmp_path / "a", dataset="MUTAG", pooling="add", mean=0.8, std=0.1)
    b = _write(tmp_path / "b", dataset="MUTAG", pooling="add", mean=0.9, std=0.1)
    with pytest.raises(SystemExit):
        main([str(a), str(b), "--out", str(tmp_path / "t")])
    assert "two runs of add on MUTAG" in capsys.readouterr().err
    assert not (tmp_path / "t.md").exists()
