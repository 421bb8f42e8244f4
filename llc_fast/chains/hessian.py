"""Curvature of the loss at w*, from Hessian-vector products: what bounds the sampler's step.

``hessian_curvature(model, data, loss_fn)`` measures, on the sampled parameters (``FlatLayout``; a restriction's
coordinates only, with ``mask``), the Hessian H of the mean loss over a few fixed batches (the first
``num_batches`` batches of the curvature stream of ``seed``):

* h_max, its largest eigenvalue, by power iteration (a Rayleigh quotient, so never above the true value; the
  iteration stops when it changes by less than ``rtol`` relative); when the eigenvalue of largest size is negative,
  a second iteration on H + |h|·I finds the largest;
* h_min, the smallest eigenvalue it can resolve, by power iteration on h_max·I − H (resolution about
  ``rtol``·h_max: flatter directions, including a singular model's zero-curvature ones, read as about 0);
* trace, tr H, by Hutchinson's estimator over ``trace_probes`` Rademacher vectors.

The Hessian-vector products, batches and probe vectors are ``chains.curvature``'s (``HessianProbe``: double
backward through ``loss_fn`` at w* on a flat copy of the weights; ``curvature_batches``: the curvature stream of
``seed``; ``rademacher``), here averaged over the same ``num_batches`` batches at every product, so that H is one
fixed symmetric matrix. One product of one batch costs about two forward/backward passes; ``grad_evals`` counts
them so. The same call gives the same numbers; the model's weights and gradients are left untouched.

``lr_limit(h_max, nbeta, gamma)`` is the stability limit of plain SGLD, lr < STABILITY_LIMIT/(nbeta·h_max + gamma)
(``kernels.update_spec.STABILITY_LIMIT``).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ..kernels.update_spec import STABILITY_LIMIT
from ..state.flat import FlatLayout
from .curvature import HVP_GRAD_EVALS, HessianProbe, curvature_batches, rademacher
from .data import batches_in_first_pass
from .engines import check_differentiable, checked_loss

_START, _TRACE = 2**33, 2**34  # probe indices of the start vector and the trace's probes (apart from others' probes)


@dataclass(frozen=True)
class Curvature:
    """What ``hessian_curvature`` measured (module docstring). iterations: power iterations for h_max and for
    h_min; converged: both met rtol; hvps: Hessian-vector products of one batch each."""

    h_max: float
    h_min: float
    trace: float
    iterations: tuple
    converged: bool
    hvps: int
    num_batches: int
    num_params: int

    @property
    def grad_evals(self) -> float:
        """Forward/backward passes the measurement took, counting one Hessian-vector product of a batch as
        HVP_GRAD_EVALS."""
        return self.hvps * HVP_GRAD_EVALS

    def to_dict(self) -> dict:
        return dict(asdict(self), iterations=list(self.iterations), grad_evals=self.grad_evals)


def lr_limit(h_max: float, nbeta: float, gamma: float) -> float:
    """The largest stable SGLD step on a quadratic with top curvature h_max: STABILITY_LIMIT/(nbeta·h_max + gamma)."""
    return STABILITY_LIMIT / (nbeta * max(h_max, 0.0) + gamma)


def hessian_curvature(model: torch.nn.Module, data, loss_fn: Callable, *, num_batches: int = 4, max_iters: int = 50,
                      rtol: float = 1e-3, trace_probes: int = 8, seed: int = 0, mask: dict | None = None,
                      device: str | torch.device | None = None) -> Curvature:
    """h_max, h_min and tr of the Hessian of ``loss_fn`` at the model's weights (module docstring).

    num_batches: curvature batches the Hessian averages (fewer if one pass over the data is shorter);
    max_iters: power iterations at most, for each extreme; rtol: stop when the Rayleigh quotient changes by at
    most this, relative; trace_probes: Hutchinson vectors (0: trace NaN); mask: a restriction {param name: 0/1
    tensor or None} as estimate_llc's, the Hessian then of its coordinates only; device: where to compute (default:
    the model's)."""
    for name, value, least in (("num_batches", num_batches, 1), ("max_iters", max_iters, 2),
                               ("trace_probes", trace_probes, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if not (isinstance(rtol, (int, float)) and 0 < rtol < 1):
        raise ValueError(f"rtol must be a number in (0, 1), e.g. 1e-3, got {rtol!r}")
    hvp, probe = _hessian_operator(model, data, loss_fn, num_batches, seed, mask, device)
    with torch.random.fork_rng(devices=[probe.device] if probe.device.type == "cuda" else []):
        h_max, it_max, ok_max = power_iteration(hvp, hvp.where(rademacher(hvp.n, seed, _START)), max_iters, rtol)
        if h_max < 0:  # the largest in size is negative: shift it to 0 and find the largest
            top, it, ok_max = power_iteration(lambda v: hvp(v) - h_max * v, hvp.where(rademacher(hvp.n, seed, _START)),
                                              max_iters, rtol)
            h_max, it_max = top + h_max, it_max + it
        span, it_min, ok_min = power_iteration(lambda v: h_max * v - hvp(v), hvp.where(rademacher(hvp.n, seed, _START)),
                                               max_iters, rtol)
        trace = math.nan
        if trace_probes:
            trace = sum(float(z @ hvp(z)) for z in (hvp.where(rademacher(hvp.n, seed, _TRACE + k))
                                                     for k in range(trace_probes))) / trace_probes
    return Curvature(h_max=h_max, h_min=h_max - span, trace=trace, iterations=(it_max, it_min),
                     converged=ok_max and ok_min, hvps=probe.products, num_batches=len(hvp.batches), num_params=hvp.n)


def power_iteration(op: Callable, v: torch.Tensor, max_iters: int, rtol: float) -> tuple[float, int, bool]:
    """(dominant eigenvalue's Rayleigh quotient, iterations, converged) of the symmetric ``op`` from ``v``: stops when
    the quotient changes by at most ``rtol`` relative, or after ``max_iters`` products."""
    v = v / v.norm()
    previous = math.nan
    for k in range(1, max_iters + 1):
        hv = op(v)
        mu = float(v @ hv)
        size = float(hv.norm())
        if not math.isfinite(size):
            raise ValueError("a Hessian-vector product of the loss is not finite at w*: check the loss and the "
                             "weights (the loss must be finite and twice differentiable there)")
        if size == 0.0:
            return 0.0, k, True
        if abs(mu - previous) <= rtol * abs(mu):
            return mu, k, True
        previous, v = mu, hv / size
    return previous, max_iters, False


class MeanHVP:
    """v [N] float64 -> H·v [N] float64, H the Hessian of the mean loss over fixed batches (masked coordinates 0)."""

    def __init__(self, probe: HessianProbe, batches: list, mask: torch.Tensor | None):
        self.probe, self.batches, self.mask, self.n = probe, batches, mask, probe.layout.numel

    def where(self, v: torch.Tensor) -> torch.Tensor:
        """v on the probe's device, 0 outside the mask."""
        v = v.to(self.probe.device, torch.float64)
        return v if self.mask is None else v * self.mask

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        v = self.where(v)
        out = sum(self.probe.hvp(b, v).to(torch.float64) for b in self.batches) / len(self.batches)
        return self.where(out)


def _hessian_operator(model, data, loss_fn, num_batches, seed, mask, device) -> tuple[MeanHVP, HessianProbe]:
    """(the mean Hessian-vector product of the first ``num_batches`` curvature batches, its probe)."""
    if not callable(loss_fn):
        raise TypeError("loss_fn must be a callable loss_fn(model, batch) -> scalar mean loss")
    layout = FlatLayout.for_sampling(model)
    device = torch.device(device) if device is not None else layout.device
    if device != layout.device:
        raise ValueError(f"the model is on {layout.device} but device={str(device)!r}: move the model first "
                         f"(model.to({str(device)!r})) or leave device out")
    count = batches_in_first_pass(data, num_batches)
    if count == 0:
        raise ValueError("data yielded no batches: pass a non-empty DataLoader or list of batches")
    probe = HessianProbe(model, layout, loss_fn, device)
    batches = curvature_batches(data, seed=seed, count=count, device=device)
    with torch.enable_grad():  # a loss that does not reach the weights has no Hessian: say so before any product
        check_differentiable(checked_loss(loss_fn(model, batches[0]), "at w*"), "at w* (curvature batch 0)")
    where = None if mask is None else layout.flat_mask(layout.checked_mask(mask), device, dtype=torch.float64)
    return MeanHVP(probe, batches, where), probe
