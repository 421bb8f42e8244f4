"""A fixed diagonal preconditioner from the curvature at w*, gathered before sampling
(``estimate_llc(preconditioner="curvature")``; the math and its reasons: ``docs/update.md``).

Curvature: Hutchinson's estimate of the diagonal of the Hessian of the mean minibatch loss at w*,

    ĥ = (1/K) Σ_k z_k ⊙ H_k z_k,        z_k Rademacher (±1), H_k the Hessian on the k-th batch,

from K Hessian-vector products (double backward through ``loss_fn``), each probe on its own batch of a stream
keyed by the seed (``STREAM_CURVATURE``), each probe drawn from a CPU generator seeded by (seed, k): the same
for every device, grouping and process. On a diagonal Hessian it is exact for any K (z_i² = 1); otherwise each
probe adds Σ_(j≠i) H_ij·z_i·z_j, of mean 0.

Gains, one per element, the same for every chain (``curvature_gains``):

    G_i = min( (ĥ_max + ρ) / (ĥ_i⁺ + ρ),  κ ),    ĥ⁺ = max(ĥ, 2·SE(ĥ), 0),  ρ = max_c γ_c / nβ_c,

SE(ĥ) the standard error of ĥ_i from the probes' spread (an element whose curvature the probes do not resolve
from their cross terms gets no gain its noise cannot justify), ĥ_max the largest ĥ⁺ over the sampled elements,
κ = ``preconditioner_max_gain``: G = 1 at the stiffest element (its step is the plain SGLD step of the same lr),
each other element's step enlarged so that its quadratic relaxation rate ε·G_i·(nβ·h_i + γ)/2 matches the
stiffest's, at most κ times. ``top_eigenvalue`` measures the largest eigenvalue of G^(1/2)·H·G^(1/2), which
bounds the preconditioned chain's stable lr.

The chains run it as the RMSProp update whose statistic is fixed before sampling and never updated
(``Schedule(freeze_preconditioner_at=0)``): with eps = 1/(2κ) and V = (1/G − eps)², the update's
G = 1/(√V + eps) is the gain above (``frozen_statistic``); no kernel has a path of its own for it.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from ..state.flat import FlatLayout, isolated_buffers, swapped_parameters
from .data import STREAM_CURVATURE, BatchStream, derived_seed, move_to_device
from .engines import checked_finite, checked_loss
from .settings import CurvatureSpec

PRECONDITIONERS = ("curvature",)
DEFAULT_SAMPLES = 32  # Hessian-vector products (one probe, one batch each)
DEFAULT_MAX_GAIN = 1000.0  # kappa: the most an element's step is enlarged over the stiffest element's
STDERR_FLOOR = 2.0  # no element's curvature is taken below this many standard errors of its estimate
HVP_GRAD_EVALS = 2  # forward/backward passes one Hessian-vector product costs, about (double backward)


class HessianProbe:
    """Hessian-vector products of ``loss_fn``'s mean minibatch loss at w* (the module's sampled parameters as
    they are), on the real module: its sampled parameters are swapped for views of one flat leaf, its buffers
    and frozen parameters for private copies (on ``device``)."""

    def __init__(self, model: torch.nn.Module, layout: FlatLayout, loss_fn: Callable, device: torch.device):
        self.model, self.layout, self.loss_fn, self.device = model, layout, loss_fn, torch.device(device)
        self.w_star = layout.flatten().to(self.device)
        self.products = 0  # Hessian-vector products taken

    def hvp(self, batch, v: torch.Tensor) -> torch.Tensor:
        """H·v [N] (the parameters' dtype; v is cast to it) of the loss on ``batch`` at w*."""
        w = self.w_star.detach().clone().requires_grad_(True)
        with torch.enable_grad(), isolated_buffers(self.model, self.device, sampled=self.layout.params), \
                swapped_parameters(self.layout, self.layout.views(w)):
            loss = checked_loss(self.loss_fn(self.model, batch), "at w* (curvature probe)")
            checked_finite(float(loss.detach()), "at w* (curvature probe)")
            (g,) = torch.autograd.grad(loss, w, create_graph=True)
            (hv,) = torch.autograd.grad(g, w, grad_outputs=v.to(w.dtype), allow_unused=True) \
                if g.requires_grad else (None,)
        self.products += 1
        return torch.zeros_like(w) if hv is None else hv.detach()


def curvature_batches(data, *, seed: int, count: int, device) -> list:
    """The first ``count`` batches of the curvature stream of ``data`` (keyed by the seed; cycled when shorter)."""
    stream = BatchStream(data, seed=seed, stream=STREAM_CURVATURE, index=0)
    return [move_to_device(next(stream), device) for _ in range(count)]


def rademacher(n: int, seed: int, k: int) -> torch.Tensor:
    """Probe k of ``seed``: n signs ±1 (float64, CPU) from a CPU generator, the same on every device."""
    gen = torch.Generator().manual_seed(derived_seed(seed, STREAM_CURVATURE, k))
    return torch.randint(0, 2, (n,), generator=gen, dtype=torch.int8).to(torch.float64) * 2 - 1


class HessianDiagonal(NamedTuple):
    """Hutchinson's estimate of the Hessian's diagonal: ``diagonal`` ĥ [N] and its standard error ``stderr`` [N]
    (the probes' standard deviation, ddof 1, over √K; 0 with one probe), both float64."""

    diagonal: torch.Tensor
    stderr: torch.Tensor


def hutchinson_diagonal(probe: HessianProbe, data, *, seed: int, num_samples: int) -> HessianDiagonal:
    """ĥ (module docstring): the mean of z_k ⊙ H_k z_k over ``num_samples`` Rademacher probes, probe k on batch k of
    ``curvature_batches``, with its standard error from the probes' spread."""
    total = torch.zeros(probe.layout.numel, dtype=torch.float64, device=probe.device)
    squares = torch.zeros_like(total)
    batches = curvature_batches(data, seed=seed, count=num_samples, device=probe.device)
    with torch.random.fork_rng(devices=[probe.device] if probe.device.type == "cuda" else []):
        torch.manual_seed(derived_seed(seed, STREAM_CURVATURE, 2**32))  # randomness inside the model, if any
        for k, batch in enumerate(batches):
            z = rademacher(probe.layout.numel, seed, k).to(probe.device)
            value = z * probe.hvp(batch, z).to(torch.float64)
            total += value
            squares += value * value
    mean = total / num_samples
    if num_samples == 1:
        return HessianDiagonal(mean, torch.zeros_like(mean))
    variance = ((squares - num_samples * mean * mean) / (num_samples - 1)).clamp(min=0.0)
    return HessianDiagonal(mean, (variance / num_samples).sqrt())


def top_eigenvalue(probe: HessianProbe, batches: list, gains: torch.Tensor | None = None, *, max_iters: int = 50,
                   rtol: float = 1e-3, seed: int = 0) -> float:
    """The largest eigenvalue of G^(1/2)·H̄·G^(1/2) (H̄ the mean Hessian at w* over ``batches``; G = ``gains``, or
    1) by ``chains.hessian.power_iteration`` from a Rademacher start (a Rayleigh quotient: from below; rtol=0 runs
    all max_iters steps). The preconditioned chain is stable on a quadratic iff about
    lr·(nβ·this + γ·max G) < 4."""
    from .hessian import MeanHVP, power_iteration  # chains.hessian builds on this module

    mean_hvp = MeanHVP(probe, batches, None)
    root = None if gains is None else gains.to(device=probe.device, dtype=torch.float64).sqrt()
    op = mean_hvp if root is None else (lambda v: root * mean_hvp(root * v))
    start = rademacher(probe.layout.numel, seed, 2**32 + 1).to(probe.device)
    return power_iteration(op, start, max_iters, rtol)[0]


def curvature_gains(curvature: HessianDiagonal, *, nbeta, gamma, max_gain: float,
                    sampled: torch.Tensor | None = None) -> torch.Tensor:
    """G [N] float64 in [1, max_gain] from the curvature diagonal (module docstring), each ĥ_i taken as at least
    ``STDERR_FLOOR`` standard errors. nbeta, gamma: every chain's values (ρ = max γ_c/nβ_c: the chain whose
    localizer weighs most, which gets the smallest gains); sampled: bool [N], the elements some chain moves
    (None: all), over which ĥ_max is taken."""
    if not max_gain >= 1.0:
        raise ValueError(f"max_gain must be >= 1 (G = 1 at the stiffest element), got {max_gain!r}")
    rho = max(float(g) / float(b) for g, b in zip(gamma, nbeta))
    h = torch.maximum(curvature.diagonal.to(torch.float64), STDERR_FLOOR * curvature.stderr.to(torch.float64))
    h = h.clamp(min=0.0)
    h_max = float((h if sampled is None else h[sampled]).max()) if h.numel() else 0.0
    if h_max + rho <= 0.0:  # no curvature seen and no localizer: nothing to scale by
        return torch.ones_like(h)
    with torch.no_grad():
        gains = (h_max + rho) / (h + rho)  # h + rho == 0 gives inf, clipped to max_gain
    return gains.clamp(min=1.0, max=max_gain)


def statistic_eps(max_gain: float) -> float:
    """The update's eps for gains up to ``max_gain``: 1/(2 max_gain), so that √V = 1/G − eps > 0 for every G."""
    return 0.5 / max_gain


def frozen_statistic(gains: torch.Tensor, eps: float) -> torch.Tensor:
    """The RMSProp statistic V [N] (float64) whose update gain 1/(√V + eps) is ``gains`` (each in (0, 1/eps])."""
    if bool((gains <= 0).any()) or bool((1.0 / gains < eps).any()):
        raise ValueError(f"every gain must lie in (0, 1/eps] = (0, {1 / eps:g}]")
    return (1.0 / gains.to(torch.float64) - eps) ** 2


def sampled_elements(layout: FlatLayout, restrictions: list, device) -> torch.Tensor | None:
    """bool [N]: the elements some restriction samples (each {param: 0/1 tensor or None}, or None for all);
    None when one of them samples everything."""
    if not restrictions or any(not r for r in restrictions):
        return None
    out = torch.zeros(layout.numel, dtype=torch.bool, device=device)
    for r in restrictions:
        out |= layout.flat_mask(r, device, dtype=torch.uint8).bool()
    return out


def gains_for(model, layout: FlatLayout, data, loss_fn: Callable, spec: CurvatureSpec,
              device: torch.device) -> tuple[torch.Tensor, HessianProbe]:
    """(G [N] float64, the probe that measured it) of the curvature preconditioner ``spec``
    (``settings.CurvatureSpec``): the curvature at w* (``hutchinson_diagonal``) and the gains
    (``curvature_gains``), over the elements the run samples."""
    probe = HessianProbe(model, layout, loss_fn, device)
    curvature = hutchinson_diagonal(probe, data, seed=spec.seed, num_samples=spec.samples)
    gains = curvature_gains(curvature, nbeta=spec.nbeta, gamma=spec.gamma, max_gain=spec.max_gain,
                            sampled=sampled_elements(layout, list(spec.restrictions), device))
    return gains, probe


def curvature_preconditioner(model, layout: FlatLayout, data, loss_fn: Callable, spec: CurvatureSpec,
                             device: torch.device) -> tuple[torch.Tensor, dict]:
    """(V [N] the frozen statistic, facts) of the curvature preconditioner ``spec`` (``settings.CurvatureSpec``):
    the statistic that gives ``gains_for``'s gains. facts: what ``result.config`` records of it."""
    import time

    t0 = time.perf_counter()
    gains, probe = gains_for(model, layout, data, loss_fn, spec, device)
    facts = dict(curvature_hvps=probe.products, curvature_grad_evals=HVP_GRAD_EVALS * probe.products,
                 curvature_gain_min=float(gains.min()), curvature_gain_median=float(gains.median()),
                 curvature_gain_max=float(gains.max()),
                 curvature_gains_capped=int((gains >= spec.max_gain).sum()),
                 curvature_s=time.perf_counter() - t0)
    return frozen_statistic(gains, statistic_eps(spec.max_gain)), facts
