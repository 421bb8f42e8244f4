"""sweep: lambda_hat over a grid of nbeta, gamma and lr, every setting a group of chains of one batched run.

The grid runs as ``calibrate``'s (per-chain hyperparameters in the fused update, one run for the whole
grid); a sweep reports lambda_hat ± its standard error per setting and plots lambda_hat against nbeta and
against gamma. Reading it: where the estimator is valid lambda_hat is flat in nbeta over a range (it is a
property of the basin, not of the temperature); a rise at small nbeta means the chains leave the basin,
a drift at large nbeta with lr fixed means lr is too large for the sharper posterior (check the
diagnostics' R-hat). Larger gamma confines the chains more and lowers lambda_hat once gamma is no longer
small against nbeta times the curvature: choose the smallest gamma at which the chains stay stable.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..estimators.output import pyplot
from .calibrate import CalibrationResult, calibrate, calibration_run


@dataclass
class SweepResult:
    """The grid's rows (``CalibrationRow``: lr, gamma, nbeta, llc_mean, llc_stderr, mcse, rhat, mixed,
    trusted and verdict (the diagnostics' own), diverged, ...) and the calibration built on them
    (``calibration``: its recommendation and LLCResult)."""

    calibration: CalibrationResult

    @property
    def rows(self):
        return self.calibration.rows

    def table(self) -> str:
        head = (f"{'lr':>9} {'gamma':>8} {'nbeta':>9} {'LLC':>10} {'stderr':>9} {'MCSE':>9} {'R-hat':>7} {'mixed':>6} "
                f"{'trust':>6}")
        lines = [head]
        for r in self.rows:
            lines.append(f"{r.lr:>9.3g} {r.gamma:>8.3g} {r.nbeta:>9.4g} {r.llc_mean:>10.4g} {r.llc_stderr:>9.3g} "
                         f"{r.mcse:>9.3g} {r.rhat:>7.3f} {'yes' if r.mixed else 'no':>6} {'yes' if r.trusted else 'no':>6}")
        return "\n".join(lines)

    def to_csv(self, path: str | os.PathLike) -> Path:
        return self.calibration.to_csv(path)

    def save(self, path: str | os.PathLike) -> Path:
        return self.calibration.save(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SweepResult":
        return cls(CalibrationResult.load(path))

    def plot(self, path: str | os.PathLike | None = None):
        """Two panels: lambda_hat against nbeta (a line per lr and gamma) and against gamma (a line per lr and
        nbeta), with ± 2 standard errors (the larger of the MCSE and the spread of chain means)."""
        plt = pyplot(headless=path is not None)
        fig, (ax_n, ax_g) = plt.subplots(1, 2, figsize=(11, 4))
        for ax, x_name, keys in ((ax_n, "nbeta", ("lr", "gamma")), (ax_g, "gamma", ("lr", "nbeta"))):
            groups: dict = {}
            for r in self.rows:
                groups.setdefault(tuple(getattr(r, k) for k in keys), []).append(r)
            for key, rows in groups.items():
                rows = sorted(rows, key=lambda r: getattr(r, x_name))
                x = np.array([getattr(r, x_name) for r in rows])
                y = np.array([r.llc_mean for r in rows])
                se = np.array([np.nanmax([r.llc_stderr, r.mcse]) if np.isfinite([r.llc_stderr, r.mcse]).any()
                               else np.nan for r in rows])
                label = ", ".join(f"{k}={v:g}" for k, v in zip(keys, key))
                ax.errorbar(x, y, yerr=2 * se, fmt="o-", capsize=3, lw=1, label=label)
            ax.set(xscale="log" if len({getattr(r, x_name) for r in self.rows}) > 2 else "linear",
                   xlabel=x_name + (" (n·β, inverse temperature × n)" if x_name == "nbeta" else " (localization)"),
                   ylabel="LLC estimate λ̂ ± 2 SE", title=f"λ̂ against {x_name}")
            ax.legend(fontsize=7)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig


def sweep(model, data, loss_fn: Callable, *, nbetas: Sequence[float], gammas: Sequence[float] = (1.0,),
          lrs: Sequence[float], chains_per_setting: int = 4, **calibrate_kwargs) -> SweepResult:
    """lambda_hat for every (lr, gamma, nbeta) of the grid, as ``chains_per_setting`` chains of one run
    (``calibrate``'s other keyword arguments pass through). Returns a SweepResult."""
    grid = dict(lrs=lrs, gammas=gammas, nbetas=nbetas, chains_per_setting=chains_per_setting, **calibrate_kwargs)
    calibration_run(grid, caller="sweep")  # refusals name sweep, the function called
    return SweepResult(calibrate(model, data, loss_fn, **grid))

