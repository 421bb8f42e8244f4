"""The perturbation probe: how fast the loss rises around w*, the infinite-temperature limit of the LLC.

For each radius eps, draw S perturbations delta and measure

    Delta L(eps) = mean over delta of [ L(w* + delta) - L(w*) ]

on the same evaluation batches for every delta (common random numbers), with its standard error
std(Delta L)/sqrt(S). ``kind`` says how delta is drawn in the d sampled coordinates (a restriction
``mask`` leaves the others at w*):

* "gaussian": delta = eps * xi, xi ~ N(0, I_d)            (quadratic loss: E = 1/2 tr(H) eps^2)
* "sphere":   delta = eps * xi / |xi|                       (quadratic loss: E = 1/2 tr(H) eps^2 / d)
* "ball":     delta = eps * u^(1/d) * xi / |xi|, u ~ U(0,1) (quadratic loss: E = 1/2 tr(H) eps^2 / (d + 2))

The same S unit directions (and ball radii) serve every eps, so the curve's shape is not noise. The
local exponent is the slope of log Delta L against log eps (least squares over the radii with Delta L > 0):
2 for a regular (quadratic) minimum, larger where the basin is flatter than quadratic. The perturbations
of one radius are the rows of one batched (vmapped) forward pass, ``max_batched`` at a time (one at a time, with
a warning saying why, for a model that cannot be batched, such as BatchNorm in train mode).
"""
from __future__ import annotations

import csv
import inspect
import io
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..chains.data import STREAM_PROBE, BatchStream, derived_seed, move_to_device
from ..chains.engines import checked_loss, local_engine
from ..config import check_count, check_positive
from ..estimators.output import nan_to_none, none_to_nan, pyplot
from ..files import write_atomically
from ..files import SavedAsJson
from ..state.flat import FlatLayout, FlatState

KINDS = ("gaussian", "sphere", "ball")


@dataclass
class ProbeResult(SavedAsJson):
    """radii [R]; delta_loss [R] (mean of L(w*+delta) - L(w*)), delta_loss_se [R], samples [R, S] (every
    perturbation's Delta L); exponent, exponent_se: the fitted slope of log Delta L vs log eps; kind,
    num_params (d, the perturbed coordinates), init_loss, config."""

    radii: np.ndarray
    delta_loss: np.ndarray
    delta_loss_se: np.ndarray
    samples: np.ndarray
    exponent: float
    exponent_se: float
    kind: str
    num_params: int
    init_loss: float
    config: dict = field(default_factory=dict)

    def table(self) -> str:
        lines = [f"{'radius':>10}  {'Delta L':>12}  {'stderr':>10}"]
        for r, m, s in zip(self.radii, self.delta_loss, self.delta_loss_se):
            lines.append(f"{r:>10.4g}  {m:>12.5g}  {s:>10.3g}")
        lines.append(f"local exponent (slope of log Delta L vs log radius): {self.exponent:.3f} ± {self.exponent_se:.3f}")
        return "\n".join(lines)

    def to_csv(self, path: str | os.PathLike) -> Path:
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        w.writerow(["radius", "delta_loss", "delta_loss_se", "num_samples"])
        for r, m, s in zip(self.radii, self.delta_loss, self.delta_loss_se):
            w.writerow([r, m, s, self.samples.shape[1]])
        return write_atomically(path, out.getvalue())

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("radii", "delta_loss", "delta_loss_se", "samples"):
            d[k] = nan_to_none(getattr(self, k).tolist())
        for k in ("exponent", "exponent_se"):
            d[k] = nan_to_none(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ProbeResult":
        d = dict(d)
        for k in ("radii", "delta_loss", "delta_loss_se", "samples"):
            d[k] = np.array(none_to_nan(d[k]), dtype=np.float64)
        for k in ("exponent", "exponent_se"):
            d[k] = math.nan if d[k] is None else d[k]
        return cls(**d)



    def plot(self, path: str | os.PathLike | None = None, ax=None):
        """Delta L against the radius on log-log axes with ± 2 SE error bars and the fitted power law."""
        plt = pyplot(headless=path is not None)
        fig = None
        if ax is None:
            fig, ax = plt.subplots(figsize=(5.5, 4))
        ok = self.delta_loss > 0
        ax.errorbar(self.radii[ok], self.delta_loss[ok], yerr=2 * self.delta_loss_se[ok], fmt="o", capsize=3,
                    label=f"Delta L ± 2 SE ({self.samples.shape[1]} {self.kind} perturbations per radius)")
        if math.isfinite(self.exponent) and ok.sum() >= 2:
            r = self.radii[ok]
            c = np.exp(np.mean(np.log(self.delta_loss[ok]) - self.exponent * np.log(r)))
            ax.plot(r, c * r**self.exponent, "k--", lw=1, label=f"fit: radius^{self.exponent:.2f}")
        ax.set(xscale="log", yscale="log", xlabel=f"perturbation radius eps ({self.kind}, d = {self.num_params})",
               ylabel="Delta L = L(w* + delta) - L(w*)  (loss units)", title="perturbation probe")
        ax.legend(fontsize=7)
        if fig is not None:
            fig.tight_layout()
            if path is not None:
                fig.savefig(path, dpi=120)
        return fig if fig is not None else ax.figure


def _fit_exponent(radii: np.ndarray, mean: np.ndarray, se: np.ndarray) -> tuple[float, float]:
    """Weighted least-squares slope of log mean vs log radius (weights 1/var of log mean), and its SE."""
    ok = (mean > 0) & np.isfinite(mean)
    if ok.sum() < 2:
        return math.nan, math.nan
    x, y = np.log(radii[ok]), np.log(mean[ok])
    var = np.where(se[ok] > 0, (se[ok] / mean[ok]) ** 2, np.nan)
    w = 1 / var if np.isfinite(var).all() and (var > 0).all() else np.ones_like(x)
    xm, ym = np.average(x, weights=w), np.average(y, weights=w)
    sxx = np.sum(w * (x - xm) ** 2)
    slope = float(np.sum(w * (x - xm) * (y - ym)) / sxx)
    return slope, float(math.sqrt(1 / sxx)) if np.isfinite(var).all() else math.nan


def _directions(kind: str, num_samples: int, coords: torch.Tensor, n: int, seed: int, dtype) -> torch.Tensor:
    """[S, N] perturbations of radius 1 (gaussian: unit scale) in the coordinates ``coords`` (indices)."""
    gen = torch.Generator().manual_seed(derived_seed(seed, STREAM_PROBE, 2**32))
    d = coords.numel()
    xi = torch.randn(num_samples, d, generator=gen, dtype=torch.float64)
    if kind in ("sphere", "ball"):
        xi = xi / xi.norm(dim=1, keepdim=True)
    if kind == "ball":
        xi = xi * torch.rand(num_samples, 1, generator=gen, dtype=torch.float64) ** (1.0 / d)
    out = torch.zeros(num_samples, n, dtype=torch.float64)
    out[:, coords] = xi
    return out.to(dtype)


def _probe_engine(model, state: FlatState, loss_fn: Callable, batch):
    """The engine of the perturbations: batched (vmap) where the model allows, else one at a time with a warning
    saying why, as ``estimate_llc`` decides (``chains.engines.local_engine``; the same perturbations either way)."""
    engine, reason = local_engine(model, state, loss_fn, "auto", lambda: [batch] * state.num_rows)
    if reason:
        import warnings

        norms = [n for n, m in model.named_modules()
                 if m.training and isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        hint = (f" BatchNorm in train mode ({', '.join(norms[:3])}) cannot be batched: call model.eval() first to "
                "batch the perturbations (the loss then uses the running statistics)." if norms else "")
        warnings.warn(f"the model could not be batched over perturbations ({reason}); they ran one at a time "
                      f"(the same perturbations, slower).{hint}", RuntimeWarning, stacklevel=3)
    return engine


def check_probe_options(options: Mapping, caller: str = "perturbation_probe") -> dict:
    """``perturbation_probe``'s keyword arguments checked before anything runs (``caller`` names who passed them):
    no unknown name, radii given, every value valid. Returns them with the defaults filled in and radii as a
    float64 array."""
    from ..api import refuse_unknown_options

    params = {n: p.default for n, p in inspect.signature(perturbation_probe).parameters.items()
              if p.kind is p.KEYWORD_ONLY}
    refuse_unknown_options(caller, options, params, "perturbation_probe's options")
    out = dict(params, **options)
    if out["radii"] is inspect.Parameter.empty:
        raise TypeError(f"{caller}: the probe needs radii, the perturbation sizes, e.g. radii=[1e-3, 1e-2, 1e-1]")
    if out["kind"] not in KINDS:
        raise ValueError(f"{caller}: the probe's kind must be one of {KINDS}, got {out['kind']!r}")
    radii = out["radii"] = np.asarray(out["radii"], dtype=np.float64).reshape(-1)
    if radii.size == 0:
        raise ValueError(f"{caller}: radii is empty: pass the perturbation sizes, e.g. radii=[1e-3, 1e-2, 1e-1]")
    check_positive("radii", radii.tolist(), hint="radii are perturbation sizes, e.g. [1e-3, 1e-2].")
    for name in ("num_samples", "num_batches", "max_batched", "seed"):
        check_count(name, out[name], 0 if name == "seed" else 1)
    if out["num_samples"] < 2:
        raise ValueError(f"{caller}: num_samples must be >= 2 (the standard error needs two perturbations)")
    if out["mask"] is not None and not isinstance(out["mask"], Mapping):
        raise TypeError(f"{caller}: the probe's mask is a dict {{parameter name: 0/1 tensor or None}}, got "
                        f"{type(out['mask']).__name__}")
    return out


def perturbation_probe(model: torch.nn.Module, data, loss_fn: Callable, *, radii: Sequence[float],
                       num_samples: int = 64, kind: str = "gaussian", num_batches: int = 4, seed: int = 0,
                       mask: dict | None = None, device=None, max_batched: int = 64) -> ProbeResult:
    """Delta L(eps) = E[L(w* + delta) - L(w*)] for each radius in ``radii`` (see module docstring).

    data, loss_fn: as for ``estimate_llc``; the first ``num_batches`` batches of one seeded pass are the
    evaluation batches, the same for every perturbation. mask: a restriction (``estimate_llc``'s) to
    perturb only some weights. The model is left bitwise unchanged. Returns a ProbeResult.
    """
    radii = check_probe_options(dict(radii=radii, num_samples=num_samples, kind=kind, num_batches=num_batches,
                                     seed=seed, mask=mask, device=device, max_batched=max_batched))["radii"]
    layout = FlatLayout.for_sampling(model)
    device = torch.device(device) if device is not None else layout.device
    rows = min(num_samples, max_batched)
    state = FlatState(layout, rows, device=device, preconditioned=False, mask=mask)
    coords = (torch.nonzero(state.flat_mask.cpu()).flatten() if state.flat_mask is not None
              else torch.arange(layout.numel))
    stream = BatchStream(data, seed=seed, stream=STREAM_PROBE, index=0)
    batches = [move_to_device(next(stream), device) for _ in range(num_batches)]
    unit = _directions(kind, num_samples, coords, layout.numel, seed, layout.dtype)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), state.isolation():
        with torch.no_grad(), state.install(0):
            init = float(np.mean([float(checked_loss(loss_fn(model, b), "at w*")) for b in batches]))
        engine = _probe_engine(model, state, loss_fn, batches[0])
        samples = np.empty((radii.size, num_samples))
        for i, eps in enumerate(radii):
            for lo in range(0, num_samples, rows):
                hi = min(num_samples, lo + rows)
                state.w[: hi - lo] = state.w_star + eps * unit[lo:hi].to(device)
                per_batch = torch.stack([engine.evaluate(hi - lo, b).to(torch.float64) for b in batches])
                samples[i, lo:hi] = per_batch.mean(0).cpu().numpy() - init
    mean = samples.mean(1)
    se = samples.std(1, ddof=1) / math.sqrt(num_samples)
    exponent, exponent_se = _fit_exponent(radii, mean, se)
    config = dict(kind=kind, num_samples=num_samples, num_batches=num_batches, seed=seed,
                  mask=sorted(mask) if mask else None, device=str(device))
    return ProbeResult(radii=radii, delta_loss=mean, delta_loss_se=se, samples=samples, exponent=exponent,
                       exponent_se=exponent_se, kind=kind, num_params=int(coords.numel()), init_loss=init,
                       config=config)
