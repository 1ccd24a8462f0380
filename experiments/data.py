"""TU datasets from an offline root, loaded through a writable cache, with PyG's kernel-benchmark features."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch_geometric.transforms as T
from torch_geometric.data import Data
from torch_geometric.datasets import TUDataset
from torch_geometric.transforms import BaseTransform
from torch_geometric.utils import degree


class NormalizedDegree(BaseTransform):
    """The standardised node degree as the only node feature (PyG ``benchmark/kernel``)."""

    def __init__(self, mean: float, std: float) -> None:
        self.mean = mean
        self.std = std

    def forward(self, data: Data) -> Data:
        deg = degree(data.edge_index[0], data.num_nodes, dtype=torch.float)
        data.x = ((deg - self.mean) / self.std).view(-1, 1)
        return data


def load_tu(name: str, root: str | os.PathLike, cache: str | os.PathLike) -> TUDataset:
    """Loads TU dataset ``name`` from ``root/name/raw`` without ever writing into ``root``.

    The raw files are copied to ``cache/name/raw`` once, and PyG writes ``processed/`` next to them. Without
    ``root/name/raw``, PyG downloads the raw files into the cache. Graphs without node features get a one-hot
    degree, or the standardised degree when the maximum degree is 1000 or more, as in ``benchmark/kernel``.
    """
    src = Path(root).expanduser() / name / "raw"
    cache = Path(cache).expanduser()
    dst = cache / name / "raw"
    if src.is_dir() and not dst.is_dir():
        # Copy to a temporary name and rename it, so that a killed copy is never taken for a complete one.
        tmp = dst.with_name(f"raw.tmp{os.getpid()}")
        tmp.mkdir(parents=True)
        for file in src.iterdir():
            shutil.copyfile(file, tmp / file.name)  # not copy2: a read-only root must not make the cache so
        tmp.rename(dst)
    dataset = TUDataset(str(cache), name)

    if dataset.num_node_features == 0:
        degs = [degree(data.edge_index[0], data.num_nodes, dtype=torch.long) for data in dataset]
        max_degree = int(torch.cat(degs).max())
        if max_degree < 1000:
            dataset.transform = T.OneHotDegree(max_degree)
        else:
            deg = torch.cat(degs).float()
            dataset.transform = NormalizedDegree(deg.mean().item(), deg.std().item())
    return dataset
