"""calibrate: try a grid of (lr, gamma, nbeta) settings in one batched run and recommend one.

Every setting is a group of ``chains_per_setting`` chains of ONE ``estimate_llc`` call (per-chain
hyperparameters, chains batched in the fused update), so a grid costs one run, not one run per setting.
Chain k belongs to setting k // chains_per_setting; settings are ordered as
``itertools.product(lrs, gammas, nbetas)``.

Per setting: λ̂ mean ± std over its chains, mean MALA acceptance, whether the trace has flattened,
and how many chains diverged. The recommendation rule is stated in ``calibrate``'s docstring.
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from ..api import estimate_llc
from ..diagnostics.convergence import FLAT_Z_MAX, RHAT_MAX
from ..config import check_count, check_positive
from ..estimators.llc import AllChainsDivergedError, LLCDivergenceWarning
from ..estimators.result import LLCResult, _nan_to_none, _none_to_nan, pyplot, write_atomically
from ..files import SavedAsJson

# A trace has flattened when |λ̂(second half) − λ̂(first half)| is at most FLAT_SE_MULTIPLE combined
# standard errors, or at most FLAT_RTOL of the setting's |λ̂|. Each half is cut into FLAT_BLOCKS blocks
# per chain, whose spread gives one estimate of the half's standard error (batch means).
FLAT_BLOCKS = 5
FLAT_SE_MULTIPLE = 2.0
FLAT_RTOL = 0.05
# Practitioners aim for a mean MALA acceptance of about 0.9-0.95 (lower: the step is too large).
ACCEPTANCE_TARGET = 0.9
# Set by calibrate itself from lrs/gammas/nbetas/chains_per_setting.
_RESERVED_KWARGS = {"lr": "lrs", "nbeta": "nbetas", "gamma": "gammas", "num_chains": "chains_per_setting"}


@dataclass
class CalibrationRow:
    """One (lr, gamma, nbeta) setting and its diagnostics.

    chains: indices of its chains in the underlying LLCResult.
    llc_mean, llc_std (ddof = 1), llc_stderr: over its chains that did not diverge (NaN if none, std NaN if one).
    llc_first_half, llc_second_half: λ̂ from the first and the last FLAT_BLOCKS·(num_draws // (2·FLAT_BLOCKS))
        draws alone; drift = second − first; drift_se = sqrt(se_first² + se_second²), each half's
        standard error as in ``calibrate``'s docstring (batch means or between chains, the larger).
    flattened: |drift| <= FLAT_SE_MULTIPLE·drift_se or |drift| <= FLAT_RTOL·|llc_mean| (chains averaged).
    rhat: rank-normalised split R-hat of its chains; max_chain_drift_z: the largest |second-half − first-half
        mean| of one chain in units of its MCSE (``llc_fast.diagnostics.convergence``); mixed: rhat <= 1.01
        and max_chain_drift_z <= 3, judged per chain and across chains, so chains drifting in opposite
        directions (whose average looks flat) do not pass.
    mala_mean: mean MALA acceptance over its chains (NaN if not recorded).
    diverged: number of its chains whose loss became NaN/Inf; diverged_at_step: the step each was seen.
    """

    setting: int
    lr: float
    gamma: float
    nbeta: float
    chains: list[int]
    llc_mean: float
    llc_std: float
    llc_stderr: float
    llc_first_half: float
    llc_second_half: float
    drift: float
    drift_se: float
    flattened: bool
    mala_mean: float
    diverged: int
    diverged_at_step: list[int]
    rhat: float = math.nan
    max_chain_drift_z: float = math.nan
    mixed: bool = True
    mcse: float = math.nan  # Monte Carlo standard error of llc_mean

    @property
    def label(self) -> str:
        return f"lr={self.lr:g}, gamma={self.gamma:g}, nbeta={self.nbeta:.4g}"

    def to_dict(self) -> dict:
        return {name: _nan_to_none(value) for name, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "CalibrationRow":
        return cls(**{f.name: _none_to_nan(d[f.name]) for f in fields(cls) if f.name in d})


@dataclass
class CalibrationResult(SavedAsJson):
    """Result of ``calibrate``.

    rows: one CalibrationRow per setting, in the order of itertools.product(lrs, gammas, nbetas).
    recommended: the recommended row, or None when every setting had a diverging chain; reason: why.
    result: the underlying LLCResult of all chains (chain k belongs to setting k // chains_per_setting).
    """

    rows: list[CalibrationRow]
    recommended: CalibrationRow | None
    reason: str
    result: LLCResult
    chains_per_setting: int

    def recommendation(self) -> str:
        """One line: the recommended setting (or that there is none) and why."""
        if self.recommended is None:
            return f"no recommendation: {self.reason}"
        return f"recommended: setting {self.recommended.setting} ({self.recommended.label}): {self.reason}"

    def table(self) -> str:
        """The rows as a fixed-width text table; '*' marks the recommended setting."""
        header = ("", "#", "lr", "gamma", "nbeta", "LLC mean ± std", "accept", "R-hat", "flat", "mixed", "diverged")
        lines = []
        for r in self.rows:
            mark = "*" if self.recommended is not None and r.setting == self.recommended.setting else ""
            lines.append((mark, str(r.setting), f"{r.lr:g}", f"{r.gamma:g}", f"{r.nbeta:.4g}",
                          f"{r.llc_mean:.4g} ± {r.llc_std:.3g}", f"{r.mala_mean:.3f}", f"{r.rhat:.3f}",
                          "yes" if r.flattened else "no", "yes" if r.mixed else "no", f"{r.diverged}/{len(r.chains)}"))
        widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
        return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *lines])

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write the rows as CSV (one line per setting, NaN as an empty cell, lists space-separated), atomically."""
        out = io.StringIO()
        names = [f.name for f in fields(CalibrationRow)] + ["recommended"]
        writer = csv.DictWriter(out, fieldnames=names, lineterminator="\n")
        writer.writeheader()
        for r in self.rows:
            d = r.to_dict()
            d["chains"] = " ".join(map(str, r.chains))
            d["diverged_at_step"] = " ".join(map(str, r.diverged_at_step))
            d["recommended"] = self.recommended is not None and r.setting == self.recommended.setting
            writer.writerow(d)
        return write_atomically(path, out.getvalue())

    def to_dict(self) -> dict:
        return dict(rows=[r.to_dict() for r in self.rows],
                    recommended=None if self.recommended is None else self.recommended.setting,
                    reason=self.reason, chains_per_setting=self.chains_per_setting, result=self.result.to_dict())

    @classmethod
    def from_dict(cls, d: dict) -> "CalibrationResult":
        rows = [CalibrationRow.from_dict(r) for r in d["rows"]]
        return cls(rows=rows, recommended=None if d["recommended"] is None else rows[d["recommended"]],
                   reason=d["reason"], result=LLCResult.from_dict(d["result"]),
                   chains_per_setting=d["chains_per_setting"])



    def plot(self, path: str | os.PathLike | None = None):
        """One panel per setting: the running LLC estimate (LLCResult.llc_trace) of each of its chains
        against the draw index, titled with the setting, its acceptance and flags. Needs matplotlib;
        returns the figure and writes a PNG to ``path`` if given."""
        plt = pyplot(headless=path is not None)
        ncols = min(3, len(self.rows))
        nrows = math.ceil(len(self.rows) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False, sharex=True)
        with np.errstate(over="ignore", invalid="ignore"):
            traces = self.result.llc_trace()
        for ax in axes.flat[len(self.rows):]:
            ax.set_visible(False)
        for ax, r in zip(axes.flat, self.rows):
            for c in r.chains:
                ax.plot(np.where(np.isfinite(traces[c]), traces[c], np.nan), lw=0.8, label=f"chain {c}")
            flags = ["flat" if r.flattened else "not flat"]
            if r.diverged:
                flags.append(f"{r.diverged}/{len(r.chains)} diverged")
            best = self.recommended is not None and r.setting == self.recommended.setting
            ax.set_title(f"{'[recommended] ' if best else ''}{r.label}\naccept {r.mala_mean:.2f}, {', '.join(flags)}",
                         fontsize=8, color="tab:green" if best else "black")
            ax.tick_params(labelsize=7)
        for ax in axes[-1]:
            ax.set_xlabel("draw", fontsize=8)
        for ax in axes[:, 0]:
            ax.set_ylabel("running LLC estimate", fontsize=8)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=110)
        return fig


def calibrate(
    model: torch.nn.Module,
    data,
    loss_fn: Callable,
    *,
    lrs: Sequence[float],
    gammas: Sequence[float] = (1.0,),
    nbetas: Sequence[float] | None = None,
    chains_per_setting: int = 2,
    sampler: str = "sgld",
    num_draws: int = 200,
    num_burnin_steps: int = 0,
    num_steps_bw_draws: int = 1,
    mala_every: int | None = 10,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    **estimate_kwargs,
) -> CalibrationResult:
    """Run every (lr, gamma, nbeta) setting as ``chains_per_setting`` chains of one estimate_llc call.

    lrs, gammas, nbetas: the grid (lists of step sizes > 0, localization strengths >= 0, nbeta > 0);
        nbetas=None uses estimate_llc's default n/log n (then required if the data's size is unknown).
    num_draws (>= 10), num_burnin_steps, num_steps_bw_draws, sampler, seed, device, progress and
        **estimate_kwargs go to estimate_llc unchanged. mala_every: record the MALA acceptance every
        that many steps after burn-in (None: not recorded, and the acceptance condition below is dropped).

    Diverging chains are expected for bad settings: their warnings are silenced and counted per setting
    (and an all-diverged run still returns rows).

    Flattened: the setting's λ̂ from the first half of the draws and from the second half (each over
    its non-diverged chains; halves of 5·b draws, b = num_draws // 10, from the start and from the end)
    differ by at most 2 combined standard errors, sqrt(se_first² + se_second²), or by at most 5 % of
    |λ̂|. A half's standard error is the larger of two: by batch means (each chain's half cut into 5
    blocks of b draws; std of the blocks' λ̂ over chains and blocks, ddof=1, / sqrt(number of blocks))
    and between chains (std of the chains' λ̂ from that half, ddof=1, / sqrt(chains); needs 2 chains).

    Mixed: the setting's chains have rank-normalised split R-hat <= 1.01 and no chain's second half differs
    from its first half by more than 3 MCSE (``CalibrationRow.mixed``): judged per chain and across chains.

    Recommendation rule (a setting whose chains have not mixed is never recommended):
      1. Candidates: settings with no diverged chain, mixed chains, a flattened trace and mean MALA
         acceptance >= 0.9. Among them the largest lr (fastest mixing); ties: the higher acceptance, then
         the earlier setting.
      2. If there is none: the mixed setting with no diverged chain and the highest acceptance (ties:
         flattened first, then the smaller lr), and the reason says that no setting met every condition.
      3. If no setting without a diverged chain has mixed: no recommendation (recommended=None), and the
         reason names the closest setting and what to change.
    Returns a CalibrationResult.
    """
    lrs = _grid("lrs", lrs, hint="lrs are SGLD step sizes, e.g. lrs=[1e-4, 3e-4, 1e-3].")
    gammas = _grid("gammas", gammas, allow_zero=True, hint="gammas are localization strengths, e.g. gammas=[1, 100].")
    nbetas_grid = [None] if nbetas is None else _grid("nbetas", nbetas, hint="nbetas are n*beta values, e.g. [10, 30].")
    check_count("chains_per_setting", chains_per_setting, 1)
    check_count("num_draws", num_draws, 2 * FLAT_BLOCKS)  # two halves of FLAT_BLOCKS blocks, for flattening
    taken = sorted(_RESERVED_KWARGS.keys() & estimate_kwargs.keys())
    if taken:
        raise TypeError(f"calibrate sets {taken[0]!r} itself from the grid: pass {_RESERVED_KWARGS[taken[0]]}= instead")

    settings = list(itertools.product(lrs, gammas, nbetas_grid))
    per_chain = [s for s in settings for _ in range(chains_per_setting)]
    lr, gamma, nbeta = ([s[i] for s in per_chain] for i in range(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = estimate_llc(
                model, data, loss_fn, sampler=sampler, lr=lr, gamma=gamma, nbeta=None if nbetas is None else nbeta,
                num_chains=len(per_chain), num_draws=num_draws, num_burnin_steps=num_burnin_steps,
                num_steps_bw_draws=num_steps_bw_draws, mala_every=mala_every, seed=seed, device=device,
                progress=progress, **estimate_kwargs,
            )
        except AllChainsDivergedError as e:
            result = e.result
    for w in caught:  # divergence is reported per setting; anything else is passed on
        if not issubclass(w.category, LLCDivergenceWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

    with np.errstate(over="ignore", invalid="ignore"):  # chains growing without bound give Inf/NaN, not warnings
        rows = [_row(result, s, list(range(s * chains_per_setting, (s + 1) * chains_per_setting)))
                for s in range(len(settings))]
    recommended, reason = _recommend(rows, acceptance_recorded=result.mala_acceptance.shape[1] > 0)
    return CalibrationResult(rows=rows, recommended=recommended, reason=reason, result=result,
                             chains_per_setting=chains_per_setting)


def _grid(name: str, values, *, allow_zero: bool = False, hint: str = "") -> list[float]:
    """A non-empty list of finite numbers > 0 (>= 0 with allow_zero); a single number counts as one value."""
    if isinstance(values, (torch.Tensor, np.ndarray)):
        values = values.reshape(-1).tolist()
    elif not isinstance(values, (list, tuple)):
        values = [values]
    if not values:
        raise ValueError(f"{name} is empty: pass at least one value. {hint}".rstrip())
    check_positive(name, list(values), allow_zero=allow_zero, hint=hint)
    return [float(v) for v in values]


def _chain_subset(result: LLCResult, chains: list[int], draws: slice = slice(None)) -> LLCResult:
    """The LLCResult of some chains of ``result``, from a range of its draws only."""
    local = {c: i for i, c in enumerate(chains)}
    diverged = {local[c]: step for c, step in result.diverged_at_step.items() if c in local}
    config = dict(result.config, num_chains=len(chains),
                  **{k: [result.config[k][c] for c in chains] for k in ("lr", "nbeta", "gamma")})
    return LLCResult.from_traces(result.loss_trace[chains, draws], result.init_loss, np.asarray(config["nbeta"]),
                                 diverged, config, mala_acceptance=result.mala_acceptance[chains])


def _row(result: LLCResult, setting: int, chains: list[int]) -> CalibrationRow:
    whole = _chain_subset(result, chains)
    block = result.loss_trace.shape[1] // (2 * FLAT_BLOCKS)
    first, first_se = _half(result, chains, 0, block)
    second, second_se = _half(result, chains, result.loss_trace.shape[1] - FLAT_BLOCKS * block, block)
    drift, drift_se = second - first, math.hypot(first_se, second_se)
    # NaN (no surviving chain) and Inf (an exploding chain) never pass the standard-error test
    flattened = (math.isfinite(drift_se) and abs(drift) <= FLAT_SE_MULTIPLE * drift_se) or \
        abs(drift) <= FLAT_RTOL * abs(whole.llc_mean)
    acceptance = whole.mala_mean[np.isfinite(whole.mala_mean)]  # chains that diverged early have none
    diag = whole.diagnostics()
    worst = float(np.nanmax(np.abs(diag["flatness"]))) if np.isfinite(diag["flatness"]).any() else math.nan
    mixed = bool(math.isfinite(diag["rhat"]) and diag["rhat"] <= RHAT_MAX and math.isfinite(worst)
                 and worst <= FLAT_Z_MAX)
    c0 = chains[0]
    return CalibrationRow(
        setting=setting, lr=result.config["lr"][c0], gamma=result.config["gamma"][c0],
        nbeta=result.config["nbeta"][c0], chains=chains, llc_mean=whole.llc_mean, llc_std=whole.llc_std,
        llc_stderr=whole.llc_stderr, llc_first_half=first, llc_second_half=second, drift=drift,
        drift_se=drift_se, flattened=bool(flattened),
        mala_mean=float(acceptance.mean()) if acceptance.size else math.nan,
        diverged=len(whole.diverged_chains), diverged_at_step=list(whole.diverged_at_step.values()),
        rhat=diag["rhat"], max_chain_drift_z=worst, mixed=mixed, mcse=diag["mcse"],
    )


def _half(result: LLCResult, chains: list[int], start: int, block: int) -> tuple[float, float]:
    """λ̂ of the chains from FLAT_BLOCKS consecutive blocks of ``block`` draws from draw ``start``, and its
    standard error: the larger of the batch-means one, std(the blocks' λ̂ over chains and blocks, ddof=1) /
    sqrt(number of blocks), and the between-chain one, std(the chains' λ̂, ddof=1) / sqrt(chains). The first
    works with one chain; the second stays right when a chain's autocorrelation spans several blocks.
    Diverged chains are left out; NaN where there are too few values."""
    per_block = np.stack([
        _chain_subset(result, chains, slice(start + b * block, start + (b + 1) * block)).llc_per_chain
        for b in range(FLAT_BLOCKS)
    ], axis=1)  # [chains, blocks]
    per_block = per_block[np.isfinite(per_block).all(axis=1)]
    if per_block.size == 0:
        return math.nan, math.nan
    batch_se = per_block.std(ddof=1) / math.sqrt(per_block.size) if per_block.size > 1 else math.nan
    chains_se = per_block.mean(axis=1).std(ddof=1) / math.sqrt(len(per_block)) if len(per_block) > 1 else math.nan
    return float(per_block.mean()), float(np.fmax(batch_se, chains_se))


def _recommend(rows: list[CalibrationRow], acceptance_recorded: bool) -> tuple[CalibrationRow | None, str]:
    """The documented rule of ``calibrate``: (row or None, reason)."""
    def acceptance(r: CalibrationRow) -> float:
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


