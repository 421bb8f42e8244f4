"""What calibrate knows besides its rows: the curvature at w*, the stability limit of each setting, whether gamma
moves the target, and (with ``lrs="auto"``) the grid it builds and the setting it chooses from the curvature.

Stability. Plain SGLD on a quadratic is stable iff lr·(nbeta·h + gamma) < 4 along every curvature h
(``kernels.update_spec.STABILITY_LIMIT``), so ``calibrate`` measures h_max at w* (``chains.hessian``) and never
recommends a setting at or above lr_limit = 4/(nbeta·h_max + gamma).

Gamma. The localizer lowers the target: directions whose nbeta·h is not large against gamma are held near w*.
An unfinished transient from w* lowers the estimate too, so between two settings that differ only in gamma the
larger λ̂ is the nearer, as long as the smaller gamma still holds the chains near w*: when the setting with gamma/10
(the next smaller gamma of the grid at the same lr and nbeta) gives a λ̂ larger by more than GAMMA_Z combined
standard errors and GAMMA_RTOL relative, and its chains agree at least as well (R-hat no larger, or within
RHAT_MAX), gamma moved the target and the smaller one is taken; this repeats down the grid (``gamma_ladder``).
Chains that agree less at the smaller gamma are leaving w* along the model's flat directions (on a deep linear
network λ̂ then rises far above λ), so the larger gamma is kept.

Automatic grid (``lrs="auto"``), for a budget of S steps per chain (the run's schedule):
* lr_c = STEP_FRACTION·lr_limit(largest gamma);
* gammas (unless given): GAMMA_LADDER values from gamma_hi = RELAX/(lr_c·S) down by factors of 10: gamma_hi is
  the smallest localization that relaxes every direction, however flat, within S steps (a direction relaxes at
  rate lr·(nbeta·h + gamma) per step, RELAX e-folds); smaller ones move the target less.
The choice (``auto_choice``): the recommended row's gamma (when no row qualifies: the gamma ladder over every row
within the limit without a diverged chain, from the largest gamma, whether or not its trace flattened, since both
an unfinished transient and gamma's pull lower λ̂); the step lr = the largest with an estimated step bias
lr·nbeta·tr(H)/8 (the first-order bias of the discretised chain's E[nbeta·L] on a quadratic) at most STEP_BIAS_TOL
of the estimate, and at most MAX_STEP_FRACTION of the limit (with noise_scheme="lm", which has no such bias,
LM_STEP_FRACTION of the limit); and the steps needed to relax the flattest curvature
measured, RELAX/(lr·(nbeta·h_min + gamma)), against the budget.
"""
from __future__ import annotations

import math

from ..api import EVAL_OPTIONS, options_config
from ..chains.hessian import Curvature, hessian_curvature, lr_limit
from ..diagnostics.convergence import RHAT_MAX
from ..distributed.mesh import launched_processes

GAMMA_Z, GAMMA_RTOL = 2.0, 0.02
STEP_FRACTION = 0.25  # calibrate's rows run at this fraction of the stability limit
MAX_STEP_FRACTION = 0.5  # the chosen step never above this fraction (lr·a_max <= 2: the stiffest direction not
# overshooting w*)
STEP_BIAS_TOL = 0.03  # the chosen step's estimated relative bias of λ̂
LM_STEP_FRACTION = 0.3  # noise_scheme="lm": no step bias on the quadratic part; the margin is for the flat
# directions, which stiffen away from w* (at 0.5 the deep linear networks of bench_accuracy.py spike)
RELAX = 3.0  # e-folds of a direction's variance (1 - e^-3 = 95 % relaxed)
GAMMA_LADDER = 3  # gammas of the automatic grid, each a tenth of the one before


def _config(options: dict, **changes):
    """The LLCConfig of estimate_llc ``options`` (``calibrate``'s run) with ``changes``."""
    return options_config("calibrate", {k: v for k, v in dict(options, **changes).items() if k not in EVAL_OPTIONS})


def run_steps(options: dict) -> int:
    """Steps per chain of a run of estimate_llc ``options``."""
    return _config(options).schedule.num_steps


def auto_nbeta(options: dict, data) -> float:
    """The one nbeta of an ``lrs="auto"`` calibration: the grid's, or estimate_llc's default for the data."""
    return _config(options, lr=1.0, gamma=0.0, num_chains=1, nbeta=(options["nbeta"] or [None])[0]).for_data(
        data).nbeta[0]


def measure_curvature(model, data, loss_fn, options: dict) -> Curvature | None:
    """The curvature at w* of the run ``options`` (estimate_llc's keyword arguments: seed, mask, device); None under
    torchrun (the Hessian-vector products are not written for a sharded model)."""
    if launched_processes() > 1:
        return None
    return hessian_curvature(model, data, loss_fn, seed=options.get("seed", 0), mask=options.get("mask"),
                             device=options.get("device"))


def mark_limits(rows, curvature: Curvature | None) -> None:
    """Set each row's lr_limit and within_limit from the curvature (left as they are without one)."""
    if curvature is None:
        return
    for r in rows:
        r.lr_limit = lr_limit(curvature.h_max, r.nbeta, r.gamma)
        r.within_limit = r.lr < r.lr_limit


def _se(r) -> float:
    return r.mcse if math.isfinite(r.mcse) else r.llc_stderr


def gamma_ladder(best, rows) -> tuple[object, str]:
    """(row, note): from ``best`` down the smaller gammas of ``rows`` at its lr and nbeta, while the next gives a
    significantly larger λ̂ (module docstring); rows: the candidates (within the limit, no chain diverged, mixed and
    flattened: a setting whose chains wander or still rise says nothing about the target). note: what was
    compared."""
    if best is None:
        return best, ""
    down = sorted((r for r in rows if r.lr == best.lr and r.nbeta == best.nbeta and r.gamma < best.gamma
                   and math.isfinite(r.llc_mean)), key=lambda r: -r.gamma)
    notes, current = [], best
    for r in down:
        se = math.hypot(_se(r), _se(current))
        gain = r.llc_mean - current.llc_mean
        if not math.isfinite(se):
            notes.append(f"gamma={r.gamma:.3g} could not be compared with gamma={current.gamma:.3g} (no standard "
                         "error: run more chains or draws)")
            break
        if gain > GAMMA_Z * se and gain > GAMMA_RTOL * abs(current.llc_mean):
            agree = current.rhat if math.isfinite(current.rhat) and current.rhat > RHAT_MAX else RHAT_MAX
            if not r.rhat <= agree:  # chains spreading apart: leaving w*, not a truer target
                notes.append(f"gamma={r.gamma:.3g} gives λ̂ {r.llc_mean:.4g}, {gain:.3g} higher, but its chains agree "
                             f"less (R-hat {r.rhat:.3g} > {agree:.3g}): gamma={current.gamma:.3g} kept")
                break
            notes.append(f"gamma={current.gamma:.3g} moves the target (gamma={r.gamma:.3g} gives λ̂ {r.llc_mean:.4g}, "
                         f"{gain:.3g} higher, {gain / se:.1f} standard errors)")
            current = r
            continue
        notes.append(f"gamma={current.gamma:.3g} does not measurably move the target (gamma={r.gamma:.3g} gives "
                     f"λ̂ {r.llc_mean:.4g}, {gain:+.3g}, within {GAMMA_Z:g} standard errors or {GAMMA_RTOL:.0%})")
        break
    return current, "; ".join(notes)


def auto_grid(curvature: Curvature, nbeta: float, steps: int, gammas: list[float] | None) -> tuple[list, list]:
    """(lrs, gammas) of ``calibrate(lrs="auto")``: one lr, STEP_FRACTION of the limit at the largest gamma, and
    ``gammas`` (largest first) or the automatic ladder (module docstring)."""
    if not curvature.h_max > 0:
        raise ValueError(f"the loss has no positive curvature at w* (h_max = {curvature.h_max:.3g} on the curvature "
                         "batches), so no step size follows from it: pass lrs=[...] and gammas=[...] to calibrate")
    if gammas is None:
        top = RELAX / (STEP_FRACTION * lr_limit(curvature.h_max, nbeta, 0.0) * steps)
        gammas = [top / 10.0**k for k in range(GAMMA_LADDER)]
    gammas = sorted(gammas, reverse=True)
    return [STEP_FRACTION * lr_limit(curvature.h_max, nbeta, gammas[0])], gammas


def auto_choice(rows, recommended, reason: str, curvature: Curvature, steps: int,
                noise_scheme: str = "euler") -> tuple[dict | None, str]:
    """(the setting to estimate with or None, calibrate's reason with why) of an ``lrs="auto"`` calibration: from
    the recommended row, else (no row qualified) the row of the largest gamma without a diverged chain within the
    limit, the fastest to relax, and then the budget is too small (``_choice``)."""
    usable = [r for r in rows if r.within_limit and r.diverged == 0 and math.isfinite(r.llc_mean)]
    if recommended is None and not usable:
        return None, reason
    fallback, note = recommended is None, ""
    if fallback:  # every estimate is then low (an unfinished transient) or held (gamma): the larger is the nearer
        recommended, note = gamma_ladder(max(usable, key=lambda r: r.gamma), usable)
    choice, why = _choice(recommended, curvature, steps, noise_scheme)
    if fallback:
        choice["budget_ok"] = False
        why += (". No setting qualified (the budget is too small for this model), so from the largest gamma without "
                f"a diverged chain down the gammas whose λ̂ is significantly larger{': ' + note if note else ''}")
    return choice, f"{why}. Calibration: {reason}"


def _choice(best, curvature: Curvature, steps: int, noise_scheme: str = "euler") -> tuple[dict, str]:
    """(the setting to estimate with, why) from calibrate's recommended row ``best`` (module docstring)."""
    limit = lr_limit(curvature.h_max, best.nbeta, best.gamma)
    per_lr = best.nbeta * curvature.trace / 8.0  # step bias of λ̂ per unit of lr
    unbiased = best.llc_mean - best.lr * per_lr if math.isfinite(per_lr) else best.llc_mean
    lr, why = MAX_STEP_FRACTION * limit, f"{MAX_STEP_FRACTION:g} of the stability limit {limit:.3g}"
    if noise_scheme == "lm":
        lr, why = LM_STEP_FRACTION * limit, (f"{LM_STEP_FRACTION:g} of the stability limit {limit:.3g} (noise_scheme="
                                             "'lm' has no step bias on the quadratic part)")
    elif math.isfinite(per_lr) and per_lr > 0 and unbiased > 0 and STEP_BIAS_TOL * unbiased / per_lr < lr:
        lr, why = STEP_BIAS_TOL * unbiased / per_lr, (f"the largest step whose bias lr·nbeta·tr(H)/8 is "
                                                      f"{STEP_BIAS_TOL:.0%} of λ̂ ≈ {unbiased:.4g}")
    bias = 0.0 if noise_scheme == "lm" else lr * per_lr / unbiased if math.isfinite(per_lr) and unbiased > 0 \
        else math.nan
    slowest = best.nbeta * max(curvature.h_min, 0.0) + best.gamma
    needed = math.ceil(RELAX / (lr * slowest)) if slowest > 0 else math.inf
    choice = dict(lr=lr, gamma=best.gamma, nbeta=best.nbeta, lr_limit=limit, step_fraction=lr / limit,
                  step_bias=bias, steps_needed=needed if math.isfinite(needed) else None, steps=steps,
                  budget_ok=bool(needed <= steps and best.flattened),
                  h_max=curvature.h_max, h_min=curvature.h_min, trace=curvature.trace)
    reason = (f"lr={lr:.3g}: {why} (h_max {curvature.h_max:.4g} at w*, estimated step bias {bias:.1%}); "
              f"gamma={best.gamma:.3g}")
    if needed > steps:
        reason += (f". The flattest curvature measured (h_min {curvature.h_min:.3g}, with gamma) relaxes in about "
                   f"{needed} steps, more than the {steps} of the budget: the budget is too small, run at least "
                   f"{needed} steps (num_burnin_steps)" + ("" if best.flattened else " (the trace was still rising)"))
    elif not best.flattened:
        reason += ". The trace was still rising at this setting: the budget is too small, run more burn-in steps"
    return choice, reason
