from pathlib import Path

import pytest
import torch
from torch_geometric.datasets import TUDataset

from experiments.data import DatasetNotFound, load_tu

REPO = Path(__file__).resolve().parents[2]


def _write_tu(root, name, graphs, labels):
    """Writes TU-format raw files (no node labels) for graphs given as lists of undirected edges."""
    raw = root / name / "raw"
    raw.mkdir(parents=True)
    pairs, indicator, offset = [], [], 0
    for i, edges in enumerate(graphs):
        num_nodes = 1 + max(max(edge) for edge in edges)
        pairs += [(offset + a + 1, offset + b + 1) for a, b in edges]
        pairs += [(offset + b + 1, offset + a + 1) for a, b in edges]
        indicator += [i + 1] * num_nodes
        offset += num_nodes
    (raw / f"{name}_A.txt").write_text("".join(f"{a}, {b}\n" for a, b in pairs))
    (raw / f"{name}_graph_indicator.txt").write_text("".join(f"{i}\n" for i in indicator))
    (raw / f"{name}_graph_labels.txt").write_text("".join(f"{y}\n" for y in labels))


def _files(root):
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


def test_one_hot_degree_and_root_untouched(tmp_path):
    root, cache = tmp_path / "root", tmp_path / "cache"
    _write_tu(root, "TOY", [[(0, 1), (1, 2)], [(0, 1), (0, 2), (0, 3)]], [1, 2])
    before = _files(root)
    dataset = load_tu("TOY", root, cache)
    assert _files(root) == before  # nothing written into the root
    assert (cache / "TOY" / "raw" / "TOY_A.txt").is_file() and (cache / "TOY" / "processed").is_dir()
    assert dataset.num_features == 4  # degrees 0..3
    assert torch.equal(dataset[0].x.argmax(dim=1), torch.tensor([1, 2, 1]))
    assert torch.equal(dataset[1].x.argmax(dim=1), torch.tensor([3, 1, 1, 1]))
    assert torch.equal(dataset.y, torch.tensor([0, 1]))


def test_normalised_degree_from_degree_1000(tmp_path):
    star = [(0, leaf) for leaf in range(1, 1001)]
    _write_tu(tmp_path / "root", "STAR", [star, [(0, 1)]], [0, 1])
    dataset = load_tu("STAR", tmp_path / "root", tmp_path / "cache")
    assert dataset.num_features == 1
    x = torch.cat([data.x for data in dataset]).view(-1)
    deg = torch.tensor([1000.0] + [1.0] * 1000 + [1.0, 1.0])
    assert torch.allclose(x, (deg - deg.mean()) / deg.std())


def test_node_labels_are_kept(tmp_path):
    dataset = load_tu("MUTAG", REPO / "data", tmp_path)  # the bundled copy
    assert len(dataset) == 188 and dataset.num_features == 7 and dataset.transform is None


def test_missing_root_is_named_and_leaves_no_cache_entry(tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(DatasetNotFound, match=f"--root {tmp_path / 'nowhere'} does not exist"):
        load_tu("MUTAG", tmp_path / "nowhere", cache)
    assert not cache.exists()
    assert len(load_tu("MUTAG", REPO / "data", cache)) == 188  # the same cache, nothing to clean up


def test_missing_root_is_an_error_with_a_filled_cache_too(tmp_path):
    cache = tmp_path / "cache"
    assert len(load_tu("MUTAG", REPO / "data", cache)) == 188
    message = (f"--root {tmp_path / 'nowhere'} does not exist; point --root at a folder that holds "
               f"MUTAG/raw/MUTAG_A.txt and the other TU files, or at an existing folder without it to download it "
               f"into --cache")
    with pytest.raises(DatasetNotFound) as error:
        load_tu("MUTAG", tmp_path / "nowhere", cache)
    assert str(error.value) == message


def test_failed_download_leaves_nothing_and_says_where(tmp_path, monkeypatch):
    # A URL that refuses at once, whatever network this machine has.
    monkeypatch.setattr(TUDataset, "url", "http://127.0.0.1:9")
    root, cache = tmp_path / "root", tmp_path / "cache"
    root.mkdir()
    with pytest.raises(DatasetNotFound) as error:
        load_tu("TOY", root, cache)
    message = str(error.value)
    assert "\n" not in message
    for part in ("TOY_A.txt", "TOY_graph_indicator.txt", str(root / "TOY" / "raw"), "http://127.0.0.1:9/TOY.zip",
                 "point --root at a folder that holds TOY/raw/"):
        assert part in message, part
    assert _files(cache) == []  # no half-made entry for a later run to trip over
    _write_tu(root, "TOY", [[(0, 1)], [(0, 1), (1, 2)]], [0, 1])
    assert len(load_tu("TOY", root, cache)) == 2


def test_an_entry_left_by_a_failed_download_is_rebuilt(tmp_path):
    cache = tmp_path / "cache"
    (cache / "MUTAG" / "raw").mkdir(parents=True)  # what a failed download of an earlier version left
    assert len(load_tu("MUTAG", REPO / "data", cache)) == 188
