"""The verdict sees a drift that every chain shares (``convergence.shared_drift``), which R-hat, ESS and the
per-chain flatness cannot see when all chains start at w* and rise together; and it does not cry wolf on
stationary chains more often than the stated false-alarm rate (0.5 %), counted over many replications and
judged against the binomial distribution."""
import math

import numpy as np
import pytest

from llc_fast import LLCResult
from llc_fast.diagnostics.convergence import (DRIFT_RTOL, DRIFT_Z_MAX, ESS_MIN_PER_CHAIN, FLAT_Z_MAX, RHAT_MAX,
                                              diagnose, drift_reason, shared_drift)

STATED_FALSE_ALARM_RATE = 0.005  # the rate convergence.py's docstring states for >= 50 autocorrelation times


def ar1(rho: float, reps: int, chains: int, draws: int, seed: int) -> np.ndarray:
    """[reps, chains, draws] stationary Gaussian AR(1) chains with unit marginal variance."""
    rng = np.random.default_rng(seed)
    x = np.empty((reps, chains, draws))
    x[..., 0] = rng.standard_normal((reps, chains))
    noise = rng.standard_normal((reps, chains, draws)) * math.sqrt(1 - rho**2)
    for t in range(1, draws):
        x[..., t] = rho * x[..., t - 1] + noise[..., t]
    return x


def binomial_upper_quantile(n: int, p: float, q: float) -> int:
    """The smallest k with P(Binomial(n, p) <= k) >= q (exact, from the probability mass function)."""
    cdf, k = 0.0, 0
    while True:
        cdf += math.comb(n, k) * p**k * (1 - p) ** (n - k)
        if cdf >= q:
            return k
        k += 1


def test_exact_line_the_drift_is_its_change_over_the_draws():
    draws = 101
    y = 3.0 + 0.02 * np.arange(draws)[None, :] + np.array([[0.0], [1.0], [-1.0]])  # three parallel lines
    d = shared_drift(y)
    assert d["drift"] == pytest.approx(0.02 * (draws - 1), rel=1e-12) and d["num_draws"] == draws
    assert d["drift_rel"] == pytest.approx(2.0 / 4.0, rel=1e-12) and d["drifting"]
    assert d["drift_se"] == pytest.approx(0.0, abs=1e-12) and d["drift_z"] > 1e12  # rounding noise only
    assert "rose by 2 over the 101 draws" in drift_reason(d) and "50 % of λ̂" in drift_reason(d)
    at_zero = drift_reason(dict(drift=-2.0, drift_z=-5.0, drift_rel=-math.inf, num_draws=101))  # lambda_hat = 0
    assert "fell by 2 over the 101 draws, 5 SE)" in at_zero and "inf" not in at_zero
    flat = shared_drift(np.full((2, 50), 7.0))
    assert flat["drift"] == 0.0 and flat["drift_z"] == 0.0 and not flat["drifting"]
    assert math.isnan(shared_drift(y[:, :5])["drift"]) and not shared_drift(y[:, :5])["drifting"]


def test_the_standard_error_is_that_of_the_slope_for_autocorrelated_noise():
    """For AR(1) noise, var(OLS slope) = sigma² tau / Sxx to O(tau/D): drift_se over reps equals the spread of
    the drifts within sampling error (the z's standard deviation is 1 within 5 of its standard errors)."""
    y = ar1(0.9, 600, 4, 2000, seed=11)
    z = np.array([shared_drift(r)["drift_z"] for r in y])
    assert abs(z.mean()) < 5 / math.sqrt(z.size)
    assert abs(z.std() - 1.0) < 5 / math.sqrt(2 * z.size) + 0.03  # + the O(tau/D) excess, about 2 %


@pytest.mark.parametrize("rho,chains,draws", [(0.9, 4, 2000), (0.97, 2, 4000), (0.5, 1, 1000)])
def test_stationary_chains_are_rarely_flagged(rho, chains, draws):
    """Stationary AR(1) chains (mean 0, so only the significance test decides) in 2,000 replications from 4
    seeds: the number flagged may exceed the stated rate's expectation only by binomial chance; the tolerance
    is the 0.999 quantile of Binomial(2000, 0.005) (21), so a correct test fails here once in 1,000 seeds.
    A standard error that ignored the autocorrelation would flag about half of them."""
    flagged = 0
    for seed in range(4):
        for y in ar1(rho, 500, chains, draws, seed=100 * seed + chains):
            flagged += shared_drift(y)["drifting"]
    tolerance = binomial_upper_quantile(2000, STATED_FALSE_ALARM_RATE, 0.999)
    assert tolerance == 21
    assert flagged <= tolerance, f"{flagged} of 2000 stationary runs flagged as drifting"


def shared_trend_run(mean: float, trend: np.ndarray, seed: int = 3, chains: int = 16) -> np.ndarray:
    """``chains`` AR(1) chains (rho 0.9, unit variance) around ``mean`` + the same ``trend`` [D] in every chain."""
    return mean + ar1(0.9, 1, chains, trend.size, seed=seed)[0] + trend[None, :]


def test_a_slow_trend_shared_by_agreeing_chains_is_flagged():
    """16 chains of 8,000 draws (rho 0.9) all rising by 0.25 marginal standard deviations (2.5 % of lambda_hat):
    R-hat, every chain's flatness (expected z 1.3) and the ESS pass, as they did before the shared-drift test;
    the shared drift is expected at 1.3·4·2/sqrt(3) ≈ 6 of its standard errors, so the verdict says do not
    trust yet, and why. The same chains without the trend are trusted. Seed 4 is a sample on which every
    older check passes (so are 4 of the seeds 0-7: with 16 chains one of them often trips the per-chain test)."""
    draws, rise, chains = 8000, 0.25, 16
    y = shared_trend_run(10.0, rise * np.arange(draws) / (draws - 1), seed=4)
    d = diagnose(y, 0.0, np.ones(chains), {})
    assert d["rhat"] <= RHAT_MAX and np.nanmax(np.abs(d["flatness"])) <= FLAT_Z_MAX
    assert min(d["ess_bulk"], d["ess_tail"]) >= ESS_MIN_PER_CHAIN * chains
    assert abs(d["drift"] - rise) < 4 * d["drift_se"] and d["drift_z"] > DRIFT_Z_MAX and d["drifting"]
    assert not d["ok"] and d["verdict"].startswith("the chains are still drifting together")
    assert "rose by 0.2" in d["verdict"] and f"over the {draws} draws" in d["verdict"]
    assert d["verdict"].endswith("run longer or raise lr")
    result = LLCResult.from_traces(y, 0.0, np.ones(chains), {}, dict(nbeta=[1.0] * chains, mala_every=None))
    assert "do not trust yet: the chains are still drifting together" in result.summary()
    assert diagnose(shared_trend_run(10.0, np.zeros(draws), seed=4), 0.0, np.ones(chains), {})["ok"]


def test_an_exponential_approach_and_a_fall_are_flagged():
    """The shape of a chain still equilibrating from w*, 16 chains: 10 − exp(−(D + t)/(2D)) over draws t of
    D = 8,000 (a rise of 0.24, 2.4 % of lambda_hat); and its mirror image, falling, which asks for burn-in."""
    draws = 8000
    t = np.arange(draws)
    approach = -1.0 * np.exp(-(t + draws) / (2 * draws))
    rising = diagnose(shared_trend_run(10.0, approach), 0.0, np.ones(16), {})
    assert rising["drifting"] and "rose by" in rising["verdict"] and not rising["ok"]
    falling = diagnose(shared_trend_run(10.0, -approach), 0.0, np.ones(16), {})
    assert falling["drifting"] and "fell by" in falling["verdict"]
    assert falling["verdict"].endswith("run more burn-in steps")


def test_a_significant_but_immaterial_drift_is_not_flagged():
    """A rise of 0.4 on lambda_hat = 100 is 0.4 % of it, below DRIFT_RTOL: significant, not material."""
    draws = 8000
    d = shared_drift(shared_trend_run(100.0, 0.4 * np.arange(draws) / (draws - 1)))
    assert d["drift_z"] > DRIFT_Z_MAX and abs(d["drift_rel"]) < DRIFT_RTOL and not d["drifting"]


def test_diverged_chains_are_left_out_of_the_drift():
    y = shared_trend_run(10.0, np.zeros(2000), chains=4)
    y[3, 500:] = np.nan
    y[3, :500] += np.linspace(0, 50, 500)  # a chain exploding before it diverged
    d = diagnose(y, 0.0, np.ones(4), {3: 500})
    assert d["drift"] == pytest.approx(shared_drift(y[:3])["drift"], rel=1e-12) and not d["drifting"]


def test_the_same_verdict_reaches_calibrate_sweep_and_checkpoint_rows():
    """calibrate's rows (and so sweep's table) and the checkpoint tables take the verdict of
    LLCResult.diagnostics(): a shared drift makes each say do not trust, with the same reason."""
    from llc_fast.studies.calibrate import CalibrationResult, _row
    from llc_fast.studies.checkpoints import _row as checkpoint_row
    from llc_fast.studies.sweep import SweepResult

    draws, chains = 8000, 16
    y = shared_trend_run(10.0, 0.25 * np.arange(draws) / (draws - 1), seed=4)
    config = dict(lr=[1e-3] * chains, nbeta=[1.0] * chains, gamma=[1.0] * chains, num_chains=chains,
                  mala_every=None)
    result = LLCResult.from_traces(y, 0.0, np.ones(chains), {}, config)
    reason = result.diagnostics()["verdict"]
    assert reason.startswith("the chains are still drifting together")
    row = _row(result, 0, list(range(chains)))
    assert not row.trusted and row.verdict == reason and not row.flattened and row.mixed
    table = SweepResult(CalibrationResult([row], None, "", result, chains)).table()
    assert table.splitlines()[1].split()[-1] == "no"
    point = checkpoint_row(100, "all", result, None)
    assert not point.trusted and point.verdict == reason
