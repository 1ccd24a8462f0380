"""A GIN with UOT-Pooling as its readout on the bundled MUTAG data: ``python examples/gin_uot_readout.py [OUT]``
prints the test accuracy and the learned UOT values, and saves the model to OUT/gin_uot.pt (default: examples/out/,
which git ignores)."""
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn import BatchNorm1d, Linear, ReLU, Sequential
from torch_geometric.datasets import TUDataset
from torch_geometric.loader import DataLoader
from torch_geometric.nn import GINConv

from uotp_geometric import UOTAggregation


def out_dir(argv):
    """The folder named by the command line's argument, or examples/out/ beside this file, so that an example never
    litters the folder it is run from; made if missing."""
    out = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent / "out"
    out.mkdir(parents=True, exist_ok=True)
    return out


def load_mutag(cache):
    """MUTAG from data/MUTAG/raw; PyG writes its processed files into ``cache``, never into data/."""
    shutil.copytree(Path(__file__).resolve().parents[1] / "data/MUTAG/raw", Path(cache) / "MUTAG/raw")
    return TUDataset(cache, "MUTAG")


class GIN(torch.nn.Module):
    def __init__(self, in_channels, hidden, num_classes, num_layers=3):
        super().__init__()
        self.convs = torch.nn.ModuleList(GINConv(Sequential(
            Linear(in_channels if i == 0 else hidden, hidden), ReLU(), Linear(hidden, hidden), ReLU(),
            BatchNorm1d(hidden))) for i in range(num_layers))
        # eps and lam_q are learned; lam_p = inf (a hard marginal over dimensions) keeps the pooled mass at 1.
        self.readout = UOTAggregation(num_iters=4, eps=1.0, lam_p=float("inf"), lam_q=1.0)
        self.head = Linear(hidden, num_classes)

    def forward(self, x, edge_index, batch, num_graphs):
        for conv in self.convs:
            x = conv(x, edge_index)
        return self.head(self.readout(x, batch, dim_size=num_graphs))


def train(model, graphs, epochs=30):
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(epochs):
        for data in DataLoader(graphs, batch_size=32, shuffle=True):
            optimizer.zero_grad()
            F.cross_entropy(model(data.x, data.edge_index, data.batch, data.num_graphs), data.y).backward()
            optimizer.step()
    return model.eval()


if __name__ == "__main__":
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as cache:
        dataset = load_mutag(cache).shuffle()
    model = train(GIN(dataset.num_features, 32, dataset.num_classes), dataset[:150])
    test = next(iter(DataLoader(dataset[150:], batch_size=len(dataset))))
    accuracy = (model(test.x, test.edge_index, test.batch, test.num_graphs).argmax(-1) == test.y).float().mean()
    values = {name: round(model.readout.value(name).item(), 3) for name in ("eps", "lam_p", "lam_q")}
    print(f"test accuracy {accuracy:.3f} on {test.num_graphs} graphs; learned UOT values {values}")
    torch.save(model.state_dict(), out_dir(sys.argv) / "gin_uot.pt")
