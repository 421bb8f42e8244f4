"""The reference SGLD update: the single, readable definition of the sampler's math.

One step for every chain c and element i (Welling–Teh convention, ``docs/update.md``):

    V   <- alpha*V + (1-alpha)*g^2                  (RMSProp samplers, before use)
    G    = 1 / (sqrt(V * s_t) + eps)                (s_t = 1/(1-alpha^(t+1)) if bias-corrected, else 1;
                                                      G = 1 for plain SGLD)
    d    = nbeta_c*g + gamma_c*(w - w*) + wd*w
    w   <- w + m * ( -(lr_c/2)*G*d + noise_level*sqrt(lr_c*G)*xi )
    w   <- clamp(w, w* - box, w* + box)             (if a box is set)

g is the gradient of the mean minibatch loss, m the 0/1 mask (one [N] mask shared by every
chain row, or a ``RowMasks``: row c's own mask, its element i the local flat index), xi the counter-based normal of
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
from .backend import Backend, PreparedUpdate, UpdateCall
from .update_spec import SUPPORTED_PARAM_DTYPES, RowMasks, SamplerSettings, StepCounters, compute_dtype  # noqa: F401

CHUNK = 1 << 20  # elements per pass, to bound the int64 temporaries of the noise


def sgld_step(w: torch.Tensor, grad: torch.Tensor, w_star: torch.Tensor, stat: torch.Tensor | None,
              mask: torch.Tensor | None, *, lr: torch.Tensor, nbeta: torch.Tensor, gamma: torch.Tensor,
              settings: SamplerSettings, counters: StepCounters, seed: int, chain_ids: torch.Tensor,
              index_offset: int) -> None:
    """The step above, in place on one buffer ``w`` [C, N] (and ``stat`` [C, N]), arguments checked.

    grad: [C, N]. w_star, mask: [N] (or mask a ``RowMasks`` of C rows). lr, nbeta, gamma: [C, 1] of
    the compute dtype. chain_ids: int64 [C] on w's device. index_offset: global index of element 0.
    """
    philox._check_counters(chain_ids, counters.step, index_offset)
    _BufferStep(w, mask, lr=lr, nbeta=nbeta, gamma=gamma, settings=settings, chain_ids=chain_ids,
                index_offset=index_offset).run(w, grad, w_star, stat, counters, counters.step, seed)


class _BufferStep:
    """``sgld_step`` on one buffer of w's shape and dtype, split into what does not change from one
    step to the next (built once: the chunks, their noise counters and mask, the per-chain values,
    SGLD's coefficients) and ``run``, the step itself."""

    def __init__(self, w: torch.Tensor, mask: torch.Tensor | RowMasks | None, *, lr: torch.Tensor, nbeta: torch.Tensor,
                 gamma: torch.Tensor, settings: SamplerSettings, chain_ids: torch.Tensor, index_offset: int,
                 local_start: int = 0):
        """mask: [n] (this buffer's columns), or a RowMasks whose local element local_start + j is column j."""
        n = w.shape[1]
        cdt = self.cdt = compute_dtype(w.dtype)
        self.settings, self.lr, self.nbeta, self.gamma = settings, lr, nbeta, gamma
        self.chunks = []  # (columns, mask in the compute dtype, noise counters, rounding counters)
        for lo in range(0, n, CHUNK):
            hi = min(n, lo + CHUNK)
            self.chunks.append((
                slice(lo, hi), None if mask is None else (
                    mask.rows(local_start + lo, local_start + hi).to(cdt) if isinstance(mask, RowMasks)
                    else mask[lo:hi].to(cdt)),
                philox.group_counters(chain_ids, index_offset + lo, hi - lo, philox.STREAM_GAUSSIAN),
                philox.group_counters(chain_ids, index_offset + lo, hi - lo, philox.STREAM_ROUNDING)
                if w.dtype == torch.bfloat16 else None))
        if settings.preconditioned:
            self.alpha = torch.tensor(settings.rmsprop_alpha, dtype=cdt)
            self.one_minus_alpha = torch.tensor(1.0 - settings.rmsprop_alpha, dtype=cdt)
        else:  # G = 1: the drift and noise coefficients -(lr/2)*G and noise_level*sqrt(lr*G) are fixed
            precond = torch.ones((), dtype=cdt, device=w.device)
            self.coefs = (-(0.5 * lr) * precond, settings.noise_level * torch.sqrt(lr * precond))

    def run(self, w: torch.Tensor, grad: torch.Tensor, w_star: torch.Tensor, stat: torch.Tensor | None,
            counters: StepCounters, step: int, seed: int) -> None:
        settings, cdt, lr, nbeta, gamma = self.settings, self.cdt, self.lr, self.nbeta, self.gamma
        for sl, m, noise, rounding in self.chunks:
            wc = w[:, sl].to(cdt)
            g = grad[:, sl].to(cdt)
            ws = w_star[sl].to(cdt)
            if settings.preconditioned:
                v = stat[:, sl]
                if counters.update_statistic:
                    v.copy_(self.alpha * v + self.one_minus_alpha * (g * g))
                scale = torch.tensor(settings.statistic_scale(counters.stat_step), dtype=cdt)
                precond = 1.0 / (torch.sqrt(v * scale) + settings.rmsprop_eps)
                drift_coef, noise_coef = -(0.5 * lr) * precond, settings.noise_level * torch.sqrt(lr * precond)
            else:
                drift_coef, noise_coef = self.coefs
            drift = nbeta * g + gamma * (wc - ws)
            if settings.weight_decay:
                drift = drift + settings.weight_decay * wc
            xi = philox.normals_at(noise, seed, step).to(cdt)
            delta = drift_coef * drift + noise_coef * xi
            if m is not None:
                delta = delta * m
            new = wc + delta
            if settings.box is not None:
                new = torch.minimum(torch.maximum(new, ws - settings.box), ws + settings.box)
            if w.dtype == torch.bfloat16:
                w[:, sl] = philox.stochastic_round_to_bf16(new, philox.words_at(rounding, seed, step))
            else:
                w[:, sl] = new


class _TorchPrepared(PreparedUpdate):
    """The reference's prepared update: one ``_BufferStep`` per segment, on w*, stat and mask sliced to
    the segment's columns, with the segment's global offset."""

    def __init__(self, backend: "TorchBackend", call: UpdateCall):
        super().__init__(backend, call)
        lr, nbeta, gamma = (v[:, None] for v in call.per_chain_values())
        chain_ids = call.chain_ids.to(call.device)
        philox._check_counters(chain_ids, 0, 0)  # once (a host sync for chain indices on an accelerator)
        self.steps = [(seg.local, call.w_star[seg.local],
                       _BufferStep(seg.w, self._mask(call.mask, seg), lr=lr, nbeta=nbeta, gamma=gamma,
                                   settings=call.settings, chain_ids=chain_ids, index_offset=seg.global_offset,
                                   local_start=seg.local_start)) for seg in call.segments]

    @staticmethod
    def _mask(mask, seg):
        """The segment's columns of a shared mask; a RowMasks as it is (indexed by local element)."""
        if mask is None or isinstance(mask, RowMasks):
            return mask
        return mask[seg.local]

    def _launch(self, counters: StepCounters, step: int) -> None:
        call = self.call
        for seg, grad, (sl, w_star, buffer_step) in zip(call.segments, self.grads, self.steps):
            stat = None if call.stat is None else call.stat[:, sl]
            if stat is not None and not stat.is_contiguous():
                stat = stat.contiguous()
            buffer_step.run(seg.w, grad, w_star, stat, counters, step, call.seed)
            if stat is not None and stat.data_ptr() != call.stat[:, sl].data_ptr():
                call.stat[:, sl].copy_(stat)


class TorchBackend(Backend):
    """The reference as a backend ("torch"): ``sgld_step`` once per segment, on w*, stat and mask
    sliced to the segment's columns, with the segment's global offset (``_TorchPrepared``)."""

    name = "torch"
    devices = ("cpu", "cuda")

    def prepare_call(self, call: UpdateCall) -> PreparedUpdate:
        return _TorchPrepared(self, call)


#: The reference update, ``Backend.update``'s signature: ``reference_update(w, grad, w_star, stat, ...)``.
reference_update = TorchBackend()
#: The multi-segment reference: ``reference_update`` once per segment.
reference_update_segments = reference_update.update_segments
