"""The UOT paper's protocol: an AD-GCL encoder trained without labels, then a linear SVM on its embeddings.

``python -m experiments.adgcl --config configs/adgcl/mutag.yaml [--<field> <value>]``

AD-GCL (Suresh et al., NeurIPS 2021, github.com/susheels/adgcl, ``test_minmax_tu.py``) trains a GIN encoder
with a contrastive loss between each graph and a view of it whose edges a second GNN, the view learner, drops
adversarially. The UOT paper (its script ``backbones/adgcl.py``) keeps this protocol and swaps the encoder's
readout, here any pooling name of :func:`experiments.models.make_readout`.

- :mod:`experiments.adgcl.model`: the encoder, the view learner and the contrastive objective.
- :mod:`experiments.adgcl.protocol`: the config, the alternating training, the SVM evaluation and the runs.
"""
