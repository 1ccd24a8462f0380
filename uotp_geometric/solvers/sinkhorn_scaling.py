r"""Sinkhorn scaling in the scaling domain (spec §2): the iterations of
:func:`~uotp_geometric.solvers.sinkhorn.sinkhorn_log_plan` for one :math:`\varepsilon` shared by all of
them, on the CPU, as :class:`torch.autograd.Function` s with hand-written backwards.

One exponential of the ``(N, D)`` data per forward replaces the two per iteration of the log domain;
where a set spans more than the float's range, each Function says so in a flag and the caller solves in
the log domain instead.
"""
from typing import Any, Optional, Tuple

import torch
from torch import Tensor

from uotp_geometric.segment import Segments, segment_count, segment_max, segment_sum
from uotp_geometric.solvers.common import MAX_LOG_MASS
from uotp_geometric.solvers.compiled import compiled, dot, iteration_value

# The least value a weighted sum of the scaling domain may take for its logarithm to be exact: terms
# below the smallest normal float may flush to 0, and against a sum of at least sqrt(tiny) they weigh
# at most N sqrt(tiny) relative (1e-19 N in float32).
SAFE_SUM = {dtype: torch.finfo(dtype).tiny ** 0.5 for dtype in (torch.float32, torch.float64)}


class SinkhornScaling(torch.autograd.Function):
    r"""The K Sinkhorn iterations of :class:`~uotp_geometric.solvers.sinkhorn.SinkhornPotentials` for
    one :math:`s = 1 / \varepsilon` shared by all of them, in the scaling domain: one exponential of the
    ``(N, D)`` data per forward, then multiply-and-sum iterations.

    The kernel is shifted on both axes, :math:`E_{nd} = \exp(s x_{nd} - A_{bd} - a_n) \in (0, 1]` with
    :math:`A_{bd} = s \max_{n \in b} x_{nd}` and :math:`a_n = \max_d (s x_{nd} - A_{bd})`, so that every
    row and every column of each set holds an entry equal to 1. Each log-sum-exp of spec §2 then is a
    weighted sum of kernel entries with weights in ``(0, 1]`` (the potentials, shifted by their per-set
    maximum):

    .. math::
        \operatorname{LSE}_{n \in b}(s x_{nd} + v_n) = A_{bd} + W_b + \log \textstyle\sum_{n \in b}
            E_{nd}\, e^{a_n + v_n - W_b}, \qquad
        \operatorname{LSE}_d(s x_{nd} + u_{bd}) = a_n + Y_b + \log \textstyle\sum_d E_{nd}\,
            e^{A_{bd} + u_{bd} - Y_b}

    with :math:`W_b = \max_{n \in b}(a_n + v_n)` and :math:`Y_b = \max_d(A_{bd} + u_{bd})`. The sums are
    exact unless an entry the result depends on underflows, which needs a dynamic range of
    :math:`s x` beyond the float's (about 87 in float32) within a set: the forward returns a flag that
    is false when any sum fell below :data:`SAFE_SUM`, and
    :func:`~uotp_geometric.solvers.sinkhorn.sinkhorn_log_plan` then solves in the log domain instead.
    The backward keeps the kernel (``N D`` values, like ``x`` itself) and per iteration the two sums and
    their shifts, ``O(K (B D + N))``, from which it rebuilds the potentials and weights. Differentiable
    once (no double backward).
    """
    @staticmethod
    def forward(ctx: Any, x: Tensor, segments: Segments, scale: Tensor, c_p: Tensor, c_q: Tensor,
                log_p: Tensor, log_q: Tensor, compile: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
        u, v, kernel, shifts, sums = _scaling_iterations(x, segments, scale, c_p, c_q, log_p, log_q, compile)
        ctx.segments, ctx.compile = segments, compile
        ctx.save_for_backward(x, kernel, *shifts, scale, c_p, c_q, log_p, log_q, *sums)
        ok = _sums_are_safe(x, sums, _nonempty(segments, x.dtype))
        ctx.mark_non_differentiable(ok)
        return u, v, ok

    @staticmethod
    def backward(ctx: Any, grad_u: Optional[Tensor], grad_v: Optional[Tensor],
                 _: Any) -> Tuple[Optional[Tensor], ...]:
        x, kernel, shift_x, shift_n, scale, c_p, c_q, log_p, log_q, *sums = ctx.saved_tensors
        gu = grad_u if grad_u is not None else torch.zeros_like(log_p)
        gv = grad_v if grad_v is not None else torch.zeros_like(log_q)
        grad_logits = torch.zeros_like(x)
        grads = _scaling_backward(ctx.segments, kernel, (shift_x, shift_n), c_p, c_q, log_p, log_q, sums,
                                  gu, gv, grad_logits, ctx.compile)
        grad_scale = torch.dot(x.reshape(-1), grad_logits.reshape(-1))
        return (grad_logits.mul_(scale), None, grad_scale, *grads, None)


class SinkhornScalingPool(torch.autograd.Function):
    r"""The iterations of :class:`SinkhornScaling` followed by the pooling
    :math:`z_{bd} = D \sum_{n \in b} x_{nd} T_{nd}`, read from the kernel without forming the plan.

    With :math:`F_{bd} = A_{bd} + u_{bd}`, :math:`G_n = a_n + v_n` and :math:`W_b = \max_{n \in b} G_n`,
    the plan is :math:`T_{nd} = E_{nd}\, e^{G_n - W_b}\, e^{F_{bd} + W_b}`, so

    .. math::
        z_{bd} = D\, e^{F_{bd} + W_b} \textstyle\sum_{n \in b} x_{nd} E_{nd}\, e^{G_n - W_b}

    is one multiply-and-sum over the ``(N, D)`` data; the node weights lie in ``(0, 1]`` and
    :math:`F_{bd} + W_b` bounds :math:`\log T_{nd}` from above. The log-domain path caps
    :math:`\log T` at :data:`~uotp_geometric.solvers.common.MAX_LOG_MASS`; the flag this returns is false
    where that cap could bite (or a sum underflowed, as in :class:`SinkhornScaling`), and the caller then
    takes that path. Differentiable once (no double backward).
    """
    @staticmethod
    def forward(ctx: Any, x: Tensor, segments: Segments, scale: Tensor, c_p: Tensor, c_q: Tensor,
                log_p: Tensor, log_q: Tensor, compile: bool = False) -> Tuple[Tensor, Tensor]:
        u, v, kernel, shifts, sums = _scaling_iterations(x, segments, scale, c_p, c_q, log_p, log_q, compile)
        shift_x, shift_n = shifts
        node_log = shift_n + v  # G
        node_shift = segment_max(node_log, segments)  # W
        node_weight = (node_log - segments.gather(node_shift)).exp()
        col_log = shift_x + u + node_shift.unsqueeze(-1)  # F + W
        col_factor = col_log.exp()
        total = segment_sum(x * kernel * node_weight.unsqueeze(-1), segments)
        out = total * col_factor * x.size(-1)
        ctx.segments, ctx.compile = segments, compile
        ctx.save_for_backward(x, kernel, shift_x, shift_n, scale, c_p, c_q, log_p, log_q, node_weight, col_factor,
                              total, *sums)
        # The cap of the log-domain path is never reached where F + W stays below it (empty sets aside).
        nonempty = _nonempty(segments, x.dtype)
        uncapped = col_log.masked_fill(~nonempty.unsqueeze(-1), 0.0).amax() <= MAX_LOG_MASS
        ok = _sums_are_safe(x, sums, nonempty) & uncapped
        ctx.mark_non_differentiable(ok)
        return out, ok

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor, _: Any) -> Tuple[Optional[Tensor], ...]:
        (x, kernel, shift_x, shift_n, scale, c_p, c_q, log_p, log_q, node_weight, col_factor, total,
         *sums) = ctx.saved_tensors
        segments = ctx.segments
        # z = D sum_n x T: its gradient through the factor x is D g T, through log T = s x + u + v it is D g x T.
        grad_col = grad_out * col_factor * x.size(-1)
        grad_plan = kernel * segments.gather(grad_col)
        grad_plan.mul_(node_weight.unsqueeze(-1))  # D g T
        grad_logits = grad_plan * x  # D g x T
        gu = grad_col * total  # the segment sum of grad_logits, already known
        gv = grad_logits.sum(dim=-1)
        grads = _scaling_backward(segments, kernel, (shift_x, shift_n), c_p, c_q, log_p, log_q, sums, gu, gv,
                                  grad_logits, ctx.compile)
        grad_scale = torch.dot(x.reshape(-1), grad_logits.reshape(-1))
        return (grad_plan.addcmul_(grad_logits, scale), None, grad_scale, *grads, None)


def _scaling_iterations(x: Tensor, segments: Segments, scale: Tensor, c_p: Tensor, c_q: Tensor, log_p: Tensor,
                        log_q: Tensor,
                        compile: bool = False) -> Tuple[Tensor, Tensor, Tensor, Tuple[Tensor, Tensor], list]:
    r"""The forward of :class:`SinkhornScaling`: the last ``u`` and ``v``, the kernel, its two shifts
    ``(A, a)``, and per iteration the sums and shifts ``(C, R, W, Y)`` that the backward rebuilds from.
    With :obj:`compile`, the kernel and each iteration run compiled (:mod:`~uotp_geometric.solvers.compiled`)."""
    kernel_of, step = (compiled(_kernel), compiled(_scaling_step)) if compile else (_kernel, _scaling_step)
    shift_x, kernel, shift_n = kernel_of(x, segments, scale)
    v = torch.zeros_like(log_q)
    sums = []
    # Eager, one (N, D) buffer for every product: a fresh one per iteration, freed between the small sums
    # kept for the backward, fragments glibc's heap (gigabytes at K = 32 under the default allocator). A
    # compiled step fuses the products into its reductions and needs none.
    scratch = None if compile else torch.empty_like(kernel)
    for k in range(c_p.numel()):
        u, v, *step_sums = step(kernel, segments, shift_x, shift_n, v, iteration_value(c_p, k, compile),
                                iteration_value(c_q, k, compile), log_p, log_q, scratch)
        sums += step_sums
    return u, v, kernel, (shift_x, shift_n), sums


def _kernel(x: Tensor, segments: Segments, scale: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    r"""The shifted kernel :math:`E` of :class:`SinkhornScaling` and its shifts :math:`A` ``(B, D)`` and
    :math:`a` ``(N,)``: returns ``(A, E, a)``."""
    shift_x = scale * segment_max(x, segments)  # A, (B, D); scale >= 0
    kernel = torch.addcmul(segments.gather(shift_x).neg_(), x, scale)
    shift_n = kernel.amax(dim=-1)  # a, (N,)
    kernel.sub_(shift_n.unsqueeze(-1)).exp_()
    return shift_x, kernel, shift_n


def _scaling_step(kernel: Tensor, segments: Segments, shift_x: Tensor, shift_n: Tensor, v: Tensor, c_p: Tensor,
                  c_q: Tensor, log_p: Tensor, log_q: Tensor, scratch: Optional[Tensor] = None) -> Tuple[Tensor, ...]:
    r"""One iteration of :func:`_scaling_iterations` from ``v``, with its 0-d ``c_p`` and ``c_q``: returns
    the new ``u`` and ``v`` and the iteration's sums and shifts ``(C, R, W, Y)``. Its ``(N, D)`` products
    go into :obj:`scratch` where given."""
    # u: weights on the nodes, summed over each set's nodes per dim.
    col_shift = segment_max(shift_n + v, segments)
    col_weight = _col_weight(shift_n, v, col_shift, segments).unsqueeze(-1)
    col_sum = segment_sum(torch.mul(kernel, col_weight, out=scratch), segments)
    u = c_p * (log_p - _lse_u(shift_x, col_shift, col_sum))
    # v: weights on the dims, summed over each node's dims.
    row_shift = (shift_x + u).amax(dim=-1, keepdim=True)
    row_weight = _row_weight(shift_x, u, row_shift)
    row_sum = torch.index_select(row_weight, 0, segments.index, out=scratch).mul_(kernel).sum(dim=-1)
    v = c_q * (log_q - _lse_v(shift_n, row_shift, row_sum, segments))
    return u, v, col_sum, row_sum, col_shift, row_shift


def _nonempty(segments: Segments, dtype: torch.dtype) -> Tensor:
    return segment_count(segments, dtype) > 0


def _sums_are_safe(x: Tensor, sums: list, nonempty: Tensor) -> Tensor:
    r"""Whether no sum of :func:`_scaling_iterations` fell below :data:`SAFE_SUM` (the sums of empty sets
    are 0 and read by no node: :obj:`nonempty` masks them out)."""
    safe = torch.minimum(torch.stack(sums[::4]).amin(dim=(0, 2)).masked_fill(~nonempty, 1.0).amin(),
                         torch.stack(sums[1::4]).amin())
    return safe >= SAFE_SUM[x.dtype]


def _scaling_backward(segments: Segments, kernel: Tensor, shifts: Tuple[Tensor, Tensor], c_p: Tensor,
                      c_q: Tensor, log_p: Tensor, log_q: Tensor, sums: list, gu: Tensor, gv: Tensor,
                      grad_logits: Tensor, compile: bool = False) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""Backpropagates the gradients ``gu``, ``gv`` of the last potentials through the iterations of
    :func:`_scaling_iterations`, adding the gradient w.r.t. the logits :math:`s x` of all iterations into
    :obj:`grad_logits` (in place); returns those w.r.t. ``c_p``, ``c_q``, ``log_p`` and ``log_q``. Every
    softmax of spec §2 is the kernel times a per-node and a per-(set, dim) factor
    (:class:`SinkhornScaling`). With :obj:`compile`, each iteration's adjoint runs compiled."""
    shift_x, shift_n = shifts
    grad_c_p, grad_c_q = torch.zeros_like(c_p), torch.zeros_like(c_q)
    grad_log_p, grad_log_q = torch.zeros_like(log_p), torch.zeros_like(log_q)
    step = compiled(_scaling_adjoint_step) if compile else _scaling_adjoint_step
    # Eager, the (N, D) products in two buffers allocated once, for the reason _scaling_iterations gives;
    # one allocation of both is large enough for glibc to map it apart from its heap.
    buffers = None if compile else torch.empty((2, *kernel.shape), dtype=kernel.dtype,
                                               device=kernel.device).unbind(0)
    for k in reversed(range(c_p.numel())):
        # The same operations as the forward, on (B, D) and (N,) values only.
        v = torch.zeros_like(log_q)
        if k > 0:  # the v entering iteration k, from the sums of iteration k - 1
            _, prev_row_sum, _, prev_row_shift = sums[4 * k - 4:4 * k]
            v = c_q[k - 1] * (log_q - _lse_v(shift_n, prev_row_shift, prev_row_sum, segments))
        gv, part_c_p, part_c_q, part_p, part_q = step(
            kernel, segments, shift_x, shift_n, v, iteration_value(c_p, k, compile), iteration_value(c_q, k, compile),
            log_p, log_q, *sums[4 * k:4 * k + 4], gu, gv, grad_logits, buffers)
        grad_c_p[k], grad_c_q[k] = part_c_p.sum(), part_c_q.sum()
        grad_log_p.add_(part_p)
        grad_log_q.add_(part_q)
        gu = torch.zeros_like(gu)  # the previous u does not enter this iteration
    return grad_c_p, grad_c_q, grad_log_p, grad_log_q


def _scaling_adjoint_step(kernel: Tensor, segments: Segments, shift_x: Tensor, shift_n: Tensor, v: Tensor,
                          c_p: Tensor, c_q: Tensor, log_p: Tensor, log_q: Tensor, col_sum: Tensor, row_sum: Tensor,
                          col_shift: Tensor, row_shift: Tensor, gu: Tensor, gv: Tensor, grad_logits: Tensor,
                          buffers: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, ...]:
    r"""The adjoint of one :func:`_scaling_step` from the ``v`` entering it and its sums: backpropagates
    ``gu``, ``gv``, adds the gradient w.r.t. the logits into :obj:`grad_logits` (in place), and returns the
    gradient w.r.t. the previous ``v`` and the iteration's shares of the gradients w.r.t. ``c_p``, ``c_q``
    (as partial sums, :func:`~uotp_geometric.solvers.compiled.dot`), ``log p`` and ``log q``.
    Its ``(N, D)`` products go into the two :obj:`buffers` where given."""
    col_weight = _col_weight(shift_n, v, col_shift, segments)
    lse_u = _lse_u(shift_x, col_shift, col_sum)
    u = c_p * (log_p - lse_u)
    row_weight = _row_weight(shift_x, u, row_shift)
    lse_v = _lse_v(shift_n, row_shift, row_sum, segments)
    # v = c_q (log q - LSE_d B): dv/dB = -c_q E_nd y_bd / R_n.
    grad_c_q = dot(gv, log_q - lse_v)
    grad_log_q = c_q * gv
    node_weight, dim_weight = (gv / row_sum).unsqueeze(-1), -c_q * row_weight
    node_out, gathered_out = (None, None) if buffers is None else buffers
    node = torch.mul(kernel, node_weight, out=node_out)
    gathered = torch.index_select(dim_weight, 0, segments.index, out=gathered_out)
    gu = gu - c_q * row_weight * segment_sum(node, segments)
    grad_logits.addcmul_(node, gathered)
    # u = c_p (log p - LSE_n A): du/dA = -c_p E_nd w_n / C_bd.
    grad_c_p = dot(gu, log_p - lse_u)
    grad_log_p = c_p * gu
    col_factor = gu / col_sum.clamp_min(torch.finfo(kernel.dtype).tiny)
    # into the first buffer, whose node products are read no more
    dim = torch.index_select(col_factor, 0, segments.index, out=node_out).mul_(kernel)
    gv = -c_p * col_weight * dim.sum(dim=-1)  # gradient of the previous v
    grad_logits.addcmul_(dim, (-c_p * col_weight).unsqueeze(-1))
    return gv, grad_c_p, grad_c_q, grad_log_p, grad_log_q


def _col_weight(shift_n: Tensor, v: Tensor, col_shift: Tensor, segments: Segments) -> Tensor:
    return (shift_n + v - segments.gather(col_shift)).exp()  # w_n = exp(a_n + v_n - W_b)


def _row_weight(shift_x: Tensor, u: Tensor, row_shift: Tensor) -> Tensor:
    return (shift_x + u - row_shift).exp()  # y_bd = exp(A_bd + u_bd - Y_b)


def _lse_u(shift_x: Tensor, col_shift: Tensor, col_sum: Tensor) -> Tensor:
    return shift_x + col_shift.unsqueeze(-1) + col_sum.clamp_min(torch.finfo(col_sum.dtype).tiny).log()


def _lse_v(shift_n: Tensor, row_shift: Tensor, row_sum: Tensor, segments: Segments) -> Tensor:
    return shift_n + segments.gather(row_shift.squeeze(-1)) + row_sum.log()


def scaling_applies(x: Tensor, eps: Tensor) -> bool:
    r"""Whether :class:`SinkhornScaling` runs: one ``eps`` for all iterations (a scalar expanded to
    ``K``), on the CPU, in eager mode. Its check of the sums costs a host sync, which an accelerator
    pays dearly and :func:`torch.compile` cannot trace; there the log domain runs, fused by the compiler."""
    one_eps = eps.numel() == 1 or eps.stride(0) == 0
    return (one_eps and x.device.type == 'cpu' and x.size(0) > 0
            and x.dtype in SAFE_SUM and not torch.compiler.is_compiling())
