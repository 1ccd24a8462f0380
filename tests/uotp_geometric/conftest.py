import pytest

from uotp_geometric.solvers import badmm


@pytest.fixture(params=['keep', 'recompute'])
def badmm_backward(request, monkeypatch):
    r"""Runs a test through both paths of BADMM's lean backward, whatever the inputs' size: keeping every
    iteration's internals (what small inputs do) and recomputing them from checkpoints (what large ones do)."""
    monkeypatch.setattr(badmm, 'KEEP_BYTES', 2 ** 62 if request.param == 'keep' else 0)
    return request.param
