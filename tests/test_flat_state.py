"""Flat sampler state: parameters are views into the flat buffers; gradients land in the flat grad buffer."""
import torch
from torch import nn

from llc_fast.state import FlatLayout, FlatState


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.mid = nn.Linear(4, 4)
        self.out = nn.Linear(4, 7, bias=False)
        self.out.weight = self.emb.weight  # tied, as GPT-2's embedding and unembedding
        self.frozen = nn.Parameter(torch.ones(3), requires_grad=False)

    def forward(self, idx):
        return self.out(torch.tanh(self.mid(self.emb(idx))))


def loss_fn(model, idx):
    return nn.functional.cross_entropy(model(idx), idx)


def test_layout_has_one_slot_per_tensor_and_skips_frozen():
    model = Tied()
    layout = FlatLayout(model)
    assert [s.name for s in layout.slots] == ["emb.weight", "mid.weight", "mid.bias"]
    assert layout.numel == 28 + 16 + 4
    assert len(layout.owners) == 4  # emb.weight, mid.weight, mid.bias and the tied out.weight


def test_install_binds_views_and_gradients_land_in_flat_buffer():
    torch.manual_seed(0)
    model = Tied()
    idx = torch.randint(0, 7, (12,))
    expected_loss = loss_fn(model, idx)
    expected = torch.autograd.grad(expected_loss, [model.emb.weight, model.mid.weight, model.mid.bias])
    state = FlatState(FlatLayout(model), 2, device=torch.device("cpu"), preconditioned=False)
    originals = [model.emb.weight, model.mid.weight, model.mid.bias, model.out.weight]
    with state.install(1):
        assert model.out.weight is model.emb.weight  # still tied
        assert model.emb.weight.data_ptr() == state.w[1].data_ptr()
        loss = loss_fn(model, idx)
        loss.backward()
    assert loss.item() == expected_loss.item()
    flat_expected = torch.cat([g.reshape(-1) for g in expected])
    torch.testing.assert_close(state.grad[1], flat_expected)  # tied gradient summed over both uses
    assert torch.equal(state.grad[0], torch.zeros_like(state.grad[0]))
    assert [model.emb.weight, model.mid.weight, model.mid.bias, model.out.weight] == originals
    assert all(p.grad is None for p in originals)


def test_writes_to_flat_buffer_change_the_installed_module():
    model = nn.Linear(3, 2)
    state = FlatState(FlatLayout(model), 1, device=torch.device("cpu"), preconditioned=True, initial_statistic=1.0)
    assert torch.equal(state.stat, torch.ones(1, 8))
    x = torch.randn(5, 3)
    before = model(x)
    with state.install(0):
        state.w[0, :6] += 1.0  # the weight matrix
        after = model(x)
    torch.testing.assert_close(after, before + x.sum(1, keepdim=True))
    state.stat.zero_()
    state.reset()
    assert torch.equal(state.w[0], state.w_star)
    assert torch.equal(state.stat, torch.ones(1, 8))  # back at its initial value
