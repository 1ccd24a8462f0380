"""The authors' layers in the benchmark, on a fake checkout with their layout (their code is not needed)."""
import sys
from pathlib import Path
from textwrap import dedent

import numpy as np
import pandas as pd
import pytest
import torch

from experiments import bench
from experiments.bench import __main__ as bench_main
from experiments.bench import authors
from experiments.bench.timing import forward_backward
from tests.experiments.test_bench import one_thread  # noqa: F401 - a fixture

# Their layout: pooling/rotpooling.py imports pooling/rotlayers.py by the package's name, and the package's
# __init__ imports plotting and scatter helpers the layer does not need (here: a module that does not exist).
ROTLAYERS = '''
import torch


class UOT(torch.nn.Module):
    def __init__(self, num=4, eps=1e-8, f_method="badmm-e"):
        super().__init__()
        self.num, self.f_method = num, f_method

    def forward(self, x, p0, q0, a1, a2, a3, rho, mask):
        return q0 * p0 * mask * a1.sum()  # (B, M, D): a plan with a learned factor
'''
ROTPOOLING = '''
import torch
from torch_geometric.utils import to_dense_batch
from pooling.rotlayers import UOT


class UOTPooling(torch.nn.Module):
    def __init__(self, dim, a1=None, a2=None, a3=None, rho=None, num=4, eps=1e-8, f_method="badmm-e",
                 p0="fixed", q0="fixed", same_para=False):
        super().__init__()
        self.dim, self.num = dim, num
        self.a1 = torch.nn.Parameter(0.1 * torch.randn(num))
        self.uot = UOT(num=num, eps=eps, f_method=f_method)

    def forward(self, x, batch):
        x, mask = to_dense_batch(x, batch)
        mask = mask.unsqueeze(2).to(x.dtype)
        q0 = mask / mask.sum(1, keepdim=True)
        p0 = torch.ones_like(x[:, :1, :]) / self.dim
        trans = self.uot(x, p0, q0, self.a1, self.a1, self.a1, self.a1, mask)
        return (self.dim * x * trans * mask).sum(1)
'''


def fake_checkout(root: Path, rotpooling: str = ROTPOOLING) -> Path:
    package = root / "pooling"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("import a_plotting_package_we_lack\nfrom .rotpooling import *\n")
    (package / "rotlayers.py").write_text(dedent(ROTLAYERS))
    (package / "rotpooling.py").write_text(dedent(rotpooling))
    return root


def test_loader_builds_their_layer(tmp_path: Path) -> None:
    code = fake_checkout(tmp_path / "ROT-Pooling")
    sys.modules["pooling"] = other = type(sys)("pooling")  # someone else's package of that name
    try:
        module = bench.AuthorsMethod(solver="badmm", num_iters=4, code=str(code)).build(8, torch.device("cpu"))
        assert sys.modules["pooling"] is other  # set back after the import
    finally:
        del sys.modules["pooling"]
    assert type(module.layer).__name__ == "UOTPooling" and module.layer.num == 4
    assert module.layer.uot.f_method == "badmm-e"
    assert not any(name.startswith("pooling.") for name in sys.modules)

    batch = bench.Batch(5, 4, "uniform", dim=8)
    x, index = batch.make()
    out = module(x, index, batch.num_sets)
    torch.testing.assert_close(out, module.layer.a1.sum() * x.view(5, 4, 8).mean(1))
    forward_backward(module, x.requires_grad_(), index, batch.num_sets)  # as the benchmark calls it
    assert module.layer.a1.grad is not None and x.grad is not None

    again = bench.AuthorsMethod(solver="sinkhorn", num_iters=4, code=str(code)).build(8, torch.device("cpu"))
    torch.testing.assert_close(again.layer.a1, module.layer.a1)  # their random start, the same every time
    assert again.layer.uot.f_method == "sinkhorn"
    with pytest.raises(ValueError, match="pooled 5 sets, not 6"):
        module(x, index, 6)


def test_missing_or_broken_checkout(tmp_path: Path, one_thread: int) -> None:
    with pytest.raises(bench.AuthorsCodeError, match=r"not a checkout of .*ROT-Pooling: pooling/rotlayers.py"):
        authors.load_rotpooling(tmp_path / "missing")
    broken = fake_checkout(tmp_path / "broken", "import torch_scatter_of_another_age\n")
    with pytest.raises(bench.AuthorsCodeError, match="ModuleNotFoundError: No module named 'torch_scatter_of"):
        authors.load_rotpooling(broken)

    # In the suite, the rows of a checkout that does not import carry the reason; ours are still timed.
    plan = bench.make_plan(quick=True)
    plan.repeats, plan.warmup = 2, 1
    rows = bench.measure_group("authors", bench.Batch(4, 3), bench.AuthorsPlan(str(broken)).methods(),
                               torch.device("cpu"), plan, threads=one_thread)
    theirs = [row for row in rows if row["method"].startswith("authors'")]
    assert len(theirs) == 2 and all(row["note"].startswith("failed: AuthorsCodeError: importing") for row in theirs)
    assert all("fwd_ms" not in row for row in theirs)
    assert all(row["fwd_ms"] > 0 for row in rows if row not in theirs)
    table = bench.headline(pd.DataFrame(rows, columns=bench.COLUMNS))
    assert table["range over repeats"].str.startswith("failed: AuthorsCodeError").all()

    with pytest.raises(SystemExit):  # on the command line, a wrong path stops the run before it starts
        bench_main.main(["--quick", "--authors-code", str(tmp_path / "missing"), "--out", str(tmp_path)])


def _tiny_plan(**kwargs) -> bench.Plan:
    return bench.Plan(repeats=2, warmup=1, batches=[], num_iters=(4,), nodes=(), dims=(), iters=(),
                      memory_batches=[], memory_solvers=(), compile_solvers=(), compile_batches=[], **kwargs)


def test_suite_rows_and_headline(tmp_path: Path, one_thread: int) -> None:
    code = fake_checkout(tmp_path / "ROT-Pooling")
    target = authors.TARGET_BATCH
    plan = _tiny_plan(authors=bench.AuthorsPlan(str(code), batches=[target, bench.Batch(6, 5)]))
    df = bench.run(plan, torch.device("cpu"), threads=one_thread)

    assert set(df.section) == {"authors"} and (df.note == "").all()
    theirs = df[df.method.str.startswith("authors'")]
    assert list(theirs.method.unique()) == ["authors' UOTPooling badmm-e K=4", "authors' UOTPooling sinkhorn K=4"]
    assert list(theirs.baseline.unique()) == ["UOT badmm K=4 efficient", "UOT sinkhorn K=4 efficient"]
    assert set(df.method) == set(theirs.method) | set(theirs.baseline)  # each beside its own baseline
    assert np.isfinite(theirs.fwdbwd_ratio).all() and (theirs.fwdbwd_ratio > 0).all()
    assert (theirs.fwdbwd_ratio_min <= theirs.fwdbwd_ratio).all()
    assert (theirs.fwdbwd_ratio <= theirs.fwdbwd_ratio_max).all()

    table = bench.headline(df).set_index("quantity")
    row = table.loc["authors' BADMM-E / ours (badmm K=4), fwd+bwd, B=128 mean=30 uniform D=64"]
    assert row["target (issue)"] == ">= 2 (26)"
    assert row.measured == theirs[(theirs.config == target.name) & (theirs.solver == "badmm")].fwdbwd_ratio.item()
    assert table.loc["authors' BADMM-E / ours (badmm K=4), fwd+bwd, B=6 mean=5 lognormal D=64",
                     "target (issue)"] == "none"

    bench.write_outputs(df, tmp_path / "with", bench.machine_info(torch.device("cpu"), "bench", 0.0), plan)
    readme = (tmp_path / "with" / "README.md").read_text()
    assert "## Against the authors' layers" in readme and "### B=128 mean=30 uniform D=64: N=3840" in readme
    assert "| authors' UOTPooling badmm-e K=4 |" in readme
    assert f"Their code: `{code}`, commit unknown (not a git checkout)." in readme

    without = _tiny_plan()
    df = bench.run(without, torch.device("cpu"), threads=one_thread)
    bench.write_outputs(df, tmp_path / "without", bench.machine_info(torch.device("cpu"), "bench", 0.0), without)
    readme = (tmp_path / "without" / "README.md").read_text()
    assert "Not measured in this run: add `--authors-code DIR`" in readme
    assert "| authors' BADMM-E /" not in readme and "### B=128" not in readme


def test_command_line_option(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    plans = []
    monkeypatch.setattr(bench_main, "run", lambda plan, device, threads: plans.append(plan) or pd.DataFrame())
    monkeypatch.setattr(bench_main, "write_outputs", lambda *args: None)
    code = fake_checkout(tmp_path / "ROT-Pooling")
    bench_main.main(["--quick", "--authors-code", str(code), "--out", str(tmp_path)])
    bench_main.main(["--quick", "--out", str(tmp_path)])
    assert plans[0].authors == bench.AuthorsPlan(str(code.resolve())) and plans[1].authors is None
    assert plans[0].authors.batches == (authors.TARGET_BATCH, *bench.SKEWED)
