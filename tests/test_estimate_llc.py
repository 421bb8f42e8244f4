"""estimate_llc's semantics: determinism, chain independence, burn-in, divergence, the user's model, I/O."""
import copy
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import llc_fast
from llc_fast import AllChainsDivergedError, LLCDivergenceWarning, LLCResult

from llc_fast.estimators.llc import LLCChainsStuckWarning

from conftest import mlp_case, mse, regression_data


class WithBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 1)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        return self.head(self.drop(self.bn(self.lin(x))))


FAST = dict(lr=1e-3, nbeta=20.0, num_chains=3, num_draws=12, progress=False)


def test_user_model_unchanged_bitwise():
    torch.manual_seed(0)
    model = WithBatchNorm().train()
    model.lin.weight.requires_grad_(False)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    rng = torch.get_rng_state()
    loader = DataLoader(regression_data(), batch_size=16, shuffle=True)
    llc_fast.estimate_llc(model, loader, mse, num_burnin_steps=3, sampler="rmsprop_sgld", **FAST)
    assert all(torch.equal(snapshot[k], v) for k, v in model.state_dict().items())
    assert list(model.parameters()) == params
    assert all(p.grad is None for p in model.parameters())
    assert not model.lin.weight.requires_grad and model.head.weight.requires_grad
    assert model.training
    assert torch.equal(torch.get_rng_state(), rng)  # the user's global RNG is not consumed


def test_same_seed_same_result_and_chains_independent_of_count():
    model = nn.Linear(3, 1)
    loader = DataLoader(regression_data(), batch_size=16, shuffle=True)
    a = llc_fast.estimate_llc(model, loader, mse, seed=3, **FAST)
    b = llc_fast.estimate_llc(model, loader, mse, seed=3, **FAST)
    np.testing.assert_array_equal(a.loss_trace, b.loss_trace)
    # chain 0 does not see how many run: bit for bit with the same engine (one chain runs one at a time; a batched
    # pass rounds its last bits differently from the real module's, by how much depends on the CPU)
    one = llc_fast.estimate_llc(model, loader, mse, seed=3, **dict(FAST, num_chains=1))
    seq = llc_fast.estimate_llc(model, loader, mse, seed=3, chain_batching="sequential", **FAST)
    np.testing.assert_array_equal(one.loss_trace[0], seq.loss_trace[0])
    np.testing.assert_allclose(one.loss_trace[0], a.loss_trace[0], rtol=1e-6, atol=0)
    c = llc_fast.estimate_llc(model, loader, mse, seed=4, **FAST)
    assert not np.array_equal(a.loss_trace, c.loss_trace)
    assert not np.array_equal(a.loss_trace[0], a.loss_trace[1])  # chains differ in noise and batches


def test_burnin_excluded_and_thinning_follows_schedule():
    """With the same seed, the post-burn-in draws are the later forward passes of the same chain."""
    model = nn.Linear(3, 1)
    data = [tuple(t[:32] for t in regression_data().tensors)]  # one full batch
    full = llc_fast.estimate_llc(model, data, mse, **dict(FAST, num_draws=21))
    burned = llc_fast.estimate_llc(model, data, mse, num_burnin_steps=5, num_steps_bw_draws=2,
                                   **dict(FAST, num_draws=8))
    np.testing.assert_array_equal(burned.loss_trace, full.loss_trace[:, 5::2])
    assert full.loss_trace[0, 0] == pytest.approx(full.init_loss, rel=1e-6)  # draw 0 without burn-in is w*
    expected = 20.0 * (burned.loss_trace.mean(1) - burned.init_loss)
    np.testing.assert_allclose(burned.llc_per_chain, expected, rtol=1e-12)
    assert burned.llc_mean == pytest.approx(expected.mean())
    assert burned.llc_std == pytest.approx(expected.std(ddof=1))
    assert burned.llc_stderr == pytest.approx(expected.std(ddof=1) / math.sqrt(3))


def test_nbeta_defaults_to_n_over_log_n():
    loader = DataLoader(regression_data(n=50), batch_size=10)
    r = llc_fast.estimate_llc(nn.Linear(3, 1), loader, mse, **{k: v for k, v in FAST.items() if k != "nbeta"})
    assert r.config["nbeta"] == [pytest.approx(50 / math.log(50))] * 3
    assert r.config["dataset_size"] == 50


def test_init_loss_averages_batches_at_w_star():
    model = nn.Linear(3, 1)
    ds = regression_data(n=40)
    batches = [tuple(t[i : i + 10] for t in ds.tensors) for i in range(0, 40, 10)]
    r = llc_fast.estimate_llc(model, batches, mse, num_init_loss_batches=3, **FAST)
    with torch.no_grad():
        losses = [mse(model, b).item() for b in batches]
    # a list is re-iterated in order: the first three batches
    assert r.init_loss == pytest.approx(np.mean(losses[:3]), rel=1e-6)


def test_diverging_chain_is_named_and_excluded():
    model = nn.Linear(3, 1)
    loader = DataLoader(regression_data(), batch_size=16)
    with pytest.warns(LLCDivergenceWarning, match=r"chain 1 diverged.*smaller step size"):
        r = llc_fast.estimate_llc(model, loader, mse, **dict(FAST, lr=[1e-3, 50.0, 1e-3], num_draws=60))
    assert r.diverged_chains == [1]
    assert np.isnan(r.llc_per_chain[1]) and np.isfinite(r.llc_per_chain[[0, 2]]).all()
    assert r.llc_mean == pytest.approx(np.mean(r.llc_per_chain[[0, 2]]))
    assert np.isnan(r.loss_trace[1, -1]) and np.isfinite(r.loss_trace[0]).all()


def test_all_chains_diverged_raises_with_partial_result():
    loader = DataLoader(regression_data(), batch_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LLCDivergenceWarning)
        with pytest.raises(AllChainsDivergedError, match="all 3 chains diverged") as err:
            llc_fast.estimate_llc(nn.Linear(3, 1), loader, mse, **dict(FAST, lr=50.0, num_draws=60))
    assert err.value.result.diverged_chains == [0, 1, 2]


def test_mask_is_a_restriction_that_freezes_everything_outside_it():
    """mask={name: 0/1 or None} samples only its 1s; parameters it does not name stay at w* (as devinterp's
    param_masks and the published weight-restricted LLC). Freezing the bias by hand gives the same chain: the
    weight's elements keep their global indices, hence their noise."""
    data = [tuple(regression_data().tensors)]
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    restricted = llc_fast.estimate_llc(model, data, mse, mask={"weight": torch.tensor([[1.0, 0.0, 0.0]])}, **FAST)
    frozen = copy.deepcopy(model)
    frozen.bias.requires_grad_(False)
    by_hand = llc_fast.estimate_llc(frozen, data, mse, mask={"weight": torch.tensor([[1.0, 0.0, 0.0]])}, **FAST)
    np.testing.assert_array_equal(restricted.loss_trace, by_hand.loss_trace)
    assert restricted.llc_mean != pytest.approx(0.0, abs=1e-4)
    whole = llc_fast.estimate_llc(model, data, mse, mask={"weight": None, "bias": None}, **FAST)  # None: all of it
    np.testing.assert_array_equal(whole.loss_trace, llc_fast.estimate_llc(model, data, mse, **FAST).loss_trace)
    with pytest.raises(ValueError, match="the mask samples nothing"):
        llc_fast.estimate_llc(model, data, mse, mask={"weight": torch.zeros(1, 3)}, **FAST)


def test_result_json_round_trip(tmp_path):
    loader = DataLoader(regression_data(), batch_size=16)
    with pytest.warns(LLCDivergenceWarning):
        r = llc_fast.estimate_llc(nn.Linear(3, 1), loader, mse, **dict(FAST, lr=[1e-3, 50.0, 1e-3], num_draws=40))
    path = r.save(tmp_path / "r.json")
    back = LLCResult.load(path)
    np.testing.assert_array_equal(back.loss_trace, r.loss_trace)  # NaNs included
    np.testing.assert_array_equal(back.llc_per_chain, r.llc_per_chain)
    assert back.llc_mean == r.llc_mean and back.diverged_at_step == r.diverged_at_step
    assert back.config == r.config
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary left behind
    assert back.llc_trace().shape == r.loss_trace.shape


def test_bfloat16_model_is_sampled():
    model = nn.Linear(3, 1).to(torch.bfloat16)
    ds = regression_data()
    data = [tuple(t.to(torch.bfloat16) for t in ds.tensors)]
    r = llc_fast.estimate_llc(model, data, mse, **dict(FAST, num_draws=30))
    assert r.config["param_dtype"] == "bfloat16"
    assert np.isfinite(r.llc_mean) and not np.all(r.loss_trace == r.loss_trace[0, 0])


TWO_CHAINS = dict(lr=1e-3, nbeta=20.0, num_chains=2, num_draws=12, progress=False)


def _loader():
    return DataLoader(regression_data(), batch_size=16)


def test_finite_but_absurd_chains_are_flagged_and_excluded():
    """RMSProp-SGLD at nbeta = 1e8 explodes to finite losses of 1e20 and more: the bound |L - L(w*)| <=
    100 max(|L(w*)|, 1) flags it; no estimate of 1e30 comes back."""
    model, loader, loss_fn = mlp_case()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(llc_fast.AllChainsDivergedError) as err:
            llc_fast.estimate_llc(model, loader, loss_fn, sampler="rmsprop_sgld", lr=1e-3, nbeta=1e8, num_chains=2,
                                  num_draws=50, progress=False)
    result = err.value.result
    assert result.diverged_chains == [0, 1]
    assert any("moved more than 100x" in str(w.message) for w in caught if w.category is LLCDivergenceWarning)
    bound = 100 * max(abs(result.init_loss), 1.0)
    for c, step in result.diverged_at_step.items():  # the first step out of bound is the one named
        steps = np.concatenate([result.burnin_loss_trace[c], result.loss_trace[c]])
        assert steps[step] > bound or not np.isfinite(steps[step]) or np.isnan(steps[step])


def test_the_first_bad_step_is_named_not_the_step_it_was_seen():
    """Checks run every 16 steps, but the warning names the first step whose loss left the bound."""
    model = nn.Linear(3, 1)
    data = [tuple(regression_data().tensors)]
    with pytest.warns(LLCDivergenceWarning) as caught:
        r = llc_fast.estimate_llc(model, data, mse, **dict(TWO_CHAINS, lr=[1e-3, 3.0], num_draws=40))
    assert r.diverged_chains == [1]
    losses = r.loss_trace[1]  # no burn-in: draw d is step d
    first = r.diverged_at_step[1]
    assert np.all(np.abs(losses[:first] - r.init_loss) <= 100 * max(r.init_loss, 1))
    assert np.isnan(losses[first:]).all()
    assert first % 16 != 15 and f"diverged at step {first} " in str(caught[0].message)


def test_chains_that_never_move_are_flagged():
    model = nn.Linear(3, 1)
    with pytest.warns(LLCChainsStuckWarning, match=r"never moved from w\*.*below the float resolution.*larger lr"):
        llc_fast.estimate_llc(model, _loader(), mse, **dict(TWO_CHAINS, lr=1e-300))
    with warnings.catch_warnings():
        warnings.simplefilter("error", LLCChainsStuckWarning)  # a normal step size moves every chain
        llc_fast.estimate_llc(model, _loader(), mse, **TWO_CHAINS)


def test_divergence_advice_depends_on_what_is_out_of_scale():
    model = nn.Linear(3, 1)
    with pytest.warns(LLCDivergenceWarning) as caught:
        llc_fast.estimate_llc(model, _loader(), mse, **dict(TWO_CHAINS, lr=1e-2, gamma=[1.0, 1e4], num_draws=30))
    text = str(caught[0].message)
    assert "lr*gamma = 100" in text and "smaller gamma" in text and "larger gamma" not in text
    from llc_fast.estimators.llc import divergence_advice

    assert "smaller step size than lr=0.1" in divergence_advice(0.1, 1e6, 1.0)


def test_dropout_in_train_mode_and_a_certain_divergence_are_said_before_sampling():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.2), nn.Linear(4, 1))
    with pytest.warns(RuntimeWarning, match=r"dropout is active \(train mode\) in \['1'\].*model.eval\(\)"):
        llc_fast.estimate_llc(model, _loader(), mse, **TWO_CHAINS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # in eval mode: no warning
        llc_fast.estimate_llc(model.eval(), _loader(), mse, **TWO_CHAINS)
    calls = []
    with pytest.warns(LLCDivergenceWarning) as caught:
        with pytest.raises(llc_fast.AllChainsDivergedError):
            llc_fast.estimate_llc(nn.Linear(3, 1), _loader(), lambda m, b: calls.append(1) or mse(m, b),
                                  **dict(TWO_CHAINS, lr=1.0, gamma=10.0, num_draws=40))
    first = str(caught[0].message)
    assert "will diverge: lr*gamma = 10 >= 4" in first and "Use lr < 0.4" in first


def test_mask_with_none_values_samples_whole_parameters():
    """What devinterp's create_param_masks returns (None: the whole parameter) works natively."""
    model = nn.Linear(3, 1)
    r = llc_fast.estimate_llc(model, _loader(), mse, mask={"weight": None}, **TWO_CHAINS)
    assert r.config["mask"] == ["weight"] and np.isfinite(r.llc_mean)


def test_the_result_says_what_was_sampled():
    """Frozen parameters are named, tied ones are sampled once (and named with the slot they share)."""
    from conftest import TokenModel

    model = TokenModel()
    model.norm.weight.requires_grad_(False)
    tokens = torch.randint(0, 11, (16, 5), generator=torch.Generator().manual_seed(0))

    def loss_fn(m, batch):
        logits = m(batch[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    r = llc_fast.estimate_llc(model, [tokens], loss_fn, **TWO_CHAINS)
    assert r.config["frozen_params"] == ["norm.weight"]
    assert r.config["tied_params"] == {"out.weight": "emb.weight"}
    assert r.config["num_params"] == sum(p.numel() for n, p in model.named_parameters() if n != "norm.weight")
