"""``python -m experiments.bench [--quick] [--device cpu|cuda] [--out DIR] [--repeats R] [--training]``.

Times UOT-Pooling (:class:`~uotp_geometric.UOTAggregation`, both solvers) against PyG's aggregations and
against a padded implementation of the same iterations (:func:`padded_uot_pool`: ``to_dense_batch`` and a
mask, the layout of the published layer), times ROT-Pooling's structure term (``gw > 0``) against ``gw = 0``,
measures the peak extra memory of forward+backward, and writes
``results.csv``, ``README.md`` and PNG plots of the scaling curves into ``--out`` (default ``runs/bench``;
the committed results are made with ``--out docs/bench``). ``--training`` adds seconds per epoch of GIN on
PROTEINS with mean, UOT (Sinkhorn) and UOT (BADMM) pooling. ``--authors-code D``, ``D`` a checkout of the
authors' code (https://github.com/SDS-Lab/ROT-Pooling, not part of this repository), adds their ``UOTPooling``
(BADMM-E and Sinkhorn) timed against ours on 128 uniform sets of 30 nodes and the skewed batches.

CPU timings on a shared machine are noisy, so every number that is compared is a ratio against a baseline
measured in the same process, with the methods timed round-robin within each repeat: a ratio is the median
over repeats of the per-repeat ratio, so a load spike hits both sides of it alike.

Modules: :mod:`~experiments.bench.cases` (batches, methods, plans), :mod:`~experiments.bench.padded` (the
padded reference), :mod:`~experiments.bench.timing`, :mod:`~experiments.bench.memory`,
:mod:`~experiments.bench.suite` (the measurements of a run), :mod:`~experiments.bench.training` (epochs of a
GNN), :mod:`~experiments.bench.authors` (the authors' layers), :mod:`~experiments.bench.report` (README, CSV,
plots).
"""
from experiments.bench.authors import AuthorsCodeError, AuthorsMethod, AuthorsPlan, AuthorsUOT
from experiments.bench.cases import (DEFAULT_MODE, MODES, SKEWED, SOFTMAX, SOLVERS, Batch, Method, Plan,
                                     make_plan, uot_methods)
from experiments.bench.padded import PaddedUOT, padded_uot_pool
from experiments.bench.report import headline, machine_info, write_outputs
from experiments.bench.suite import COLUMNS, measure_group, run
from experiments.bench.training import TrainingPlan, measure_training

__all__ = ["DEFAULT_MODE", "MODES", "SKEWED", "SOFTMAX", "SOLVERS", "Batch", "Method", "Plan", "make_plan",
           "uot_methods", "PaddedUOT", "padded_uot_pool", "headline", "machine_info", "write_outputs", "COLUMNS",
           "measure_group", "run", "TrainingPlan", "measure_training", "AuthorsCodeError", "AuthorsMethod",
           "AuthorsPlan", "AuthorsUOT"]
