r"""Independent references for the tests: dense per-set computations and POT, in float64."""
from typing import List, Tuple

import numpy as np
import torch
from torch import Tensor


def ragged_batch(sizes: List[int], num_dims: int, seed: int = 0,
                 dtype=torch.float64, shuffle: bool = False,
                 scale: float = 1.0) -> Tuple[Tensor, Tensor]:
    r"""Random features of a batch of sets of the given sizes and their (optionally unsorted) index."""
    gen = torch.Generator().manual_seed(seed)
    index = torch.repeat_interleave(torch.arange(len(sizes)),
                                    torch.tensor(sizes))
    x = scale * torch.randn(len(index), num_dims, generator=gen, dtype=dtype)
    if shuffle:
        perm = torch.randperm(len(index), generator=gen)
        x, index = x[perm], index[perm]
    return x, index


def pot_plan(x_set: Tensor, eps: float, lam_p: float, lam_q: float,
             p: np.ndarray = None, q: np.ndarray = None) -> np.ndarray:
    r"""The UOT plan of one set, shape ``(N, D)``, from POT's entropic unbalanced Sinkhorn."""
    import ot
    x_np = x_set.detach().double().numpy()
    num_nodes, num_dims = x_np.shape
    p = np.full(num_dims, 1.0 / num_dims) if p is None else p
    q = np.full(num_nodes, 1.0 / num_nodes) if q is None else q
    plan = ot.unbalanced.sinkhorn_unbalanced(
        p, q, -x_np.T, eps, (lam_p, lam_q), reg_type='entropy',
        numItermax=200000, stopThr=1e-16)
    return plan.T
