r"""The functional interface of UOT-Pooling: argument checks, priors, and dispatch to a solver.

For every set :math:`b` of a ragged batch, with features :math:`X_b \in \mathbb{R}^{N_b \times D}`, the
plan is

.. math::
    T_b^\star = \operatorname*{argmin}_{T \geq 0} \; -\langle X_b, T \rangle
    + \varepsilon \sum T (\log T - 1)
    + \lambda_p \operatorname{KL}(T^\top \mathbf{1} \,\|\, p_b)
    + \lambda_q \operatorname{KL}(T \mathbf{1} \,\|\, q_b)

and the pooled vector is :math:`z_b = D \sum_n x_n \odot T^\star_{b,n}`. Defaults are :math:`p_b =
\mathbf{1}_D / D` and :math:`q_b = \mathbf{1}_{N_b} / N_b`. With ``gw > 0`` the problem gains the structure
term of ROT-Pooling, :math:`-\frac{\gamma}{2} \langle C_N T C_D, T \rangle` (spec §6,
:mod:`uotp_geometric.solvers.rot`).
"""
import math
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch_geometric
from torch import Tensor

from uotp_geometric.segment import (Segments, segment_count, segment_sum,
                                    sorted_segments)
from uotp_geometric.solvers import (badmm_log_plan, rot_badmm_log_plan,
                                    rot_sinkhorn_log_plan, sinkhorn_log_plan,
                                    sinkhorn_pool)
from uotp_geometric.solvers.common import pool_log_plan

__all__ = ['uot_plan', 'uot_pool', 'uot_diagnostics', 'UOTDiagnostics', 'SOLVERS']

SOLVERS = ('sinkhorn', 'badmm', 'badmm_q')
Value = Union[float, Sequence[float], Tensor]


def _should_validate(t: Tensor) -> bool:
    r"""Whether to run checks that read tensor values: always on the CPU, where they are cheap; on
    an accelerator only inside :obj:`torch_geometric.debug()`, since they cost a host sync."""
    if torch.compiler.is_compiling():
        return False
    return t.device.type == 'cpu' or torch_geometric.is_debug_enabled()


def _check_input(x: Tensor, index: Tensor,
                 dim_size: Optional[int]) -> int:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"'x' must be a floating-point tensor (got "
                        f"{x.dtype if isinstance(x, Tensor) else type(x)})")
    if x.dim() != 2:
        raise ValueError(f"'x' must have shape (num_nodes, num_features) "
                         f"(got shape {tuple(x.shape)})")
    if not isinstance(index, Tensor) or index.dtype != torch.long:
        raise TypeError(f"'index' must be a torch.long tensor (got "
                        f"{index.dtype if isinstance(index, Tensor) else type(index)})")
    if index.dim() != 1 or index.numel() != x.size(0):
        raise ValueError(f"'index' must have shape ({x.size(0)},), one entry "
                         f"per row of 'x' (got shape {tuple(index.shape)})")
    # A NaN in x only spoils its own set's row; asking for it to be an error costs a full pass.
    if torch_geometric.is_debug_enabled() and not torch.isfinite(x).all():
        raise ValueError("'x' holds NaN or infinite values")
    if dim_size is None:
        return int(index.max()) + 1 if index.numel() > 0 else 0
    if dim_size < 0:
        raise ValueError(f"'dim_size' must be non-negative (got {dim_size})")
    if index.numel() > 0 and _should_validate(index):
        low, high = int(index.min()), int(index.max())
        if low < 0 or high >= dim_size:
            raise ValueError(f"'index' holds values in [{low}, {high}], out "
                             f"of range for dim_size={dim_size}")
    return dim_size


def _schedule(name: str, value: Value, num_iters: int, x: Tensor,
              positive: bool = False) -> Tensor:
    r"""Returns :obj:`value` as a tensor of shape ``(num_iters,)``: one value per iteration."""
    out = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    if out.numel() == 1:
        out = out.reshape(()).expand(num_iters)
    elif out.shape != (num_iters, ):
        raise ValueError(f"'{name}' must be a scalar or have shape "
                         f"({num_iters},), one value per iteration (got "
                         f"shape {tuple(out.shape)})")
    if _should_validate(out):
        bad = out.isnan() | (out <= 0 if positive else out < 0)
        if bool(bad.any()):
            bound = 'positive' if positive else 'non-negative'
            raise ValueError(f"'{name}' must be {bound} (got "
                             f"{out.detach().tolist()})")
    return out


def _is_zero(value: Value) -> bool:
    r"""Whether a structure weight is exactly 0 and not learned: then the solvers of spec §1 run
    unchanged (and a Python number costs no host sync)."""
    if isinstance(value, (int, float)):
        return value == 0
    if isinstance(value, Tensor) and value.requires_grad:
        return False
    return not bool(torch.as_tensor(value).ne(0).any())


def _safe_log(t: Tensor) -> Tensor:
    # A zero prior entry means "no mass here"; log(tiny) keeps it finite, so no gradient sees 0 * inf.
    return t.clamp_min(torch.finfo(t.dtype).tiny).log()


def _check_prior(name: str, prior: Tensor, shape: Tuple[int, ...]) -> None:
    if prior.shape != shape:
        raise ValueError(f"'{name}' must have shape {shape} (got "
                         f"{tuple(prior.shape)})")
    if _should_validate(prior) and not bool((prior >= 0).all()):
        raise ValueError(f"'{name}' must be non-negative and not NaN")


def _dim_prior(x: Tensor, num_sets: int, p: Optional[Tensor]) -> Tensor:
    r"""The dimension prior ``p`` as a ``(B, D)`` tensor (default ``1 / D``)."""
    num_dims = x.size(-1)
    if p is None:
        return x.new_full((num_sets, num_dims), 1.0 / num_dims)
    if p.dim() == 1:
        _check_prior('p', p, (num_dims, ))
        p = p.expand(num_sets, num_dims)
    _check_prior('p', p, (num_sets, num_dims))
    return p.to(x.dtype)


def _node_prior(x: Tensor, segments: Segments,
                q: Optional[Tensor]) -> Tensor:
    r"""The node prior ``q`` as an ``(N,)`` tensor (default ``1 / N_b`` in each set)."""
    if q is None:
        count = segment_count(segments, x.dtype).clamp_min(1)
        return segments.gather(count.reciprocal())
    _check_prior('q', q, (x.size(0), ))
    return q.to(x.dtype)


def _run_solver(x: Tensor, index: Tensor, dim_size: Optional[int], solver: str,
                eps: Value, lam_p: Value, lam_q: Value, rho: Value,
                num_iters: int, p: Optional[Tensor], q: Optional[Tensor],
                log_q: Optional[Tensor], memory_efficient: bool,
                gw: Value = 0.0, prox: Value = 1.0, inner_iters: int = 4,
                pool: bool = False, sort_rows: Optional[bool] = None
                ) -> Tuple[Tensor, Tensor, Segments, Optional[Tensor]]:
    r"""Returns the log-plan (with :obj:`pool`, the pooled output instead), the features and sets it
    was solved on, and the row permutation applied to them (``None`` where the rows kept their
    order). :obj:`sort_rows` groups the rows by set and reduces with :func:`torch.segment_reduce`
    (default: on accelerators only, where it is faster; the CPU tests force it to cover that path)."""
    if solver not in SOLVERS:
        raise ValueError(f"Unknown solver '{solver}' (expected one of "
                         f"{list(SOLVERS)})")
    if not isinstance(num_iters, int) or num_iters < 1:
        raise ValueError(f"'num_iters' must be an integer >= 1 (got "
                         f"{num_iters!r})")
    if not isinstance(inner_iters, int) or inner_iters < 1:
        raise ValueError(f"'inner_iters' must be an integer >= 1 (got "
                         f"{inner_iters!r})")
    num_sets = _check_input(x, index, dim_size)
    # Exponentials and log-sum-exps need float32 at least: upcast half inputs, and keep autocast
    # from lowering any op in the solver.
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    segments = Segments(index, num_sets)
    log_p = _safe_log(_dim_prior(x, num_sets, p))
    if log_q is None:
        log_q = _safe_log(_node_prior(x, segments, q))
    elif q is not None:
        raise ValueError("Give the node prior as 'q' or as 'log_q', not both")
    elif log_q.shape != (x.size(0), ):
        raise ValueError(f"'log_q' must have shape ({x.size(0)},), one entry "
                         f"per node (got {tuple(log_q.shape)})")
    else:
        log_q = log_q.to(x.dtype)
    perm = None
    if x.device.type != 'cpu' if sort_rows is None else sort_rows:
        # Rows grouped by set let every reduction run as a segment reduction instead of atomics.
        perm, segments = sorted_segments(index, num_sets)
        x, log_q = x.index_select(0, perm), log_q.index_select(0, perm)
    with torch.autocast(x.device.type, enabled=False):
        out = _solve(x, segments, solver, eps, lam_p, lam_q, rho, num_iters,
                     log_p, log_q, memory_efficient, gw, prox, inner_iters,
                     pool)
    return out, x, segments, perm


def _solve(x: Tensor, segments: Segments, solver: str, eps: Value,
           lam_p: Value, lam_q: Value, rho: Value, num_iters: int,
           log_p: Tensor, log_q: Tensor, memory_efficient: bool,
           gw: Value = 0.0, prox: Value = 1.0, inner_iters: int = 4,
           pool: bool = False) -> Tensor:
    eps_k = _schedule('eps', eps, num_iters, x, positive=solver == 'sinkhorn')
    lam_p_k = _schedule('lam_p', lam_p, num_iters, x)
    lam_q_k = _schedule('lam_q', lam_q, num_iters, x)
    if not _is_zero(gw):
        log_plan = _solve_structured(x, segments, solver, eps_k, lam_p_k,
                                     lam_q_k, rho, num_iters, log_p, log_q,
                                     memory_efficient, gw, prox, inner_iters)
    elif solver == 'sinkhorn' and pool:  # pooled without forming the plan where it can
        return sinkhorn_pool(x, segments, eps_k, lam_p_k, lam_q_k, log_p,
                             log_q, memory_efficient)
    elif solver == 'sinkhorn':
        log_plan = sinkhorn_log_plan(x, segments, eps_k, lam_p_k, lam_q_k,
                                     log_p, log_q, memory_efficient)
    else:
        rho_k = _schedule('rho', rho, num_iters, x, positive=True)
        # Pooled from the solver's last plan where asked: the pooling's backward is then part of its adjoint.
        return badmm_log_plan(x, segments, eps_k, lam_p_k, lam_q_k, rho_k, log_p, log_q,
                              memory_efficient, quadratic=solver == 'badmm_q', pool=pool)
    return pool_log_plan(x, log_plan, segments) if pool else log_plan



def _solve_structured(x: Tensor, segments: Segments, solver: str,
                      eps_k: Tensor, lam_p_k: Tensor, lam_q_k: Tensor,
                      rho: Value, num_iters: int, log_p: Tensor,
                      log_q: Tensor, memory_efficient: bool, gw: Value,
                      prox: Value, inner_iters: int) -> Tensor:
    gw_k = _schedule('gw', gw, num_iters, x)
    if _should_validate(gw_k) and bool(gw_k.isinf().any()):
        raise ValueError(f"'gw' must be finite (got {gw_k.detach().tolist()})")
    if solver == 'sinkhorn':
        prox_k = _schedule('prox', prox, num_iters, x)
        return rot_sinkhorn_log_plan(x, segments, eps_k, lam_p_k, lam_q_k,
                                     gw_k, prox_k, log_p, log_q, inner_iters,
                                     memory_efficient)
    rho_k = _schedule('rho', rho, num_iters, x, positive=True)
    return rot_badmm_log_plan(x, segments, eps_k, lam_p_k, lam_q_k, rho_k,
                              gw_k, log_p, log_q, memory_efficient,
                              quadratic=solver == 'badmm_q')


def uot_plan(
    x: Tensor,
    index: Tensor,
    dim_size: Optional[int] = None,
    *,
    solver: str = 'sinkhorn',
    eps: Value = 1.0,
    lam_p: Value = 1.0,
    lam_q: Value = 1.0,
    rho: Value = 1.0,
    num_iters: int = 4,
    p: Optional[Tensor] = None,
    q: Optional[Tensor] = None,
    log_q: Optional[Tensor] = None,
    memory_efficient: bool = True,
    gw: Value = 0.0,
    prox: Value = 1.0,
    inner_iters: int = 4,
) -> Tensor:
    r"""The UOT plan :math:`T` of every set, stacked as the rows of ``x``.

    Args:
        x (Tensor): Node features of shape ``(N, D)``.
        index (Tensor): The set of each node, shape ``(N,)``; need not be sorted.
        dim_size (int, optional): The number of sets ``B`` (default: ``index.max() + 1``). Sets
            without nodes are allowed.
        solver (str): ``"sinkhorn"`` (spec §2), ``"badmm"`` (Bregman ADMM, spec §3) or
            ``"badmm_q"`` (Bregman ADMM for the quadratic regulariser
            :math:`\frac{\varepsilon}{2} \|T\|_F^2` in place of the entropy, spec §7).
        eps (float or Tensor): Regularisation :math:`\varepsilon`; ``> 0`` for Sinkhorn,
            ``>= 0`` for BADMM and BADMM-Q; ``inf`` is allowed with Sinkhorn.
        lam_p (float or Tensor): :math:`\lambda_p \geq 0`, weight of the dimension marginal;
            ``inf`` makes it hard, ``0`` free.
        lam_q (float or Tensor): :math:`\lambda_q \geq 0`, weight of the node marginal.
        rho (float or Tensor): BADMM step :math:`\rho > 0` (unused by Sinkhorn).
        num_iters (int): The number of iterations ``K``.
        p (Tensor, optional): Dimension prior, shape ``(D,)`` or ``(B, D)`` (default ``1 / D``).
        q (Tensor, optional): Node prior, shape ``(N,)`` (default ``1 / N_b`` in each set).
        log_q (Tensor, optional): The node prior as :math:`\log q`, instead of :obj:`q`: from a
            log-softmax, it keeps gradients finite where :math:`q` underflows.
        memory_efficient (bool): If :obj:`True`, the backward recomputes each iteration's
            ``(N, D)`` work instead of storing it, so training memory hardly grows with ``K``
            (spec §5): Sinkhorn keeps ``O(N D + K (B D + N))``, the BADMMs every
            ``ceil(sqrt(K))``-th state, ``O(sqrt(K) N D)``. :obj:`False` backpropagates
            through the unrolled iterations with plain autograd, which also supports double
            backward.
        gw (float or Tensor): :math:`\gamma \geq 0`, the weight of ROT-Pooling's structure term
            :math:`-\frac{\gamma}{2} \langle C_N T C_D, T \rangle` (spec §6). ``0`` (not learned)
            runs the solvers of spec §1 unchanged; otherwise Sinkhorn becomes proximal Sinkhorn with
            ``K`` outer steps and BADMM (and BADMM-Q) gains the term in its two blocks
            (:mod:`uotp_geometric.solvers.rot`).
        prox (float or Tensor): Proximal weight :math:`\tau \geq 0` of proximal Sinkhorn (used only
            with ``gw`` and Sinkhorn).
        inner_iters (int): Sinkhorn iterations ``J`` per outer step of proximal Sinkhorn (used only
            with ``gw``).

    Each of ``eps``, ``lam_p``, ``lam_q``, ``rho``, ``gw`` and ``prox`` is a scalar or a tensor of
    shape ``(K,)`` (one value per iteration), and may require grad.

    Returns:
        Tensor: The plan, shape ``(N, D)``.
    """
    log_plan, _, _, perm = _run_solver(x, index, dim_size, solver, eps, lam_p,
                                       lam_q, rho, num_iters, p, q, log_q,
                                       memory_efficient, gw, prox, inner_iters)
    return _unpermute(log_plan, perm).exp()


def _unpermute(rows: Tensor, perm: Optional[Tensor]) -> Tensor:
    r"""The rows of a solve in the order of the input (:func:`_run_solver` may have grouped them)."""
    if perm is None:
        return rows
    inverse = torch.empty_like(perm).scatter_(
        0, perm, torch.arange(perm.numel(), device=perm.device))
    return rows.index_select(0, inverse)


def uot_pool(
    x: Tensor,
    index: Tensor,
    dim_size: Optional[int] = None,
    *,
    solver: str = 'sinkhorn',
    eps: Value = 1.0,
    lam_p: Value = 1.0,
    lam_q: Value = 1.0,
    rho: Value = 1.0,
    num_iters: int = 4,
    p: Optional[Tensor] = None,
    q: Optional[Tensor] = None,
    log_q: Optional[Tensor] = None,
    memory_efficient: bool = True,
    gw: Value = 0.0,
    prox: Value = 1.0,
    inner_iters: int = 4,
) -> Tensor:
    r"""UOT-Pooling: :math:`z_b = D \sum_{n \in b} x_n \odot T_n` for every set, shape ``(B, D)``.

    Takes the arguments of :func:`uot_plan`. An empty set gives a zero row.
    """
    out, _, _, _ = _run_solver(x, index, dim_size, solver, eps, lam_p, lam_q,
                               rho, num_iters, p, q, log_q, memory_efficient,
                               gw, prox, inner_iters, pool=True)
    return out


class UOTDiagnostics(NamedTuple):
    r"""Per-set convergence diagnostics of a plan, each of shape ``(B,)``."""
    mass: Tensor  #: total mass of the plan, :math:`\sum T`
    dim_marginal_error: Tensor  #: :math:`\|T^\top \mathbf{1} - p\|_1`
    node_marginal_error: Tensor  #: :math:`\|T \mathbf{1} - q\|_1`


def uot_diagnostics(plan: Tensor, index: Tensor,
                    dim_size: Optional[int] = None, *,
                    p: Optional[Tensor] = None,
                    q: Optional[Tensor] = None) -> UOTDiagnostics:
    r"""Measures how far each set's plan is from its priors.

    A hard marginal (``lam = inf``) should give an error near 0 once the solver has converged; a soft
    one deviates by design, by an amount that shrinks as its ``lam`` grows.
    """
    segments = Segments(index, _check_input(plan, index, dim_size))
    p = _dim_prior(plan, segments.num_sets, p)
    q = _node_prior(plan, segments, q)
    dim_marginal = segment_sum(plan, segments)
    node_error = (plan.sum(dim=-1) - q).abs()
    return UOTDiagnostics(
        mass=dim_marginal.sum(dim=-1),
        dim_marginal_error=(dim_marginal - p).abs().sum(dim=-1),
        node_marginal_error=segment_sum(node_error, segments),
    )
