"""devinterp's SGNHT (``devinterp.optim.sgnht.SGNHT``, deprecated there) as a torch optimizer stepping with llc_fast's
reference SGNHT step, and what its factory ``SGMCMC.sgnht`` really computes in devinterp 1.3.2.

``SGNHT``: Ding et al.'s (2014) thermostat sampler, the math of ``llc_fast.kernels.reference.sgnht_step`` (sampler
"sgnht" of the one loop, with gamma = 0 as devinterp has no localization): per parameter a momentum p, per param
group a thermostat z starting at the diffusion factor A; each step

    p <- p - lr*nbeta*g ; p <- p - z*p ; p <- p + sqrt(2*A*lr)*xi ; w <- w + p
    (bounding box: where |w - w0| >= box, p <- -p; w clamped to w0 +- box)
    z <- z + sum(p^2)/count - lr          (over the group's parameters that received a gradient)

with xi llc_fast's counter-based normals keyed (seed, chain, step, element index in the optimizer's flat order).
Differences from devinterp's class: p starts at 0 (devinterp draws sqrt(lr)*N(0, 1); the stationary law is the
same), the noise is llc_fast's, and ``seed`` / ``chain`` key it (seed None: drawn from torch's global RNG at the
first step). Passed as ``sampling_method`` to the compat layer's ``estimate_learning_coeff(_with_summary)``, the
chains run in llc_fast's loop with sampler="sgnht" (``sampling_kind``).

``sgnht_factory``: devinterp 1.3.2's ``SGMCMC.sgnht`` builds an ``NHTPreconditioning`` whose thermostat and
momentum are created but never used: ``SGMCMC.step`` ignores its ``grad_correction`` and applies only its noise
coefficient sqrt(2*A). Its update is therefore SGLD with noise_level sqrt(2*A), no localization, and the box:
w <- w - (lr/2)*nbeta*g + sqrt(lr)*sqrt(2*A)*xi, then clamped. That is what it is here, faithfully.
"""
from __future__ import annotations

import math
import warnings

import torch

from ...kernels import philox
from ...kernels.reference import compute_dtype, sgnht_step, thermostat_step
from ...kernels.update_spec import SamplerSettings

__all__ = ["SGNHT", "sgnht_factory", "sampling_kind"]

_VALID_METRICS = {"noise", "dws", "localization_loss"}


class SGNHT(torch.optim.Optimizer):
    """devinterp 1.3.2's ``SGNHT(params, lr, diffusion_factor, bounding_box_size, save_noise, save_mala_vars, nbeta,
    metrics)`` with llc_fast's reference SGNHT step (module docstring); ``seed``, ``chain``: the noise key."""

    def __init__(self, params, lr=0.01, diffusion_factor=0.01, bounding_box_size=None, save_noise=False,
                 save_mala_vars=False, nbeta=1.0, metrics=None, *, seed: int | None = None, chain: int = 0):
        warnings.warn("SGNHT has been deprecated. Please use SGMCMC.sgnht instead.", DeprecationWarning, stacklevel=2)
        if metrics:
            invalid = set(metrics) - _VALID_METRICS
            if invalid:
                raise ValueError(f"Invalid metrics: {invalid}. Valid metrics are: {_VALID_METRICS}")
            save_noise = save_noise or "noise" in metrics
            save_mala_vars = save_mala_vars or "dws" in metrics or "localization_loss" in metrics
        if save_noise:
            warnings.warn("NoiseNorm not implemented for SGNHT! If you insist on using NoiseNorm, use SGLD instead.")
        if save_mala_vars:
            warnings.warn("MALA not implemented for SGNHT! If you insist on using MALA, use SGLD instead.")
        if nbeta == 1.0:
            warnings.warn("nbeta set to 1, LLC estimates will be off unless you know what you're doing. Use "
                          "utils.default_nbeta(dataloader) instead")
        if isinstance(chain, bool) or not isinstance(chain, int) or not 0 <= chain <= philox.MAX_CHAIN:
            raise ValueError(f"chain must be an integer in [0, 2**31), got {chain!r}")
        defaults = dict(lr=lr, diffusion_factor=diffusion_factor, bounding_box_size=bounding_box_size, nbeta=nbeta,
                        save_noise=save_noise, save_mala_vars=save_mala_vars)
        super().__init__(params, defaults)
        self._seed, self._chain, self._step_count = seed, chain, 0
        offset = 0
        for group in self.param_groups:
            SamplerSettings("sgnht", sgnht_diffusion=float(group["diffusion_factor"]),
                            box=group["bounding_box_size"] or None)  # checked now, not at the first step
            cdt = torch.float64 if any(p.dtype == torch.float64 for p in group["params"]) else torch.float32
            group["thermostat"] = torch.tensor(float(group["diffusion_factor"]), dtype=cdt)
            for p in group["params"]:
                state = self.state[p]
                state["momentum"] = torch.zeros_like(p, dtype=compute_dtype(p.dtype))
                state["initial_param"] = p.detach().clone()
                state["offset"] = offset  # the parameter's first element in the flat order (keys the noise)
                offset += p.numel()

    @property
    def seed(self) -> int | None:
        return self._seed

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._seed is None:
            self._seed = int(torch.randint(0, 2**62, (1,)).item())
        for group in self.param_groups:
            self._step_group(group)
        self._step_count += 1
        return loss

    def _step_group(self, group: dict) -> None:
        """``sgnht_step`` on every parameter of the group that has a gradient, then its thermostat."""
        settings = SamplerSettings("sgnht", sgnht_diffusion=float(group["diffusion_factor"]),
                                   box=group["bounding_box_size"] or None)
        z = group["thermostat"]
        kinetic, count = torch.zeros((), dtype=z.dtype), 0
        for p in group["params"]:
            if p.grad is None:
                continue
            state, cdt = self.state[p], compute_dtype(p.dtype)
            row = dict(lr=torch.full((1, 1), float(group["lr"]), dtype=cdt, device=p.device),
                       nbeta=torch.full((1, 1), float(group["nbeta"]), dtype=cdt, device=p.device),
                       gamma=torch.zeros((1, 1), dtype=cdt, device=p.device))
            xi = philox.gaussian_noise(self._seed, torch.tensor([self._chain], device=p.device), self._step_count,
                                       state["offset"], p.numel()).to(cdt)
            new, mom, k = sgnht_step(p.detach().reshape(1, -1).to(cdt), p.grad.reshape(1, -1).to(cdt),
                                     state["initial_param"].reshape(-1).to(cdt), state["momentum"].reshape(1, -1),
                                     z.to(device=p.device, dtype=cdt).reshape(1, 1), xi, None, settings=settings,
                                     **row)
            p.copy_(new.reshape(p.shape).to(p.dtype))
            state["momentum"].copy_(mom.reshape(p.shape))
            kinetic, count = kinetic + k.sum().to(device="cpu", dtype=z.dtype), count + p.numel()
        if count:
            lr = torch.full((1, 1), float(group["lr"]), dtype=z.dtype)
            group["thermostat"] = thermostat_step(z.reshape(1, 1), kinetic.reshape(1, 1),
                                                  torch.full((1, 1), float(count), dtype=z.dtype), lr).reshape(())


def sgnht_factory(sgld, params, lr=0.01, diffusion_factor=0.01, nbeta=1.0, bounding_box_size=None, metrics=None,
                  **kwargs):
    """devinterp 1.3.2's ``SGMCMC.sgnht`` as it computes (module docstring): ``sgld`` (the compat ``SGMCMC.sgld``)
    with noise_level sqrt(2*diffusion_factor), no localization, and the box."""
    if not (math.isfinite(diffusion_factor) and diffusion_factor >= 0):
        raise ValueError(f"diffusion_factor must be finite and >= 0, got {diffusion_factor!r}")
    return sgld(params, lr=lr, noise_level=math.sqrt(2.0 * diffusion_factor), nbeta=nbeta, localization=0.0,
                bounding_box_size=bounding_box_size, metrics=metrics, **kwargs)


def sampling_kind(method) -> str | None:
    """"sgnht" for the SGNHT class (this module's or devinterp's, by name), "sgnht_factory" for ``SGMCMC.sgnht``
    (the compat layer's or devinterp's), None for any other sampling method."""
    if isinstance(method, type) and issubclass(method, SGNHT):
        return "sgnht"
    name = getattr(method, "__name__", None)
    return {"SGNHT": "sgnht", "sgnht": "sgnht_factory"}.get(name) if isinstance(name, str) else None


def sgnht_options(kind: str, kw: dict) -> dict:
    """estimate_llc's options of devinterp's SGNHT (``kind`` "sgnht") or ``SGMCMC.sgnht`` ("sgnht_factory") from its
    optimizer kwargs ``kw`` (the keys it takes are popped): lr, nbeta, diffusion_factor, bounding_box_size."""
    diffusion, box = kw.pop("diffusion_factor", 0.01), kw.pop("bounding_box_size", None)
    out = dict(lr=kw.pop("lr", 0.01), nbeta=kw.pop("nbeta"), gamma=0.0, box=box if box else None)
    if kind == "sgnht":
        return dict(out, sampler="sgnht", sgnht_diffusion=diffusion)
    return dict(out, sampler="sgld", noise_level=math.sqrt(2.0 * diffusion))
