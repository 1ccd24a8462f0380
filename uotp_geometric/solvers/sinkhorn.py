r"""Sinkhorn scaling for unbalanced optimal transport over a ragged batch of sets (spec §2)."""
from typing import Any, Optional, Tuple

import torch
from torch import Tensor

from uotp_geometric.segment import (Segments, segment_count, segment_logsumexp,
                                    segment_max, segment_sum)
from uotp_geometric.solvers.common import MAX_LOG_MASS, hardness, pool_log_plan


def sinkhorn_step(
    x: Tensor,
    segments: Segments,
    v: Tensor,
    scale: Tensor,
    c_p: Tensor,
    c_q: Tensor,
    log_p: Tensor,
    log_q: Tensor,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""One Gauss-Seidel Sinkhorn iteration in the log domain, with :math:`s = 1 / \varepsilon`:

    .. math::
        u_{b,d} &\leftarrow c_p \Big(\log p_{b,d} - \operatorname{LSE}_{n \in b}
            \big(s\, x_{n,d} + v_n\big)\Big), \qquad
            c_p = \frac{\lambda_p}{\lambda_p + \varepsilon} \\
        v_n &\leftarrow c_q \Big(\log q_n - \operatorname{LSE}_{d}
            \big(s\, x_{n,d} + u_{b(n),d}\big)\Big), \qquad
            c_q = \frac{\lambda_q}{\lambda_q + \varepsilon}

    Args:
        x (Tensor): Features of shape ``(N, D)``.
        segments (Segments): The set of each row, ``B`` sets.
        v (Tensor): Node potentials of the previous iteration, shape ``(N,)``. (The new ``u``
            depends on ``v`` alone.)
        scale, c_p, c_q (Tensor): Scalar tensors :math:`1 / \varepsilon`, :math:`c_p`, :math:`c_q`.
        log_p (Tensor): Log dimension prior, shape ``(B, D)``.
        log_q (Tensor): Log node prior, shape ``(N,)``.

    Returns:
        The new ``u`` ``(B, D)`` and ``v`` ``(N,)``, and the two log-sum-exps they were made from
        (``(B, D)`` and ``(N,)``), which a backward pass can reuse.
    """
    lse_u = segment_logsumexp(torch.addcmul(v.unsqueeze(-1), x, scale),
                              segments)
    u = c_p * (log_p - lse_u)
    lse_v = torch.logsumexp(torch.addcmul(segments.gather(u), x, scale),
                            dim=-1)
    v = c_q * (log_q - lse_v)
    return u, v, lse_u, lse_v


def _sinkhorn_loop(x: Tensor, segments: Segments, scale: Tensor,
                   c_p: Tensor, c_q: Tensor, log_p: Tensor,
                   log_q: Tensor) -> Tuple[Tensor, Tensor]:
    v = log_q.new_zeros(x.size(0))
    u = torch.zeros_like(log_p)
    for k in range(scale.numel()):
        u, v, _, _ = sinkhorn_step(x, segments, v, scale[k], c_p[k],
                                   c_q[k], log_p, log_q)
    return u, v


# The least value a weighted sum of the scaling domain may take for its logarithm to be exact: terms
# below the smallest normal float may flush to 0, and against a sum of at least sqrt(tiny) they weigh
# at most N sqrt(tiny) relative (1e-19 N in float32).
SAFE_SUM = {dtype: torch.finfo(dtype).tiny ** 0.5 for dtype in (torch.float32, torch.float64)}


class _SinkhornPotentials(torch.autograd.Function):
    r"""The K Sinkhorn iterations with a backward that stores only the potentials and log-sum-exps
    of each iteration, ``O(K (B D + N))``, and recomputes the ``(N, D)`` softmax weights from them
    (spec §5). Differentiable once (no double backward).
    """
    @staticmethod
    def forward(ctx: Any, x: Tensor, segments: Segments, scale: Tensor, c_p: Tensor, c_q: Tensor, log_p: Tensor,
                log_q: Tensor) -> Tuple[Tensor, Tensor]:
        v = log_q.new_zeros(x.size(0))
        vs, us, lse_us, lse_vs = [], [], [], []
        for k in range(scale.numel()):
            vs.append(v)
            u, v, lse_u, lse_v = sinkhorn_step(x, segments, v, scale[k],
                                               c_p[k], c_q[k], log_p, log_q)
            us.append(u)
            lse_us.append(lse_u)
            lse_vs.append(lse_v)
        ctx.segments = segments
        ctx.save_for_backward(x, scale, c_p, c_q, log_p, log_q,
                              torch.stack(vs), torch.stack(us),
                              torch.stack(lse_us), torch.stack(lse_vs))
        return u, v

    @staticmethod
    def backward(ctx: Any, grad_u: Optional[Tensor],
                 grad_v: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
        (x, scale, c_p, c_q, log_p, log_q, vs, us, lse_us,
         lse_vs) = ctx.saved_tensors
        segments = ctx.segments
        grad_x = torch.zeros_like(x)
        grad_scale, grad_c_p, grad_c_q = (torch.zeros_like(scale),
                                          torch.zeros_like(c_p),
                                          torch.zeros_like(c_q))
        grad_log_p, grad_log_q = torch.zeros_like(log_p), torch.zeros_like(log_q)
        gu = grad_u if grad_u is not None else torch.zeros_like(log_p)
        gv = grad_v if grad_v is not None else torch.zeros_like(log_q)
        for k in reversed(range(scale.numel())):
            # v = c_q (log q - LSE_d B), B = s x + u[index]: dv/dB is -c_q softmax_d(B).
            logits_v = torch.addcmul(segments.gather(us[k]), x, scale[k])
            grad_b = (logits_v - lse_vs[k].unsqueeze(-1)).exp_()
            grad_b.mul_((-c_q[k] * gv).unsqueeze(-1))
            grad_c_q[k] = torch.dot(gv, log_q - lse_vs[k])
            grad_log_q.add_(c_q[k] * gv)
            gu = gu + segment_sum(grad_b, segments)

            # u = c_p (log p - LSE_{n in b} A), A = s x + v_prev: du/dA is -c_p softmax_n(A).
            logits_u = torch.addcmul(vs[k].unsqueeze(-1), x, scale[k])
            grad_a = (logits_u - segments.gather(lse_us[k])).exp_()
            grad_a.mul_(-c_p[k] * segments.gather(gu))
            grad_c_p[k] = (gu * (log_p - lse_us[k])).sum()
            grad_log_p.add_(c_p[k] * gu)
            gv = grad_a.sum(dim=-1)  # gradient of the previous v

            grad_logits = grad_a.add_(grad_b)
            grad_x.add_(scale[k] * grad_logits)
            grad_scale[k] = torch.dot(x.reshape(-1), grad_logits.reshape(-1))
            gu = torch.zeros_like(gu)  # the previous u does not enter this iteration
        return (grad_x, None, grad_scale, grad_c_p, grad_c_q, grad_log_p,
                grad_log_q)


class _SinkhornScaling(torch.autograd.Function):
    r"""The K Sinkhorn iterations of :class:`_SinkhornPotentials` for one :math:`s = 1 / \varepsilon`
    shared by all of them, in the scaling domain: one exponential of the ``(N, D)`` data per forward,
    then multiply-and-sum iterations.

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
    is false when any sum fell below :data:`SAFE_SUM`, and :func:`sinkhorn_log_plan` then solves in the
    log domain instead. The backward keeps the kernel (``N D`` values, like ``x`` itself) and per
    iteration the two sums and their shifts, ``O(K (B D + N))``, from which it rebuilds the potentials and
    weights. Differentiable once (no double backward).
    """
    @staticmethod
    def forward(ctx: Any, x: Tensor, segments: Segments, scale: Tensor, c_p: Tensor, c_q: Tensor,
                log_p: Tensor, log_q: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        u, v, kernel, shifts, sums = _scaling_iterations(x, segments, scale, c_p, c_q, log_p, log_q)
        ctx.segments = segments
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
                                  gu, gv, grad_logits)
        grad_scale = torch.dot(x.reshape(-1), grad_logits.reshape(-1))
        return (grad_logits.mul_(scale), None, grad_scale, *grads)


class _SinkhornScalingPool(torch.autograd.Function):
    r"""The iterations of :class:`_SinkhornScaling` followed by the pooling
    :math:`z_{bd} = D \sum_{n \in b} x_{nd} T_{nd}`, read from the kernel without forming the plan.

    With :math:`F_{bd} = A_{bd} + u_{bd}`, :math:`G_n = a_n + v_n` and :math:`W_b = \max_{n \in b} G_n`,
    the plan is :math:`T_{nd} = E_{nd}\, e^{G_n - W_b}\, e^{F_{bd} + W_b}`, so

    .. math::
        z_{bd} = D\, e^{F_{bd} + W_b} \textstyle\sum_{n \in b} x_{nd} E_{nd}\, e^{G_n - W_b}

    is one multiply-and-sum over the ``(N, D)`` data; the node weights lie in ``(0, 1]`` and
    :math:`F_{bd} + W_b` bounds :math:`\log T_{nd}` from above. The log-domain path caps
    :math:`\log T` at :data:`~uotp_geometric.solvers.common.MAX_LOG_MASS`; the flag this returns is false
    where that cap could bite (or a sum underflowed, as in :class:`_SinkhornScaling`), and the caller then
    takes that path. Differentiable once (no double backward).
    """
    @staticmethod
    def forward(ctx: Any, x: Tensor, segments: Segments, scale: Tensor, c_p: Tensor, c_q: Tensor,
                log_p: Tensor, log_q: Tensor) -> Tuple[Tensor, Tensor]:
        u, v, kernel, shifts, sums = _scaling_iterations(x, segments, scale, c_p, c_q, log_p, log_q)
        shift_x, shift_n = shifts
        node_log = shift_n + v  # G
        node_shift = segment_max(node_log, segments)  # W
        node_weight = (node_log - segments.gather(node_shift)).exp()
        col_log = shift_x + u + node_shift.unsqueeze(-1)  # F + W
        col_factor = col_log.exp()
        total = segment_sum(x * kernel * node_weight.unsqueeze(-1), segments)
        out = total * col_factor * x.size(-1)
        ctx.segments = segments
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
                                  grad_logits)
        grad_scale = torch.dot(x.reshape(-1), grad_logits.reshape(-1))
        return (grad_plan.addcmul_(grad_logits, scale), None, grad_scale, *grads)


def _scaling_iterations(x: Tensor, segments: Segments, scale: Tensor, c_p: Tensor, c_q: Tensor, log_p: Tensor,
                        log_q: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tuple[Tensor, Tensor], list]:
    r"""The forward of :class:`_SinkhornScaling`: the last ``u`` and ``v``, the kernel, its two shifts
    ``(A, a)``, and per iteration the sums and shifts ``(C, R, W, Y)`` that the backward rebuilds from."""
    shift_x = scale * segment_max(x, segments)  # A, (B, D); scale >= 0
    kernel = torch.addcmul(segments.gather(shift_x).neg_(), x, scale)
    shift_n = kernel.amax(dim=-1)  # a, (N,)
    kernel.sub_(shift_n.unsqueeze(-1)).exp_()
    v = torch.zeros_like(log_q)
    sums = []
    for k in range(c_p.numel()):
        # u: weights on the nodes, summed over each set's nodes per dim.
        col_shift = segment_max(shift_n + v, segments)
        col_weight = _col_weight(shift_n, v, col_shift, segments)
        col_sum = segment_sum(kernel * col_weight.unsqueeze(-1), segments)
        u = c_p[k] * (log_p - _lse_u(shift_x, col_shift, col_sum))
        # v: weights on the dims, summed over each node's dims.
        row_shift = (shift_x + u).amax(dim=-1, keepdim=True)
        row_sum = (kernel * segments.gather(_row_weight(shift_x, u, row_shift))).sum(dim=-1)
        v = c_q[k] * (log_q - _lse_v(shift_n, row_shift, row_sum, segments))
        sums += [col_sum, row_sum, col_shift, row_shift]
    return u, v, kernel, (shift_x, shift_n), sums


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
                      grad_logits: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""Backpropagates the gradients ``gu``, ``gv`` of the last potentials through the iterations of
    :func:`_scaling_iterations`, adding the gradient w.r.t. the logits :math:`s x` of all iterations into
    :obj:`grad_logits` (in place); returns those w.r.t. ``c_p``, ``c_q``, ``log_p`` and ``log_q``. Every
    softmax of spec §2 is the kernel times a per-node and a per-(set, dim) factor
    (:class:`_SinkhornScaling`)."""
    shift_x, shift_n = shifts
    grad_c_p, grad_c_q = torch.zeros_like(c_p), torch.zeros_like(c_q)
    grad_log_p, grad_log_q = torch.zeros_like(log_p), torch.zeros_like(log_q)
    tiny = torch.finfo(kernel.dtype).tiny
    for k in reversed(range(c_p.numel())):
        col_sum, row_sum, col_shift, row_shift = sums[4 * k:4 * k + 4]
        # The same operations as the forward, on (B, D) and (N,) values only.
        v = torch.zeros_like(log_q)
        if k > 0:  # the v entering iteration k, from the sums of iteration k - 1
            _, prev_row_sum, _, prev_row_shift = sums[4 * k - 4:4 * k]
            v = c_q[k - 1] * (log_q - _lse_v(shift_n, prev_row_shift, prev_row_sum, segments))
        col_weight = _col_weight(shift_n, v, col_shift, segments)
        lse_u = _lse_u(shift_x, col_shift, col_sum)
        u = c_p[k] * (log_p - lse_u)
        row_weight = _row_weight(shift_x, u, row_shift)
        lse_v = _lse_v(shift_n, row_shift, row_sum, segments)

        # v = c_q (log q - LSE_d B): dv/dB = -c_q E_nd y_bd / R_n.
        grad_c_q[k] = torch.dot(gv, log_q - lse_v)
        grad_log_q.add_(c_q[k] * gv)
        node = kernel * (gv / row_sum).unsqueeze(-1)
        gu = gu - c_q[k] * row_weight * segment_sum(node, segments)
        grad_logits.addcmul_(node, segments.gather(-c_q[k] * row_weight))
        # u = c_p (log p - LSE_n A): du/dA = -c_p E_nd w_n / C_bd.
        grad_c_p[k] = (gu * (log_p - lse_u)).sum()
        grad_log_p.add_(c_p[k] * gu)
        dim = kernel * segments.gather(gu / col_sum.clamp_min(tiny))
        gv = -c_p[k] * col_weight * dim.sum(dim=-1)  # gradient of the previous v
        grad_logits.addcmul_(dim, (-c_p[k] * col_weight).unsqueeze(-1))
        gu = torch.zeros_like(gu)  # the previous u does not enter this iteration
    return grad_c_p, grad_c_q, grad_log_p, grad_log_q


def _col_weight(shift_n: Tensor, v: Tensor, col_shift: Tensor, segments: Segments) -> Tensor:
    return (shift_n + v - segments.gather(col_shift)).exp()  # w_n = exp(a_n + v_n - W_b)


def _row_weight(shift_x: Tensor, u: Tensor, row_shift: Tensor) -> Tensor:
    return (shift_x + u - row_shift).exp()  # y_bd = exp(A_bd + u_bd - Y_b)


def _lse_u(shift_x: Tensor, col_shift: Tensor, col_sum: Tensor) -> Tensor:
    return shift_x + col_shift.unsqueeze(-1) + col_sum.clamp_min(torch.finfo(col_sum.dtype).tiny).log()


def _lse_v(shift_n: Tensor, row_shift: Tensor, row_sum: Tensor, segments: Segments) -> Tensor:
    return shift_n + segments.gather(row_shift.squeeze(-1)) + row_sum.log()


def sinkhorn_log_plan(
    x: Tensor,
    segments: Segments,
    eps: Tensor,
    lam_p: Tensor,
    lam_q: Tensor,
    log_p: Tensor,
    log_q: Tensor,
    memory_efficient: bool = True,
) -> Tensor:
    r"""Solves, for every set :math:`b` of the batch, the entropic unbalanced OT problem

    .. math::
        \min_{T \geq 0} \; -\langle X_b, T \rangle
        + \varepsilon \sum T (\log T - 1)
        + \lambda_p \operatorname{KL}(T^\top \mathbf{1} \,\|\, p_b)
        + \lambda_q \operatorname{KL}(T \mathbf{1} \,\|\, q_b)

    by ``K = eps.numel()`` Sinkhorn iterations (:func:`sinkhorn_step`) from ``u = 0, v = 0``, and
    returns :math:`\log T = X / \varepsilon + u + v` of shape ``(N, D)``, capped at
    :data:`~uotp_geometric.solvers.common.MAX_LOG_MASS`.

    ``eps``, ``lam_p`` and ``lam_q`` are 1-D tensors of length ``K``: iteration ``k`` uses entry
    ``k``, and the plan is read with the last ``eps``. ``lam = inf`` makes a marginal hard, ``lam = 0``
    free.
    With :obj:`memory_efficient`, the backward stores ``O(N D + K (B D + N))`` instead of autograd's
    ``O(K N D)``, and one ``eps`` for all iterations runs in the scaling domain on the CPU
    (:class:`_SinkhornScaling`: one exponential of the data instead of two per iteration), falling back
    to the log domain (:class:`_SinkhornPotentials`) where a set spans more than the float's range.
    """
    c_p, c_q = hardness(lam_p, eps), hardness(lam_q, eps)
    u = v = None
    if memory_efficient and _scaling_applies(x, eps):
        u, v, ok = _SinkhornScaling.apply(x, segments, eps[0].reciprocal(), c_p, c_q, log_p, log_q)
        if not bool(ok):  # a sum underflowed: its set spans more than the float's range
            u = v = None
    if u is None:
        u, v = _log_domain_potentials(x, segments, eps, c_p, c_q, log_p, log_q, memory_efficient)
    return _read_log_plan(x, segments, u, v, eps)


def sinkhorn_pool(
    x: Tensor,
    segments: Segments,
    eps: Tensor,
    lam_p: Tensor,
    lam_q: Tensor,
    log_p: Tensor,
    log_q: Tensor,
    memory_efficient: bool = True,
) -> Tensor:
    r"""UOT-Pooling with the plan :math:`T` of :func:`sinkhorn_log_plan` (same arguments):
    :math:`z_b = D \sum_{n \in b} x_n \odot T_n`, shape ``(B, D)``.

    Where :func:`sinkhorn_log_plan` runs in the scaling domain, the pooled vectors are read from its
    kernel (:class:`_SinkhornScalingPool`) and the plan is never formed, which saves a handful of
    ``(N, D)`` passes forward and backward; elsewhere they are pooled from the plan.
    """
    if memory_efficient and _scaling_applies(x, eps):
        c_p, c_q = hardness(lam_p, eps), hardness(lam_q, eps)
        out, ok = _SinkhornScalingPool.apply(x, segments, eps[0].reciprocal(), c_p, c_q, log_p, log_q)
        if bool(ok):
            return out
        # A sum underflowed or a plan entry may reach the cap: the log domain, as sinkhorn_log_plan does.
        u, v = _log_domain_potentials(x, segments, eps, c_p, c_q, log_p, log_q, memory_efficient)
        log_plan = _read_log_plan(x, segments, u, v, eps)
    else:
        log_plan = sinkhorn_log_plan(x, segments, eps, lam_p, lam_q, log_p, log_q, memory_efficient)
    return pool_log_plan(x, log_plan, segments)


def _read_log_plan(x: Tensor, segments: Segments, u: Tensor, v: Tensor, eps: Tensor) -> Tensor:
    log_plan = torch.addcmul(segments.gather(u) + v.unsqueeze(-1), x, eps[-1].reciprocal())
    return log_plan.clamp(max=MAX_LOG_MASS)


def _log_domain_potentials(x: Tensor, segments: Segments, eps: Tensor, c_p: Tensor, c_q: Tensor, log_p: Tensor,
                           log_q: Tensor, memory_efficient: bool) -> Tuple[Tensor, Tensor]:
    scale = eps.reciprocal()
    if memory_efficient and torch.is_grad_enabled():
        return _SinkhornPotentials.apply(x, segments, scale, c_p, c_q, log_p, log_q)
    return _sinkhorn_loop(x, segments, scale, c_p, c_q, log_p, log_q)


def _scaling_applies(x: Tensor, eps: Tensor) -> bool:
    r"""Whether :class:`_SinkhornScaling` runs: one ``eps`` for all iterations (a scalar expanded to
    ``K``), on the CPU, in eager mode. Its check of the sums costs a host sync, which an accelerator
    pays dearly and :func:`torch.compile` cannot trace; there the log domain runs, fused by the compiler."""
    one_eps = eps.numel() == 1 or eps.stride(0) == 0
    return (one_eps and x.device.type == 'cpu' and x.size(0) > 0
            and x.dtype in SAFE_SUM and not torch.compiler.is_compiling())
