import pytest
import torch
import torch.nn.functional as F

from experiments.models import GIN, POOLINGS, MixedAggregation, UOTOptions, make_readout


def _graphs(num_graphs=5, channels=7):
    sizes = torch.tensor([3, 9, 1, 6, 12])[:num_graphs]
    batch = torch.repeat_interleave(torch.arange(num_graphs), sizes)
    # A ring per graph (a single node has no edge).
    start = torch.cumsum(sizes, 0) - sizes
    edges = [(s + i, s + (i + 1) % n) for s, n in zip(start.tolist(), sizes.tolist()) if n > 1 for i in range(n)]
    edge_index = torch.tensor(edges).t()
    edge_index = torch.cat([edge_index, edge_index.flip(0)], dim=1)
    x = torch.randn(int(sizes.sum()), channels, generator=torch.Generator().manual_seed(0))
    return x, edge_index, batch


@pytest.mark.parametrize("name", POOLINGS)
def test_readout_forward_backward(name):
    torch.manual_seed(0)
    x, _, batch = _graphs(channels=16)
    readout, width = make_readout(name, 16, UOTOptions(num_iters=3))
    x.requires_grad_()
    out = readout(x, batch, dim_size=5)
    assert out.shape == (5, width)
    assert width == (32 if name == "set2set" else 16)
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for param_name, param in readout.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), param_name


@pytest.mark.parametrize("name", POOLINGS)
def test_gin_trains_with_every_readout(name):
    torch.manual_seed(0)
    x, edge_index, batch = _graphs()
    y = torch.tensor([0, 1, 1, 0, 1])
    # No dropout, so that the loss of the same batch is comparable from step to step.
    model = GIN(7, 2, name, hidden=16, num_layers=2, dropout=0.0, uot=UOTOptions(num_iters=2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for step in range(10):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x, edge_index, batch, 5), y)
        loss.backward()
        assert torch.isfinite(loss)
        if step == 0:  # DDP requires every parameter to take part in the loss.
            for param_name, param in model.named_parameters():
                assert param.grad is not None and torch.isfinite(param.grad).all(), param_name
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_unknown_pooling():
    with pytest.raises(ValueError, match="unknown pooling 'sum'"):
        make_readout("sum", 8)


def test_mixed_aggregation_interpolates_mean_and_max():
    x = torch.tensor([[1.0], [3.0], [8.0]])
    index = torch.tensor([0, 0, 1])
    aggr = MixedAggregation()
    assert torch.allclose(aggr(x, index), torch.tensor([[2.5], [8.0]]))  # sigmoid(0) = 1/2: (2 + 3) / 2
    with torch.no_grad():
        aggr.logit.fill_(20.0)
    assert torch.allclose(aggr(x, index), torch.tensor([[2.0], [8.0]]), atol=1e-6)  # the mean


@pytest.mark.parametrize("name", ["rot", "rot_badmm"])
def test_structure_weight_reaches_rot_readouts_only(name):
    readout, _ = make_readout(name, 8, UOTOptions(uot_gw=0.3))
    assert readout.value("gw").item() == pytest.approx(0.3, rel=1e-6)
    uot, _ = make_readout(name.replace("rot", "uot"), 8, UOTOptions(uot_gw=0.3))
    assert "gw" not in uot.init_values  # UOT-Pooling is gw = 0, fixed
