"""estimate_susceptibilities checks, at w* and before any sampling step, that per_token_fn's values average to
loss_fn's loss on the same batch: a summing or unshifted per-token loss would change chi without a word."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import llc_fast
from llc_fast.integrations.hf import causal_lm_loss, causal_lm_token_losses

from conftest import gpt2_case, mlp_case

KW = dict(lr=1e-4, nbeta=10.0, gamma=100.0, num_chains=2, num_draws=4, progress=False)


class Sampled(Exception):
    """Raised in place of sampling: the checks before it passed."""


@pytest.fixture
def sampling(monkeypatch):
    """The calls that reached sampling (each raises ``Sampled`` instead of sampling)."""
    calls = []

    def instead(*args, **kwargs):
        calls.append(args)
        raise Sampled

    monkeypatch.setattr(llc_fast.api, "estimate_config", instead)
    return calls


def row_sums(model, batch):
    """Each row's summed token losses: a sum where causal_lm_loss averages."""
    return causal_lm_token_losses(model, batch).reshape(batch[0].shape[0], -1).sum(dim=1)


def unshifted(model, batch):
    """Token t scored against itself: the label shift causal_lm_loss makes is forgotten."""
    ids = batch[0]
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids.reshape(-1), reduction="none")


@pytest.mark.parametrize("bad", [row_sums, unshifted])
def test_a_per_token_fn_that_does_not_reduce_to_the_loss_is_refused_before_sampling(bad, sampling):
    model, loader, _ = gpt2_case()
    batches = list(loader)
    with torch.no_grad():
        want, got = float(causal_lm_loss(model, batches[0])), float(bad(model, batches[0]).double().mean())
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match="per_token_fn does not reduce to loss_fn") as info:
        llc_fast.estimate_susceptibilities(model, batches, causal_lm_loss, "heads", {"s": batches[1:2]},
                                           per_token_fn=bad, **KW)
    message = str(info.value)
    assert f"is {got:.7g}, loss_fn's loss is {want:.7g}" in message and "the sampling data" in message
    assert "sums where loss_fn averages" in message and "label shift" in message and "causal_lm_token_losses" in message
    assert sampling == [] and torch.equal(torch.get_rng_state(), rng)


def test_causal_lm_token_losses_pass_on_every_set(sampling):
    model, loader, _ = gpt2_case()
    batches = list(loader)
    with pytest.raises(Sampled):
        llc_fast.estimate_susceptibilities(model, loader, causal_lm_loss, "heads", {"s": batches[1:2], "t": batches},
                                           per_token_fn=causal_lm_token_losses, **KW)
    assert len(sampling) == 1


def test_a_subset_where_they_disagree_is_named(sampling):
    model, loader, loss_fn = mlp_case()
    batches = list(loader)
    weighted = [(x, y, torch.ones(len(y))) for x, y in batches]  # a third entry: per-sample weights

    def loss(m, b):
        return (F.cross_entropy(m(b[0]), b[1], reduction="none") * (b[2] if len(b) > 2 else 1.0)).mean()

    def per_sample(m, b):  # ignores the weights
        return F.cross_entropy(m(b[0]), b[1], reduction="none")

    with pytest.raises(Sampled):
        llc_fast.estimate_susceptibilities(model, batches, loss, {"all": ["*"]}, {"w": weighted}, per_token_fn=per_sample,
                                           **KW)
    weighted[0][2][:16] = 3.0
    with pytest.raises(ValueError, match="on the first batch of subset 'w'"):
        llc_fast.estimate_susceptibilities(model, batches, loss, {"all": ["*"]}, {"w": weighted}, per_token_fn=per_sample,
                                           **KW)
    assert len(sampling) == 1


def test_dropout_in_train_mode_sees_the_same_masks_in_both_calls(sampling):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.5), nn.Linear(16, 3)).train()
    _, loader, loss_fn = mlp_case()
    batches = list(loader)

    def per_sample(m, b):
        return F.cross_entropy(m(b[0]), b[1], reduction="none")

    with torch.no_grad():  # unseeded, the two calls draw different dropout masks
        assert float(loss_fn(model, batches[0])) != pytest.approx(float(per_sample(model, batches[0]).mean()), rel=1e-3)
    with pytest.raises(Sampled):
        llc_fast.estimate_susceptibilities(model, batches, loss_fn, {"all": ["*"]}, {"s": batches[1:]},
                                           per_token_fn=per_sample, **KW)
    assert len(sampling) == 1
