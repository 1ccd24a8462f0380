import pytest
import torch

# Tests that train models or run the harness end to end: marked `slow` here, by file or by node id, so that the test
# files need not change. The full suite (`python -m pytest`) runs them; `python -m pytest -m "not slow"` skips them.
SLOW_FILES = frozenset({
    "tests/test_docs.py",
    "tests/test_examples.py",
    "tests/experiments/test_adgcl.py",
    "tests/experiments/test_bench.py",
    "tests/experiments/test_ogb.py",
    "tests/experiments/test_plot.py",
    "tests/experiments/test_train.py",
})
SLOW_TESTS = frozenset()  # node ids without parameters, e.g. "tests/uotp_geometric/test_numerics.py::test_x"


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
