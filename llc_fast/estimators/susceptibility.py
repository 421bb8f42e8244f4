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

from ..files import SavedAsJson, check_free_space, reserve
from .restricted import RestrictedLLCResult
from .output import pyplot, thinned_ticks

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

    def unresolved(self) -> np.ndarray:
        """[K, S] True where chi is not resolved from zero: |chi| <= 2 standard errors, or NaN."""
        with np.errstate(invalid="ignore"):
            return ~(np.abs(self.chi) > 2 * self.chi_stderr)

    def plot(self, path: str | os.PathLike | None = None):
        """chi as a heat map [components x subsets], each cell annotated chi ± SE and hatched where |chi| <= 2 SE;
        with per-token results, below it one panel per subset: a line per component over the token index
        (``plot_tokens``). Returns the figure (needs matplotlib; headless when writing ``path``)."""
        plt = pyplot(headless=path is not None)
        K, S = self.chi.shape
        fig, axes = plt.subplots(1 + len(self.token_chi), 1, squeeze=False, figsize=(
            min(16, max(5, 0.9 * S + 3)), min(12, max(2.5, 0.35 * K + 1.5)) + 2.8 * len(self.token_chi)))
        self.plot_heatmap(axes[0, 0])
        for ax, subset in zip(axes[1:, 0], self.token_chi):
            self.plot_tokens(ax, subset)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig

    def plot_heatmap(self, ax) -> None:
        """The heat map of ``plot`` on ``ax``."""
        from matplotlib.patches import Rectangle

        K, S = self.chi.shape
        size = np.abs(self.chi[np.isfinite(self.chi)])
        vmax = float(size.max()) if size.size and size.max() > 0 else 1.0  # colours centred on chi = 0
        im = ax.imshow(self.chi, aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        for k, s in zip(*np.nonzero(self.unresolved())):
            ax.add_patch(Rectangle((s - 0.5, k - 0.5), 1, 1, fill=False, hatch="..", edgecolor="0.4", lw=0))
        if K * S <= 200:
            for k in range(K):
                for s in range(S):
                    ax.text(s, k, f"{self.chi[k, s]:.2g}\n± {self.chi_stderr[k, s]:.1g}", ha="center", va="center",
                            fontsize=6)
        thinned_ticks(ax, "x", self.subsets, most=30)
        thinned_ticks(ax, "y", self.components, most=40)
        ax.set(xlabel="subset", ylabel="component", title="susceptibility χ ± SE (hatched: |χ| ≤ 2 SE, not resolved "
               "from 0)")
        ax.title.set_fontsize(8)
        ax.figure.colorbar(im, ax=ax, label="χ")

    def plot_tokens(self, ax, subset: str) -> None:
        """The per-token susceptibilities of ``subset`` on ``ax``: a line per component over the token index."""
        for k, comp in enumerate(self.components):
            ax.plot(self.token_chi[subset][k], lw=0.8, label=comp)
        ax.axhline(0.0, color="k", lw=0.5)
        ax.set(xlabel="token index", ylabel="per-token χ", title=f"per-token susceptibility, subset {subset!r}")
        ax.title.set_fontsize(8)
        if len(self.components) <= 12:
            ax.legend(fontsize=6, ncol=2)

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


def check_token_losses(model, loss_fn: Callable, per_token_fn: Callable, sets: Mapping, seed: int = 0,
                       name: str = "per_token_fn", why: str = "the susceptibilities would compare two different losses"
                       ) -> None:
    """Before sampling, at w* (the model as given): on the first batch of each of ``sets`` ({name: loader}), the
    mean of ``per_token_fn``'s values must be ``loss_fn``'s loss to float tolerance (rtol and atol 1e-4 and 1e-6,
    or twice the resolution of a coarser dtype). Both are called under the same RNG state (dropout) and with
    private buffers (BatchNorm); the caller's RNG is left as it was. Raises ValueError naming both numbers (and
    ``name``, the caller's name of per_token_fn, and ``why`` it matters)."""
    import torch

    from ..chains.engines import checked_loss, checked_observable
    from ..chains.observe import Observers
    from ..state.flat import isolated_buffers

    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad(), \
            isolated_buffers(model, None):
        observers = Observers(sets, num_batches=1)
        observers.take_batches(device)
        for set_name, (batch,) in observers.batches.items():
            torch.manual_seed(seed)
            loss = checked_loss(loss_fn(model, batch), f"on the first batch of {set_name}")
            torch.manual_seed(seed)
            tokens = checked_observable(per_token_fn(model, batch), False)
            _check_reduces(set_name, loss, tokens, name, why)


def _check_reduces(name: str, loss, tokens, fn: str, why: str) -> None:
    """Refuse when the mean of ``tokens`` is not ``loss`` (``check_token_losses``)."""
    import torch

    eps = max(torch.finfo(loss.dtype).eps, torch.finfo(tokens.dtype).eps)
    rtol, atol = max(1e-4, 2 * eps), max(1e-6, 2 * eps)
    want, got = float(loss), float(tokens.double().mean())
    if math.isfinite(want) and math.isfinite(got) and abs(got - want) <= atol + rtol * abs(want):
        return
    raise ValueError(
        f"{fn} does not reduce to loss_fn at w*: on the first batch of {name} the mean of its "
        f"{tokens.numel()} values (shape {tuple(tokens.shape)}) is {got:.7g}, loss_fn's loss is {want:.7g} "
        f"(ratio {got / want if want else math.inf:.4g}), so {why}. "
        f"Likely causes: {fn} sums where loss_fn averages (the ratio is then about the number of tokens), it "
        "leaves out the label shift loss_fn makes (one more value per row: token t scored against itself instead of "
        "token t+1), or the two weight or mask tokens differently. Return the unreduced per-token (or per-sample) "
        "losses whose mean is loss_fn's loss, e.g. llc_fast.integrations.hf.causal_lm_token_losses with "
        "causal_lm_loss")


def flat_tokens(per_token_fn: Callable) -> Callable:
    """An observable giving ``per_token_fn(model, batch)``'s values as one flat [T] vector per batch."""
    def observable(model, batch):
        return per_token_fn(model, batch).reshape(-1)

    return observable


def token_storage(path: str | os.PathLike | None, num_components: int):
    """Observers' storage ({set name: shape} -> {set name: float32 array}): memory-mapped .npy files under ``path``
    (announced; before sampling the free space is checked against their total size and each file is allocated
    on disk, so a full file system is an error now, not a SIGBUS later), or in memory (refused beyond
    IN_MEMORY_LIMIT); the size of each array is printed first when it is large."""
    def layout(shape: tuple) -> str:
        return f"[{num_components} components x {shape[0] // num_components} chains x {shape[1]} draws x " \
               f"{int(np.prod(shape[2:], dtype=np.int64))} tokens]"

    def storage(shapes: Mapping) -> dict:
        sizes = {name: 4 * int(np.prod(shape, dtype=np.int64)) for name, shape in shapes.items()}
        if path is not None:
            return _token_files(Path(path), shapes, sizes, layout)
        for name, nbytes in sizes.items():
            if nbytes > IN_MEMORY_LIMIT:
                raise ValueError(f"the per-token losses of {name!r} take {nbytes / 2**30:.1f} GiB "
                                 f"{layout(shapes[name])}: pass token_losses_path=DIR to stream them to disk, or fewer "
                                 "draws, chains or tokens")
            if nbytes > LARGE_BYTES:
                print(f"llc_fast: per-token losses of {name!r}: {nbytes / 2**20:.0f} MiB in memory "
                      f"{layout(shapes[name])}", file=sys.stderr)
        return {name: np.empty(shape, dtype=np.float32) for name, shape in shapes.items()}

    return storage


NPY_HEADER_BYTES = 4096  # at most, per .npy file (numpy writes 128 bytes for these shapes)


def _token_files(folder: Path, shapes: Mapping, sizes: dict, layout: Callable) -> dict:
    """{name: memory-mapped .npy file} under ``folder``, after checking that all of them fit on its file system,
    each allocated on disk (``files.reserve``); on an error the files made so far are removed."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {name: folder / f"token_losses_{name}.npy" for name in shapes}
    check_free_space(folder, sum(sizes.values()) + NPY_HEADER_BYTES * len(files),
                     f"the per-token losses ({', '.join(f.name for f in files.values())})",
                     "free space there, pass a token_losses_path on a file system with room, or ask for fewer draws, "
                     "chains or tokens", replaced=list(files.values()))
    out, made = {}, []
    try:
        for name, shape in shapes.items():
            print(f"llc_fast: per-token losses of {name!r}: {sizes[name] / 2**20:.1f} MiB {layout(shape)} -> "
                  f"{files[name]}", file=sys.stderr)
            made.append(files[name])
            out[name] = np.lib.format.open_memmap(files[name], mode="w+", dtype=np.float32, shape=shape)
            reserve(files[name], out[name].offset, out[name].nbytes)
    except OSError as e:
        out.clear()
        for file in made:
            file.unlink(missing_ok=True)
        raise OSError(e.errno, f"could not allocate the per-token losses under {folder} ({e}); nothing was sampled: "
                               "free space there or pass another token_losses_path") from e
    return out


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
