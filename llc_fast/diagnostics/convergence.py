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


def verdict(d: dict) -> tuple[bool, str]:
    """(trustworthy, one-line reason with what to do) from ``diagnose``'s dict."""
    if d["diverged"] and d["diverged"] == d["num_chains"]:
        return False, "every chain diverged: lower lr"
    if not math.isfinite(d["rhat"]):
        return False, "R-hat could not be computed (too few draws): run more draws"
    if d["rhat"] > RHAT_MAX:
        return False, f"R-hat {d['rhat']:.3f} > {RHAT_MAX}: the chains disagree; run longer or lower lr"
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
    d.update(num_chains=int(y.shape[0]), diverged=len(diverged_at), diverged_chains=sorted(diverged_at),
             diverged_at_step=dict(sorted(diverged_at.items())))
    acc = np.asarray(mala_acceptance) if mala_acceptance is not None else np.zeros((0, 0))
    d["mala_mean"] = float(np.nanmean(acc)) if acc.size and np.isfinite(acc).any() else math.nan
    d["ess_per_second"] = d["ess_bulk"] / sampling_s if sampling_s else math.nan
    d["ess_per_grad_eval"] = d["ess_bulk"] / grad_evals if grad_evals else math.nan
    d["ok"], d["verdict"] = verdict(d)
    return d
