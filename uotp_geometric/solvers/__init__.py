r"""Solvers of the unbalanced OT problem of UOT-Pooling, as pure functions on the flat ragged layout."""
from uotp_geometric.solvers.badmm import (BADMMCoefficients, BADMMProblem, badmm_coefficients, badmm_log_plan,
                                          badmm_step)
from uotp_geometric.solvers.rot import rot_badmm_log_plan, rot_sinkhorn_log_plan
from uotp_geometric.solvers.sinkhorn import sinkhorn_log_plan, sinkhorn_pool, sinkhorn_step

__all__ = ['sinkhorn_step', 'sinkhorn_log_plan', 'sinkhorn_pool', 'badmm_step', 'badmm_coefficients', 'badmm_log_plan',
           'BADMMCoefficients', 'BADMMProblem',
           'rot_sinkhorn_log_plan', 'rot_badmm_log_plan']
