from pathlib import Path

import torch

from experiments.data import load_tu

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
    assert len(load_tu("TOY", tmp_path / "elsewhere", cache)) == 2  # a filled cache needs no root


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
