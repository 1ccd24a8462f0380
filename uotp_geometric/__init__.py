r"""UOT-Pooling for PyTorch Geometric.

``import uotp_geometric`` registers :class:`UOTAggregation` with PyG's aggregation resolver, so that
``aggr="uot"`` works in message-passing layers and in :class:`~torch_geometric.nn.aggr.MultiAggregation`.
"""
import torch_geometric.nn.aggr

from uotp_geometric import functional, segment, solvers
from uotp_geometric.aggr import UOTAggregation
from uotp_geometric.functional import uot_diagnostics, uot_plan, uot_pool

__version__ = '0.1.0'


def register() -> None:
    r"""Makes :class:`UOTAggregation` resolvable by name (``"uot"``) in PyG. Idempotent."""
    # PyG's resolver looks up Aggregation subclasses among the names of torch_geometric.nn.aggr.
    setattr(torch_geometric.nn.aggr, UOTAggregation.__name__, UOTAggregation)


register()

__all__ = [
    'UOTAggregation', 'uot_plan', 'uot_pool', 'uot_diagnostics', 'register',
    'functional', 'segment', 'solvers', '__version__'
]
