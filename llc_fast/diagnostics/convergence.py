"""Convergence diagnostics of an LLC estimate, computed by ArviZ (``arviz_stats``) on the chains' draws.

The quantity diagnosed is each draw's contribution to the estimate, y[c, d] = nbeta_c * (L_c,d - L(w*)),
whose grand mean over chains and draws is lambda_hat (every chain has the same number of draws):

* ``rhat``: rank-normalised split R-hat (Vehtari et al. 2021); > ``RHAT_MAX`` = 1.01 means the chains do
  not agree yet (CmdStan's threshold).
* ``ess_bulk``, ``ess_tail``: effective sample sizes (bulk; tail = the 5 % and 95 % quantiles).
* ``mcse``: Monte Carlo standard error of lambda_hat (ArviZ's MCSE of the mean of y); lambda_hat's
  standard error. ``llc_stderr`` (std of chain means / sqrt(chains)) is the cruder between-chain figure.
* ``ess_per_second``, ``ess_per_grad_eval``: bulk ESS per second of sampling and per forward/backward pass.
* ``flatness``: per chain, (mean of the second half - mean of the first half) of y divided by the
  combined MCSE of the two halves; |z| > ``FLAT_Z_MAX`` = 3 says the chain was still drifting.
* ``drift``, ``drift_se``, ``drift_z``, ``drift_rel``, ``drifting``: the drift every chain shares, which
  R-hat, ESS and ``flatness`` cannot see when all chains start at w* and rise together (``shared_drift``):
  the change over the draws of the least-squares line through the chains' mean of y, its standard error
  from the autocorrelated residuals, z = drift / drift_se, and drift / |lambda_hat|. ``drifting`` when
  |z| > ``DRIFT_Z_MAX`` = 3 (significant) and |drift| > ``DRIFT_RTOL`` = 1 % of |lambda_hat| (material).
  False-alarm rate on stationary chains: about 0.5 % (0.27 % if z were exactly Gaussian; measured 0.35-0.6 %
  on AR(1) chains, 1-4 chains of 60-330 autocorrelation times, ``tests/test_diagnostics_drift.py``),
  more on shorter runs (3 % at 11 autocorrelation times), which the ESS condition rejects anyway.
* divergences (count, chains, first bad steps) and the mean MALA acceptance where recorded.

Diverged chains are left out, as they are from the estimate. ``verdict`` states in one line whether to
trust the number and, if not, the first reason and what to do.
"""
from __future__ import annotations

import math

import numpy as np

RHAT_MAX = 1.01
ESS_MIN_PER_CHAIN = 100  # CmdStan's diagnose: bulk/tail ESS below 100 per chain is too few
FLAT_Z_MAX = 3.0
DRIFT_Z_MAX = 3.0  # two-sided 0.27 % for a Gaussian z
DRIFT_RTOL = 0.01  # a drift below 1 % of lambda_hat over the draws is not material
DRIFT_MIN_DRAWS = 8
ACCEPTANCE_MIN = 0.5  # far below the practitioners' 0.9 target: the step is too large


def _array_stats():
    try:
        from arviz_stats.base import array_stats
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise ImportError("convergence diagnostics need arviz-stats: pip install arviz-stats") from e
    return array_stats


def contributions(loss_trace: np.ndarray, init_loss: float, nbeta) -> np.ndarray:
    """y [C, D] = nbeta_c * (loss - L(w*)): the draws whose grand mean is lambda_hat."""
    return np.asarray(nbeta, dtype=np.float64).reshape(-1, 1) * (np.asarray(loss_trace, np.float64) - init_loss)


def chain_diagnostics(y: np.ndarray) -> dict:
    """R-hat, bulk/tail ESS and MCSE of the mean of y [C, D] (finite rows only), by arviz_stats."""
    a = _array_stats()
    y = y[np.isfinite(y).all(axis=1)]
    out = dict(rhat=math.nan, ess_bulk=math.nan, ess_tail=math.nan, mcse=math.nan, chains_used=int(y.shape[0]))
    if y.shape[0] == 0 or y.shape[1] < 4:
        return out
    out["ess_bulk"] = float(a.ess(y, method="bulk"))
    out["ess_tail"] = float(a.ess(y, method="tail", prob=(0.05, 0.95)))
    out["mcse"] = float(a.mcse(y, method="mean"))
    if y.shape[0] >= 2:
        out["rhat"] = float(a.rhat(y, method="rank"))
    elif y.shape[1] >= 8:  # one chain: its two halves as two chains (split R-hat then splits each again)
        half = y.shape[1] // 2
        out["rhat"] = float(a.rhat(y[:, : 2 * half].reshape(2, half), method="rank"))
    return out


def flatness(y: np.ndarray) -> np.ndarray:
    """[C] drift z of each chain: (second-half mean - first-half mean) / combined MCSE of the halves."""
    a = _array_stats()
    half = y.shape[1] // 2
    z = np.full(y.shape[0], np.nan)
    if half < 4:
        return z
    for c, row in enumerate(y):
        if not np.isfinite(row).all():
            continue
        first, second = row[None, :half], row[None, -half:]
        se = math.hypot(float(a.mcse(first, method="mean")), float(a.mcse(second, method="mean")))
        drift = float(second.mean() - first.mean())
        z[c] = drift / se if se > 0 else (0.0 if drift == 0 else math.inf)
    return z


def shared_drift(y: np.ndarray) -> dict:
    """The drift shared by the chains of y [C, D] (finite rows only): the trend of their mean over the draws.

    Each chain's least-squares slope b_c against the draw index; the shared slope b = mean_c b_c (the slope
    of the chains' mean trace) and drift = b·(D − 1), the fitted line's change from the first draw to the
    last. Its standard error comes from the residuals r = y − (each chain's line), autocorrelation included:
    for a slowly varying regressor var(b_c) = sigma²·tau / Sxx (tau the integrated autocorrelation time),
    so drift_se = MCSE(mean of r)·sqrt(12·(D − 1)/(D + 1)), with ArviZ's MCSE of the residuals (their ESS
    pooled over chains). Keys: drift, drift_se, drift_z, drift_rel (drift / |mean of y|), num_draws and
    drifting (|drift_z| > DRIFT_Z_MAX and |drift| > DRIFT_RTOL·|mean of y|)."""
    y = np.asarray(y, dtype=np.float64)
    y = y[np.isfinite(y).all(axis=1)]
    out = dict(drift=math.nan, drift_se=math.nan, drift_z=math.nan, drift_rel=math.nan, num_draws=int(y.shape[1]),
               drifting=False)
    chains, draws = y.shape
    if chains == 0 or draws < DRIFT_MIN_DRAWS:
        return out
    x = np.arange(draws) - (draws - 1) / 2
    slopes = y @ x / (x @ x)
    residuals = y - y.mean(axis=1, keepdims=True) - slopes[:, None] * x
    drift = float(slopes.mean() * (draws - 1))
    se = float(_array_stats().mcse(residuals, method="mean")) * math.sqrt(12 * (draws - 1) / (draws + 1))
    z = drift / se if se > 0 else (0.0 if drift == 0 else math.copysign(math.inf, drift))
    scale = abs(float(y.mean()))
    out.update(drift=drift, drift_se=se, drift_z=z, drift_rel=drift / scale if scale > 0 else math.inf,
               drifting=bool(abs(z) > DRIFT_Z_MAX and abs(drift) > DRIFT_RTOL * scale))
    return out


def drift_reason(d: dict) -> str:
    """The verdict's line for a shared drift (``shared_drift``'s dict): how much, how sure, what to do."""
    rose = d["drift"] > 0
    share = f", {100 * abs(d['drift_rel']):.3g} % of λ̂" if math.isfinite(d["drift_rel"]) else ""
    return (f"the chains are still drifting together (nbeta·(loss − L(w*)) {'rose' if rose else 'fell'} by "
            f"{abs(d['drift']):.3g} over the {d['num_draws']} draws, {abs(d['drift_z']):.3g} SE{share}): "
            + ("run longer or raise lr" if rose else "run more burn-in steps"))


def verdict(d: dict) -> tuple[bool, str]:
    """(trustworthy, one-line reason with what to do) from ``diagnose``'s dict."""
    if d["diverged"] and d["diverged"] == d["num_chains"]:
        return False, "every chain diverged: lower lr"
    if not math.isfinite(d["rhat"]):
        return False, "R-hat could not be computed (too few draws): run more draws"
    if d["rhat"] > RHAT_MAX:
        return False, f"R-hat {d['rhat']:.3f} > {RHAT_MAX}: the chains disagree; run longer or lower lr"
    if d["drifting"]:
        return False, drift_reason(d)
    worst = np.nanmax(np.abs(d["flatness"])) if np.isfinite(d["flatness"]).any() else math.nan
    if math.isfinite(worst) and worst > FLAT_Z_MAX:
        return False, (f"a chain is still drifting (|first vs second half| = {worst:.3g} MCSE > {FLAT_Z_MAX:g}): "
                       "run more burn-in steps")
    need = ESS_MIN_PER_CHAIN * d["chains_used"]
    if min(d["ess_bulk"], d["ess_tail"]) < need:
        return False, (f"ESS {min(d['ess_bulk'], d['ess_tail']):.0f} < {need} ({ESS_MIN_PER_CHAIN} per chain): "
                       "run more draws or more chains")
    if math.isfinite(d["mala_mean"]) and d["mala_mean"] < ACCEPTANCE_MIN:
        return False, f"MALA acceptance {d['mala_mean']:.2f} < {ACCEPTANCE_MIN}: the step is too large; lower lr"
    if d["diverged"]:
        return True, f"mixed (R-hat {d['rhat']:.3f}, ESS {d['ess_bulk']:.0f}) but {d['diverged']} chain(s) diverged"
    return True, f"mixed: R-hat {d['rhat']:.3f} <= {RHAT_MAX}, ESS {d['ess_bulk']:.0f}"


def diagnose(loss_trace, init_loss, nbeta, diverged_at: dict, *, mala_acceptance=None, sampling_s=None,
             grad_evals=None) -> dict:
    """Every diagnostic of the module docstring, plus ``ok`` and ``verdict``, as one dict."""
    y = contributions(loss_trace, init_loss, nbeta)
    kept = np.ones(y.shape[0], dtype=bool)
    kept[list(diverged_at)] = False
    d = chain_diagnostics(y[kept])
    d["flatness"] = np.full(y.shape[0], np.nan)
    d["flatness"][kept] = flatness(y[kept])
    d.update(shared_drift(y[kept]))
    d.update(num_chains=int(y.shape[0]), diverged=len(diverged_at), diverged_chains=sorted(diverged_at),
             diverged_at_step=dict(sorted(diverged_at.items())))
    acc = np.asarray(mala_acceptance) if mala_acceptance is not None else np.zeros((0, 0))
    d["mala_mean"] = float(np.nanmean(acc)) if acc.size and np.isfinite(acc).any() else math.nan
    d["ess_per_second"] = d["ess_bulk"] / sampling_s if sampling_s else math.nan
    d["ess_per_grad_eval"] = d["ess_bulk"] / grad_evals if grad_evals else math.nan
    d["ok"], d["verdict"] = verdict(d)
    return d
