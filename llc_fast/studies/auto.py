"""estimate_llc_auto: the one-call estimate: calibrate from the curvature at w*, then estimate at its choice.

    result = llc_fast.estimate_llc_auto(model, data, loss_fn, num_draws=2000, num_burnin_steps=2000)
    result.config["calibration"]   # what was chosen and why, and what the calibration cost

1. ``calibrate(lrs="auto")`` with the estimate's own schedule (burn-in, draws): the Hessian's largest and
   smallest measurable eigenvalues and its trace at w* (``chains.hessian``), then one batched run of
   ``calibration_chains`` chains at each gamma of a ladder (``studies.stability``), at a quarter of the stability
   limit; the largest gamma that does not measurably lower λ̂ is kept, and the step is chosen for an estimated
   step bias of at most 3 % and never above half the limit.
2. ``estimate_llc`` at that (lr, gamma, nbeta) with ``num_chains`` chains and the same schedule.

The calibration costs about GAMMA_LADDER·calibration_chains/num_chains of the estimate (1.5x with the defaults)
plus the Hessian-vector products; result.config["calibration"] records both costs in gradient evaluations and their
ratio.
"""
from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable

from ..api import estimate_llc, llc_option_names, refuse_unknown_options
from ..config import check_count
from ..estimators.result import LLCResult
from .calibrate import calibrate

#: estimate_llc's options that estimate_llc_auto chooses itself.
CHOSEN = ("lr", "gamma")


class AutoCalibrationError(RuntimeError):
    """The calibration found no setting to estimate with; ``.calibration`` holds its CalibrationResult."""

    def __init__(self, message: str, calibration):
        super().__init__(message)
        self.calibration = calibration


def estimate_llc_auto(model, data, loss_fn: Callable, *, num_chains: int = 4, num_draws: int = 2000,
                      num_burnin_steps: int = 2000, calibration_chains: int = 2, gammas=None, nbeta=None,
                      seed: int = 0, progress: bool = True, **estimate_llc_options) -> LLCResult:
    """The LLC of ``model`` at w* with lr and gamma chosen by ``calibrate(lrs="auto")`` (module docstring).

    num_chains, num_draws, num_burnin_steps: the estimate's (the calibration runs the same schedule).
    calibration_chains: chains per gamma in the calibration (>= 2, for a standard error). gammas: the gammas to
    choose from (default: the automatic ladder). nbeta: one value (default n/log n). Every other option of
    estimate_llc but lr and gamma passes to both runs. Returns the estimate's LLCResult; its
    config["calibration"] holds the choice (lr, gamma, nbeta, lr_limit, step_bias, steps_needed, budget_ok,
    h_max, h_min, trace), the reason, and the costs (calibration_grad_evals, estimate_grad_evals, cost_ratio).
    Raises AutoCalibrationError when the calibration recommends nothing (its reason says what to change).
    """
    taken = [k for k in CHOSEN if k in estimate_llc_options]
    if taken:
        raise TypeError(f"estimate_llc_auto chooses {' and '.join(taken)} itself: leave {taken[0]}= out, or call "
                        f"estimate_llc({taken[0]}=...) to set it")
    if "chains_per_setting" in estimate_llc_options:
        raise TypeError("estimate_llc_auto takes calibration_chains= (chains per gamma in the calibration), not "
                        "chains_per_setting=")
    refuse_unknown_options("estimate_llc_auto", estimate_llc_options,
                           [n for n in llc_option_names() if n not in CHOSEN], "estimate_llc's options but lr and gamma")
    check_count("calibration_chains", calibration_chains, 2)
    if nbeta is not None and (isinstance(nbeta, bool) or not isinstance(nbeta, numbers.Real)):
        raise ValueError(f"estimate_llc_auto takes one nbeta (a number > 0, e.g. n/log n), got {nbeta!r}")
    mala_every = estimate_llc_options.pop("mala_every", None)
    schedule = dict(num_draws=num_draws, num_burnin_steps=num_burnin_steps, seed=seed, progress=progress)
    calibration = calibrate(model, data, loss_fn, lrs="auto", gammas=gammas,
                            nbetas=None if nbeta is None else [nbeta], chains_per_setting=calibration_chains,
                            mala_every=mala_every, **schedule,
                            **estimate_llc_options)
    choice = calibration.auto
    if choice is None:
        raise AutoCalibrationError(f"estimate_llc_auto found no setting: {calibration.reason}", calibration)
    if not choice["budget_ok"]:
        warnings.warn(f"estimate_llc_auto: {calibration.reason}", RuntimeWarning, stacklevel=2)
    result = estimate_llc(model, data, loss_fn, lr=choice["lr"], gamma=choice["gamma"], nbeta=choice["nbeta"],
                          num_chains=num_chains, mala_every=mala_every, **schedule, **estimate_llc_options)
    spent = (calibration.result.grad_evals or 0.0) + calibration.curvature["grad_evals"]
    final = result.grad_evals or 0.0
    result.config["calibration"] = dict(
        choice, reason=calibration.reason, curvature=calibration.curvature,
        rows=[dict(gamma=r.gamma, lr=r.lr, llc_mean=r.llc_mean, mcse=r.mcse, flattened=r.flattened,
                   diverged=r.diverged) for r in calibration.rows],
        calibration_grad_evals=spent, estimate_grad_evals=final, cost_ratio=spent / final if final else None)
    return result
