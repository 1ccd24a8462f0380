import pytest

from uotp_geometric.solvers import badmm


@pytest.fixture(params=['keep', 'recompute'])
def badmm_backward(request, monkeypatch):
    r"""Runs a test through both paths of BADMM's lean backward: keeping every iteration's internals (what
    inputs of test size do) and recomputing them from checkpoints (what large inputs do)."""
    if request.param == 'recompute':
        monkeypatch.setattr(badmm, 'KEEP_BYTES', 0)
    return request.param
