"""Models, data and settings shared by the distributed tests and the scripts torchrun runs for them.

Each case builds the same model and data in every process (fixed seeds), so a run under torchrun
can be compared with ``estimate_llc`` in the test process.
"""
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def mlp():
    torch.manual_seed(0)
    # widths 7 and 5 shard unevenly over two ranks; the last layer's weight [1, 5] leaves rank 1 empty
    return nn.Sequential(nn.Linear(3, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 1))


def mlp_data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=gen)
    y = torch.tanh(x @ torch.tensor([[1.0], [-2.0], [0.5]])) + 0.1 * torch.randn(64, 1, generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)


def mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64, n_positions=16, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GPT2LMHeadModel(config).eval()


def tokens(rows=32, seq_len=12, vocab=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (rows, seq_len), generator=gen)


def gpt2_data():
    return DataLoader(TensorDataset(tokens()), batch_size=8, shuffle=True)


def lm_loss(model, batch):
    from llc_fast.integrations.hf import causal_lm_loss

    return causal_lm_loss(model, batch)


COMMON = dict(lr=1e-3, nbeta=20.0, num_chains=3, num_draws=8, num_burnin_steps=3, seed=7, progress=False)

CASES = {
    # name: (model, data, loss, estimate_llc keyword arguments)
    "mlp_rmsprop": (mlp, mlp_data, mse, dict(COMMON, sampler="rmsprop_sgld_bc", box=0.5,
                                             mask={"2.weight": torch.tensor([[1.0], [0.0], [1.0], [1.0], [0.0]])})),
    "mlp_bf16": (lambda: mlp().to(torch.bfloat16), mlp_data,
                 lambda m, b: mse(m, [t.to(torch.bfloat16) for t in b]).float(), dict(COMMON, sampler="sgld")),
    "gpt2": (gpt2, gpt2_data, lm_loss, dict(COMMON, lr=1e-4, sampler="rmsprop_sgld", num_chains=2)),
    "mlp_chains": (mlp, mlp_data, mse, dict(COMMON, num_chains=4)),
}
