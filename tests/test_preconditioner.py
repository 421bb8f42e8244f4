"""The curvature preconditioner (``estimate_llc(preconditioner="curvature")``, ``llc_fast.chains.curvature``):
Hutchinson's diagonal is exact on a diagonal quadratic; the gains follow docs/update.md's formula; the chain
samples the exact stationary law of preconditioned SGLD on a quadratic (within 3 Monte-Carlo SE from the chains);
bad options are refused with what to do; and without the option the update gets exactly the inputs it got
before (settings, schedule, statistic), so every existing sampler's trace is unchanged."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import llc_fast
from llc_fast.chains.curvature import (HessianDiagonal, HessianProbe, curvature_gains, frozen_statistic,
                                       hutchinson_diagonal, statistic_eps, top_eigenvalue)
from llc_fast.chains.schedule import Schedule
from llc_fast.config import LLCConfig
from llc_fast.kernels.update_spec import KERNEL_SAMPLERS as SAMPLERS, SamplerSettings
from llc_fast.oracles import quadratic_sgld_expectation
from llc_fast.state.flat import FlatLayout, FlatState


class Quadratic(nn.Module):
    """K(w) = ½ Σ h_i (w_i − c_i)² (times the batch's scale s), with w* = c: two parameters, a vector and a
    matrix, so the flat layout has more than one slot."""

    def __init__(self, h: torch.Tensor, dtype=torch.float32):
        super().__init__()
        self.register_buffer("h", h.to(dtype))
        self.a = nn.Parameter(torch.linspace(-1, 1, 4, dtype=dtype))
        self.b = nn.Parameter(torch.linspace(0.5, 2, h.numel() - 4, dtype=dtype).reshape(-1, 2))
        self.register_buffer("centre", torch.cat([self.a.detach().clone(), self.b.detach().reshape(-1).clone()]))

    def forward(self) -> torch.Tensor:
        w = torch.cat([self.a, self.b.reshape(-1)])
        return 0.5 * (self.h * (w - self.centre) ** 2).sum()


def scaled_loss(model, batch):
    """The quadratic times the batch's scale (a batch is a 1-element tensor s)."""
    return model() * batch.reshape(())


def full_batch_loss(model, batch):
    return model()


def test_hutchinson_is_exact_on_a_diagonal_quadratic():
    h = torch.tensor([3.0, 1.0, 0.5, 0.25, 0.0, 2.0, 1e-3, 7.0], dtype=torch.float64)
    model = Quadratic(h, torch.float64)
    batches = [torch.tensor([s], dtype=torch.float64) for s in (1.0, 2.0, 0.5, 4.0)]
    before = [p.detach().clone() for p in model.parameters()]
    probe = HessianProbe(model, FlatLayout.for_sampling(model), scaled_loss, torch.device("cpu"))
    for k in (1, 3, 6):  # probes cycle through the batches: probe j reads batch j mod 4
        got = hutchinson_diagonal(probe, batches, seed=11, num_samples=k)
        scales = [float(batches[j % 4]) for j in range(k)]
        np.testing.assert_allclose(got.diagonal.numpy(), h.numpy() * np.mean(scales), rtol=1e-14, atol=0)
        spread = np.std(scales, ddof=1) / math.sqrt(k) if k > 1 else 0.0  # only the batches' scales vary
        np.testing.assert_allclose(got.stderr.numpy(), h.numpy() * spread, rtol=1e-12, atol=1e-15)
    assert probe.products == 1 + 3 + 6
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # the module is left as it was


def test_hutchinson_off_the_diagonal_is_the_probes_own_cross_terms_and_deterministic():
    """A 2 x 2 block [[p, q], [q, r]]: each probe adds q z1 z2 to both diagonal entries; the probes are a pure
    function of the seed, so two calls agree bit for bit and another seed differs."""

    class Coupled(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(2, dtype=torch.float64))

        def forward(self):
            p, q, r = 2.0, 0.7, 5.0
            return 0.5 * (p * self.w[0] ** 2 + 2 * q * self.w[0] * self.w[1] + r * self.w[1] ** 2)

    model = Coupled()
    probe = HessianProbe(model, FlatLayout.for_sampling(model), full_batch_loss, torch.device("cpu"))
    data = [torch.zeros(1)]
    one = hutchinson_diagonal(probe, data, seed=3, num_samples=8)
    again = hutchinson_diagonal(probe, data, seed=3, num_samples=8)
    assert torch.equal(one.diagonal, again.diagonal) and torch.equal(one.stderr, again.stderr)
    cross = one.diagonal - torch.tensor([2.0, 5.0], dtype=torch.float64)
    assert cross[0] == pytest.approx(float(cross[1]), abs=1e-15)  # the same q·mean(z1 z2) on both
    signs = float(cross[0]) / 0.7  # the mean of the 8 products z1·z2 = ±1
    assert any(signs == pytest.approx(k / 8) for k in range(-8, 9, 2))
    # their standard error: sd of ±1 values with that mean (ddof 1) over √8, times q
    assert float(one.stderr[0]) == pytest.approx(0.7 * math.sqrt((1 - signs ** 2) * 8 / 7 / 8), rel=1e-9)
    others = {float(hutchinson_diagonal(probe, data, seed=s, num_samples=8).diagonal[0]) for s in range(4, 12)}
    assert len(others | {float(one.diagonal[0])}) > 1  # the probes depend on the seed


def test_top_eigenvalue_of_the_preconditioned_hessian():
    """max(G·h) on a diagonal quadratic; on the coupled 2 x 2 block [[2, 0.7], [0.7, 5]] with G = (4, 1) the
    largest eigenvalue of G^½ H G^½ = [[8, 1.4], [1.4, 5]]."""
    h = torch.tensor([3.0, 1.0, 0.5, 0.25, 0.0, 2.0, 1e-3, 7.0], dtype=torch.float64)
    model = Quadratic(h, torch.float64)
    probe = HessianProbe(model, FlatLayout.for_sampling(model), full_batch_loss, torch.device("cpu"))
    gains = torch.tensor([1.0, 2.0, 10.0, 4.0, 100.0, 1.0, 50.0, 1.0], dtype=torch.float64)
    assert top_eigenvalue(probe, [torch.zeros(1)], max_iters=200, rtol=1e-13) == pytest.approx(7.0, rel=1e-10)
    assert top_eigenvalue(probe, [torch.zeros(1)], gains, max_iters=200, rtol=1e-13) == pytest.approx(7.0, rel=1e-10)
    gains[2] = 20.0  # 20 * 0.5 = 10 is now the largest
    assert top_eigenvalue(probe, [torch.zeros(1)], gains, max_iters=400, rtol=1e-13) == pytest.approx(10.0, rel=1e-8)

    class Coupled(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(2, dtype=torch.float64))

        def forward(self):
            return 0.5 * (2.0 * self.w[0] ** 2 + 1.4 * self.w[0] * self.w[1] + 5.0 * self.w[1] ** 2)

    coupled = Coupled()
    probe = HessianProbe(coupled, FlatLayout.for_sampling(coupled), full_batch_loss, torch.device("cpu"))
    expected = float(torch.linalg.eigvalsh(torch.tensor([[8.0, 1.4], [1.4, 5.0]], dtype=torch.float64))[-1])
    got = top_eigenvalue(probe, [torch.zeros(1)], torch.tensor([4.0, 1.0], dtype=torch.float64), max_iters=200,
                         rtol=1e-13)
    assert got == pytest.approx(expected, rel=1e-10)


def test_gains_follow_the_stated_formula():
    h = torch.tensor([3.0, 1.0, 0.3, 0.01, 0.0, -0.2, 5.0], dtype=torch.float64)
    nbeta, gamma, kappa = [100.0, 50.0], [1.0, 1.0], 100.0
    rho = 1.0 / 50.0  # the largest gamma/nbeta
    sampled = torch.tensor([True] * 6 + [False])  # the 5.0 is not sampled: h_max = 3
    got = curvature_gains(HessianDiagonal(h, torch.zeros_like(h)), nbeta=nbeta, gamma=gamma, max_gain=kappa,
                          sampled=sampled)
    expected = [(3 + rho) / (max(x, 0.0) + rho) for x in h.tolist()]
    expected = [min(max(g, 1.0), kappa) for g in expected]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-15)
    assert got[0] == 1.0 and got[3] == got[4] == got[5] == kappa and got[6] == 1.0  # 3.02/0.03 > 100: capped
    flat = torch.tensor([4.0, 0.0], dtype=torch.float64)
    no_localizer = curvature_gains(HessianDiagonal(flat, torch.zeros(2)), nbeta=[10.0], gamma=[0.0], max_gain=50.0)
    assert no_localizer.tolist() == [1.0, 50.0]  # zero curvature and gamma = 0: the cap, not an infinite step
    # an estimate below two standard errors counts as two standard errors: 4/(2*0.1) = 20, 4/0.3
    noisy = HessianDiagonal(torch.tensor([4.0, -0.1, 0.3], dtype=torch.float64),
                            torch.tensor([0.0, 0.1, 0.1], dtype=torch.float64))
    assert curvature_gains(noisy, nbeta=[10.0], gamma=[0.0], max_gain=50.0).tolist() == pytest.approx(
        [1.0, 20.0, 4 / 0.3], rel=1e-14)
    eps = statistic_eps(kappa)
    np.testing.assert_allclose((1 / (frozen_statistic(got, eps).sqrt() + eps)).numpy(), got.numpy(), rtol=1e-13)


def test_the_chain_samples_the_preconditioned_sgld_law_of_a_quadratic():
    """64 chains on K = ½ Σ h_i w_i² (full batch): λ̂ = E[nβ K] must equal the stationary value of SGLD with
    step lr·G_i (``quadratic_sgld_expectation(..., preconditioner=G)``) within 3 SE, SE = std of the chains'
    estimates (ddof 1) / √chains; it must not be the value of plain SGLD at the same lr (G = 1) nor the exact
    posterior's. Here G spans 1 ... the cap, two elements capped (docs/update.md's formula, h known exactly)."""
    h = np.array([3.0, 1.0, 0.3, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.0, 0.0, 0.02])
    nbeta, gamma, kappa, chains = 100.0, 1.0, 200.0, 64
    a = nbeta * h + gamma
    G = np.minimum(a.max() / a, kappa)
    lr = 0.5 / float((G * a).max())  # every element's lr·G·a <= 0.5: relaxes in a few steps
    model = Quadratic(torch.tensor(h))
    result = llc_fast.estimate_llc(model, [torch.zeros(1)], full_batch_loss, lr=lr, nbeta=nbeta, gamma=gamma,
                                   num_chains=chains, num_draws=2000, num_burnin_steps=200, progress=False,
                                   preconditioner="curvature", preconditioner_max_gain=kappa,
                                   preconditioner_samples=2)
    assert result.config["curvature_gain_max"] == pytest.approx(kappa) and result.config["curvature_gains_capped"] == 2
    expected = quadratic_sgld_expectation(h, nbeta, gamma, lr, preconditioner=G)
    se = float(np.std(result.llc_per_chain, ddof=1)) / math.sqrt(chains)
    assert abs(result.llc_mean - expected) < 3 * se, (result.llc_mean, expected, se)
    plain = quadratic_sgld_expectation(h, nbeta, gamma, lr)
    posterior = float(np.sum(nbeta * h / (2 * a)))
    assert abs(expected - plain) > 10 * se and abs(expected - posterior) > 10 * se  # the test can tell them apart
    assert result.grad_evals == result.timing["steps"] + 2 * 2  # the probes' cost is counted


@pytest.mark.parametrize("options, match", [
    (dict(preconditioner="diagonal"), r"preconditioner must be None .* \('curvature',\)"),
    (dict(preconditioner=True), r"preconditioner must be None"),
    (dict(preconditioner="curvature", sampler="rmsprop_sgld"), r"pass sampler='sgld' \(the default\) with it"),
    (dict(preconditioner="curvature", freeze_preconditioner_at=5), r"leave freeze_preconditioner_at out"),
    (dict(preconditioner_samples=8), r"preconditioner_samples applies to preconditioner='curvature'"),
    (dict(preconditioner_max_gain=10.0), r"preconditioner_max_gain applies to preconditioner='curvature'"),
    (dict(preconditioner="curvature", preconditioner_samples=0), r"preconditioner_samples must be an integer >= 1"),
    (dict(preconditioner="curvature", preconditioner_max_gain=0.5), r"preconditioner_max_gain must be >= 1"),
    (dict(preconditioner="curvature", preconditioner_max_gain=math.inf), r"preconditioner_max_gain must be a finite"),
])
def test_bad_options_are_refused_with_what_to_do(options, match):
    with pytest.raises(ValueError, match=match):
        LLCConfig(lr=1e-3, **options)


def test_defaults_are_resolved_and_the_update_is_the_frozen_rmsprop_one():
    c = LLCConfig(lr=1e-3, nbeta=10.0, preconditioner="curvature")
    assert (c.preconditioner_samples, c.preconditioner_max_gain) == (32, 1000.0)
    assert c.settings == SamplerSettings(sampler="rmsprop_sgld", rmsprop_eps=0.5 / 1000.0)
    counters = c.schedule.counters(0)
    assert not counters.update_statistic and c.settings.statistic_scale(counters.stat_step) == 1.0
    assert c.to_dict()["preconditioner"] == "curvature" and c.fingerprint()["preconditioner_samples"] == 32


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("freeze", [None, 3])
def test_without_the_option_the_update_gets_what_it_got_before(sampler, freeze):
    """The inputs of every existing sampler's update, as the code built them before the option existed: the
    settings from the user's fields, the schedule with the user's freeze step, and a statistic filled with the
    sampler's start value (torch.full). Equal inputs give the same trace bit for bit (the update is a pure
    function of them: docs/noise.md)."""
    c = LLCConfig(lr=1e-3, sampler=sampler, rmsprop_alpha=0.9, rmsprop_eps=0.05, freeze_preconditioner_at=freeze,
                  num_draws=7, num_burnin_steps=2)
    assert c.preconditioner is None and c.preconditioner_samples is None and c.preconditioner_max_gain is None
    assert not any(k.startswith("preconditioner") for k in c.fingerprint())  # checkpoints saved before still match
    assert c.settings == SamplerSettings(sampler=sampler, rmsprop_alpha=0.9, rmsprop_eps=0.05)
    assert c.schedule == Schedule(num_draws=7, num_burnin_steps=2, freeze_preconditioner_at=freeze)
    model = Quadratic(torch.ones(8))
    state = FlatState(FlatLayout.for_sampling(model), 3, device=torch.device("cpu"), preconditioned=True,
                      initial_statistic=c.settings.initial_statistic)
    assert torch.equal(state.stat, torch.full((3, 8), c.settings.initial_statistic))
    state.stat.add_(1.0)
    state.reset()
    assert torch.equal(state.stat, torch.full((3, 8), c.settings.initial_statistic))


def test_flat_state_takes_a_statistic_per_element():
    model = Quadratic(torch.ones(8))
    layout = FlatLayout.for_sampling(model)
    v = torch.arange(8, dtype=torch.float64)
    state = FlatState(layout, 2, device=torch.device("cpu"), preconditioned=True, initial_statistic=v)
    assert state.stat.dtype == torch.float32 and torch.equal(state.stat, v.float().expand(2, 8))
    state.stat.zero_()
    state.reset()
    assert torch.equal(state.stat, v.float().expand(2, 8))
    with pytest.raises(ValueError, match=r"a number or a \[8\] tensor"):
        FlatState(layout, 2, device=torch.device("cpu"), preconditioned=True, initial_statistic=torch.ones(3))


def test_a_chain_is_the_same_in_any_grouping_and_engine():
    """G is computed from the whole run's settings, not from the rows a process or group holds: chains run
    batched, one at a time, or as a subset (a chain-parallel process) are the same chains."""
    from llc_fast.estimators.sampling import sample_local
    from llc_fast.oracles import dln_dataset, make_dln, mse_loss

    model = make_dln((3, 4, 3), 1, seed=1)
    data = [tuple(t[i:i + 50] for t in dln_dataset(model, 400, seed=5, input_range=10.0).tensors)
            for i in range(0, 400, 50)]
    options = dict(lr=[2e-4, 1e-4, 2e-4, 1e-4], nbeta=50.0, gamma=[1.0, 1.0, 10.0, 1.0], num_chains=4, num_draws=30,
                   num_burnin_steps=10, progress=False, preconditioner="curvature", preconditioner_samples=4)
    config = LLCConfig(**options).for_data(data)
    full = sample_local(model, data, mse_loss, config)
    assert full.facts["curvature_gain_max"] > 1 and full.facts["curvature_hvps"] == 4
    part = sample_local(model, data, mse_loss, config, chains=[0, 1])  # without chain 2, whose gamma sets rho
    one_by_one = sample_local(model, data, mse_loss, config.replace(chain_batching="sequential"))
    np.testing.assert_allclose(part.trace.loss_trace, full.trace.loss_trace[:2], rtol=1e-5)
    np.testing.assert_allclose(one_by_one.trace.loss_trace, full.trace.loss_trace, rtol=1e-5)
    plain = sample_local(model, data, mse_loss, LLCConfig(**dict(options, preconditioner=None,
                                                                 preconditioner_samples=None)).for_data(data))
    assert not np.allclose(plain.trace.loss_trace, full.trace.loss_trace, rtol=1e-3)  # the gains change the chain


@pytest.mark.filterwarnings("ignore:.*the loss function has another name")  # the recording wrapper's name
def test_a_resumed_run_is_the_uninterrupted_run_bit_for_bit(tmp_path):
    """The statistic is computed again on resume (the same probes and batches, from the seed): resuming from a
    checkpoint mid-group or between groups (the second group starts from the recomputed statistic) gives the
    same run, bit for bit."""
    from conftest import checkpoint_recorder, mlp_case

    model, loader, loss_fn = mlp_case()
    kw = dict(lr=1e-3, nbeta=30.0, gamma=100.0, num_chains=4, num_draws=40, num_burnin_steps=6, progress=False,
              seed=3, preconditioner="curvature", preconditioner_samples=4, max_batched_chains=2)
    full = llc_fast.estimate_llc(model, loader, loss_fn, **kw)
    path = tmp_path / "run.ckpt"
    recording, seen = checkpoint_recorder(path, loss_fn)
    llc_fast.estimate_llc(model, loader, recording, checkpoint=str(path), checkpoint_every=7, **kw)
    assert len(seen) >= 3
    for k, (_, blob) in enumerate(seen[:: max(1, len(seen) // 3)]):
        copy = tmp_path / f"copy{k}.ckpt"
        copy.write_bytes(blob)
        again = llc_fast.estimate_llc(model, loader, loss_fn, resume=str(copy), **kw)
        np.testing.assert_array_equal(full.loss_trace, again.loss_trace)
        np.testing.assert_array_equal(full.burnin_loss_trace, again.burnin_loss_trace)
