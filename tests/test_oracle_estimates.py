"""Estimates against exact answers (llc_fast.oracles), within 3 Monte Carlo standard errors.

Potentials are replicated R times inside one parameter tensor: the loss is the sum of R
independent copies, so one chain carries R independent samples per step and the estimate
divided by R estimates the single-copy expectation. The standard error is the spread of the
per-chain estimates over chains, std(ddof=1)/sqrt(C) — chains are independent by construction.
Step sizes are chosen so that the discretisation bias (where there is no exact discretised
formula) is far below that error; the comments give the bound.
"""
import math

import numpy as np
import pytest
import torch
from torch import nn

import llc_fast
from llc_fast.chains import ChainHyper, LoopSettings, Schedule, run_chains
from llc_fast.chains.engines import SequentialEngine
from llc_fast.chains.setup import initial_loss
from llc_fast.kernels import SamplerSettings, select_backend
from llc_fast.oracles import (one_variable_expectation, quadratic_sgld_expectation, sum_of_powers_expectation)
from llc_fast.state import FlatLayout, FlatState

FULL_BATCH = [None]  # the loss needs no data: one empty batch, used every step


class Replicated(nn.Module):
    """R copies of a d-dimensional potential K, all at w* = 0; loss = sum of the copies."""

    def __init__(self, replicas: int, dim: int, potential):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(replicas, dim, dtype=torch.float64))
        self.potential = potential

    def forward(self):
        return self.potential(self.w).sum()


def potential_loss(model, batch):
    return model()


def within_3_se(per_copy: np.ndarray, expected: float) -> tuple[float, float]:
    mean, se = per_copy.mean(), per_copy.std(ddof=1) / math.sqrt(per_copy.size)
    assert abs(mean - expected) < 3 * se, f"estimate {mean:.5f} vs exact {expected:.5f}, 3 SE = {3 * se:.5f}"
    return mean, se


def discretised_quadratic_stats(h, nbeta, gamma, step, num_draws):
    """Stationary mean of nbeta*K and the variance of its average over ``num_draws`` consecutive draws,
    for K = sum_e h_e w_e^2 / 2 under w <- w - (step_e/2)(nbeta h_e + gamma) w + sqrt(step_e) xi.

    Each coordinate is AR(1) with rho = 1 - step*a/2 and variance s^2 = step/(1 - rho^2); w^2 has
    variance 2 s^4 and autocorrelation rho^(2k), so the average's variance is 2 m^2 (1+rho^2)/(1-rho^2)/N
    (m = nbeta h s^2 / 2) up to O(1/N^2)."""
    h, step = np.asarray(h, dtype=np.float64), np.asarray(step, dtype=np.float64)
    a = nbeta * h + gamma
    rho = 1 - step * a / 2
    m = nbeta * h * (step / (1 - rho**2)) / 2
    return m.sum(), (2 * m**2 * (1 + rho**2) / (1 - rho**2)).sum() / num_draws


def test_sgld_on_quadratic_matches_discretised_chain_exactly():
    """oracles.md check value: h = (1, 0.2, 3), nbeta = 100, gamma = 1, lr = 0.01 -> 3.17834 (posterior: 1.46958).
    The standard error is the exact one of the AR(1) chains (the sample SE of 8 chains is itself ~25 % off)."""
    h = torch.tensor([1.0, 0.2, 3.0], dtype=torch.float64)
    R, C, D = 1000, 8, 600
    model = Replicated(R, 3, lambda w: 0.5 * h * w**2)
    r = llc_fast.estimate_llc(model, FULL_BATCH, potential_loss, lr=0.01, nbeta=100.0, gamma=1.0, num_chains=C,
                              num_draws=D, num_burnin_steps=150, progress=False)
    expected, var = discretised_quadratic_stats(np.tile(h.numpy(), R), 100.0, 1.0, 0.01, D)
    assert expected / R == pytest.approx(quadratic_sgld_expectation(h.numpy(), 100.0, 1.0, 0.01), rel=1e-12)
    se = math.sqrt(var / C) / R
    mean = r.llc_per_chain.mean() / R
    assert abs(mean - expected / R) < 3 * se, f"{mean:.5f} vs exact {expected / R:.5f}, 3 SE = {3 * se:.5f}"
    assert abs(mean - 1.46958) > 100 * se  # the test tells the discretised chain from the exact posterior
    assert r.llc_per_chain.std(ddof=1) / R == pytest.approx(math.sqrt(var) / R, rel=0.6)  # spread as predicted


@pytest.mark.parametrize("sampler", ["rmsprop_sgld", "rmsprop_sgld_bc"])
def test_rmsprop_with_frozen_preconditioner_matches_discretised_chain(sampler):
    """Once V is frozen, coordinate e is an exact AR(1) chain with step lr*G_e: the same closed form,
    with each chain's own preconditioner read from its state."""
    h = torch.tensor([1.0, 0.2, 3.0], dtype=torch.float64)
    R, C, lr, nbeta, gamma, D = 400, 6, 1e-3, 100.0, 1.0, 1500
    model = Replicated(R, 3, lambda w: 0.5 * h * w**2)
    layout = FlatLayout(model)
    settings = SamplerSettings(sampler)
    schedule = Schedule(num_draws=D, num_burnin_steps=400, freeze_preconditioner_at=100)
    backend = select_backend("auto", torch.device("cpu"))
    diffs, variances, expectations = [], [], []
    for chain in range(C):
        state = FlatState(layout, 1, device=torch.device("cpu"), preconditioned=True,
                          initial_statistic=settings.initial_statistic)
        hyper = ChainHyper(torch.tensor([lr]), torch.tensor([nbeta]), torch.tensor([gamma]), torch.tensor([chain]))
        engine = SequentialEngine(model, state, potential_loss)
        init = initial_loss(engine, FULL_BATCH, seed=0, num_batches=1, device=torch.device("cpu"))
        trace = run_chains(engine, state, FULL_BATCH, LoopSettings(hyper, settings, schedule, seed=0),
                           backend=backend, device=torch.device("cpu"), init_loss=init)
        scale = settings.statistic_scale(schedule.freeze_preconditioner_at - 1)
        G = 1.0 / (np.sqrt(state.stat[0].numpy() * scale) + settings.rmsprop_eps)
        expected, var = discretised_quadratic_stats(np.tile(h.numpy(), R), nbeta, gamma, lr * G, D)
        diffs.append(nbeta * trace.loss_trace[0].mean() - expected)
        variances.append(var)
        expectations.append(expected)
    assert np.ptp(expectations) > 0  # the chains really adapted different preconditioners
    se = math.sqrt(sum(variances)) / C
    assert abs(np.mean(diffs)) < 3 * se, f"mean difference {np.mean(diffs):.4f}, 3 SE = {3 * se:.4f}"


def test_flat_prior_sum_of_powers():
    """K = c1*w1^2 + c2*w2^4, gamma = 0: E[nbeta*K] = 1/2 + 1/4 for every nbeta, c.

    Discretisation bias: the quadratic part's exact factor is 1/(1 - lr*a/4) - 1 = 0.1 % (a = 2);
    the quartic part's is of the same order, far below the ~1 % standard error."""
    R, C, nbeta = 500, 6, 10.0
    model = Replicated(R, 2, lambda w: (0.1 * w[:, 0] ** 2 + 0.1 * w[:, 1] ** 4))
    r = llc_fast.estimate_llc(model, FULL_BATCH, potential_loss, lr=2e-3, nbeta=nbeta, gamma=0.0, num_chains=C,
                              num_draws=3000, num_burnin_steps=2000, progress=False)
    within_3_se(r.llc_per_chain / R, sum_of_powers_expectation([1, 2]))


def test_one_variable_quartic_against_quadrature():
    """K = w^4 with gamma = 1 at t = nbeta = 100: E[t*K] = 0.24172 (quadrature, oracles.md §2)."""
    R, C = 500, 6
    model = Replicated(R, 1, lambda w: w**4)
    r = llc_fast.estimate_llc(model, FULL_BATCH, potential_loss, lr=2e-4, nbeta=100.0, gamma=1.0, num_chains=C,
                              num_draws=3000, num_burnin_steps=1500, progress=False)
    expected = one_variable_expectation(2, 100.0)
    assert expected == pytest.approx(0.24172, abs=1e-5)
    within_3_se(r.llc_per_chain / R, expected)


def test_regular_model_linear_regression():
    """y = 3x + 2 on 100 points of [-1, 1], full batch, nbeta = 100/ln 100, lr = 0.002, gamma = 1.
    The MSE loss is quadratic with Hessian 2[[E x^2, E x], [E x, 1]]; in its eigenbasis each coordinate
    is an AR(1) chain, so the discretised expectation (0.9719; d/2 = 1) and its error are exact."""
    model, data = llc_fast.oracles.make_regression_example()
    x = data.tensors[0].double().reshape(-1)
    hessian = 2 * torch.tensor([[float((x * x).mean()), float(x.mean())], [float(x.mean()), 1.0]])
    h = torch.linalg.eigvalsh(hessian).numpy()
    nbeta, C, D = 100 / math.log(100), 8, 3000
    r = llc_fast.estimate_llc(model, [data.tensors], llc_fast.oracles.mse_loss, lr=0.002, nbeta=nbeta, gamma=1.0,
                              num_chains=C, num_draws=D, num_burnin_steps=500, progress=False)
    expected, var = discretised_quadratic_stats(h, nbeta, 1.0, 0.002, D)
    assert expected == pytest.approx(0.9719, abs=1e-4)
    se = math.sqrt(var / C)
    assert abs(r.llc_mean - expected) < 3 * se, f"{r.llc_mean:.4f} vs {expected:.4f}, 3 SE = {3 * se:.4f}"


def test_two_variable_normal_crossing_against_quadrature():
    """K = w1^2 w2^2 (lambda 1/2, m 2), gamma = 1, t = nbeta = 1000/ln 1000: E[t*K] = 0.3614 (quadrature).

    The axes are singular, so the stiffness t*w^2 varies widely and SGLD's O(lr) bias is not
    negligible here (about +5 % at lr = 1e-3). The test runs lr and lr/2 and takes the Richardson
    extrapolation 2*E(lr/2) - E(lr), whose bias is O(lr^2); its error combines both runs' errors."""
    R, C, t = 300, 6, 1000 / math.log(1000)
    expected = llc_fast.oracles.product_expectation(1, 1, t)
    assert expected == pytest.approx(0.3614, abs=1e-4)
    runs = []
    for lr, draws in ((1e-3, 5000), (5e-4, 10000)):
        model = Replicated(R, 2, lambda w: w[:, 0] ** 2 * w[:, 1] ** 2)
        r = llc_fast.estimate_llc(model, FULL_BATCH, potential_loss, lr=lr, nbeta=t, gamma=1.0, num_chains=C,
                                  num_draws=draws, num_burnin_steps=draws // 2, progress=False)
        per_copy = r.llc_per_chain / R
        runs.append((per_copy.mean(), per_copy.std(ddof=1) / math.sqrt(C)))
    (coarse, se_coarse), (fine, se_fine) = runs
    extrapolated, se = 2 * fine - coarse, math.sqrt(4 * se_fine**2 + se_coarse**2)
    assert coarse - expected > 3 * se_coarse  # the bias the extrapolation removes is real
    assert abs(extrapolated - expected) < 3 * se, f"{extrapolated:.4f} vs {expected:.4f}, 3 SE = {3 * se:.4f}"
