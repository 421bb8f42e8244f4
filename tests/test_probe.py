"""perturbation_probe on models that cannot be batched: it falls back to one perturbation at a time (the choice
estimate_llc makes, chains.engines.local_engine) with a warning saying why and how to batch, never a raw
functorch error; the model is left unchanged."""
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import llc_fast


def _bn_case():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 4, generator=gen), torch.randn(32, 1, generator=gen)
    data = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 32, 8)]
    return model, data, lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()


PROBE = dict(radii=[1e-2, 1e-1], num_samples=6, num_batches=2, max_batched=4)


def _state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_batchnorm_in_train_mode_falls_back_and_names_the_fix():
    model, data, loss_fn = _bn_case()
    model.train()
    before = _state(model)
    with pytest.warns(RuntimeWarning, match=r"could not be batched over perturbations \(RuntimeError: .*one at a "
                                            r"time.*BatchNorm in train mode \(1\).*model\.eval\(\)"):
        got = llc_fast.perturbation_probe(model, data, loss_fn, **PROBE)
    assert np.isfinite(got.samples).all() and got.samples.shape == (2, 6)
    assert (got.delta_loss[1] > got.delta_loss[0] > 0)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the probe changed the model (BatchNorm buffers)"
    assert model.training


def test_the_fallback_measures_what_the_batched_probe_measures(monkeypatch):
    """One perturbation at a time and batched give the same Delta L (eval mode, where both can run)."""
    import llc_fast.studies.probe as probe

    model, data, loss_fn = _bn_case()
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # batched: no fallback warning
        batched = llc_fast.perturbation_probe(model, data, loss_fn, **PROBE)
    original = probe.local_engine

    def unbatchable(model, state, loss_fn, chain_batching, probe_batches, **kw):
        return original(model, state, loss_fn, "sequential", probe_batches, **kw)[0], "RuntimeError: injected"

    monkeypatch.setattr(probe, "local_engine", unbatchable)
    with pytest.warns(RuntimeWarning, match=r"\(RuntimeError: injected\); they ran one at a time") as record:
        one_at_a_time = llc_fast.perturbation_probe(model, data, loss_fn, **PROBE)
    assert "model.eval()" not in str(record[0].message)  # no BatchNorm in train mode here: no such advice
    np.testing.assert_allclose(one_at_a_time.samples, batched.samples, rtol=1e-5, atol=1e-7)
