"""Batched chains (one vmapped forward/backward per group) give the chains of one-at-a-time runs."""
import numpy as np
import pytest
import torch
from torch import nn

import llc_fast
from llc_fast.chains.engines import SequentialEngine, VmapEngine
from llc_fast.state import FlatLayout, FlatState

from conftest import gpt2_case, mlp_case, token_case

SETTINGS = dict(lr=1e-3, nbeta=30.0, gamma=100.0, num_chains=4, num_draws=20, num_burnin_steps=5, progress=False,
                seed=7)


@pytest.mark.parametrize("case", [mlp_case, token_case, gpt2_case])
def test_batched_grouped_and_sequential_traces_agree(case):
    model, loader, loss_fn = case()
    seq = llc_fast.estimate_llc(model, loader, loss_fn, chain_batching="sequential", **SETTINGS)
    batched = llc_fast.estimate_llc(model, loader, loss_fn, chain_batching="vmap", **SETTINGS)
    groups = llc_fast.estimate_llc(model, loader, loss_fn, chain_batching="vmap", max_batched_chains=3, **SETTINGS)
    assert seq.config["engine"] == "sequential" and batched.config["engine"] == "vmap"
    np.testing.assert_allclose(batched.loss_trace, seq.loss_trace, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(groups.loss_trace, seq.loss_trace, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(batched.burnin_loss_trace, seq.burnin_loss_trace, rtol=2e-5, atol=1e-6)
    assert not np.allclose(seq.loss_trace[0], seq.loss_trace[1])  # the chains are not copies of each other


@pytest.mark.parametrize("case", [mlp_case, token_case, gpt2_case])
def test_per_chain_losses_and_gradients_equal_the_real_module(case):
    model, loader, loss_fn = case()
    layout = FlatLayout(model)
    state = FlatState(layout, 3, device=torch.device("cpu"), preconditioned=False)
    gen = torch.Generator().manual_seed(3)
    state.w.add_(0.05 * torch.randn(state.w.shape, generator=gen))
    batches = [next(iter(loader)) for _ in range(3)]
    v_loss, v_grad = VmapEngine(model, state, loss_fn).loss_and_grad(3, batches)
    v_grad = v_grad.clone()
    s_loss, s_grad = SequentialEngine(model, state, loss_fn).loss_and_grad(3, batches)
    assert s_grad is None  # the sequential engine leaves the gradients in the state's buffer
    s_grad = state.grad[:3]
    torch.testing.assert_close(v_loss, s_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v_grad, s_grad, rtol=1e-4, atol=1e-6)
    for row in range(3):  # and the sequential engine is the real module with the chain's weights
        with torch.no_grad():
            for p, view in zip(layout.params, layout.views(state.w[row])):
                p.copy_(view)
        assert loss_fn(model, batches[row]).item() == pytest.approx(s_loss[row].item(), rel=1e-6)


def test_shared_batches_give_every_chain_the_same_batch():
    model, loader, loss_fn = mlp_case()
    kw = dict(SETTINGS, num_burnin_steps=0)
    shared = llc_fast.estimate_llc(model, loader, loss_fn, shared_batches=True, **kw)
    own = llc_fast.estimate_llc(model, loader, loss_fn, **kw)
    assert np.all(shared.loss_trace[:, 0] == shared.loss_trace[0, 0])  # draw 0 is w* on the first batch
    assert len(set(own.loss_trace[:, 0].tolist())) > 1


def test_unbatchable_model_falls_back_and_says_why():
    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).train()
    x = torch.randn(64, 6)
    data = [(x[i : i + 16],) for i in range(0, 64, 16)]
    with pytest.warns(RuntimeWarning, match=r"could not be batched over chains \(RuntimeError: .*one at a time"):
        r = llc_fast.estimate_llc(model, data, lambda m, b: m(b[0]).pow(2).mean(), **SETTINGS)
    assert r.config["engine"] == "sequential"
    ref = llc_fast.estimate_llc(model, data, lambda m, b: m(b[0]).pow(2).mean(), chain_batching="sequential",
                                **SETTINGS)
    np.testing.assert_array_equal(r.loss_trace, ref.loss_trace)


def test_mala_acceptance_recorded_and_falls_with_step_size():
    """On a quadratic, small steps are accepted almost always and large ones far less often."""
    model = nn.Linear(20, 1)
    with torch.no_grad():  # at the least-squares solution of y = sum(x)
        model.weight.fill_(1.0)
        model.bias.zero_()
    x = torch.randn(200, 20, generator=torch.Generator().manual_seed(4))
    data = [(x, x.sum(1, keepdim=True))]
    mse = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()  # noqa: E731
    kw = dict(nbeta=100.0, num_chains=3, num_draws=40, num_burnin_steps=20, mala_every=2, progress=False)
    small = llc_fast.estimate_llc(model, data, mse, lr=1e-5, **kw)
    large = llc_fast.estimate_llc(model, data, mse, lr=1e-2, **kw)
    assert small.mala_acceptance.shape == (3, 20)
    assert np.all((small.mala_acceptance >= 0) & (small.mala_acceptance <= 1))
    assert small.mala_mean.min() > 0.95 and large.mala_mean.max() < 0.8
    assert small.llc_mean > 0


def test_memory_budget_sets_the_group_size_not_the_result():
    model, loader, loss_fn = mlp_case()
    from llc_fast.state.memory import row_bytes, rows_within
    numel = sum(p.numel() for p in model.parameters())
    per_chain = numel * 4 * 2  # weights and gradients of one row (fp32, SGLD: no statistic)
    assert sum(row_bytes(numel, torch.float32, False).values()) == per_chain
    assert sum(row_bytes(numel, torch.float32, True).values()) == per_chain + numel * 4
    small = llc_fast.estimate_llc(model, loader, loss_fn, batch_memory_bytes=2 * per_chain, **SETTINGS)
    full = llc_fast.estimate_llc(model, loader, loss_fn, **SETTINGS)
    np.testing.assert_allclose(small.loss_trace, full.loss_trace, rtol=2e-5, atol=1e-6)
    assert rows_within(2 * per_chain + 1, numel, torch.float32, False, 4) == 2
    assert rows_within(None, numel, torch.float32, False, 3) == 3
    assert rows_within(1, numel, torch.float32, True, 4) == 1  # at least one row


def test_bf16_engines_agree_to_bf16_precision():
    """The README's statement: the same noise and rounding bits, but a bf16 forward/backward rounds differently
    batched and one chain at a time, so bf16 chains agree to bf16 precision only (float32 to float tolerance)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("golden_cases", Path(__file__).parent / "golden" / "cases.py")
    cases = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cases)
    for dtype, loss, rel in ((torch.float32, cases.xent, 1e-6), (torch.bfloat16, cases.xent_bf16, 5e-3)):
        kw = dict(cases.BASE, backend="cpu", num_draws=50)
        a = llc_fast.estimate_llc(cases.mlp().to(dtype), cases.mlp_data(), loss, chain_batching="vmap", **kw)
        b = llc_fast.estimate_llc(cases.mlp().to(dtype), cases.mlp_data(), loss, chain_batching="sequential", **kw)
        np.testing.assert_allclose(a.loss_trace, b.loss_trace, rtol=rel, atol=0)


@pytest.mark.parametrize("case", [mlp_case, token_case])
def test_compiled_step_gives_the_same_chains(case):
    """compile_step=True: the vmapped forward/backward through torch.compile (tied weights kept tied); the
    traces equal the eager ones to float rounding."""
    model, loader, loss_fn = case()
    kw = dict(SETTINGS, num_draws=8, num_burnin_steps=2)
    eager = llc_fast.estimate_llc(model, loader, loss_fn, chain_batching="vmap", **kw)
    compiled = llc_fast.estimate_llc(model, loader, loss_fn, chain_batching="vmap", compile_step=True, **kw)
    assert compiled.config["compiled"] is True and compiled.config["compile_step"] is True
    np.testing.assert_allclose(compiled.loss_trace, eager.loss_trace, rtol=2e-5, atol=1e-6)
    with pytest.warns(RuntimeWarning, match="compile_step=True applies to chains batched"):
        r = llc_fast.estimate_llc(model, loader, loss_fn, chain_batching="sequential", compile_step=True, **kw)
    assert r.config["compiled"] is False
