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
similar size (:class:`SetBlocks`), so no batch is padded to its largest set.
"""
from functools import partial
from typing import List, NamedTuple, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from uotp_geometric.segment import Segments
from uotp_geometric.solvers.badmm import badmm_log_plan
from uotp_geometric.solvers.sinkhorn import sinkhorn_log_plan


class SetBlocks(NamedTuple):
    r"""The non-empty sets of a batch as dense blocks, in buckets of sets whose sizes lie in the same
    interval :math:`(2^{k-1}, 2^k]`, each bucket padded to its largest set: the padded blocks hold
    fewer than ``2 N`` rows whatever the spread of set sizes.

    :obj:`rows` ``(P,)`` names the row of every padded slot (``N`` for padding: a zero row appended to
    the input), :obj:`slot` ``(N,)`` the slot of every row, and :obj:`shapes` the ``(number of sets,
    padded size)`` of each bucket, in order.
    """
    rows: Tensor
    slot: Tensor
    shapes: List[Tuple[int, int]]

    def pad(self, src: Tensor) -> List[Tensor]:
        r"""The rows of :obj:`src` ``(N, D)`` as one zero-padded ``(B_k, L_k, D)`` tensor per bucket."""
        padded = F.pad(src, (0, 0, 0, 1)).index_select(0, self.rows)
        sizes = [num * size for num, size in self.shapes]
        return [part.view(num, size, src.size(-1)) for part, (num, size)
                in zip(padded.split(sizes), self.shapes)]

    def unpad(self, blocks: List[Tensor]) -> Tensor:
        r"""The inverse of :meth:`pad`: the real rows of the blocks, in the order of the input."""
        return torch.cat([block.flatten(0, 1) for block in blocks]).index_select(0, self.slot)


def set_blocks(segments: Segments) -> SetBlocks:
    r"""Groups the sets of :obj:`segments` into :class:`SetBlocks` (reads the set sizes on the host)."""
    index, num_rows = segments.index, segments.index.numel()
    count = torch.bincount(index, minlength=segments.num_sets)
    start = count.cumsum(0) - count
    by_set = index.argsort(stable=True)
    # Bucket k holds the sets of 2^(k-1) < size <= 2^k: the exponent of frexp(size - 1).
    bucket = torch.frexp((count - 1).clamp_min(0).double()).exponent
    rows, shapes = [index.new_zeros(0)], []
    for k in bucket[count > 0].unique().tolist():
        members = ((bucket == k) & (count > 0)).nonzero().squeeze(1)
        size = int(count[members].max())
        offset = torch.arange(size, device=index.device)
        position = (start[members].unsqueeze(-1) + offset).clamp(max=num_rows - 1)
        valid = offset < count[members].unsqueeze(-1)
        rows.append(torch.where(valid, by_set[position], num_rows).reshape(-1))
        shapes.append((members.numel(), size))
    rows_cat = torch.cat(rows)
    real = rows_cat < num_rows
    slot = torch.empty_like(index)
    slot[rows_cat[real]] = real.nonzero().squeeze(1)
    return SetBlocks(rows_cat, slot, shapes)


class Structure(NamedTuple):
    r"""What the structure term needs of the features, computed once per call, per bucket of
    :obj:`blocks`: :obj:`x_node` :math:`= X / \sqrt{\max_n |x_n|^2}` of each set ``(B_k, L_k, D)``, so
    that :math:`C_N / \max C_N = \tilde X \tilde X^\top`, and :obj:`gram` :math:`= C_D / \max C_D`
    ``(B_k, D, D)``."""
    x_node: List[Tensor]
    gram: List[Tensor]
    blocks: SetBlocks


def _nonzero(scale: Tensor) -> Tensor:
    # "Divided by its largest entry, 1 if that entry is 0": only an all-zero set has a zero maximum.
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def structure(x: Tensor, segments: Segments) -> Structure:
    r"""The normalised similarities of every set of the batch (see :class:`Structure`). The largest
    entries come from segment sums of squares: over each row (nodes) and over each column (dims)."""
    blocks = set_blocks(segments)
    x_node, gram = [], []
    for block in blocks.pad(x):
        square = block.square()
        row_max = square.sum(-1).amax(-1)
        dim_max = square.sum(-2).amax(-1)
        x_node.append(block * _nonzero(row_max).rsqrt().view(-1, 1, 1))
        gram.append(block.transpose(1, 2) @ block / _nonzero(dim_max).view(-1, 1, 1))
    return Structure(x_node, gram, blocks)


def structure_product(st: Structure, plan: Tensor) -> Tensor:
    r"""The normalised :math:`C_N T C_D` of every set, shape ``(N, D)``, as
    :math:`\tilde X \big(\tilde X^\top (T \tilde C_D)\big)`: three per-set products of ``O(N D^2)``
    work, with ``D x D`` intermediates."""
    out = [x_node @ (x_node.transpose(1, 2) @ (block @ gram))
           for x_node, gram, block in zip(st.x_node, st.gram, st.blocks.pad(plan))]
    return st.blocks.unpad(out) if out else torch.zeros_like(plan)


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
    outer steps keep ``O(N D)`` each.
    """
    st = structure(x, segments)
    log_t = log_q.unsqueeze(-1) + segments.gather(log_p)
    for m in range(eps.numel()):
        score = x + gw[m] * structure_product(st, log_t.exp()) + prox[m] * log_t
        inner = [value.expand(inner_iters) for value in (eps[m] + prox[m], lam_p[m], lam_q[m])]
        log_t = sinkhorn_log_plan(score, segments, *inner, log_p, log_q, memory_efficient)
    return log_t


def _structure_score(st: Structure, gw: Tensor, plan: Tensor) -> Tensor:
    return (gw / 2) * structure_product(st, plan)


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
) -> Tensor:
    r"""Solves, for every set of the batch, the ROT problem of this module by Bregman ADMM with the
    quadratic term split bilinearly between the blocks, :math:`-\frac{\gamma}{2}\langle C_N T C_D, S
    \rangle`: :func:`~uotp_geometric.solvers.badmm_log_plan` with the extra scores

    .. math::
        G = \log S + \big(X + \tfrac{\gamma_k}{2} C_N S C_D - Z\big) / \rho, \qquad
        H = \big(Z + \tfrac{\gamma_k}{2} C_N T C_D + \rho \log T\big) / (\varepsilon + \rho)

    in its two blocks (the rest of each iteration unchanged). Returns :math:`\log S` of shape ``(N, D)``.
    ``gw`` is a 1-D tensor of length ``K``, like the other values.
    """
    st = structure(x, segments)
    scores = [partial(_structure_score, st, gw[k]) for k in range(gw.numel())]
    return badmm_log_plan(x, segments, eps, lam_p, lam_q, rho, log_p, log_q, memory_efficient, scores)
