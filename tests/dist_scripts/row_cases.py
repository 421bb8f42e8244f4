"""Restricted, refined and susceptibility runs for the row-split torchrun tests (``distributed/rows.py``): the same
model, data and call in every process, and ``summary``, the numbers a test compares (numpy arrays by name)."""
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

import cases

import llc_fast

COMMON = dict(lr=1e-3, nbeta=20.0, num_chains=3, num_draws=8, num_burnin_steps=3, seed=7, progress=False)
#: 8 components of the 3-7-5-1 MLP (overlapping: layer0 holds w0 and b0; "whole" is unrestricted)
COMPONENTS8 = {"w0": ["0.weight"], "b0": ["0.bias"], "w2": ["2.weight"], "b2": ["2.bias"], "w4": ["4.weight"],
               "b4": ["4.bias"], "layer0": ["0.*"], "whole": None}
LAYERS = {"l0": ["0.*"], "l2": ["2.*"], "l4": ["4.*"]}


def subset(seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 3, generator=gen)
    y = torch.tanh(x @ torch.tensor([[1.0], [-2.0], [0.5]])) + 0.1 * torch.randn(32, 1, generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=16)


def per_sample(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).reshape(-1)


def run(case: str, **extra):
    """The result of ``case`` (extra: more estimate_llc options, e.g. checkpoint=)."""
    model, data, mse, kw = cases.mlp(), cases.mlp_data(), cases.mse, dict(COMMON, **extra)
    sets = {"a": subset(1), "b": subset(2)}
    if case == "restricted8":  # 8 components over 2 ranks: 4 components each (sparse rows)
        return llc_fast.estimate_restricted_llcs(model, data, mse, COMPONENTS8, **kw)
    if case == "restricted8_seq":  # one row at a time on both sides: the same computation per row
        return llc_fast.estimate_restricted_llcs(model, data, mse, COMPONENTS8, chain_batching="sequential", **kw)
    if case == "restricted1":  # fewer components than ranks: the chains are split (each rank: chains 0, 2 or 1, 3)
        return llc_fast.estimate_restricted_llcs(model, data, mse, {"l2": ["2.*"]}, **dict(kw, num_chains=4))
    if case == "refined":  # no components: the chains split, each rank measuring its rows on the evaluation sets
        return llc_fast.estimate_llc(model, data, mse, eval_data=sets["a"], refine={"b": sets["b"]}, **kw)
    if case == "susceptibility":
        return llc_fast.estimate_susceptibilities(model, data, mse, LAYERS, sets, **kw)
    if case == "susceptibility_tokens":
        return llc_fast.estimate_susceptibilities(model, data, mse, LAYERS, sets, per_token_fn=per_sample,
                                                  token_losses=True, **kw)
    raise KeyError(case)


def summary(result, prefix: str = "") -> dict:
    """{name: float64 array} of everything a case's result holds that the chains determine."""
    if hasattr(result, "chi"):
        out = summary(result.llcs, prefix + "llcs/")
        out.update({f"{prefix}chi": result.chi, f"{prefix}chi_per_chain": result.chi_per_chain})
        out.update({f"{prefix}token_chi/{s}": v for s, v in result.token_chi.items()})
        out.update({f"{prefix}token_losses/{s}": np.asarray(v) for s, v in result.token_losses.items()})
        return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}
    if hasattr(result, "results"):
        out = {}
        for name, r in result.results.items():
            out.update(summary(r, f"{prefix}{name}/"))
        return out
    out = {f"{prefix}loss_trace": result.loss_trace, f"{prefix}burnin": result.burnin_loss_trace,
           f"{prefix}init_loss": np.array([result.init_loss]), f"{prefix}llc_per_chain": result.llc_per_chain}
    for name, r in result.refined.items():
        out.update(summary(r, f"{prefix}refined/{name}/"))
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}
