"""The design study's selection rule reads validation scores only."""
import json

import pytest

from experiments.design import choose, main

INF = float("inf")


def _write(root, name, dataset, pooling, prior, val, test, adgcl=False):
    run = root / name
    run.mkdir()
    config = dict(uot_prior=prior, num_iters=4, uot_lam_p=INF)
    if adgcl:
        units = dict(protocol="adgcl", seeds=[dict(seed=s, val_acc=v, test_acc=t) for s, (v, t) in
                                              enumerate(zip(val, test))])
    else:
        units = dict(folds=[dict(fold=f, val_acc=v, test_acc=t, best_epoch=1) for f, (v, t) in
                            enumerate(zip(val, test))])
    (run / "results.json").write_text(json.dumps(dict(dataset=dataset, pooling=pooling, config=config, **units)))


def test_choice_follows_validation_not_test(tmp_path):
    # "power" is better on validation in both cells, "uniform" on test: the rule picks "power".
    _write(tmp_path, "a", "P", "uot", "uniform", [0.6, 0.6, 0.6], [0.9, 0.9, 0.9])
    _write(tmp_path, "b", "P", "uot", "power", [0.7, 0.7, 0.7], [0.5, 0.5, 0.5])
    _write(tmp_path, "c", "P", "uot", "uniform", [0.5, 0.5, 0.5, 0.5], [0.9, 0.9, 0.9, 0.9], adgcl=True)
    _write(tmp_path, "d", "P", "uot", "power", [0.8, 0.4, 0.9, 0.1], [0.1, 0.1, 0.1, 0.1], adgcl=True)
    _write(tmp_path, "e", "P", "add", "uniform", [0.99] * 3, [0.99] * 3)  # a reference: never chosen
    main([str(tmp_path), "--out", str(tmp_path / "out"), "--seeds", "0", "1", "2"])
    text = (tmp_path / "out" / "design.md").read_text()
    assert "**Chosen by the rule: `uot[prior=power]`**" in text
    # AD-GCL averages seeds 0-2 only: (0.8 + 0.4 + 0.9) / 3 = 70.00, seed 3 left out.
    assert "| uot[prior=power] | 70.00 | 70.00 | 1.00 |" in text
    assert "| add | | 99.00 | reference, not ranked |".replace("| |", "| – |") in text


def test_ties_go_to_the_smaller_worst_gap_then_the_cost():
    table = {"x": {"c1": 0.9, "c2": 0.5}, "y": {"c1": 0.5, "c2": 0.9}, "z": {"c1": 0.8, "c2": 0.8}}
    cost = {"x": (False, 3), "y": (False, 2), "z": (True, 9)}
    chosen, average, gap = choose(table, ["c1", "c2"], cost)
    assert average == {"x": 2.0, "y": 2.0, "z": 2.0}
    assert chosen == "z" and gap["z"] == pytest.approx(-0.1)  # equal ranks: z is never far from the best
    table["z"] = {"c1": 0.5, "c2": 0.9}
    assert choose(table, ["c1", "c2"], cost)[0] == "y"  # all tie on rank and gap; y is the cheapest


def test_nothing_is_chosen_while_a_variant_lacks_a_cell(tmp_path):
    _write(tmp_path, "a", "P", "uot", "uniform", [0.6], [0.9])
    _write(tmp_path, "b", "P", "uot", "power", [0.7], [0.5])
    _write(tmp_path, "c", "Q", "uot", "uniform", [0.6], [0.9])
    main([str(tmp_path), "--out", str(tmp_path)])
    text = (tmp_path / "design.md").read_text()
    assert "Chosen" not in text and "missing cells: uot[prior=power]" in text
    assert "| uot[prior=power] | 70.00 | – | incomplete |" in text
