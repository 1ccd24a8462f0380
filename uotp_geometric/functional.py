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
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch_geometric
from torch import Tensor

from uotp_geometric.segment import (Segments, infer_num_sets, segment_count, segment_sum,
                                    sorted_segments)
from uotp_geometric.solvers import (badmm_log_plan, rot_badmm_log_plan,
                                    rot_sinkhorn_log_plan, sinkhorn_log_plan,
                                    sinkhorn_pool)
from uotp_geometric.solvers.common import pool_log_plan

__all__ = ['uot_plan', 'uot_pool', 'uot_diagnostics', 'UOTDiagnostics', 'SolverOptions', 'SOLVERS']

SOLVERS = ('sinkhorn', 'badmm', 'badmm_q')
# The options that take a number per iteration: a scalar, or a sequence or tensor of shape (num_iters,).
VALUES = ('eps', 'lam_p', 'lam_q', 'rho', 'gw', 'prox')
Value = Union[float, Sequence[float], Tensor]
INF = math.inf



def solve_dtype(dtype: torch.dtype) -> torch.dtype:
    r"""The dtype the solvers run in for inputs of :obj:`dtype`: exponentials and log-sum-exps need
    float32 at least, so half types are raised to float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _should_validate(t: Tensor) -> bool:
    r"""Whether to run checks that read tensor values: always on the CPU, where they are cheap; on
    an accelerator only inside :obj:`torch_geometric.debug()`, since they cost a host sync."""
    if torch.compiler.is_compiling():
        return False
    return t.device.type == 'cpu' or torch_geometric.is_debug_enabled()


@dataclass(frozen=True)
class SolverOptions:
    r"""The options of :func:`uot_plan` and :func:`uot_pool` other than the data and the priors, with
    the same names, meanings and defaults; :class:`~uotp_geometric.UOTAggregation` checks its initial
    values with it too.

    Each of ``eps``, ``lam_p``, ``lam_q``, ``rho``, ``gw`` and ``prox`` is a scalar or a sequence or
    tensor of shape ``(num_iters,)``, one value per iteration.
    """
    solver: str = 'sinkhorn'
    num_iters: int = 4
    eps: Value = 1.0
    lam_p: Value = INF
    lam_q: Value = 1.0
    rho: Value = 1.0
    gw: Value = 0.0
    prox: Value = 1.0
    inner_iters: int = 4
    memory_efficient: bool = True
    compile: bool = False

    def validate(self) -> 'SolverOptions':
        r"""Raises a :class:`ValueError` that names the first bad option; returns the options. The
        entries of tensors on an accelerator are read only inside :obj:`torch_geometric.debug()`."""
        if self.solver not in SOLVERS:
            raise ValueError(f"Unknown solver '{self.solver}' (expected one of {list(SOLVERS)})")
        for name in ('num_iters', 'inner_iters'):
            count = getattr(self, name)
            if not isinstance(count, int) or count < 1:
                raise ValueError(f"'{name}' must be an integer >= 1 (got {count!r})")
        if not isinstance(self.compile, bool):
            raise ValueError(f"'compile' must be a bool (got {self.compile!r})")
        if self.compile and self.solver != 'sinkhorn':
            raise ValueError(f"compile=True is implemented for solver='sinkhorn' only (got solver="
                             f"'{self.solver}'); BADMM's iterations run eager")
        for name in VALUES:
            self._check_value(name)
        return self

    def _check_value(self, name: str) -> None:
        value = getattr(self, name)
        t = value if isinstance(value, Tensor) else torch.as_tensor(value, dtype=torch.float64)
        if t.numel() != 1 and t.shape != (self.num_iters, ):
            raise ValueError(f"'{name}' must be a scalar or have shape ({self.num_iters},), one value "
                             f"per iteration (got shape {tuple(t.shape)})")
        if not _should_validate(t):
            return
        t = t.detach()
        # rho is a step size and Sinkhorn divides by eps; gw = inf would make the structure term the
        # whole objective.
        positive = name == 'rho' or (name == 'eps' and self.solver == 'sinkhorn')
        bad = t.isnan() | (t <= 0 if positive else t < 0)
        if name == 'gw':
            bad |= t.isinf()
        if bool(bad.any()):
            bound = ('positive' if positive else
                     'finite and non-negative' if name == 'gw' else 'non-negative')
            raise ValueError(f"'{name}' must be {bound} for solver='{self.solver}' (got "
                             f"{t.tolist()})")

    def schedule(self, name: str, like: Tensor) -> Tensor:
        r"""The value :obj:`name` as a tensor of shape ``(num_iters,)``, one entry per iteration, in
        the dtype and on the device of :obj:`like` (a scalar is expanded, not copied)."""
        value = torch.as_tensor(getattr(self, name), dtype=like.dtype, device=like.device)
        return value.reshape(-1).expand(self.num_iters)

    def has_structure(self) -> bool:
        r"""Whether the structure term is on: :obj:`gw` is not exactly 0 or is learned. Otherwise the
        solvers of spec §1 run unchanged (and a Python number costs no host sync)."""
        gw = self.gw
        if isinstance(gw, (int, float)):
            return gw != 0
        if isinstance(gw, Tensor) and gw.requires_grad:
            return True
        return bool(torch.as_tensor(gw).ne(0).any())


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
        return infer_num_sets(index)
    if dim_size < 0:
        raise ValueError(f"'dim_size' must be non-negative (got {dim_size})")
    if index.numel() > 0 and _should_validate(index):
        low, high = int(index.min()), int(index.max())
        if low < 0 or high >= dim_size:
            raise ValueError(f"'index' holds values in [{low}, {high}], out "
                             f"of range for dim_size={dim_size}")
    return dim_size


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


def _log_node_prior(x: Tensor, segments: Segments, q: Optional[Tensor],
                    log_q: Optional[Tensor]) -> Tensor:
    r"""The node prior as :math:`\log q`, shape ``(N,)``, from :obj:`q` or :obj:`log_q`."""
    if log_q is None:
        return _safe_log(_node_prior(x, segments, q))
    if q is not None:
        raise ValueError("Give the node prior as 'q' or as 'log_q', not both")
    if log_q.shape != (x.size(0), ):
        raise ValueError(f"'log_q' must have shape ({x.size(0)},), one entry "
                         f"per node (got {tuple(log_q.shape)})")
    return log_q.to(x.dtype)


def _uot(x: Tensor, index: Tensor, dim_size: Optional[int], options: SolverOptions,
         p: Optional[Tensor], q: Optional[Tensor], log_q: Optional[Tensor], pool: bool,
         sort_rows: Optional[bool] = None) -> Tensor:
    r"""The plan (``(N, D)``, rows in the order of :obj:`x`) or, with :obj:`pool`, the pooled output
    (``(B, D)``) of :func:`uot_plan` and :func:`uot_pool`. :obj:`sort_rows` groups the rows by set and
    reduces with :func:`torch.segment_reduce` (default: on accelerators only, where it is faster; the
    CPU tests force it to cover that path)."""
    options.validate()
    segments = Segments(index, _check_input(x, index, dim_size))
    if x.size(-1) == 0:  # nothing to transport: the empty result of PyG's aggregations
        return segment_sum(x, segments) if pool else torch.zeros_like(x)
    # Under autocast the solve is a float32 op, as softmax is; outside it, the output keeps the input's
    # dtype, so that a model cast to a half type composes.
    out_dtype = solve_dtype(x.dtype) if torch.is_autocast_enabled(x.device.type) else x.dtype
    x = x.to(solve_dtype(x.dtype))
    log_p = _safe_log(_dim_prior(x, segments.num_sets, p))
    log_q = _log_node_prior(x, segments, q, log_q)
    perm = None
    if x.device.type != 'cpu' if sort_rows is None else sort_rows:
        # Rows grouped by set let every reduction run as a segment reduction instead of atomics.
        perm, segments = sorted_segments(index, segments.num_sets)
        x, log_q = x.index_select(0, perm), log_q.index_select(0, perm)
    with torch.autocast(x.device.type, enabled=False):  # no op of the solver may be lowered
        out = _solve(x, segments, options, log_p, log_q, pool)
    if not pool:
        out = _unpermute(out, perm).exp()
    return out.to(out_dtype)


def _unpermute(rows: Tensor, perm: Optional[Tensor]) -> Tensor:
    r"""The rows of a solve in the order of the input (:func:`_uot` may have grouped them by set)."""
    if perm is None:
        return rows
    inverse = torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))
    return rows.index_select(0, inverse)


def _solve(x: Tensor, segments: Segments, options: SolverOptions, log_p: Tensor, log_q: Tensor,
           pool: bool) -> Tensor:
    r"""Runs the solver of :obj:`options`: the log-plan, or with :obj:`pool` the pooled output."""
    def value(name: str) -> Tensor:
        return options.schedule(name, x)

    eps, lam_p, lam_q = value('eps'), value('lam_p'), value('lam_q')
    memory_efficient, structured = options.memory_efficient, options.has_structure()
    # Compiled kernels where asked, but not inside a graph that torch.compile traces as a whole.
    compile = options.compile and not torch.compiler.is_compiling()
    if options.solver == 'sinkhorn' and structured:
        log_plan = rot_sinkhorn_log_plan(x, segments, eps, lam_p, lam_q, value('gw'), value('prox'),
                                         log_p, log_q, options.inner_iters, memory_efficient, compile)
    elif options.solver == 'sinkhorn' and pool:  # pooled without forming the plan where it can
        return sinkhorn_pool(x, segments, eps, lam_p, lam_q, log_p, log_q, memory_efficient, compile)
    elif options.solver == 'sinkhorn':
        log_plan = sinkhorn_log_plan(x, segments, eps, lam_p, lam_q, log_p, log_q, memory_efficient, compile)
    elif structured:  # BADMM runs eager (validate refuses compile=True for it)
        log_plan = rot_badmm_log_plan(x, segments, eps, lam_p, lam_q, value('rho'), value('gw'),
                                      log_p, log_q, memory_efficient, quadratic=options.solver == 'badmm_q')
    else:  # pooled from the solver's last plan where asked: the pooling's backward is part of its adjoint
        return badmm_log_plan(x, segments, eps, lam_p, lam_q, value('rho'), log_p, log_q, memory_efficient,
                              quadratic=options.solver == 'badmm_q', pool=pool)
    return pool_log_plan(x, log_plan, segments) if pool else log_plan


def uot_plan(
    x: Tensor,
    index: Tensor,
    dim_size: Optional[int] = None,
    *,
    solver: str = 'sinkhorn',
    eps: Value = 1.0,
    lam_p: Value = INF,
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
    compile: bool = False,
) -> Tensor:
    r"""The UOT plan :math:`T` of every set, stacked as the rows of ``x``.

    The defaults are those of :class:`~uotp_geometric.UOTAggregation`: a hard dimension marginal
    (``lam_p=inf``), so at convergence each set's plan has the mass of its dimension prior (1 for the
    uniform one). Half
    inputs are solved in float32; the plan has the dtype of ``x`` (float32 for half inputs under
    autocast).

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
            ``inf`` makes it hard, ``0`` free. (The paper's setting is ``1``.)
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
            ``ceil(sqrt(K))``-th state, ``O(sqrt(K) N D)``, or, where ``5 K N D`` values fit in
            256 MiB, everything their adjoint reads (faster). :obj:`False` backpropagates
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
        compile (bool): Sinkhorn only (``solver='sinkhorn'``, proximal Sinkhorn's inner iterations
            included; BADMM and BADMM-Q run eager and refuse it). If :obj:`True`, each Sinkhorn
            iteration, and in the lean backward (:obj:`memory_efficient`) each iteration's adjoint, runs
            as a kernel compiled by :func:`torch.compile` (``fullgraph=True, dynamic=True``; the
            solvers' :class:`~torch.autograd.Function` s stay eager and call the same iteration bodies
            as without it): fused passes over the ``(N, D)`` data in place of dozens of operations
            each. The first call compiles (tens of seconds on a CPU, kept for the process, and by the
            compiler's cache on disk); later calls reuse the graphs whatever ``N``, ``B`` and ``D``. On
            the benchmark's CPU the compiled kernels were slower than eager, the iterations being bound
            by their exponentials, which the fused loops partly recompute where eager keeps them
            (``docs/solvers.md``, ``docs/bench``): the option is for accelerators. Plain autograd
            (``memory_efficient=False`` with gradients, which double backward needs and compiled
            graphs do not give) stays eager, and inside a graph that :func:`torch.compile` traces as a
            whole the option does nothing.

    Each of ``eps``, ``lam_p``, ``lam_q``, ``rho``, ``gw`` and ``prox`` is a scalar or a tensor of
    shape ``(K,)`` (one value per iteration), and may require grad.

    Returns:
        Tensor: The plan, shape ``(N, D)``.

    Examples:
        >>> import torch
        >>> from uotp_geometric import uot_plan
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
        >>> index = torch.tensor([0, 0, 1])  # two sets: nodes 0 and 1, and node 2
        >>> plan = uot_plan(x, index, eps=0.5, lam_q=float('inf'), num_iters=50)
        >>> plan.shape
        torch.Size([3, 2])
        >>> plan[index == 0].sum(dim=0)  # hard marginals: the dimension prior 1 / D
        tensor([0.5000, 0.5000])

    References:
        - L. Chizat, G. Peyré, B. Schmitzer and F.-X. Vialard. `Scaling algorithms for unbalanced
          optimal transport problems <https://arxiv.org/abs/1607.05816>`__. Mathematics of
          Computation, 2018. (``solver="sinkhorn"``)
        - H. Wang and A. Banerjee. `Bregman alternating direction method of multipliers
          <https://arxiv.org/abs/1306.3203>`__. NeurIPS 2014. (``solver="badmm"``)
        - M. Cheng and H. Xu. `Revisiting global pooling through the lens of optimal transport
          <https://arxiv.org/abs/2201.09191>`__. arXiv:2201.09191, 2022. (UOT-Pooling)
        - H. Xu and M. Cheng. `Regularized optimal transport layers for generalized global pooling
          operations <https://arxiv.org/abs/2212.06339>`__. IEEE TPAMI, 2023.
          (ROT-Pooling, ``gw > 0``)
    """
    options = SolverOptions(solver=solver, num_iters=num_iters, eps=eps, lam_p=lam_p, lam_q=lam_q,
                            rho=rho, gw=gw, prox=prox, inner_iters=inner_iters,
                            memory_efficient=memory_efficient, compile=compile)
    return _uot(x, index, dim_size, options, p, q, log_q, pool=False)


def uot_pool(
    x: Tensor,
    index: Tensor,
    dim_size: Optional[int] = None,
    *,
    solver: str = 'sinkhorn',
    eps: Value = 1.0,
    lam_p: Value = INF,
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
    compile: bool = False,
) -> Tensor:
    r"""UOT-Pooling: :math:`z_b = D \sum_{n \in b} x_n \odot T_n` for every set, with the plan
    :math:`T` of :func:`uot_plan`.

    Takes the arguments of :func:`uot_plan`, with the same defaults (:obj:`compile` with
    ``solver='sinkhorn'`` only: BADMM and BADMM-Q run eager). An empty set gives a zero row;
    ``x`` with no feature columns gives the empty ``(B, 0)`` result. Half inputs are solved in
    float32; the output has the dtype of ``x`` (float32 for half inputs under autocast).

    Returns:
        Tensor: The pooled vectors, shape ``(B, D)``.

    Examples:
        >>> import torch
        >>> from uotp_geometric import uot_pool
        >>> x = torch.tensor([[1.0, 4.0], [3.0, 2.0], [5.0, 6.0]])
        >>> index = torch.tensor([0, 0, 1])
        >>> # eps -> inf with hard marginals is mean pooling (spec §4)
        >>> uot_pool(x, index, eps=float('inf'), lam_q=float('inf'), num_iters=1)
        tensor([[2., 3.],
                [5., 6.]])

    References:
        - M. Cheng and H. Xu. `Revisiting global pooling through the lens of optimal transport
          <https://arxiv.org/abs/2201.09191>`__. arXiv:2201.09191, 2022.
        - See :func:`uot_plan` for the solvers' references.
    """
    options = SolverOptions(solver=solver, num_iters=num_iters, eps=eps, lam_p=lam_p, lam_q=lam_q,
                            rho=rho, gw=gw, prox=prox, inner_iters=inner_iters,
                            memory_efficient=memory_efficient, compile=compile)
    return _uot(x, index, dim_size, options, p, q, log_q, pool=True)


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
