"""LLCResult: an LLC estimate with its traces, diagnostics and the configuration that made it."""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from ..files import SavedAsJson
from .output import nan_to_none, none_to_nan, pyplot

LLC_STD_DDOF = 1


@dataclass
class LLCResult(SavedAsJson):
    """Result of ``estimate_llc``.

    llc_mean, llc_std: mean and standard deviation (ddof = ``llc_std_ddof`` = 1) over the chains
        that did not diverge. llc_stderr = llc_std / sqrt(number of those chains).
    llc_per_chain: [C] per-chain estimates nbeta_c * (mean of its draws - init_loss); NaN if diverged.
    loss_trace: [C, D] minibatch loss at each draw (burn-in excluded); NaN after a divergence.
    init_loss: L(w*) averaged over ``config['num_init_loss_batches']`` batches.
    diverged_chains: indices of chains whose loss became NaN/Inf; diverged_at_step: the step it was seen.
    config: every setting used (resolved nbeta included), with the package and torch versions.
    burnin_loss_trace: [C, B] minibatch loss at each burn-in step (not part of the estimate).
    mala_acceptance: [C, K] MALA acceptance of every ``mala_every``-th step after burn-in ([C, 0]
        when not recorded); ``mala_mean`` averages it per chain.
    refined: {evaluation set: LLCResult} of the data-refined estimates from the same chains
        (``estimate_llc(refine=...)``; with ``eval_data=`` the estimate itself is the eval set's and
        ``refined["sampling"]`` the one from the sampling data's minibatch losses).
    """

    llc_mean: float
    llc_std: float
    llc_stderr: float
    llc_per_chain: np.ndarray
    loss_trace: np.ndarray
    init_loss: float
    diverged_chains: list[int]
    diverged_at_step: dict[int, int]
    config: dict
    timing: dict = field(default_factory=dict)
    burnin_loss_trace: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    mala_acceptance: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    llc_std_ddof: int = LLC_STD_DDOF
    refined: dict = field(default_factory=dict)

    @classmethod
    def from_traces(cls, loss_trace: np.ndarray, init_loss: float, nbeta: np.ndarray, diverged_at: dict[int, int],
                    config: dict, timing: dict | None = None, burnin_loss_trace: np.ndarray | None = None,
                    mala_acceptance: np.ndarray | None = None) -> "LLCResult":
        """Per-chain estimates from the traces; mean and std over the chains that did not diverge."""
        loss_trace = np.asarray(loss_trace, dtype=np.float64)
        per_chain = np.asarray(nbeta, dtype=np.float64) * (loss_trace.mean(axis=1) - init_loss)
        per_chain[list(diverged_at)] = np.nan
        ok = per_chain[np.isfinite(per_chain)]
        mean = float(ok.mean()) if ok.size else math.nan
        std = float(ok.std(ddof=LLC_STD_DDOF)) if ok.size > LLC_STD_DDOF else math.nan
        return cls(
            llc_mean=mean, llc_std=std, llc_stderr=std / math.sqrt(ok.size) if ok.size else math.nan,
            llc_per_chain=per_chain, loss_trace=loss_trace, init_loss=float(init_loss),
            diverged_chains=sorted(diverged_at), diverged_at_step=dict(sorted(diverged_at.items())),
            config=config, timing=timing or {},
            burnin_loss_trace=np.zeros((loss_trace.shape[0], 0)) if burnin_loss_trace is None else burnin_loss_trace,
            mala_acceptance=np.zeros((loss_trace.shape[0], 0)) if mala_acceptance is None else mala_acceptance,
        )

    @property
    def num_chains(self) -> int:
        return self.loss_trace.shape[0]

    @property
    def mala_mean(self) -> np.ndarray:
        """[C] mean MALA acceptance per chain (NaN where none was recorded, e.g. a chain that diverged early)."""
        out = np.full(self.num_chains, np.nan)
        recorded = np.isfinite(self.mala_acceptance).any(axis=1) if self.mala_acceptance.size else out > 0
        out[recorded] = np.nanmean(self.mala_acceptance[recorded], axis=1)
        return out

    def sampled_mask(self) -> dict | None:
        """What the chains sampled, from ``config["mask_content"]``: {parameter name: bool array of its 0/1 mask, or
        None for the whole parameter}, checked against the saved sha256; None: every sampled weight of the model."""
        from ..state.flat import unpacked_mask

        content = self.config.get("mask_content")
        if content is None and self.config.get("mask"):
            raise ValueError(f"this result keeps only the names of its mask ({self.config['mask']}), not its content "
                             "(written by an llc_fast before 0/1 masks were saved): rerun it to know what was sampled")
        return None if content is None else {n: None if r is None else unpacked_mask(r) for n, r in content.items()}

    def llc_trace(self) -> np.ndarray:
        """[C, D] running estimate of each chain after each draw: nbeta_c * (running mean - init_loss)."""
        draws = np.arange(1, self.loss_trace.shape[1] + 1)
        nbeta = np.asarray(self.config["nbeta"], dtype=np.float64).reshape(-1, 1)
        return nbeta * (np.cumsum(self.loss_trace, axis=1) / draws - self.init_loss)

    def diagnostics(self) -> dict:
        """Convergence diagnostics by ArviZ (``llc_fast.diagnostics.convergence``): rhat, ess_bulk, ess_tail,
        mcse (lambda_hat's Monte Carlo standard error), ess_per_second, ess_per_grad_eval, flatness [C],
        divergences, mala_mean, and ``ok`` / ``verdict``."""
        from ..diagnostics.convergence import diagnose

        return diagnose(self.loss_trace, self.init_loss, self.config["nbeta"], self.diverged_at_step,
                        mala_acceptance=self.mala_acceptance, sampling_s=self.timing.get("sampling_s"),
                        grad_evals=self.grad_evals)

    @property
    def grad_evals(self) -> float | None:
        """Forward/backward passes the sampling took: every chain's steps (``timing["steps"]``), plus one per
        recorded MALA acceptance (``mala_every``) and two per Hessian-vector product of the curvature
        preconditioner (``curvature_grad_evals``); None when the timing does not say (a result from traces)."""
        steps = self.timing.get("steps")
        if not steps:
            return None
        return steps * (1 + (1 / self.config["mala_every"] if self.config.get("mala_every") else 0)) + \
            self.config.get("curvature_grad_evals", 0)

    def to_xarray(self):
        """The draws as an ``xarray.Dataset`` with dims (chain, draw), the layout of an ArviZ posterior group:
        ``llc`` = nbeta_c (L - L(w*)) (its grand mean is lambda_hat) and ``loss``; e.g.
        ``arviz_stats.rhat(xarray.DataTree.from_dict({"posterior": result.to_xarray()}))``. Needs xarray."""
        try:
            import xarray as xr
        except ImportError as e:
            raise ImportError("to_xarray needs xarray: pip install xarray") from e
        from ..diagnostics.convergence import contributions

        y = contributions(self.loss_trace, self.init_loss, self.config["nbeta"])
        dims = ("chain", "draw")
        return xr.Dataset({"llc": (dims, y), "loss": (dims, self.loss_trace)},
                          coords={"chain": np.arange(y.shape[0]), "draw": np.arange(y.shape[1])},
                          attrs={"init_loss": self.init_loss, "llc_mean": self.llc_mean,
                                 "diverged_chains": list(self.diverged_chains), "inference_library": "llc_fast"})

    def summary(self) -> str:
        """One line: the estimate, its standard errors, and whether to trust it (with the reason)."""
        ok = self.num_chains - len(self.diverged_chains)
        s = f"LLC = {self.llc_mean:.4g} ± {self.llc_std:.3g} (std over {ok} chains, ddof={self.llc_std_ddof}"
        try:
            d = self.diagnostics()
        except ImportError:
            d = None
        if d is not None and np.isfinite(d["mcse"]):
            s += f"; MCSE {d['mcse']:.3g}"
        s += ")"
        if self.diverged_chains:
            s += f"; diverged chains: {self.diverged_chains}"
        if d is not None:
            s += f"; {'trust' if d['ok'] else 'do not trust yet'}: {d['verdict']}"
        return s

    def to_dict(self) -> dict:
        d = asdict(dict_factory_skip(self, "refined"))
        d["refined"] = {name: r.to_dict() for name, r in self.refined.items()}
        d["llc_per_chain"] = nan_to_none(self.llc_per_chain.tolist())
        for k in ("loss_trace", "burnin_loss_trace", "mala_acceptance"):
            d[k] = nan_to_none(getattr(self, k).tolist())
        d["diverged_at_step"] = {str(k): v for k, v in self.diverged_at_step.items()}
        for k in ("llc_mean", "llc_std", "llc_stderr"):
            d[k] = nan_to_none(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LLCResult":
        d = dict(d)
        d["llc_per_chain"] = np.array(none_to_nan(d["llc_per_chain"]), dtype=np.float64)
        num_chains = len(d["llc_per_chain"])
        for k in ("loss_trace", "burnin_loss_trace", "mala_acceptance"):
            if k in d:
                d[k] = np.array(none_to_nan(d[k]), dtype=np.float64).reshape(num_chains, -1)
        d["diverged_at_step"] = {int(k): v for k, v in d["diverged_at_step"].items()}
        for k in ("llc_mean", "llc_std", "llc_stderr"):
            d[k] = math.nan if d[k] is None else d[k]
        d["refined"] = {name: cls.from_dict(r) for name, r in d.get("refined", {}).items()}
        return cls(**d)



    def plot(self, path: str | os.PathLike | None = None):
        """Plot each chain's loss trace and running LLC estimate (needs matplotlib), with the diagnostics'
        verdict in the title; returns the figure."""
        plt = pyplot(headless=path is not None)
        fig, (ax_loss, ax_llc) = plt.subplots(1, 2, figsize=(12, 4.5))
        for c in range(self.num_chains):
            ax_loss.plot(self.loss_trace[c], lw=0.8, label=f"chain {c}")
            ax_llc.plot(self.llc_trace()[c], lw=0.8)
        ax_loss.axhline(self.init_loss, color="k", ls="--", lw=0.8, label="L(w*)")
        ax_loss.set(xlabel="draw (after burn-in)", ylabel="minibatch loss", title="loss trace")
        if np.isfinite(self.llc_mean):
            ax_llc.axhline(self.llc_mean, color="k", lw=1, label="λ̂ (all chains)")
            ax_llc.axhspan(self.llc_mean - 2 * self.llc_stderr, self.llc_mean + 2 * self.llc_stderr, color="k",
                           alpha=0.1, label="± 2 standard errors")
            ax_llc.legend(fontsize=7)
        ax_llc.set(xlabel="draw (after burn-in)", ylabel="running LLC estimate λ̂")
        ax_llc.set_title(self.summary(), fontsize=7, wrap=True)
        ax_loss.legend(fontsize=7)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig


def dict_factory_skip(result, *skip: str):
    """A shallow copy of a dataclass with the fields ``skip`` emptied (for asdict on the rest)."""
    from dataclasses import replace

    return replace(result, **{k: {} for k in skip})
