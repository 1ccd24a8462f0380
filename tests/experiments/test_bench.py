"""The benchmark command: the padded baseline computes our pooling, and a tiny run writes its outputs."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from experiments import bench
from experiments.bench import __main__ as bench_main
from experiments.bench import timing
from uotp_geometric.functional import uot_pool


@pytest.fixture
def one_thread():
    """The machinery is under test, not the speed: one thread keeps it quick on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield 1
    torch.set_num_threads(threads)


@pytest.mark.parametrize("solver", bench.SOLVERS)
def test_padded_matches_flat(solver: str) -> None:
    torch.manual_seed(0)
    sizes = torch.tensor([1, 5, 1, 12, 3, 1, 8])  # singletons, and padding up to 12 in every other set
    index = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)
    x = torch.randn(int(sizes.sum()), 6, dtype=torch.float64, requires_grad=True)
    eps = torch.tensor([0.5, 0.8, 1.3, 0.7], dtype=torch.float64)  # one value per iteration
    kwargs = dict(solver=solver, eps=eps, lam_p=2.0, lam_q=0.5, rho=1.7, num_iters=4)

    ours = uot_pool(x, index, sizes.numel(), **kwargs)
    padded = bench.padded_uot_pool(x, index, sizes.numel(), **kwargs)
    assert ours.abs().max() > 0.1  # a real output, not zeros on both sides
    torch.testing.assert_close(padded, ours, rtol=0, atol=1e-10)

    # The benchmark times the backward of the padded implementation too: its gradient must be ours.
    grad = torch.randn_like(ours)
    (ours_grad,) = torch.autograd.grad(ours, x, grad)
    (padded_grad,) = torch.autograd.grad(padded, x, grad)
    torch.testing.assert_close(padded_grad, ours_grad, rtol=0, atol=1e-10)


def test_padded_module_uses_learned_values() -> None:
    batch = bench.Batch(5, 4)
    x, index = batch.make()
    module = bench.PaddedUOT("badmm", num_iters=3)
    with torch.no_grad():
        module.params.eps_raw.fill_(0.3)
    params = module.params
    expected = uot_pool(x, index, batch.num_sets, solver="badmm", num_iters=3, eps=params.value("eps"),
                        lam_p=params.value("lam_p"), lam_q=params.value("lam_q"), rho=params.value("rho"))
    torch.testing.assert_close(module(x, index, batch.num_sets), expected, rtol=1e-5, atol=1e-5)


def test_batch_sizes() -> None:
    uniform = bench.Batch(64, 30, "uniform").sizes()
    skewed = bench.Batch(2000, 30).sizes()
    assert (uniform == 30).all()
    assert skewed.min() >= 1 and abs(skewed.mean() / 30 - 1) < 0.1  # the stated mean
    assert skewed.max() > 5 * 30  # skewed: padding to the largest set wastes most of the batch


def test_compiled_kernels_are_timed_for_sinkhorn_only() -> None:
    # compile=True is Sinkhorn's only (UOTAggregation refuses it for the BADMMs): no kernels row for them.
    for quick in (True, False):
        assert tuple(bench.make_plan(quick).compile_solvers) == ("sinkhorn",)


def test_compile_failure_is_reported(monkeypatch: pytest.MonkeyPatch, one_thread: int) -> None:
    def broken_compile(*args, **kwargs):
        raise RuntimeError("no C++ compiler\nsecond line")

    monkeypatch.setattr(torch, "compile", broken_compile)
    plan = bench.make_plan(quick=True)
    plan.repeats, plan.warmup = 2, 1
    method = bench.Method("UOT", "sinkhorn", 2, bench.DEFAULT_MODE, compiled=True)
    rows = bench.measure_group("compile", bench.Batch(4, 3), [method.baseline, method], torch.device("cpu"),
                               plan, threads=one_thread)
    eager, compiled = rows
    assert compiled["note"] == "failed: RuntimeError: no C++ compiler"
    assert "fwd_ms" not in compiled and eager["fwd_ms"] > 0


def test_fresh_pages_count_a_new_mapping_once() -> None:
    # 64 MiB is above glibc's largest mmap threshold: a fresh mapping, whose pages fault in when first written.
    before = timing.fresh_pages_mb()
    block = torch.empty(16 * 2 ** 20, dtype=torch.float32)
    block.fill_(1.0)
    first = timing.fresh_pages_mb() - before
    block.fill_(2.0)
    again = timing.fresh_pages_mb() - before - first
    assert 63 <= first <= 80 and again < 1


def test_tiny_run_writes_outputs(tmp_path: Path, one_thread: int) -> None:
    tiny = bench.Batch(6, 5)
    plan = bench.Plan(repeats=2, warmup=1, batches=[tiny, bench.Batch(6, 5, "uniform")], num_iters=(2,),
                      nodes=(40, 80), dims=(8, 16), iters=(1, 2), memory_batches=[],
                      memory_target=bench.Batch(20, 500, "uniform"), memory_iters=(1, 2),
                      memory_solvers=("sinkhorn",), solvers=("sinkhorn",), compile_solvers=("sinkhorn",),
                      module_compile_solvers=(), curve_batch=tiny, compile_batches=[tiny])
    df = bench.run(plan, torch.device("cpu"), threads=one_thread)
    info = bench.machine_info(torch.device("cpu"), "python -m experiments.bench", load_before=0.0)
    bench.write_outputs(df, tmp_path, info, plan)

    timed = df[df.section != "memory"]
    compiled = df.method.str.contains(" compiled")  # Softmax compiled, and ours with compile=True
    assert set(df[compiled].method) == {"SoftmaxAggregation compiled", "UOT sinkhorn K=4 efficient compiled kernels"}
    assert df[compiled].note.str.match(r"compile and warm-up: [0-9.]+ s$").all()
    assert (df[~compiled].note == "").all()  # nothing failed or was skipped
    assert (timed.fwdbwd_fresh_mb >= 0).all()  # measured for every timed row on the CPU
    assert set(timed.section) == {"batch", "scaling N", "scaling D", "scaling K", "compile"}
    for column in ("fwd_ms", "fwdbwd_ms", "fwdbwd_ratio"):
        assert np.isfinite(timed[column]).all() and (timed[column] > 0).all(), column
    assert (timed.fwdbwd_ratio_min <= timed.fwdbwd_ratio).all()
    assert (timed.fwdbwd_ratio <= timed.fwdbwd_ratio_max).all()
    softmax = timed[timed.method == "SoftmaxAggregation"]
    assert (softmax.fwdbwd_ratio == 1).all()  # it is the baseline of its own table
    padded = timed[timed.method.str.startswith("padded")]
    assert len(padded) == 8  # one per table or curve point, each divided by ours at its own K
    assert all(row.baseline == bench.Method("UOT", "sinkhorn", row.K, bench.DEFAULT_MODE).label
               for row in padded.itertuples())
    memory = df[df.section == "memory"]  # each in a fresh process
    grad_mb = memory.N * memory.D * 4 / 2**20
    assert len(memory) == 2 * len(bench.MODES) * 2  # K = 1, 2 under each allocator setting
    assert list(memory.allocator.unique()) == ["default", "mmap 64 KiB"]
    assert (memory.peak_mb > grad_mb).all()  # at least x.grad
    assert (memory.peak_mb < 100 * grad_mb).all()  # and not the whole process
    assert (memory[memory.K == 1].peak_ratio == 1).all()
    for row in memory[memory.K == 2].itertuples():  # divided by K = 1 under the same allocator setting
        base = memory[(memory.K == 1) & (memory.allocator == row.allocator) & (memory.method == row.baseline)]
        assert row.peak_ratio == pytest.approx(row.peak_mb / base.peak_mb.item())

    saved = pd.read_csv(tmp_path / "results.csv")
    assert list(saved.columns) == bench.COLUMNS and len(saved) == len(df)
    readme = (tmp_path / "README.md").read_text()
    for text in ("## Headline", "## Batches", "## Memory", "## Scaling in N", "python -m experiments.bench",
                 "SoftmaxAggregation", "| --- |"):
        assert text in readme, text
    for name in ("scaling_N.png", "scaling_D.png", "scaling_K.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")
    np.testing.assert_allclose(saved.fwdbwd_ms, df.fwdbwd_ms)


def test_training_section(tmp_path: Path, one_thread: int) -> None:
    repo = Path(__file__).resolve().parents[2]
    plan = bench.TrainingPlan(config=str(repo / "configs/tu/mutag.yaml"), root=str(repo / "data"),
                              cache=str(tmp_path / "cache"), epochs=2, warmup=0, threads=one_thread,
                              poolings=("mean", "uot", "uot_badmm", "uot[num_iters=2, prior=power]"))
    rows = bench.measure_training(plan)
    assert [row["method"] for row in rows] == list(plan.poolings)
    assert rows[0]["epoch_ratio"] == 1 and all(row["epoch_s"] > 0 for row in rows)
    assert [row["solver"] for row in rows] == ["", "sinkhorn", "badmm", "sinkhorn"]
    assert rows[-1]["K"] == 2
    df = pd.DataFrame(rows, columns=bench.COLUMNS)
    table = bench.headline(df)
    assert list(table.measured) == [rows[1]["epoch_ratio"], rows[2]["epoch_ratio"]]


def test_training_poolings_are_chosen_on_the_command_line(monkeypatch, tmp_path: Path) -> None:
    plans = []
    monkeypatch.setattr(bench_main, "run", lambda plan, device, threads: plans.append(plan) or pd.DataFrame())
    monkeypatch.setattr(bench_main, "write_outputs", lambda *args: None)
    bench_main.main(["--quick", "--training", "--training-poolings", "add", "gmt", "rot", "uot[prior=power]",
                     "--out", str(tmp_path)])
    assert plans[0].training.poolings == ("add", "gmt", "rot", "uot[prior=power]")
    for wrong in ("median", "uot[prior=power", "add[prior=power]", "uot[temperature=2]"):
        with pytest.raises(SystemExit):
            bench_main.main(["--quick", "--training", "--training-poolings", wrong, "--out", str(tmp_path)])


def test_machine_info_names_the_allocator_settings(monkeypatch) -> None:
    for name in bench.report.ALLOCATOR_ENV:
        monkeypatch.delenv(name, raising=False)
    info = bench.machine_info(torch.device("cpu"), "python -m experiments.bench", load_before=0.0)
    assert info["memory allocator"].startswith("the C library's defaults")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "268435456")
    info = bench.machine_info(torch.device("cpu"), "python -m experiments.bench", load_before=0.0)
    assert info["memory allocator"] == "MALLOC_TRIM_THRESHOLD_=268435456"


def test_memory_headline_per_allocator() -> None:
    rows = []
    for allocator, scale in (("default", 3.0), ("mmap 64 KiB", 1.0)):
        for solver, k, peak in (("sinkhorn", 4, 100.0), ("sinkhorn", 32, 110.0), ("badmm", 4, 150.0),
                                ("badmm", 32, 240.0)):
            rows.append(dict(section="memory", method=f"UOT {solver} K={k} efficient", solver=solver, K=k,
                             memory_efficient=True, allocator=allocator, N=100, D=8, B=2, peak_mb=scale * peak,
                             peak_ratio=peak / {"sinkhorn": 100.0, "badmm": 150.0}[solver]))
    table = bench.headline(pd.DataFrame(rows, columns=bench.COLUMNS)).set_index("quantity")
    across = table[table.index.str.startswith("peak memory badmm / sinkhorn")]
    assert list(across.measured) == [1.5, 1.5]
    assert list(across["target (issue)"]) == ["<= 2 (26)", "none"]  # the target is for the default allocator
    k_rows = table[table.index.str.contains("K=32 / K=4, UOT badmm")]
    assert list(k_rows.measured) == [1.6, 1.6] and k_rows.index[0].endswith("allocator: default")
