r"""The structure term of ROT-Pooling (spec §6): the per-set normalised similarities :math:`C_N` and
:math:`C_D` of a ragged batch, the product :math:`C_N T C_D` and its adjoint.

:math:`C_N T C_D` is computed per set as :math:`\tilde X \big(\tilde X^\top (T \tilde C_D)\big)`, with
:math:`\tilde X = X / \sqrt{\max_n |x_n|^2}` and the ``D x D`` matrix :math:`\tilde C_D`: ``O(N D^2)`` work,
never an ``N x N`` matrix. The per-set products run as batched matrix products over buckets of sets of
similar size (:class:`SetBlocks`), so no batch is padded to its largest set.
"""
from typing import List, NamedTuple, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from uotp_geometric.segment import Segments


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


def structure_product_vjp(st: Structure, plan: Tensor, grad: Tensor) -> Tuple[List[Tensor], List[Tensor]]:
    r"""The gradients of :math:`\langle A, \tilde X \tilde X^\top T \tilde C_D \rangle` (:obj:`grad`
    :math:`= A`, :obj:`plan` :math:`= T`) w.r.t. :obj:`st`'s :math:`\tilde X` and :math:`\tilde C_D`, per
    bucket. (Its gradient w.r.t. :math:`T` is :func:`structure_product` of :math:`A`: the map is
    self-adjoint, both similarities being symmetric.) With :math:`W = T \tilde C_D`,

    .. math::
        \nabla_{\tilde X} = A\, W^\top \tilde X + W A^\top \tilde X, \qquad
        \nabla_{\tilde C_D} = (\tilde X^\top T)^\top (\tilde X^\top A).
    """
    grad_node, grad_gram = [], []
    for x_node, gram, block, cotangent in zip(st.x_node, st.gram, st.blocks.pad(plan), st.blocks.pad(grad)):
        weighted = block @ gram
        grad_node.append(cotangent @ (weighted.transpose(1, 2) @ x_node)
                         + weighted @ (cotangent.transpose(1, 2) @ x_node))
        grad_gram.append((x_node.transpose(1, 2) @ block).transpose(1, 2) @ (x_node.transpose(1, 2) @ cotangent))
    return grad_node, grad_gram
