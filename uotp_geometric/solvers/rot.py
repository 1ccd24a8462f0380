r"""ROT-Pooling: unbalanced OT with the structure term of the journal version (spec §6), over a ragged
batch of sets.

For one set with features :math:`X \in \mathbb{R}^{N \times D}`, the node and dimension similarities
:math:`C_N = X X^\top / D` and :math:`C_D = X^\top X / N` are each divided by their own largest entry (1 if
it is 0), and the plan solves

.. math::
    \min_{T \geq 0} \; -\langle X, T \rangle - \frac{\gamma}{2} \langle C_N T C_D, T \rangle
    + \varepsilon \sum T (\log T - 1)
    + \lambda_p \operatorname{KL}(T^\top \mathbf{1} \,\|\, p)
    + \lambda_q \operatorname{KL}(T \mathbf{1} \,\|\, q)

with :math:`\gamma \geq 0` (``gw``). The largest entry of a Gram matrix is on its diagonal, so the
normalisers are a segment maximum of squared row norms and the largest segment sum of squares.
:math:`C_N T C_D` is computed per set as :math:`\tilde X \big(\tilde X^\top (T \tilde C_D)\big)`, with
:math:`\tilde X = X / \sqrt{\max_n |x_n|^2}` and the ``D x D`` matrix :math:`\tilde C_D`: ``O(N D^2)`` work,
never an ``N x N`` matrix. The per-set products run as batched matrix products over buckets of sets of
similar size (:class:`~uotp_geometric.solvers.structure.SetBlocks`), so no batch is padded to its largest set.
"""
from torch import Tensor

from uotp_geometric.segment import Segments
from uotp_geometric.solvers.badmm import badmm_log_plan
from uotp_geometric.solvers.sinkhorn import sinkhorn_log_plan
from uotp_geometric.solvers.structure import structure, structure_product


def rot_sinkhorn_log_plan(
    x: Tensor,
    segments: Segments,
    eps: Tensor,
    lam_p: Tensor,
    lam_q: Tensor,
    gw: Tensor,
    prox: Tensor,
    log_p: Tensor,
    log_q: Tensor,
    inner_iters: int = 4,
    memory_efficient: bool = True,
    compile: bool = False,
) -> Tensor:
    r"""Solves, for every set of the batch, the ROT problem of this module by proximal Sinkhorn:
    ``K = eps.numel()`` outer steps from :math:`T_0 = q p^\top`, each

    .. math::
        X'_m = X + \gamma_m C_N T_{m-1} C_D + \tau_m \log T_{m-1}, \qquad
        T_m = \text{Sinkhorn}^{J}\big(X'_m;\; \varepsilon_m + \tau_m, \lambda_{p,m}, \lambda_{q,m}\big)

    where :math:`\text{Sinkhorn}^J` is :func:`~uotp_geometric.solvers.sinkhorn_log_plan` run for
    :obj:`inner_iters` ``= J`` iterations from ``u = v = 0`` (spec §2; the proximal term
    :math:`\tau \operatorname{KL}(T \| T_{m-1})` is folded into the score and the entropy). Returns
    :math:`\log T_K` of shape ``(N, D)``. With :math:`\gamma = \tau = 0` every outer step solves the
    problem of spec §1, so :math:`T_K` is that of ``J`` Sinkhorn iterations.

    ``eps``, ``lam_p``, ``lam_q``, ``gw`` (:math:`\gamma \geq 0`) and ``prox`` (:math:`\tau \geq 0`) are
    1-D tensors of length ``K``; outer step ``m`` uses entry ``m`` in all its inner iterations. With
    :obj:`memory_efficient`, the inner iterations use the lean backward of the Sinkhorn solver, and the
    outer steps keep ``O(N D)`` each. With :obj:`compile`, the inner iterations run as compiled kernels
    (:func:`~uotp_geometric.solvers.sinkhorn_log_plan`); the outer steps' structure products stay eager.
    """
    st = structure(x, segments)
    log_t = log_q.unsqueeze(-1) + segments.gather(log_p)
    for m in range(eps.numel()):
        score = x + gw[m] * structure_product(st, log_t.exp()) + prox[m] * log_t
        inner = [value.expand(inner_iters) for value in (eps[m] + prox[m], lam_p[m], lam_q[m])]
        log_t = sinkhorn_log_plan(score, segments, *inner, log_p, log_q, memory_efficient, compile)
    return log_t


def rot_badmm_log_plan(
    x: Tensor,
    segments: Segments,
    eps: Tensor,
    lam_p: Tensor,
    lam_q: Tensor,
    rho: Tensor,
    gw: Tensor,
    log_p: Tensor,
    log_q: Tensor,
    memory_efficient: bool = True,
    quadratic: bool = False,
) -> Tensor:
    r"""Solves, for every set of the batch, the ROT problem of this module by Bregman ADMM with the
    quadratic term split bilinearly between the blocks, :math:`-\frac{\gamma}{2}\langle C_N T C_D, S
    \rangle`: :func:`~uotp_geometric.solvers.badmm_log_plan` with the extra scores

    .. math::
        G = \log S + \big(X + \tfrac{\gamma_k}{2} C_N S C_D - Z\big) / \rho, \qquad
        H = \big(Z + \tfrac{\gamma_k}{2} C_N T C_D + \rho \log T\big) / (\varepsilon + \rho)

    in its two blocks (the rest of each iteration unchanged). With :obj:`quadratic`, the entropy is
    replaced by :math:`\frac{\varepsilon}{2} \|T\|_F^2`, split in the same way (BADMM-Q, spec §7).
    Returns :math:`\log S` of shape ``(N, D)``. ``gw`` is a 1-D tensor of length ``K``, like the other
    values.
    """
    return badmm_log_plan(x, segments, eps, lam_p, lam_q, rho, log_p, log_q, memory_efficient,
                          structure(x, segments), gw, quadratic)
