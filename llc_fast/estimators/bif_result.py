"""The result of a BIF run (``estimators.bif``): the matrices, their standard errors, JSON, NetCDF and a heat map."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from ..files import SavedAsJson
from .output import nan_to_none, none_to_nan, pyplot, thinned_ticks
from .restricted import RestrictedLLCResult


@dataclass
class BIFResult(SavedAsJson):
    """Correlations (or covariances, ``kind``) of per-sample losses of query and train samples across the draws of
    every component's chains (``estimators.bif`` for the estimator; the paper's BIF is minus the covariance).

    components [K] ("full" for the whole model); bif, bif_stderr: [K, Nq, Nt] (float32 .npy files when too large
    for memory); chains_used [K]: chains that did not diverge; llcs: the restricted LLC of every component from the
    same chains (their configs hold the run's fingerprint). token_losses: {"query", "train": [K, C, D, N] float32
    losses} when asked (memory-mapped .npy files under token_losses_path).
    """

    components: list[str]
    kind: str
    bif: np.ndarray
    bif_stderr: np.ndarray
    llcs: RestrictedLLCResult
    chains_used: list[int] = field(default_factory=list)
    token_losses: dict = field(default_factory=dict)
    token_losses_path: str | None = None

    def __getitem__(self, component: str) -> tuple[np.ndarray, np.ndarray]:
        """(bif, stderr) [Nq, Nt] of ``component``."""
        if component not in self.components:
            raise KeyError(f"no component {component!r}; components: {self.components}")
        k = self.components.index(component)
        return self.bif[k], self.bif_stderr[k]

    @property
    def config(self) -> dict:
        """The run's settings and facts (the first component's LLC config: its fingerprint, seed, lr, ...)."""
        return self.llcs[self.components[0]].config

    def unresolved(self) -> np.ndarray:
        """[K, Nq, Nt] True where the value is not resolved from zero: |bif| <= 2 standard errors, or NaN."""
        with np.errstate(invalid="ignore"):
            return ~(np.abs(self.bif) > 2 * self.bif_stderr)

    def top(self, component: str, query: int, k: int = 10) -> list[tuple[int, float, float]]:
        """The ``k`` train samples with the largest |bif| for query sample ``query``: [(train index, bif, stderr)]."""
        bif, se = (np.asarray(a[query], dtype=np.float64) for a in self[component])
        order = np.argsort(-np.nan_to_num(np.abs(bif), nan=-1.0), kind="stable")[:k]
        return [(int(t), float(bif[t]), float(se[t])) for t in order]

    def summary(self) -> str:
        K, Nq, Nt = self.bif.shape
        resolved = float(np.mean(~self.unresolved())) if self.bif.size else 0.0
        return (f"BIF ({self.kind}) of {Nq} query x {Nt} train samples for {K} component(s) "
                f"({', '.join(self.components)}); chains used {self.chains_used}; {100 * resolved:.0f}% of the "
                "values resolved from 0 (|bif| > 2 SE)")

    def to_dict(self) -> dict:
        def matrix(a):
            if isinstance(a, np.memmap):
                return dict(file=str(a.filename))
            return nan_to_none(np.asarray(a, dtype=np.float64).tolist())

        return dict(components=self.components, kind=self.kind, bif=matrix(self.bif),
                    bif_stderr=matrix(self.bif_stderr), chains_used=list(self.chains_used), llcs=self.llcs.to_dict(),
                    token_losses_path=self.token_losses_path)

    @classmethod
    def from_dict(cls, d: dict) -> "BIFResult":
        def matrix(x):
            if isinstance(x, dict):
                return np.load(x["file"], mmap_mode="r")
            return np.array(none_to_nan(x), dtype=np.float64)

        return cls(d["components"], d["kind"], matrix(d["bif"]), matrix(d["bif_stderr"]),
                   RestrictedLLCResult.from_dict(d["llcs"]), d.get("chains_used", []),
                   token_losses_path=d.get("token_losses_path"))

    def to_xarray(self):
        """An ``xarray.Dataset``: ``bif`` and ``bif_stderr`` (component, query, train), ``chains_used`` (component);
        attrs kind and the run's settings as JSON (``config``)."""
        import json

        import xarray as xr

        dims = ("component", "query", "train")
        return xr.Dataset({"bif": (dims, np.asarray(self.bif)), "bif_stderr": (dims, np.asarray(self.bif_stderr)),
                           "chains_used": (("component",), np.asarray(self.chains_used, dtype=np.int32))},
                          coords={"component": list(self.components)},
                          attrs=dict(kind=self.kind, config=json.dumps(self.config, default=str)))

    def to_netcdf(self, path: str | os.PathLike) -> None:
        """``to_xarray()`` as a NetCDF file (netCDF4/h5netcdf if installed, else scipy's NetCDF3)."""
        import importlib.util

        engine = next((e.lower() for e in ("netCDF4", "h5netcdf") if importlib.util.find_spec(e)), "scipy")
        self.to_xarray().to_netcdf(path, engine=engine)

    def plot(self, path: str | os.PathLike | None = None, component: str | None = None, most: int = 200):
        """The matrix of ``component`` (default: each, one panel per component) as a heat map [query x train]: colours
        centred on 0, hatched where |bif| <= 2 SE; at most ``most`` samples per axis (the first ones). Returns the
        figure (needs matplotlib; headless when writing ``path``)."""
        plt = pyplot(headless=path is not None)
        names = [component] if component is not None else self.components
        Nq, Nt = min(self.bif.shape[1], most), min(self.bif.shape[2], most)
        fig, axes = plt.subplots(len(names), 1, squeeze=False, figsize=(
            min(16, max(5, 0.12 * Nt + 3)), len(names) * min(10, max(2.5, 0.12 * Nq + 1.5))))
        for ax, name in zip(axes[:, 0], names):
            self.plot_heatmap(ax, name, Nq, Nt)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig

    def plot_heatmap(self, ax, component: str, Nq: int, Nt: int) -> None:
        """One component's heat map (``plot``) of its first Nq query and Nt train samples on ``ax``."""
        from matplotlib.patches import Rectangle

        k = self.components.index(component)
        bif = np.asarray(self.bif[k, :Nq, :Nt], dtype=np.float64)
        size = np.abs(bif[np.isfinite(bif)])
        vmax = float(size.max()) if size.size and size.max() > 0 else 1.0
        if self.kind == "correlation":
            vmax = 1.0
        im = ax.imshow(bif, aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
        if Nq * Nt <= 2500:
            for q, t in zip(*np.nonzero(self.unresolved()[k, :Nq, :Nt])):
                ax.add_patch(Rectangle((t - 0.5, q - 0.5), 1, 1, fill=False, hatch="..", edgecolor="0.4", lw=0))
        thinned_ticks(ax, "x", [str(t) for t in range(Nt)], most=30)
        thinned_ticks(ax, "y", [str(q) for q in range(Nq)], most=30)
        shown = "" if (Nq, Nt) == self.bif.shape[1:] else f" (first {Nq} x {Nt})"
        ax.set(xlabel="train sample", ylabel="query sample",
               title=f"BIF {self.kind} of per-sample losses, component {component!r}{shown}; hatched: |value| <= 2 SE")
        ax.title.set_fontsize(8)
        ax.figure.colorbar(im, ax=ax, label=self.kind)
