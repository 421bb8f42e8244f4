"""The reference SGLD update: the single, readable definition of the sampler's math.

One step for every chain c and element i (Welling–Teh convention, ``docs/update.md``):

    V   <- alpha*V + (1-alpha)*g^2                  (RMSProp samplers, before use)
    G    = 1 / (sqrt(V * s_t) + eps)                (s_t = 1/(1-alpha^(t+1)) if bias-corrected, else 1;
                                                      G = 1 for plain SGLD)
    d    = nbeta_c*g + gamma_c*(w - w*) + wd*w
    w   <- w + m * ( -(lr_c/2)*G*d + noise_level*sqrt(lr_c*G)*xi )
    w   <- clamp(w, w* - box, w* + box)             (if a box is set)

g is the gradient of the mean minibatch loss, m the 0/1 mask, xi the counter-based normal of
(seed, chain, step, global element index) from ``philox.gaussian_noise``. bfloat16 weights
are updated in float32 and stored by stochastic rounding keyed the same way; float64 weights
are updated in float64.

``sgld_step`` is that step on one buffer; ``reference_update`` is the "torch" backend made of it
(``backend.Backend``'s entry points: the arguments are checked there, once for every backend).
The fast backends beside it (``cpp_update``, ``cuda_update``, ``triton_update``) are tested
against it.
"""
from __future__ import annotations

import torch

from . import philox
from .backend import Backend, UpdateCall
from .update_spec import SUPPORTED_PARAM_DTYPES, SamplerSettings, StepCounters, compute_dtype  # noqa: F401

CHUNK = 1 << 20  # elements per pass, to bound the int64 temporaries of the noise


def sgld_step(w: torch.Tensor, grad: torch.Tensor, w_star: torch.Tensor, stat: torch.Tensor | None,
              mask: torch.Tensor | None, *, lr: torch.Tensor, nbeta: torch.Tensor, gamma: torch.Tensor,
              settings: SamplerSettings, counters: StepCounters, seed: int, chain_ids: torch.Tensor,
              index_offset: int) -> None:
    """The step above, in place on one buffer ``w`` [C, N] (and ``stat`` [C, N]), arguments checked.

    grad: [C, N]. w_star, mask: [N]. lr, nbeta, gamma: [C, 1] of the compute dtype. chain_ids:
    int64 [C] on w's device. index_offset: global index of element 0.
    """
    n = w.shape[1]
    cdt = compute_dtype(w.dtype)
    for lo in range(0, n, CHUNK):
        hi = min(n, lo + CHUNK)
        sl = slice(lo, hi)
        wc = w[:, sl].to(cdt)
        g = grad[:, sl].to(cdt)
        ws = w_star[sl].to(cdt)
        if settings.preconditioned:
            v = stat[:, sl]
            if counters.update_statistic:
                alpha = torch.tensor(settings.rmsprop_alpha, dtype=cdt)
                one_minus_alpha = torch.tensor(1.0 - settings.rmsprop_alpha, dtype=cdt)
                v.copy_(alpha * v + one_minus_alpha * (g * g))
            scale = torch.tensor(settings.statistic_scale(counters.stat_step), dtype=cdt)
            precond = 1.0 / (torch.sqrt(v * scale) + settings.rmsprop_eps)
        else:
            precond = torch.ones((), dtype=cdt, device=w.device)
        drift = nbeta * g + gamma * (wc - ws)
        if settings.weight_decay:
            drift = drift + settings.weight_decay * wc
        xi = philox.gaussian_noise(seed, chain_ids, counters.step, index_offset + lo, hi - lo).to(cdt)
        delta = -(0.5 * lr) * precond * drift + settings.noise_level * torch.sqrt(lr * precond) * xi
        if mask is not None:
            delta = delta * mask[sl].to(cdt)
        new = wc + delta
        if settings.box is not None:
            new = torch.minimum(torch.maximum(new, ws - settings.box), ws + settings.box)
        if w.dtype == torch.bfloat16:
            words = philox.rounding_words(seed, chain_ids, counters.step, index_offset + lo, hi - lo)
            w[:, sl] = philox.stochastic_round_to_bf16(new, words)
        else:
            w[:, sl] = new


class TorchBackend(Backend):
    """The reference as a backend ("torch"): ``sgld_step`` once per segment, on w*, stat and mask
    sliced to the segment's columns, with the segment's global offset."""

    name = "torch"
    devices = ("cpu", "cuda")

    def launch(self, call: UpdateCall) -> None:
        lr, nbeta, gamma = (v[:, None] for v in call.per_chain_values())
        chain_ids = call.chain_ids.to(call.device)
        for seg in call.segments:
            sl = seg.local
            stat = None if call.stat is None else call.stat[:, sl]
            if stat is not None and not stat.is_contiguous():
                stat = stat.contiguous()
            sgld_step(seg.w, seg.grad, call.w_star[sl], stat, None if call.mask is None else call.mask[sl], lr=lr,
                      nbeta=nbeta, gamma=gamma, settings=call.settings, counters=call.counters, seed=call.seed,
                      chain_ids=chain_ids, index_offset=seg.global_offset)
            if stat is not None and stat.data_ptr() != call.stat[:, sl].data_ptr():
                call.stat[:, sl].copy_(stat)


#: The reference update, ``Backend.update``'s signature: ``reference_update(w, grad, w_star, stat, ...)``.
reference_update = TorchBackend()
#: The multi-segment reference: ``reference_update`` once per segment.
reference_update_segments = reference_update.update_segments
