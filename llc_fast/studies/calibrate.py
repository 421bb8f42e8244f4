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
import inspect
import io
import itertools
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from ..api import (EVAL_OPTIONS, estimate_llc, llc_option_names, options_config, refuse_under_torchrun,
                   refuse_unknown_options)
from ..diagnostics.convergence import FLAT_Z_MAX, RHAT_MAX
from ..config import check_count, check_positive
from ..estimators.llc import AllChainsDivergedError, LLCDivergenceWarning
from ..estimators.output import nan_to_none, none_to_nan, pyplot
from ..estimators.result import LLCResult
from ..files import SavedAsJson, write_atomically
from .recommend import ACCEPTANCE_TARGET, recommend  # noqa: F401  (ACCEPTANCE_TARGET: the rule calibrate states)
from .stability import auto_choice, auto_grid, auto_nbeta, mark_limits, measure_curvature, run_steps

# The fewest draws calibrate takes: a trend over fewer says nothing (convergence.shared_drift needs 8).
MIN_DRAWS = 10
# Set by calibrate itself from lrs/gammas/nbetas/chains_per_setting.
_RESERVED_KWARGS = {"lr": "lrs", "nbeta": "nbetas", "gamma": "gammas", "num_chains": "chains_per_setting"}


@dataclass
class CalibrationRow:
    """One (lr, gamma, nbeta) setting and its diagnostics.

    chains: indices of its chains in the underlying LLCResult.
    llc_mean, llc_std (ddof = 1), llc_stderr: over its chains that did not diverge (NaN if none, std NaN if one).
    llc_first_half, llc_second_half: λ̂ from the first and the last num_draws // 2 draws alone.
    drift, drift_se: the drift its chains share (``llc_fast.diagnostics.convergence.shared_drift``): the
        change of nbeta·(L − L(w*)) over the draws along the least-squares line through the chains' mean, and
        its standard error from the autocorrelated residuals. flattened: a finite drift that is not both
        significant (> 3 drift_se) and material (> 1 % of |llc_mean|), the diagnostics' own test.
    trusted, verdict: ``LLCResult.diagnostics()``'s ``ok`` and ``verdict`` for its chains, the verdict that
        ``summary()`` and the checkpoint tables give.
    lr_limit, within_limit: the stability limit of plain SGLD at this gamma and nbeta, 4/(nbeta·h_max + gamma)
        with h_max the Hessian's largest eigenvalue at w* (``studies.stability``), and lr < lr_limit.
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
    trusted: bool = False
    verdict: str = ""
    lr_limit: float = math.nan  # stability limit 4/(nbeta·h_max + gamma) at w* (NaN: not measured)
    within_limit: bool = True  # lr < lr_limit (True when not measured)

    @property
    def label(self) -> str:
        return f"lr={self.lr:g}, gamma={self.gamma:g}, nbeta={self.nbeta:.4g}"

    def to_dict(self) -> dict:
        return {name: nan_to_none(value) for name, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "CalibrationRow":
        return cls(**{f.name: none_to_nan(d[f.name]) for f in fields(cls) if f.name in d})


@dataclass
class CalibrationResult(SavedAsJson):
    """Result of ``calibrate``.

    rows: one CalibrationRow per setting, in the order of itertools.product(lrs, gammas, nbetas).
    recommended: the recommended row, or None when every setting had a diverging chain; reason: why.
    result: the underlying LLCResult of all chains (chain k belongs to setting k // chains_per_setting).
    curvature: what was measured at w* (``chains.hessian.Curvature.to_dict``: h_max, h_min, trace, cost), or None.
    auto: with ``lrs="auto"``, the setting to estimate with (lr, gamma, nbeta, lr_limit, step_bias, steps_needed,
        budget_ok, ...; ``studies.stability.auto_choice``), whose lr may differ from the recommended row's.
    """

    rows: list[CalibrationRow]
    recommended: CalibrationRow | None
    reason: str
    result: LLCResult
    chains_per_setting: int
    curvature: dict | None = None
    auto: dict | None = None

    def recommendation(self) -> str:
        """One line: the recommended setting (or that there is none) and why."""
        if self.recommended is None:
            return f"no recommendation: {self.reason}"
        return f"recommended: setting {self.recommended.setting} ({self.recommended.label}): {self.reason}"

    def table(self) -> str:
        """The rows as a fixed-width text table; '*' marks the recommended setting."""
        header = ("", "#", "lr", "gamma", "nbeta", "LLC mean ± std", "accept", "R-hat", "flat", "mixed", "diverged",
                  "lr<", "trust")
        lines = []
        for r in self.rows:
            mark = "*" if self.recommended is not None and r.setting == self.recommended.setting else ""
            lines.append((mark, str(r.setting), f"{r.lr:g}", f"{r.gamma:g}", f"{r.nbeta:.4g}",
                          f"{r.llc_mean:.4g} ± {r.llc_std:.3g}", f"{r.mala_mean:.3f}", f"{r.rhat:.3f}",
                          "yes" if r.flattened else "no", "yes" if r.mixed else "no", f"{r.diverged}/{len(r.chains)}",
                          f"{r.lr_limit:.2g}" + ("" if r.within_limit else "!"), "yes" if r.trusted else "no"))
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
                    reason=self.reason, chains_per_setting=self.chains_per_setting, result=self.result.to_dict(),
                    curvature=self.curvature, auto=self.auto)

    @classmethod
    def from_dict(cls, d: dict) -> "CalibrationResult":
        rows = [CalibrationRow.from_dict(r) for r in d["rows"]]
        return cls(rows=rows, recommended=None if d["recommended"] is None else rows[d["recommended"]],
                   reason=d["reason"], result=LLCResult.from_dict(d["result"]),
                   chains_per_setting=d["chains_per_setting"], curvature=d.get("curvature"), auto=d.get("auto"))

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
    lrs: Sequence[float] | str,
    gammas: Sequence[float] | None = None,
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

    lrs, gammas, nbetas: the grid (lists of step sizes > 0, localization strengths >= 0, nbeta > 0); gammas=None
        is [1.0]; nbetas=None uses estimate_llc's default n/log n (then required if the data's size is unknown).
        lrs="auto": the grid is built from the curvature at w* (``studies.stability``: one lr at a quarter of the
        stability limit; with gammas=None a ladder of three gammas a tenth apart from the
        smallest that relaxes every direction within the run's steps), for one nbeta, and ``result.auto`` holds the
        setting to estimate with (its lr chosen for a small step bias) and ``reason`` why.
    num_draws (>= 10), num_burnin_steps, num_steps_bw_draws, sampler, seed, device, progress and
        **estimate_kwargs go to estimate_llc unchanged. mala_every: record the MALA acceptance every
        that many steps after burn-in (None: not recorded, and the acceptance condition below is dropped).

    Diverging chains are expected for bad settings: their warnings are silenced and counted per setting
    (and an all-diverged run still returns rows).

    Flattened: the diagnostics' shared-drift test (``llc_fast.diagnostics.convergence.shared_drift``) does not
    flag the setting's chains: the least-squares trend of their mean draw over the draws changes by no more
    than 3 of its autocorrelation-aware standard errors, or by no more than 1 % of |λ̂|. Each row also carries
    the diagnostics' own verdict (``trusted``, ``verdict``), the one ``summary()`` and checkpoint tables give.

    Mixed: the setting's chains have rank-normalised split R-hat <= 1.01 and no chain's second half differs
    from its first half by more than 3 MCSE (``CalibrationRow.mixed``): judged per chain and across chains.

    Stability: h_max, the largest eigenvalue of the loss's Hessian at w*, is measured first (power iteration on
    Hessian-vector products, ``chains.hessian``; not under torchrun); a setting with lr >= 4/(nbeta·h_max + gamma)
    (``CalibrationRow.lr_limit``) is never recommended, even if no chain diverged.

    Recommendation (``studies.recommend``, where the rule is stated in full): among the settings within the
    stability limit whose chains did not diverge and mixed, those with a flattened trace and mean MALA acceptance
    >= 0.9, the largest lr; else the highest acceptance; else none, the reason naming the closest setting. Then
    down the grid's smaller gammas at the same lr while λ̂ is significantly larger (the gamma check).
    Returns a CalibrationResult.
    """
    grid = dict(lrs=lrs, gammas=gammas, nbetas=nbetas, chains_per_setting=chains_per_setting, sampler=sampler,
                num_draws=num_draws, num_burnin_steps=num_burnin_steps, num_steps_bw_draws=num_steps_bw_draws,
                mala_every=mala_every, seed=seed, device=device, progress=progress, **estimate_kwargs)
    auto = isinstance(lrs, str)
    settings, options = calibration_run(grid)
    curvature = measure_curvature(model, data, loss_fn, options)
    if auto:
        settings, options = _auto_run(grid, curvature, options, data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = estimate_llc(model, data, loss_fn, **options)
        except AllChainsDivergedError as e:
            result = e.result
    for w in caught:  # divergence is reported per setting; anything else is passed on
        if not issubclass(w.category, LLCDivergenceWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

    with np.errstate(over="ignore", invalid="ignore"):  # chains growing without bound give Inf/NaN, not warnings
        rows = [_row(result, s, list(range(s * chains_per_setting, (s + 1) * chains_per_setting)))
                for s in range(len(settings))]
    mark_limits(rows, curvature)
    recommended, reason = recommend(rows, acceptance_recorded=result.mala_acceptance.shape[1] > 0)
    choice, reason = auto_choice(rows, recommended, reason, curvature, run_steps(options),
                                 options.get("noise_scheme", "euler")) if auto else (None, reason)
    return CalibrationResult(rows=rows, recommended=recommended, reason=reason, result=result,
                             chains_per_setting=chains_per_setting,
                             curvature=None if curvature is None else curvature.to_dict(), auto=choice)


def _auto_run(grid: dict, curvature, options: dict, data) -> tuple[list[tuple], dict]:
    """``calibration_run`` of an ``lrs="auto"`` grid: lrs and gammas built from the curvature (``auto_grid``)."""
    if curvature is None:
        raise ValueError('lrs="auto" measures the curvature of the whole model, which a run under torchrun cannot '
                         "do yet: pass lrs=[...] and gammas=[...], or launch without torchrun")
    gammas = None if grid["gammas"] is None else _grid("gammas", grid["gammas"], allow_zero=True)
    grid = dict(grid, **dict(zip(("lrs", "gammas"), auto_grid(curvature, auto_nbeta(options, data),
                                                               run_steps(options), gammas))))
    return calibration_run(grid)


def calibration_run(options: Mapping, caller: str = "calibrate") -> tuple[list[tuple], dict]:
    """(settings, estimate_llc's keyword arguments) of ``calibrate``'s keyword arguments ``options`` (lrs=, gammas=,
    ..., estimate_llc's other options), every one checked before anything runs; ``caller`` (e.g. "sweep") names who
    passed them. Settings: the (lr, gamma, nbeta) grid in calibrate's order; the run has chains_per_setting chains
    of each. Refused: unknown names (with the closest valid one), lr/gamma/nbeta/num_chains (set from the grid), a
    bad grid or count, any estimate_llc option LLCConfig refuses, and MALA acceptance under torchrun."""
    own = {n: p.default for n, p in inspect.signature(calibrate).parameters.items() if p.kind is p.KEYWORD_ONLY}
    passthrough = [n for n in llc_option_names() if n not in own and n not in _RESERVED_KWARGS]
    taken = sorted(_RESERVED_KWARGS.keys() & options.keys())
    if taken:
        raise TypeError(f"{caller} sets {taken[0]!r} itself from the grid: pass {_RESERVED_KWARGS[taken[0]]}= "
                        "instead")
    refuse_unknown_options(caller, options, [*own, *passthrough], "calibrate's options, then estimate_llc's")
    if "lrs" not in options:
        raise TypeError(f"{caller} needs lrs, the step sizes to try, e.g. lrs=[1e-4, 3e-4, 1e-3]")
    o = dict(own, **options)
    auto = isinstance(o["lrs"], str)
    if auto and (o["lrs"] != "auto" or caller != "calibrate"):
        raise ValueError(f"{caller} got lrs={o['lrs']!r}: pass a list of step sizes, e.g. lrs=[1e-4, 3e-4, 1e-3]" +
                         ("" if caller != "calibrate" else ', or lrs="auto" to build the grid from the curvature'))
    lrs = [1.0] if auto else _grid("lrs", o["lrs"], hint="lrs are SGLD step sizes, e.g. lrs=[1e-4, 3e-4, 1e-3].")
    gammas = [1.0] if o["gammas"] is None else _grid("gammas", o["gammas"], allow_zero=True,
                                                     hint="gammas are localization strengths, e.g. gammas=[1, 100].")
    nbetas = [None] if o["nbetas"] is None else _grid("nbetas", o["nbetas"], hint="nbetas are n*beta values, e.g. "
                                                                                   "[10, 30].")
    if auto and len(nbetas) > 1:
        raise ValueError(f'lrs="auto" calibrates one nbeta, got nbetas={nbetas}: pass one value, or leave nbetas out '
                         "for n/log n")
    check_count("chains_per_setting", o["chains_per_setting"], 1)
    check_count("num_draws", o["num_draws"], MIN_DRAWS)
    if o["mala_every"] is not None:
        default = " (the default)" if o["mala_every"] == own["mala_every"] else ""
        refuse_under_torchrun(f"{caller} with mala_every={o['mala_every']}{default}", "the MALA acceptance cannot "
                              "be recorded on a model sharded over several ranks yet; set mala_every=None (the "
                              "calibration then neither records nor uses it), or launch without torchrun")
    settings = list(itertools.product(lrs, gammas, nbetas))
    per_chain = [s for s in settings for _ in range(o["chains_per_setting"])]
    lr, gamma, nbeta = ([s[i] for s in per_chain] for i in range(3))
    run = {k: v for k, v in o.items() if k not in ("lrs", "gammas", "nbetas", "chains_per_setting")}
    run.update(lr=lr, gamma=gamma, nbeta=None if o["nbetas"] is None else nbeta, num_chains=len(per_chain))
    options_config(caller, {k: v for k, v in run.items() if k not in EVAL_OPTIONS})  # estimate_llc's checks, once
    return settings, run


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
    half = result.loss_trace.shape[1] // 2
    first = _chain_subset(result, chains, slice(0, half)).llc_mean
    second = _chain_subset(result, chains, slice(result.loss_trace.shape[1] - half, None)).llc_mean
    acceptance = whole.mala_mean[np.isfinite(whole.mala_mean)]  # chains that diverged early have none
    diag = whole.diagnostics()
    worst = float(np.nanmax(np.abs(diag["flatness"]))) if np.isfinite(diag["flatness"]).any() else math.nan
    mixed = bool(math.isfinite(diag["rhat"]) and diag["rhat"] <= RHAT_MAX and math.isfinite(worst)
                 and worst <= FLAT_Z_MAX)
    c0 = chains[0]
    return CalibrationRow(
        setting=setting, lr=result.config["lr"][c0], gamma=result.config["gamma"][c0],
        nbeta=result.config["nbeta"][c0], chains=chains, llc_mean=whole.llc_mean, llc_std=whole.llc_std,
        llc_stderr=whole.llc_stderr, llc_first_half=first, llc_second_half=second, drift=diag["drift"],
        drift_se=diag["drift_se"], flattened=bool(math.isfinite(diag["drift"]) and not diag["drifting"]),
        mala_mean=float(acceptance.mean()) if acceptance.size else math.nan,
        diverged=len(whole.diverged_chains), diverged_at_step=list(whole.diverged_at_step.values()),
        rhat=diag["rhat"], max_chain_drift_z=worst, mixed=mixed, mcse=diag["mcse"], trusted=bool(diag["ok"]),
        verdict=diag["verdict"],
    )
