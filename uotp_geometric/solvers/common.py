r"""What the solvers share: the cap on a plan's log-mass, the weight of a soft marginal
(:func:`hardness`), and pooling from a plan (:func:`pool_log_plan`)."""
import torch
from torch import Tensor

from uotp_geometric.segment import Segments, segment_sum

# The largest log-mass a plan entry (Sinkhorn) or marginal (BADMM) may take. Where the exact optimum
# is larger (tiny lam with large |x| / eps lets the unbalanced mass grow like exp(|x| / eps)), its
# pooled value overflows float32, and BADMM's gradients, which pass through T at every iteration, do so
# already near e^30 (found by the fuzz test). Capping at e^15 ~ 3.3e6 keeps both finite. Masses of
# normalised priors are at most 1; the counting prior's (sum pooling) reach the cap only for sets of
# more than 3.3e6 * D elements.
MAX_LOG_MASS = 15.0


def hardness(lam: Tensor, scale: Tensor) -> Tensor:
    r"""Returns ``lam / (lam + scale)``, the weight that a marginal update puts on its prior.

    It is 1 for a hard marginal (``lam = inf``) and 0 for a free one (``lam = 0``, or ``scale = inf``
    with finite ``lam``). The infinite cases go through :func:`torch.where` on finite stand-ins, so that
    no ``inf / inf`` reaches the value or the gradient of a finite argument.
    """
    lam_inf, scale_inf = torch.isinf(lam), torch.isinf(scale)
    one = torch.ones_like(lam)
    finite_lam = torch.where(lam_inf, one, lam)
    finite_scale = torch.where(scale_inf, one, scale)
    out = finite_lam / (finite_lam + finite_scale)
    out = torch.where(scale_inf, torch.zeros_like(out), out)
    return torch.where(lam_inf, one, out)


def pool_log_plan(x: Tensor, log_plan: Tensor, segments: Segments) -> Tensor:
    r"""UOT-Pooling from a plan: :math:`z_b = D \sum_{n \in b} x_n \odot T_n`, shape ``(B, D)``."""
    return x.size(-1) * segment_sum(x * log_plan.exp(), segments)
