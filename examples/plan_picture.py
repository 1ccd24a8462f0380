"""The plan picture: trains the GIN of gin_uot_readout.py on the bundled MUTAG data and draws, for a test
molecule, the transport plan of its UOT readout (atoms named by type) and the learned parameters.
``python examples/plan_picture.py [OUT]`` writes OUT/plan.png and OUT/parameters.png (default: examples/out/)."""
import sys
import tempfile

import torch

from gin_uot_readout import GIN, load_mutag, out_dir, train  # this folder's GIN example
from uotp_geometric.plot import plot_parameters, plot_plan

ATOMS = ["C", "N", "O", "F", "I", "Cl", "Br"]  # MUTAG's node labels, from data/MUTAG/raw/README.txt

if __name__ == "__main__":
    out = out_dir(sys.argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as cache:
        dataset = load_mutag(cache).shuffle()
    model = train(GIN(dataset.num_features, 32, dataset.num_classes), dataset[:150])
    molecule = dataset[150]

    # The readout's input: the node embeddings, caught on their way in.
    seen = {}
    model.readout.register_forward_pre_hook(lambda module, args: seen.update(x=args[0]))
    with torch.no_grad():
        logits = model(molecule.x, molecule.edge_index, torch.zeros(molecule.num_nodes, dtype=torch.long), 1)
    atoms = [ATOMS[label] for label in molecule.x.argmax(dim=-1).tolist()]
    title = f"MUTAG test molecule: class {int(molecule.y)}, predicted {int(logits.argmax())}"
    plot_plan(seen["x"], layer=model.readout, node_labels=atoms, title=title).savefig(out / "plan.png", dpi=100)
    plot_parameters(model.readout).savefig(out / "parameters.png", dpi=100)
    print(f"wrote {out / 'plan.png'} and {out / 'parameters.png'}")
