"""Susceptibilities of components to data subsets, from the chains of one restricted run.

Baker, Wang, Hoogland & Murfet, "Studying small language models with susceptibilities" (2025,
arXiv:2504.18274, Appendix C.4; devinterp 2.x ``susceptibilities``): perturbing the data distribution
q towards a subset q' moves the posterior expectation of a component's observable, to first order,
by its covariance with the loss difference. For component C (the weights it does not name held at
w*, as in the restricted LLC) and subset s, llc_fast estimates

    chi(C, s) = - Cov_C[ phi(w), l_s(w) - L(w) ],    phi(w) = L(w) - L(w*)

where L is the loss on the reference set (the first ``num_eval_batches`` batches of the sampling
data), l_s the loss on subset s (its first ``num_eval_batches`` batches; per token with
``per_token_fn``), both at the chain's weights at each draw, and Cov_C the covariance under component
C's restricted posterior (driven by the sampling data's gradient), estimated over all draws of all its
chains that did not diverge, about their pooled means (ddof 0), as published:

    chi = - (1/(C D)) sum_{c,d} (phi_cd - mean(phi)) (o_cd - mean(o)),   o = l_s - L.

Chain c's term (1/D) sum_d (...) is ``chi_per_chain[k, c]`` (their mean is chi); ``chi_stderr`` is their
standard deviation (ddof 1) / sqrt(chains). Centring each chain on its own means instead would bias the
covariance by about -2 tau/D (tau the autocorrelation time). No nbeta factor, as published. devinterp 2.x
centres l_s - L with the unrestricted run's mean instead of the component's own
(``llc_fast.compat.devinterp.susceptibilities`` reproduces that).
"""
from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..files import SavedAsJson
from .restricted import RestrictedLLCResult

REFERENCE = "sampling"  # the reference set: batches of the sampling data
LARGE_BYTES = 256 * 2**20  # token losses above this are announced with their size before sampling
IN_MEMORY_LIMIT = 4 * 2**30  # token losses above this need token_losses_path (streamed to .npy files)


def pooled_covariance_terms(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each chain's term of the pooled covariance of x [C, D] with y [C, D, ...] (module docstring):
    (1/D) sum_d (x_cd - mean x)(y_cd - mean y), the means over every finite chain; [C, ...], NaN rows for
    chains with NaN draws (diverged)."""
    ok = np.isfinite(x).all(axis=1)
    out = np.full((x.shape[0],) + y.shape[2:], np.nan)
    if ok.any():
        xc = x[ok] - x[ok].mean()
        yc = y[ok] - y[ok].mean(axis=(0, 1))
        out[ok] = np.einsum("cd,cd...->c...", xc, yc) / x.shape[1]
    return out


def chains_mean_and_stderr(per_chain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and stderr (std ddof 1 / sqrt(n)) over axis 1 of [K, C, ...], NaN chains left out."""
    ok = np.isfinite(per_chain).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nansum(per_chain, axis=1) / ok
        dev = np.where(np.isfinite(per_chain), per_chain - np.expand_dims(mean, 1), 0.0)
        std = np.sqrt((dev ** 2).sum(axis=1) / (ok - 1))
        stderr = std / np.sqrt(ok)
    mean = np.where(ok > 0, mean, np.nan)
    return mean, np.where(ok > 1, stderr, np.nan)


@dataclass
class SusceptibilityResult(SavedAsJson):
    """chi(C, s) for every component C and subset s of one run (module docstring for the estimator).

    components [K], subsets [S]; chi, chi_stderr: [K, S]; chi_per_chain: [K, C, S] (NaN: diverged).
    token_chi, token_chi_stderr: {subset: [K, T_s]} per-token susceptibilities (with ``per_token_fn``).
    llcs: the restricted LLC of every component from the same chains. token_losses: {subset: [K, C, D, T_s]
    float32 array of per-token losses} when asked (memory-mapped .npy files under token_losses_path).
    """

    components: list[str]
    subsets: list[str]
    chi: np.ndarray
    chi_stderr: np.ndarray
    chi_per_chain: np.ndarray
    llcs: RestrictedLLCResult
    token_chi: dict = field(default_factory=dict)
    token_chi_stderr: dict = field(default_factory=dict)
    token_losses: dict = field(default_factory=dict)
    token_losses_path: str | None = None

    def __getitem__(self, key: tuple[str, str]) -> tuple[float, float]:
        """(chi, stderr) of (component, subset)."""
        comp, subset = key
        k, s = self.components.index(comp), self.subsets.index(subset)
        return float(self.chi[k, s]), float(self.chi_stderr[k, s])

    def table(self) -> str:
        width = max([9] + [len(c) for c in self.components])
        lines = [f"{'component':<{width}} " + " ".join(f"{s + ' chi ± stderr':>24}" for s in self.subsets)]
        for k, comp in enumerate(self.components):
            cells = [f"{self.chi[k, s]:>12.4g} ± {self.chi_stderr[k, s]:<9.3g}" for s in range(len(self.subsets))]
            lines.append(f"{comp:<{width}} " + " ".join(f"{c:>24}" for c in cells))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        def listed(a):
            return [[None if not math.isfinite(v) else v for v in row] for row in np.asarray(a).reshape(
                a.shape[0], -1).tolist()]

        return dict(components=self.components, subsets=self.subsets, chi=listed(self.chi),
                    chi_stderr=listed(self.chi_stderr), chi_per_chain=listed(self.chi_per_chain),
                    chi_per_chain_shape=list(self.chi_per_chain.shape),
                    token_chi={s: listed(v) for s, v in self.token_chi.items()},
                    token_chi_stderr={s: listed(v) for s, v in self.token_chi_stderr.items()},
                    llcs=self.llcs.to_dict(), token_losses_path=self.token_losses_path)

    @classmethod
    def from_dict(cls, d: dict) -> "SusceptibilityResult":
        def arr(x, shape=None):
            a = np.array([[np.nan if v is None else v for v in row] for row in x], dtype=np.float64)
            return a.reshape(shape) if shape is not None else a

        return cls(d["components"], d["subsets"], arr(d["chi"]), arr(d["chi_stderr"]),
                   arr(d["chi_per_chain"], d["chi_per_chain_shape"]), RestrictedLLCResult.from_dict(d["llcs"]),
                   {s: arr(v) for s, v in d.get("token_chi", {}).items()},
                   {s: arr(v) for s, v in d.get("token_chi_stderr", {}).items()},
                   token_losses_path=d.get("token_losses_path"))


def flat_tokens(per_token_fn: Callable) -> Callable:
    """An observable giving ``per_token_fn(model, batch)``'s values as one flat [T] vector per batch."""
    def observable(model, batch):
        return per_token_fn(model, batch).reshape(-1)

    return observable


def token_storage(path: str | os.PathLike | None, num_components: int):
    """Observers' storage: memory-mapped .npy files under ``path`` (announced), or in memory (refused beyond
    IN_MEMORY_LIMIT); the size of each array is printed first when it is large."""
    def storage(name: str, shape: tuple) -> np.ndarray:
        nbytes = 4 * int(np.prod(shape, dtype=np.int64))
        layout = f"[{num_components} components x {shape[0] // num_components} chains x {shape[1]} draws x " \
                 f"{int(np.prod(shape[2:], dtype=np.int64))} tokens]"
        if path is None:
            if nbytes > IN_MEMORY_LIMIT:
                raise ValueError(f"the per-token losses of {name!r} take {nbytes / 2**30:.1f} GiB {layout}: pass "
                                 "token_losses_path=DIR to stream them to disk, or fewer draws, chains or tokens")
            if nbytes > LARGE_BYTES:
                print(f"llc_fast: per-token losses of {name!r}: {nbytes / 2**20:.0f} MiB in memory {layout}",
                      file=sys.stderr)
            return np.empty(shape, dtype=np.float32)
        Path(path).mkdir(parents=True, exist_ok=True)
        file = Path(path) / f"token_losses_{name}.npy"
        print(f"llc_fast: per-token losses of {name!r}: {nbytes / 2**20:.1f} MiB {layout} -> {file}", file=sys.stderr)
        return np.lib.format.open_memmap(file, mode="w+", dtype=np.float32, shape=shape)

    return storage


def susceptibilities_from(observers, llcs: RestrictedLLCResult, num_chains: int, subsets: list[str],
                          keep_token_losses: bool, token_losses_path=None) -> SusceptibilityResult:
    """The estimator of the module docstring on a finished run's observed values (rows k*C + c)."""
    names = llcs.names
    K, C = len(names), num_chains
    values = observers.values
    per_token = observers.observable is not None

    def scalar(v):  # [R, D] mean over tokens
        return np.asarray(v, dtype=np.float64).mean(axis=2) if per_token else np.asarray(v, dtype=np.float64)

    reference = scalar(values[REFERENCE]).reshape(K, C, -1)
    phi = reference - float(np.mean(observers.at_w_star[REFERENCE]))
    chi_per_chain = -np.stack([np.stack([pooled_covariance_terms(phi[k], scalar(values[s]).reshape(K, C, -1)[k]
                                                                 - reference[k]) for k in range(K)])
                               for s in subsets], axis=-1)
    chi, stderr = chains_mean_and_stderr(chi_per_chain)
    token_chi, token_se, token_losses = {}, {}, {}
    if per_token:
        for s in subsets:
            loss = np.asarray(values[s], dtype=np.float64).reshape((K, C) + values[s].shape[1:])
            per_chain = -np.stack([pooled_covariance_terms(phi[k], loss[k] - reference[k][:, :, None])
                                   for k in range(K)])
            token_chi[s], token_se[s] = chains_mean_and_stderr(per_chain)
            if keep_token_losses:
                token_losses[s] = values[s].reshape((K, C) + values[s].shape[1:])
    return SusceptibilityResult(names, list(subsets), chi, stderr, chi_per_chain, llcs, token_chi, token_se,
                                token_losses, None if token_losses_path is None else str(token_losses_path))
