"""Convergence diagnostics: the same numbers as ArviZ's own functions, right on chains with known answers,
and a verdict that says why not to trust a run."""
import math

import numpy as np
import pytest
import torch
from arviz_stats.base import array_stats
from torch import nn

import llc_fast
from llc_fast import LLCResult
from llc_fast.diagnostics.convergence import RHAT_MAX, chain_diagnostics, diagnose, flatness

from conftest import mse, regression_data


def ar1(rho: float, chains: int, draws: int, seed: int = 0, mean=0.0) -> np.ndarray:
    """Stationary Gaussian AR(1) chains with unit marginal variance."""
    rng = np.random.default_rng(seed)
    x = np.empty((chains, draws))
    x[:, 0] = rng.standard_normal(chains)
    noise = rng.standard_normal((chains, draws)) * math.sqrt(1 - rho**2)
    for t in range(1, draws):
        x[:, t] = rho * x[:, t - 1] + noise[:, t]
    return x + np.asarray(mean, dtype=float).reshape(-1, 1)


def test_rhat_ess_and_mcse_are_arviz_own():
    y = ar1(0.7, 4, 5000, seed=1)
    d = chain_diagnostics(y)
    assert d["rhat"] == array_stats.rhat(y, method="rank")
    assert d["ess_bulk"] == array_stats.ess(y, method="bulk")
    assert d["ess_tail"] == array_stats.ess(y, method="tail", prob=(0.05, 0.95))
    assert d["mcse"] == array_stats.mcse(y, method="mean")


def test_ess_and_mcse_of_a_known_ar1_chain():
    """For AR(1) with coefficient rho: ESS = N (1 - rho) / (1 + rho), MCSE of the mean = sqrt(1/ESS)."""
    rho, chains, draws = 0.8, 4, 20000
    d = chain_diagnostics(ar1(rho, chains, draws, seed=2))
    ess = chains * draws * (1 - rho) / (1 + rho)
    assert d["ess_bulk"] == pytest.approx(ess, rel=0.15)
    assert d["mcse"] == pytest.approx(math.sqrt(1 / ess), rel=0.1)
    assert d["rhat"] < RHAT_MAX


def test_rhat_sees_chains_that_disagree_and_flatness_sees_a_drift():
    apart = ar1(0.5, 4, 1000, seed=3, mean=[0.0, 0.0, 0.0, 1.0])
    assert chain_diagnostics(apart)["rhat"] > 1.05
    drifting = ar1(0.5, 2, 1000, seed=4) + np.repeat([0.0, 1.0], 500) * np.array([[0.0], [1.0]])  # a step
    z = flatness(drifting)
    assert abs(z[0]) < 3 and z[1] > 5


def test_result_diagnostics_diagnose_lambda_hats_draws():
    """The diagnosed quantity is nbeta_c (L - L(w*)): its grand mean is lambda_hat, its MCSE lambda_hat's."""
    trace = 1.0 + 0.01 * ar1(0.6, 3, 2000, seed=5)
    nbeta = np.array([10.0, 10.0, 10.0])
    result = LLCResult.from_traces(trace, 1.0, nbeta, {}, dict(nbeta=nbeta.tolist(), mala_every=None),
                                   dict(steps=3 * 2000, sampling_s=2.0))
    d = result.diagnostics()
    y = 10.0 * (trace - 1.0)
    assert d["mcse"] == pytest.approx(float(array_stats.mcse(y, method="mean")), rel=1e-12)
    assert result.llc_mean == pytest.approx(y.mean(), rel=1e-12)
    assert d["ess_per_second"] == pytest.approx(d["ess_bulk"] / 2.0)
    assert d["ess_per_grad_eval"] == pytest.approx(d["ess_bulk"] / 6000)
    assert d["ok"] and d["verdict"].startswith("mixed")
    assert "trust: mixed" in result.summary() and "MCSE" in result.summary()


def test_verdicts_name_the_reason_and_what_to_do():
    def verdict(trace, diverged=None, acceptance=None):
        return diagnose(trace, 0.0, np.ones(trace.shape[0]), diverged or {}, mala_acceptance=acceptance)

    assert "R-hat" in verdict(ar1(0.5, 4, 1000, seed=6, mean=[0, 0, 0, 1]))["verdict"]
    assert "run longer or lower lr" in verdict(ar1(0.5, 4, 1000, seed=6, mean=[0, 0, 0, 1]))["verdict"]
    low_ess = verdict(ar1(0.99, 4, 2000, seed=7))
    assert not low_ess["ok"] and ("ESS" in low_ess["verdict"] or "R-hat" in low_ess["verdict"])
    accept = verdict(ar1(0.1, 4, 1000, seed=8), acceptance=np.full((4, 10), 0.2))
    assert not accept["ok"] and "MALA acceptance 0.20" in accept["verdict"] and "lower lr" in accept["verdict"]
    some = verdict(ar1(0.1, 4, 1000, seed=9), diverged={3: 17})
    assert some["diverged"] == 1 and some["diverged_at_step"] == {3: 17} and some["chains_used"] == 3


def test_an_estimate_reports_its_diagnostics():
    data = torch.utils.data.DataLoader(regression_data(n=128), batch_size=32, shuffle=True)
    model = nn.Linear(3, 1)
    r = llc_fast.estimate_llc(model, data, mse, lr=1e-3, nbeta=20.0, num_chains=4, num_draws=300,
                              num_burnin_steps=100, progress=False)
    d = r.diagnostics()
    for key in ("rhat", "ess_bulk", "ess_tail", "mcse", "ess_per_second", "ess_per_grad_eval"):
        assert math.isfinite(d[key]) and d[key] > 0, key
    assert d["flatness"].shape == (4,) and d["diverged"] == 0
    assert ("trust: " if d["ok"] else "do not trust yet: ") + d["verdict"] in r.summary()


def test_xarray_export_has_arvizs_posterior_layout():
    xr = pytest.importorskip("xarray")
    trace = 1.0 + 0.01 * ar1(0.3, 2, 300, seed=10)
    result = LLCResult.from_traces(trace, 1.0, np.array([5.0, 5.0]), {}, dict(nbeta=[5.0, 5.0], mala_every=None))
    ds = result.to_xarray()
    assert isinstance(ds, xr.Dataset) and ds["llc"].dims == ("chain", "draw") and ds["llc"].shape == (2, 300)
    assert float(ds["llc"].mean()) == pytest.approx(result.llc_mean, rel=1e-12)
    assert float(array_stats.rhat(ds["llc"].values)) == pytest.approx(result.diagnostics()["rhat"], rel=1e-12)
