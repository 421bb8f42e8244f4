"""The runs whose traces are pinned (``traces.npz``, recorded by ``record.py``; compared to the tolerance stated
in ``tests/test_golden_traces.py``: torch's float32 kernels round their last bits differently on other CPUs).

Each case is (model builder, data builder, loss_fn, estimate_llc keyword arguments): every sampler on
the reference and C++ backends, per-chain hyperparameters, batched and one-at-a-time engines, groups,
shared batches, mask / box / weight decay / noise level / frozen preconditioner, MALA, bf16 and tied
weights. The torchrun cases are ``DIST_CASES`` of ``tests/dist_scripts/cases.py``.
"""
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 3))


def mlp_data():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(80, 5, generator=gen), torch.randint(0, 3, (80,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)


def xent(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def xent_bf16(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x.to(torch.bfloat16)).float(), y)


class Tied(nn.Module):
    """Embedding, LayerNorm and a tied unembedding."""

    def __init__(self, vocab=11, dim=6):
        super().__init__()
        torch.manual_seed(1)
        self.emb = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, idx):
        return self.out(torch.tanh(self.norm(self.emb(idx))))


def token_data():
    gen = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randint(0, 11, (48, 7), generator=gen)), batch_size=12, shuffle=True)


def next_token(model, batch):
    idx = batch[0]
    logits = model(idx[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))


BASE = dict(lr=[1e-3, 2e-3, 5e-4], nbeta=[20.0, 30.0, 20.0], gamma=[1.0, 10.0, 100.0], num_chains=3, num_draws=6,
            num_burnin_steps=3, num_steps_bw_draws=2, seed=11, progress=False)
MASK = {"2.weight": torch.tensor([[1.0] * 9, [0.0] * 9, [1.0] * 4 + [0.0] * 5])}

CASES = {}
for _sampler in ("sgld", "rmsprop_sgld", "rmsprop_sgld_bc"):
    for _backend in ("torch", "cpu"):
        CASES[f"{_sampler}_{_backend}"] = (mlp, mlp_data, xent, dict(BASE, sampler=_sampler, backend=_backend))
CASES.update({
    "sequential_extras_cpu": (mlp, mlp_data, xent, dict(
        BASE, sampler="rmsprop_sgld_bc", backend="cpu", chain_batching="sequential", mask=MASK, box=0.05,
        weight_decay=0.01, noise_level=0.5, freeze_preconditioner_at=4)),
    "vmap_extras_torch": (mlp, mlp_data, xent, dict(
        BASE, sampler="rmsprop_sgld", backend="torch", mask=MASK, box=0.05, weight_decay=0.01, noise_level=0.5,
        freeze_preconditioner_at=4)),
    "groups_shared_cpu": (mlp, mlp_data, xent, dict(BASE, num_chains=5, lr=1e-3, nbeta=25.0, gamma=5.0, backend="cpu",
                                                  max_batched_chains=2, shared_batches=True)),
    "mala_torch": (mlp, mlp_data, xent, dict(BASE, backend="torch", mala_every=2)),
    "bf16_cpu": (lambda: mlp().to(torch.bfloat16), mlp_data, xent_bf16, dict(BASE, backend="cpu")),
    "bf16_torch_sequential": (lambda: mlp().to(torch.bfloat16), mlp_data, xent_bf16,
                              dict(BASE, backend="torch", chain_batching="sequential")),
    "tied_cpu": (Tied, token_data, next_token, dict(BASE, sampler="rmsprop_sgld", backend="cpu")),
})

#: The arrays of an LLCResult that are pinned.
FIELDS = ("loss_trace", "burnin_loss_trace", "mala_acceptance", "llc_per_chain", "init_loss")
DIST_SPECS = ("mlp_rmsprop", "mlp_rmsprop:1", "mlp_bf16", "mlp_chains:1", "gpt2")


def arrays(result) -> dict:
    import numpy as np

    return {f: np.asarray(getattr(result, f), dtype=np.float64) for f in FIELDS}
