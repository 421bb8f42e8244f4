"""The reference SGLD update: the single, readable definition of the sampler's math.

One step for every chain row c and element i (Welling–Teh convention, ``docs/update.md``):

    V   <- alpha*V + (1-alpha)*g^2                  (RMSProp samplers, before use)
    G    = 1 / (sqrt(V * s_t) + eps)                (s_t = 1/(1-alpha^(t+1)) if bias-corrected, else 1;
                                                      G = 1 for plain SGLD)
    d    = nbeta_c*g + gamma_c*(w - w*) + wd*w
    w   <- w + m * ( -(lr_c/2)*G*d + noise_level*sqrt(lr_c*G)*xi )
    w   <- clamp(w, w* - box, w* + box)             (if a box is set)

g is the gradient of the mean minibatch loss, m the 0/1 mask (one [N] mask shared by every
chain row, or a ``RowMasks``: row c's own mask, its element i the local flat index), xi the
counter-based normal of (seed, chain, step, global element index) from ``philox.gaussian_noise``.
bfloat16 weights are updated in float32 and stored by stochastic rounding keyed the same way;
float64 weights are updated in float64.

"sgnht" (``sgnht_step``, its own equations there) keeps a momentum in V's buffer and one thermostat per row.
noise_scheme="lm" (Leimkuhler-Matthews) replaces xi by (xi_t + xi_{t+1})/2, the mean of this step's normals and
the next step's: the draws of a quadratic then have the exact posterior law at any stable lr (``docs/update.md``).

``sgld_step`` is that step, a pure function of tensors: read it first. ``BufferStep`` applies it
in place to one buffer, chunk by chunk, with the noise; the "torch" backend (``torch_update.py``)
is ``BufferStep`` once per segment. The fast backends (``cpu_update``, ``cuda_update``,
``triton_update``) are tested against it.
"""
from __future__ import annotations

import torch

from . import philox
from .update_spec import SUPPORTED_PARAM_DTYPES, RowMasks, SamplerSettings, StepCounters, compute_dtype  # noqa: F401

CHUNK = 1 << 20  # elements per pass, to bound the int64 temporaries of the noise


def sgld_step(w, g, w_star, v, xi, m, *, lr, nbeta, gamma, settings: SamplerSettings, update_statistic: bool = True,
              stat_scale: float = 1.0):
    """The step above, pure: (new w, new V), all of the compute dtype, nothing written in place.

    w, g: [C, n] weights and gradient. w_star: [n]. v: the statistic V [C, n] (None for SGLD). xi:
    the normals [C, n]. m: the mask ([n] or [C, n] of 0/1) or None. lr, nbeta, gamma: [C, 1].
    update_statistic: whether V takes this gradient; stat_scale: s_t.
    """
    cdt = w.dtype
    if settings.preconditioned:
        if update_statistic:
            v = torch.tensor(settings.rmsprop_alpha, dtype=cdt) * v + torch.tensor(1.0 - settings.rmsprop_alpha,
                                                                                  dtype=cdt) * (g * g)
        precond = 1.0 / (torch.sqrt(v * torch.tensor(stat_scale, dtype=cdt)) + settings.rmsprop_eps)
    else:
        precond = torch.ones((), dtype=cdt, device=w.device)
    drift = nbeta * g + gamma * (w - w_star)
    if settings.weight_decay:
        drift = drift + settings.weight_decay * w
    delta = -(0.5 * lr) * precond * drift + settings.noise_level * torch.sqrt(lr * precond) * xi
    if m is not None:
        delta = delta * m
    new = w + delta
    if settings.box is not None:
        new = torch.minimum(torch.maximum(new, w_star - settings.box), w_star + settings.box)
    return new, v


def sgnht_step(w, g, w_star, p, thermostat, xi, m, *, lr, nbeta, gamma, settings: SamplerSettings):
    """One SGNHT step (Ding et al. 2014, as devinterp's ``SGNHT``), pure: (new w, new momentum, K [C]).

    For every row c and element i, with A = settings.sgnht_diffusion and the row's thermostat z (``thermostat``):

        d  = nbeta_c*g + gamma_c*(w - w*) + wd*w        (gamma = 0, wd = 0: devinterp's SGNHT, which has no gamma)
        p <- p - lr_c*d
        p <- p - z_c*p
        p <- p + noise_level*sqrt(2*A*lr_c)*xi
        w <- w + m*p                                    (p <- m*p: an unsampled element keeps p = 0)
        box: where |w - w*| >= box, p <- -p; then w <- clamp(w, w* - box, w* + box)

    and K_c = sum over the row's sampled elements of p^2 (taken before the reflection, which keeps p^2).
    After all of the row's elements: ``thermostat_step``, z_c <- z_c + K_c/count_c - lr_c (count_c: its
    sampled elements). p starts at 0 and z at A (devinterp draws p0 = sqrt(lr)*N(0, 1): the counter's one
    stream bit is taken by the noise and the rounding; the stationary law does not depend on p0).

    This is Ding's SGNHT on U = nbeta*L + gamma/2*|w - w*|^2 with step h = sqrt(lr): Ding's momentum
    p/h, diffusion A/h and thermostat z/h. Its stationary law is w ~ exp(-U) (the localized tempered
    posterior) with Ding's kinetic temperature <(p/h)^2> = 1, i.e. <p^2> = lr. The discretised chain's positions run
    hotter by about 1/(1 - z/2), z ~ A: an O(A) bias (``oracles.quadratic_sgnht_expectation``; docs/update.md).
    w, g, p, xi: [C, n] of the compute dtype; w_star: [n]; thermostat: [C, 1]; m: [n] or [C, n] 0/1, or
    None; lr, nbeta, gamma: [C, 1].
    """
    drift = nbeta * g + gamma * (w - w_star)
    if settings.weight_decay:
        drift = drift + settings.weight_decay * w
    p = p - lr * drift
    p = p - thermostat * p
    p = p + (settings.noise_level * torch.sqrt(2.0 * settings.sgnht_diffusion * lr)) * xi
    if m is not None:
        p = p * m
    new = w + p
    kinetic = (p * p).sum(dim=1)
    if settings.box is not None:
        p = torch.where((new - w_star).abs() < settings.box, p, -p)
        new = torch.minimum(torch.maximum(new, w_star - settings.box), w_star + settings.box)
    return new, p, kinetic


def thermostat_step(thermostat, kinetic, count, lr):
    """SGNHT's thermostat after a step: z + K/count - lr ([C, 1] each; rows with count 0 keep z)."""
    return torch.where(count > 0, thermostat + kinetic / count.clamp(min=1) - lr, thermostat)


class BufferStep:
    """``sgld_step`` in place on one buffer of w's shape and dtype, chunk by chunk, with the noise: what
    does not change from one step to the next is built once (the chunks, their noise counters and
    mask), ``run`` is the step."""

    def __init__(self, w: torch.Tensor, mask: torch.Tensor | RowMasks | None, *, lr: torch.Tensor, nbeta: torch.Tensor,
                 gamma: torch.Tensor, settings: SamplerSettings, chain_ids: torch.Tensor, index_offset: int,
                 local_start: int = 0):
        """mask: [n] (this buffer's columns), or a RowMasks whose local element local_start + j is column j.
        lr, nbeta, gamma: [C, 1] of the compute dtype. chain_ids: int64 [C] on w's device (checked by the
        caller, ``philox.check_counters``). index_offset: global index of element 0."""
        n = w.shape[1]
        cdt = self.cdt = compute_dtype(w.dtype)
        self.settings, self.hyper = settings, dict(lr=lr, nbeta=nbeta, gamma=gamma)
        self.chunks = []  # (columns, mask in the compute dtype, noise counters, rounding counters)
        for lo in range(0, n, CHUNK):
            hi = min(n, lo + CHUNK)
            self.chunks.append((
                slice(lo, hi), None if mask is None else (
                    mask.rows(local_start + lo, local_start + hi).to(cdt) if isinstance(mask, RowMasks)
                    else mask[lo:hi].to(cdt)),
                philox.quad_counters(chain_ids, index_offset + lo, hi - lo, philox.STREAM_GAUSSIAN),
                philox.quad_counters(chain_ids, index_offset + lo, hi - lo, philox.STREAM_ROUNDING)
                if w.dtype == torch.bfloat16 else None))
        if settings.thermostat:  # SGNHT: the sampled elements of each row here, [C, 1]
            self.count = torch.zeros((w.shape[0], 1), dtype=cdt, device=w.device)
            for sl, m, _, _ in self.chunks:
                self.count += float(sl.stop - sl.start) if m is None else m.sum(dim=-1).reshape(-1, 1)

    def run(self, w: torch.Tensor, grad: torch.Tensor, w_star: torch.Tensor, stat: torch.Tensor | None,
            counters: StepCounters, step: int, seed: int, thermostat: torch.Tensor | None = None):
        """The step of ``counters`` (``step``: counters.step) in place on ``w`` [C, n] and ``stat`` [C, n].
        SGNHT (``thermostat``: the rows' thermostats [C, 1], read only): returns K [C, 1], the sum of the new
        momentum's squares over this buffer's sampled elements (None for the other samplers)."""
        settings, cdt = self.settings, self.cdt
        stat_scale = settings.statistic_scale(counters.stat_step) if settings.preconditioned else 1.0
        kinetic = None
        for sl, m, noise, rounding in self.chunks:
            v = stat[:, sl] if settings.has_statistic else None
            xi = philox.normals_at(noise, seed, step).to(cdt)
            if settings.noise_scheme == "lm":
                xi = 0.5 * (xi + philox.normals_at(noise, seed, step + 1).to(cdt))
            if settings.thermostat:
                new, p, k = sgnht_step(w[:, sl].to(cdt), grad[:, sl].to(cdt), w_star[sl].to(cdt), v, thermostat, xi,
                                       m, settings=settings, **self.hyper)
                v.copy_(p)
                kinetic = k[:, None] if kinetic is None else kinetic + k[:, None]
            else:
                new, v_new = sgld_step(w[:, sl].to(cdt), grad[:, sl].to(cdt), w_star[sl].to(cdt), v, xi, m,
                                       settings=settings, update_statistic=counters.update_statistic,
                                       stat_scale=stat_scale, **self.hyper)
                if v is not None and counters.update_statistic:
                    v.copy_(v_new)
            if w.dtype == torch.bfloat16:
                w[:, sl] = philox.stochastic_round_to_bf16(new, philox.words_at(rounding, seed, step))
            else:
                w[:, sl] = new
        return kinetic
