"""TU and OGB datasets from an offline root, loaded through a writable cache.

TU graphs get PyG's kernel-benchmark node features; OGB molecules keep OGB's integer atom and bond features.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch_geometric.transforms as T
from torch_geometric.data import Data, InMemoryDataset
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


def _copy_once(src: Path, dst: Path) -> None:
    """Copies the files under ``src`` to ``dst``, unless ``dst`` exists or ``src`` does not."""
    if not src.is_dir() or dst.is_dir():
        return
    # Copy to a temporary name and rename it, so that a killed copy is never taken for a complete one.
    tmp = dst.with_name(f"{dst.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True)
    for file in sorted(src.rglob("*")):
        if file.is_file():
            target = tmp / file.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            # Files only, not copy2 or copytree: a read-only root must not make the cache read-only too.
            shutil.copyfile(file, target)
    tmp.rename(dst)


def load_tu(name: str, root: str | os.PathLike, cache: str | os.PathLike) -> TUDataset:
    """Loads TU dataset ``name`` from ``root/name/raw`` without ever writing into ``root``.

    The raw files are copied to ``cache/name/raw`` once, and PyG writes ``processed/`` next to them. Without
    ``root/name/raw``, PyG downloads the raw files into the cache. Graphs without node features get a one-hot
    degree, or the standardised degree when the maximum degree is 1000 or more, as in ``benchmark/kernel``.
    """
    cache = Path(cache).expanduser()
    _copy_once(Path(root).expanduser() / name / "raw", cache / name / "raw")
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


def load_ogb(name: str, root: str | os.PathLike, cache: str | os.PathLike) -> InMemoryDataset:
    """Loads OGB graph property dataset ``name`` (e.g. ``"ogbg-molhiv"``) without ever writing into ``root``.

    ``root`` holds OGB's folder layout, ``root/ogbg_molhiv/{RELEASE_v1.txt,raw,split,mapping}``; the folder is
    copied to ``cache`` once, and PyG writes ``processed/`` there. Without ``root/ogbg_molhiv``, OGB downloads
    the dataset into the cache.
    """
    # ogb's own imports, here so that TU runs need no ogb installed (it is the optional "ogb" extra).
    from ogb.graphproppred import PygGraphPropPredDataset
    from torch_geometric.data.data import DataEdgeAttr, DataTensorAttr
    from torch_geometric.data.storage import GlobalStorage

    cache = Path(cache).expanduser()
    folder = name.replace("-", "_")  # OGB's directory name
    _copy_once(Path(root).expanduser() / folder, cache / folder)
    # ogb 1.3.6 reads its processed file with torch.load's default, which is weights_only=True from torch 2.6.
    torch.serialization.add_safe_globals([DataEdgeAttr, DataTensorAttr, GlobalStorage])
    return PygGraphPropPredDataset(name, root=str(cache))
