"""calibrate's recommendation rule over its rows.

Stability: h_max, the largest eigenvalue of the loss's Hessian at w*, is measured first (power iteration on
Hessian-vector products, ``chains.hessian``; not under torchrun); a setting with lr >= 4/(nbeta·h_max + gamma)
(``CalibrationRow.lr_limit``) is never recommended, even if no chain diverged.

Rule (a setting whose chains have not mixed, or whose lr is at or above the stability limit, is never recommended):
  1. Candidates: settings with no diverged chain, mixed chains, a flattened trace and mean MALA acceptance >= 0.9.
     Among them the largest lr (fastest mixing); ties: the higher acceptance, then the earlier setting.
  2. If there is none: the mixed setting with no diverged chain and the highest acceptance (ties: flattened first,
     then the smaller lr), and the reason says that no setting met every condition.
  3. If no setting without a diverged chain has mixed: no recommendation (recommended=None), and the reason names
     the closest setting and what to change.
  Then gamma: from the chosen setting down the grid's smaller gammas at the same lr and nbeta whose chains mixed
  and flattened, the next is taken while its λ̂ is larger by more than 2 standard errors and 2 % and its chains
  agree at least as well (the larger gamma moved the target; ``stability.gamma_ladder``); the reason says what was
  compared.
"""
from __future__ import annotations

import math

from ..diagnostics.convergence import RHAT_MAX
from ..kernels.update_spec import STABILITY_LIMIT
from .stability import gamma_ladder

# Practitioners aim for a mean MALA acceptance of about 0.9-0.95 (lower: the step is too large).
ACCEPTANCE_TARGET = 0.9


def recommend(rows: list, acceptance_recorded: bool) -> tuple[object | None, str]:
    """The documented rule of ``calibrate``: (row or None, reason). Rows at or above the stability limit are left
    out; then the gamma ladder from the chosen row (``stability.gamma_ladder``)."""
    beyond = [r for r in rows if not r.within_limit]
    best, reason = _choose([r for r in rows if r.within_limit], acceptance_recorded)
    if beyond:
        lowest = min(beyond, key=lambda r: r.lr)
        reason += (f" ({len(beyond)} setting(s) left out for a step at or above the stability limit "
                   f"{STABILITY_LIMIT:g}/(nbeta·h_max + gamma), e.g. {lowest.label} whose limit is "
                   f"{lowest.lr_limit:.3g})")
        if best is None and len(beyond) == len(rows):
            return None, (f"every setting's lr is at or above the stability limit (the smallest, {lowest.label}, "
                          f"needs lr < {lowest.lr_limit:.3g}): try smaller lrs, or lrs=\"auto\"")
    candidates = [r for r in rows if r.within_limit and r.diverged == 0 and r.mixed and r.flattened
                  and math.isfinite(r.llc_mean)]
    chosen, note = gamma_ladder(best, candidates)
    if chosen is not best:
        reason = f"setting {chosen.setting} ({chosen.label}) instead of setting {best.setting} ({best.label}): {note}" \
                 f". Before the gamma check: {reason}"
    elif note:
        reason += f"; {note}"
    return chosen, reason


def _choose(rows: list, acceptance_recorded: bool) -> tuple[object | None, str]:
    """Rules 1-3 of ``calibrate``'s docstring over ``rows``: (row or None, reason)."""
    def acceptance(r) -> float:
        return r.mala_mean if math.isfinite(r.mala_mean) else -math.inf

    stable = [r for r in rows if r.diverged == 0 and math.isfinite(r.llc_mean)]
    unmixed = [r for r in stable if not r.mixed]
    stable = [r for r in stable if r.mixed]  # a setting whose chains have not mixed is never recommended
    healthy = [r for r in stable if r.flattened and (not acceptance_recorded or acceptance(r) >= ACCEPTANCE_TARGET)]
    conditions = f"no diverged chain, mixed chains (R-hat <= {RHAT_MAX}, no chain drifting), a flattened trace" + \
        (f" and mean MALA acceptance >= {ACCEPTANCE_TARGET:g}" if acceptance_recorded else
         " (MALA acceptance not recorded: pass mala_every to use it)")
    if healthy:
        best = max(healthy, key=lambda r: (r.lr, acceptance(r), -r.setting))
        return best, f"the largest lr among the {len(healthy)} setting(s) with {conditions}"
    if stable:
        best = max(stable, key=lambda r: (acceptance(r), r.flattened, -r.lr, -r.setting))
        advice = [] if best.flattened else ["its trace has not flattened: run more draws or burn-in steps"]
        if acceptance_recorded and not acceptance(best) >= ACCEPTANCE_TARGET:
            advice.append(f"its acceptance is below {ACCEPTANCE_TARGET:g}: try smaller lrs")
        return best, (f"no setting has {conditions}; fell back to the non-diverging setting with the highest "
                      f"acceptance ({'; '.join(advice)})")
    if unmixed:
        closest = min(unmixed, key=lambda r: (r.rhat if math.isfinite(r.rhat) else math.inf, r.setting))
        return None, (f"no setting's chains mixed (the closest, setting {closest.setting} ({closest.label}), has "
                      f"R-hat {closest.rhat:.3g} and a chain drifting by {closest.max_chain_drift_z:.3g} MCSE): run "
                      "more burn-in steps and draws, or try other lrs")
    return None, "every setting had a diverging chain: try smaller lrs or larger gammas"


