import pytest
import torch

# Tests that train models, run the harness end to end or take long otherwise: marked `slow` here, by file or by node
# id, so that the test files need not change (tests/test_readme.py checks that each one named here exists). The full suite (`python -m pytest`) runs them; `python -m pytest -m "not slow"` skips them.
SLOW_FILES = frozenset({
    "tests/test_examples.py",
    "tests/experiments/test_adgcl.py",
    "tests/experiments/test_bench.py",
    "tests/experiments/test_ogb.py",
    "tests/experiments/test_plot.py",
    "tests/experiments/test_train.py",
})
SLOW_TESTS = frozenset({  # node ids without their parameters
    "tests/test_docs.py::test_api_reference_builds_without_warnings",  # a whole Sphinx build
    "tests/uotp_geometric/solvers/test_badmm.py::test_matches_pot",  # 20000 BADMM iterations per case
    "tests/uotp_geometric/test_numerics.py::test_fuzz",
    "tests/uotp_geometric/solvers/test_badmm_q.py::test_converges_to_pot",  # 2000 iterations and POT's L-BFGS-B
    "tests/uotp_geometric/solvers/test_badmm_q.py::test_fuzz_stays_finite",
    # compiles log-domain Sinkhorn's kernels (up to half a minute, cold)
    "tests/uotp_geometric/test_compile.py::test_compiled_log_domain_matches_eager",
    "tests/uotp_geometric/test_compile.py::test_rows_grouped_by_set",  # the kernels' segment_reduce variant
    "tests/uotp_geometric/test_compile.py::test_compiled_plan_matches_eager",  # the scaling kernels, if run alone
})


def pytest_collection_modifyitems(config, items):
    slow = pytest.mark.slow
    for item in items:
        path = item.nodeid.split("::")[0]
        if path in SLOW_FILES or item.nodeid.split("[")[0] in SLOW_TESTS:
            item.add_marker(slow)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason='needs a CUDA device')
    for item in items:
        if 'gpu' in item.keywords:
            item.add_marker(skip)
