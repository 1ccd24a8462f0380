"""``aggr="uot"`` in a message-passing layer: GraphSAGE whose neighbourhood aggregation is UOT-Pooling, trained on
the bundled MUTAG data. ``python examples/uot_message_passing.py [OUT]`` prints the test accuracy and what each
layer's aggregation learned, and writes them to OUT/uot_message_passing.json (default: examples/out/)."""
import json
import sys
import tempfile

import torch
from torch.nn import Linear
from torch_geometric.loader import DataLoader
from torch_geometric.nn import SAGEConv, global_mean_pool

import uotp_geometric  # noqa: F401  (registers aggr="uot" with PyG)
from gin_uot_readout import load_mutag, out_dir, train  # this folder's GIN example


class SAGE(torch.nn.Module):
    def __init__(self, in_channels, hidden, num_classes):
        super().__init__()
        uot = dict(aggr="uot", aggr_kwargs=dict(num_iters=2, eps=1.0, lam_p=float("inf"), lam_q=1.0))
        self.convs = torch.nn.ModuleList([SAGEConv(in_channels, hidden, **uot), SAGEConv(hidden, hidden, **uot)])
        self.head = Linear(hidden, num_classes)

    def forward(self, x, edge_index, batch, num_graphs):
        for conv in self.convs:
            x = conv(x, edge_index).relu()
        return self.head(global_mean_pool(x, batch, num_graphs))


if __name__ == "__main__":
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as cache:
        dataset = load_mutag(cache).shuffle()
    model = train(SAGE(dataset.num_features, 32, dataset.num_classes), dataset[:150], epochs=20)
    test = next(iter(DataLoader(dataset[150:], batch_size=len(dataset))))
    with torch.no_grad():
        accuracy = (model(test.x, test.edge_index, test.batch, test.num_graphs).argmax(-1) == test.y).float().mean()
    learned = {f"convs.{i}": {name: conv.aggr_module.value(name).item() for name in conv.aggr_module.init_values}
               for i, conv in enumerate(model.convs)}
    print(f"test accuracy {accuracy:.3f} on {test.num_graphs} graphs; aggregation {model.convs[0].aggr_module}")
    print(f"learned: {learned}")
    results = dict(test_accuracy=accuracy.item(), learned=learned)
    (out_dir(sys.argv) / "uot_message_passing.json").write_text(json.dumps(results))
