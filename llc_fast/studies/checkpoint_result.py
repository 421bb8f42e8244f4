"""The result of ``estimate_over_checkpoints`` (``checkpoints.py``): one ``CheckpointRow`` per (checkpoint,
component), the [checkpoint x component] table as text, CSV, JSON, a plot of the LLC against the step and a
heatmap."""
from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..estimators.output import nan_to_none, none_to_nan, pyplot, settings_as_json, thinned_ticks
from ..files import SavedAsJson, write_atomically
from .probe import ProbeResult


@dataclass
class CheckpointRow:
    """One (checkpoint, component) estimate: lambda_hat with its std, stderr and MCSE, R-hat, the verdict of
    the diagnostics, the diverged chains, and the file holding its LLCResult."""

    step: int
    component: str
    llc_mean: float
    llc_std: float
    llc_stderr: float
    mcse: float
    rhat: float
    trusted: bool
    verdict: str
    diverged: int
    result_file: str = ""


@dataclass
class CheckpointSweepResult(SavedAsJson):
    """rows: one CheckpointRow per (checkpoint, component), steps ascending; settings: the estimate_llc
    options used (after calibration); calibration: the recommended setting per calibrated step."""

    rows: list[CheckpointRow]
    settings: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    probes: dict = field(default_factory=dict)  # step -> ProbeResult, when a probe was asked for

    @property
    def steps(self) -> list[int]:
        return sorted({r.step for r in self.rows})

    @property
    def components(self) -> list[str]:
        return list(dict.fromkeys(r.component for r in self.rows))

    def matrix(self, field_name: str = "llc_mean") -> np.ndarray:
        """[checkpoints, components] of one field (NaN where missing)."""
        steps, comps = self.steps, self.components
        out = np.full((len(steps), len(comps)), np.nan)
        for r in self.rows:
            out[steps.index(r.step), comps.index(r.component)] = getattr(r, field_name)
        return out

    def table(self) -> str:
        lines = [f"{'step':>10} {'component':>12} {'LLC':>10} {'std':>8} {'stderr':>8} {'MCSE':>8} {'R-hat':>7}  "
                 "verdict"]
        for r in self.rows:
            lines.append(f"{r.step:>10} {r.component:>12} {r.llc_mean:>10.4g} {r.llc_std:>8.3g} {r.llc_stderr:>8.3g} "
                         f"{r.mcse:>8.3g} {r.rhat:>7.3f}  {'trust' if r.trusted else 'do not trust'}: {r.verdict}")
        return "\n".join(lines)

    def to_csv(self, path: str | os.PathLike) -> Path:
        out = io.StringIO()
        names = list(asdict(self.rows[0])) if self.rows else ["step"]
        w = csv.DictWriter(out, fieldnames=names, lineterminator="\n")
        w.writeheader()
        for r in self.rows:
            w.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(r).items()})
        return write_atomically(path, out.getvalue())

    def to_dict(self) -> dict:
        return dict(rows=[{k: nan_to_none(v) for k, v in asdict(r).items()} for r in self.rows],
                    settings=settings_as_json(self.settings), calibration=self.calibration,
                    probes={str(s): p.to_dict() for s, p in self.probes.items()})

    @classmethod
    def from_dict(cls, d: dict) -> "CheckpointSweepResult":
        return cls([CheckpointRow(**{k: none_to_nan(v) for k, v in r.items()}) for r in d["rows"]],
                   d.get("settings", {}), d.get("calibration", {}),
                   {int(s): ProbeResult.from_dict(p) for s, p in d.get("probes", {}).items()})

    def plot(self, path: str | os.PathLike | None = None, log_x: bool = False):
        """lambda_hat against the training step, one line per component, with a ± 2 SE band (SE: the larger of
        the MCSE and the spread of chain means); untrusted estimates drawn hollow."""
        plt = pyplot(headless=path is not None)
        fig, ax = plt.subplots(figsize=(7, 4.2))
        steps = np.array(self.steps, dtype=float)
        for k, comp in enumerate(self.components):
            y = self.matrix()[:, k]
            se = np.fmax(self.matrix("mcse")[:, k], self.matrix("llc_stderr")[:, k])
            trusted = self.matrix("trusted")[:, k].astype(bool)
            line, = ax.plot(steps, y, "-", lw=1.2, label=comp)
            ax.fill_between(steps, y - 2 * se, y + 2 * se, color=line.get_color(), alpha=0.2)
            ax.plot(steps[trusted], y[trusted], "o", color=line.get_color())
            ax.plot(steps[~trusted], y[~trusted], "o", mfc="none", color=line.get_color())
        if log_x:
            ax.set_xscale("log")
        else:  # a few ticks with short labels (25k, 1.5M) however many steps and however large
            from matplotlib.ticker import EngFormatter, MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(nbins=7, integer=True))
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.set(xlabel="training step" + (" (log scale)" if log_x else ""), ylabel="LLC estimate λ̂ ± 2 SE",
               title="LLC over training (hollow: diagnostics say do not trust yet)")
        ax.legend(fontsize=7, title="component", title_fontsize=7)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig

    def heatmap(self, path: str | os.PathLike | None = None):
        """The [checkpoint x component] lambda_hat as a heat map (components as rows, steps as columns); hatched
        cells: the diagnostics say do not trust that estimate yet. With many steps or components every k-th is
        labelled."""
        from matplotlib.patches import Rectangle

        plt = pyplot(headless=path is not None)
        m = self.matrix().T
        fig, ax = plt.subplots(figsize=(min(16, max(5, 0.6 * len(self.steps) + 2)),
                                        min(12, max(2.5, 0.45 * len(self.components) + 1.5))))
        im = ax.imshow(m, aspect="auto", cmap="viridis")
        for comp, step in zip(*np.nonzero(self.matrix("trusted").T == 0)):
            ax.add_patch(Rectangle((step - 0.5, comp - 0.5), 1, 1, fill=False, hatch="//", edgecolor="white", lw=0))
        thinned_ticks(ax, "x", [str(s) for s in self.steps])
        thinned_ticks(ax, "y", self.components, most=40)
        ax.set(xlabel="training step", ylabel="component", title="restricted LLC λ̂ per component "
               "(hatched: diagnostics say do not trust yet)")
        ax.title.set_fontsize(8)
        fig.colorbar(im, ax=ax, label="λ̂")
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig
