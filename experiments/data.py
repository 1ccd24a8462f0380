"""TU and OGB datasets from a local root, loaded through a writable cache.

A dataset is read from ``--root`` (never written there) and copied into ``--cache``, where PyG writes
``processed/``. A cache entry is built in a temporary folder and renamed into place only when complete, so a
failed or killed first load leaves nothing that a later run could take for data. Files missing from the root
are downloaded, as PyG and OGB do; a failed download says in one line what was looked for where.

TU graphs get PyG's kernel-benchmark node features; OGB molecules keep OGB's integer atom and bond features.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
import torch_geometric.transforms as T
from torch_geometric.data import Data, InMemoryDataset
from torch_geometric.datasets import TUDataset
from torch_geometric.transforms import BaseTransform
from torch_geometric.utils import degree

from experiments.config import UsageError


class NormalizedDegree(BaseTransform):
    """The standardised node degree as the only node feature (PyG ``benchmark/kernel``)."""

    def __init__(self, mean: float, std: float) -> None:
        self.mean = mean
        self.std = std

    def forward(self, data: Data) -> Data:
        deg = degree(data.edge_index[0], data.num_nodes, dtype=torch.float)
        data.x = ((deg - self.mean) / self.std).view(-1, 1)
        return data


class DatasetNotFound(UsageError):
    """The root does not exist, or neither it nor the cache holds the dataset and it could not be downloaded."""


def _copy_files(src: Path, dst: Path) -> None:
    """Copies the files under ``src`` to ``dst``."""
    for file in sorted(src.rglob("*")):
        if file.is_file():
            target = dst / file.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            # Files only, not copy2 or copytree: a read-only root must not make the cache read-only too.
            shutil.copyfile(file, target)


def _cache_entry(entry: Path, root: Path, layout: str, build: Callable[[Path], None]) -> None:
    """Makes the cache folder ``entry`` unless it exists: ``build(tmp)`` fills ``tmp / entry.name`` in a
    temporary folder beside it, which is renamed to ``entry`` only once ``build`` has returned.

    ``root`` must exist even where the entry does, so that a mistyped root is an error whether or not the cache
    is filled; ``layout`` says what it should hold, for the error message.
    """
    if not root.is_dir():
        raise DatasetNotFound(f"--root {root} does not exist; point --root at a folder that holds {layout}, "
                              f"or at an existing folder without it to download it into --cache")
    if entry.is_dir() and not any(path.is_file() for path in entry.rglob("*")):
        shutil.rmtree(entry)  # empty folders, as an earlier version left after a failed download
    if entry.is_dir():
        return
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}."))
    try:
        build(tmp)
        try:
            (tmp / entry.name).rename(entry)
        except OSError:
            if not entry.is_dir():
                raise  # else another run made the same entry first, which is as good
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _download_failed(name: str, looked_for: str, url: str, error: Exception, layout: str) -> DatasetNotFound:
    reason = " ".join(str(error).split()) or type(error).__name__
    return DatasetNotFound(f"{name}: no {looked_for}, and the download from {url} failed ({reason}); put the "
                           f"files there or point --root at a folder that holds {layout}")


def load_tu(name: str, root: str | os.PathLike, cache: str | os.PathLike) -> TUDataset:
    """Loads TU dataset ``name`` from ``root/name/raw`` without ever writing into ``root``.

    The raw files are copied to ``cache/name/raw`` once, and PyG writes ``processed/`` next to them. Without
    ``root/name/raw``, PyG downloads the raw files into the cache. Graphs without node features get a one-hot
    degree, or the standardised degree when the maximum degree is 1000 or more, as in ``benchmark/kernel``.
    """
    root, cache = Path(root).expanduser(), Path(cache).expanduser()
    layout = f"{name}/raw/{name}_A.txt and the other TU files"

    def build(tmp: Path) -> None:
        raw = root / name / "raw"
        if raw.is_dir():
            _copy_files(raw, tmp / name / "raw")
        try:
            TUDataset(str(tmp), name)
        except OSError as error:  # PyG's download, from a URL it builds from the name
            raise _download_failed(name, f"{name}_A.txt, {name}_graph_indicator.txt in {raw}",
                                   f"{TUDataset.url}/{name}.zip", error, layout) from None

    _cache_entry(cache / name, root, layout, build)
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


def _ogb_master():
    """OGB's table of graph property datasets (name -> URL, task type, ...), as OGB reads it."""
    import pandas as pd
    from ogb import graphproppred  # ogb is the optional "ogb" extra

    return pd.read_csv(Path(graphproppred.__file__).with_name("master.csv"), index_col=0, keep_default_na=False)


def ogb_names() -> list[str]:
    """The OGB graph property prediction datasets (``ogbg-*``)."""
    return list(_ogb_master().columns)


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

    root, cache = Path(root).expanduser(), Path(cache).expanduser()
    folder = name.replace("-", "_")  # OGB's directory name
    layout = f"{folder}/ (OGB's files: RELEASE_v1.txt, raw/, split/, mapping/)"
    # ogb 1.3.6 reads its processed file with torch.load's default, which is weights_only=True from torch 2.6.
    torch.serialization.add_safe_globals([DataEdgeAttr, DataTensorAttr, GlobalStorage])

    def build(tmp: Path) -> None:
        if (root / folder).is_dir():
            _copy_files(root / folder, tmp / folder)
        try:
            PygGraphPropPredDataset(name, root=str(tmp))
        except OSError as error:  # OGB's download
            raise _download_failed(name, str(root / folder), _ogb_master()[name]["url"], error, layout) from None

    _cache_entry(cache / folder, root, layout, build)
    return PygGraphPropPredDataset(name, root=str(cache))
