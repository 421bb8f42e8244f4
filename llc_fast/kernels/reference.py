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
are updated in float64. The fast backends in this package are tested against this function.
"""
from __future__ import annotations

import torch

from . import philox
from .update_spec import SamplerSettings, StepCounters, per_chain

SUPPORTED_PARAM_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
CHUNK = 1 << 20  # elements per pass, to bound the int64 temporaries of the noise


def compute_dtype(param_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def check_update_args(w, grad, w_star, stat, mask, settings: SamplerSettings) -> None:
    """Shapes and dtypes every backend requires; raises ValueError naming the wrong argument."""
    if w.ndim != 2:
        raise ValueError(f"w must be [chains, elements], got shape {tuple(w.shape)}")
    if w.dtype not in SUPPORTED_PARAM_DTYPES:
        raise ValueError(f"parameters must be float32, float64 or bfloat16, got {w.dtype}")
    if grad.shape != w.shape or grad.dtype != w.dtype:
        raise ValueError(f"grad must match w ({tuple(w.shape)}, {w.dtype}), got {tuple(grad.shape)}, {grad.dtype}")
    if w_star.shape != w.shape[1:] or w_star.dtype != w.dtype:
        raise ValueError(f"w_star must be [{w.shape[1]}] of {w.dtype}, got {tuple(w_star.shape)}, {w_star.dtype}")
    if settings.preconditioned:
        if stat is None or stat.shape != w.shape or stat.dtype != compute_dtype(w.dtype):
            raise ValueError(
                f"the RMSProp statistic must be {tuple(w.shape)} of {compute_dtype(w.dtype)}, got "
                f"{None if stat is None else (tuple(stat.shape), stat.dtype)}"
            )
    if mask is not None and mask.shape != w.shape[1:]:
        raise ValueError(f"mask must be [{w.shape[1]}], got {tuple(mask.shape)}")
    for name, t in (("w", w), ("grad", grad), ("w_star", w_star), ("stat", stat), ("mask", mask)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")


def reference_update(
    w: torch.Tensor,
    grad: torch.Tensor,
    w_star: torch.Tensor,
    stat: torch.Tensor | None,
    *,
    lr: float | torch.Tensor,
    nbeta: float | torch.Tensor,
    gamma: float | torch.Tensor,
    settings: SamplerSettings,
    counters: StepCounters,
    seed: int,
    chain_ids: torch.Tensor,
    mask: torch.Tensor | None = None,
    index_offset: int = 0,
) -> None:
    """Apply one sampler step in place to ``w`` [C, N] (and ``stat`` [C, N]).

    grad: [C, N] gradient of the mean minibatch loss, same dtype as w. w_star: [N], shared.
    stat: [C, N] RMSProp statistic V (float32, float64 for float64 weights) or None for SGLD.
    lr, nbeta, gamma: scalars or [C] per-chain values. chain_ids: [C] int64 chain indices.
    mask: [N] of 0/1 or None. index_offset: global index of element 0 (a shard's offset).
    """
    check_update_args(w, grad, w_star, stat, mask, settings)
    num_chains, n = w.shape
    cdt = compute_dtype(w.dtype)
    lr_c, nbeta_c, gamma_c = (per_chain(v, num_chains, w.device, cdt)[:, None] for v in (lr, nbeta, gamma))
    chain_ids = chain_ids.to(device=w.device, dtype=torch.int64)
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
        drift = nbeta_c * g + gamma_c * (wc - ws)
        if settings.weight_decay:
            drift = drift + settings.weight_decay * wc
        xi = philox.gaussian_noise(seed, chain_ids, counters.step, index_offset + lo, hi - lo).to(cdt)
        delta = -(0.5 * lr_c) * precond * drift + settings.noise_level * torch.sqrt(lr_c * precond) * xi
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


# --- several segments in one call (a sharded rank's local shards) --------------------------------


def check_segments(segments, w_star, stat, mask, settings: SamplerSettings) -> list[tuple]:
    """Check the arguments of a multi-segment update; returns the segments as a list of
    (w, grad, local_start, global_offset) with ints. Raises ValueError naming what is wrong.

    segments: (w_k [C, n_k], grad_k [C, n_k], local_start_k, global_offset_k); w_star [N_local],
    stat [C, N_local] (or None for SGLD), mask [N_local] or None. Segment k occupies
    [local_start_k, local_start_k + n_k) of the flat buffers; the ranges must not overlap.
    """
    segs = []
    for k, seg in enumerate(segments):
        try:
            w, grad, local_start, global_offset = seg
        except (TypeError, ValueError):
            raise ValueError(f"segment {k} must be (w, grad, local_start, global_offset)") from None
        segs.append((w, grad, int(local_start), int(global_offset)))
    if w_star.ndim != 1:
        raise ValueError(f"w_star must be the flat [N_local] buffer, got shape {tuple(w_star.shape)}")
    n_local = w_star.shape[0]
    chains = segs[0][0].shape[0] if segs and segs[0][0].ndim == 2 else None
    ranges = []
    for k, (w, grad, start, offset) in enumerate(segs):
        if w.ndim != 2 or w.shape[0] != chains:
            raise ValueError(f"segment {k}: w must be [{chains}, n], got shape {tuple(w.shape)}")
        if w.dtype != w_star.dtype:
            raise ValueError(f"segment {k}: w is {w.dtype} but w_star is {w_star.dtype}")
        n = w.shape[1]
        if not (0 <= start and start + n <= n_local):
            raise ValueError(f"segment {k}: local range [{start}, {start + n}) is outside w_star's [0, {n_local})")
        if offset < 0:
            raise ValueError(f"segment {k}: global_offset must be >= 0, got {offset}")
        if w.dtype not in SUPPORTED_PARAM_DTYPES:
            raise ValueError(f"parameters must be float32, float64 or bfloat16, got {w.dtype}")
        if grad.shape != w.shape or grad.dtype != w.dtype:
            raise ValueError(f"segment {k}: grad must match w ({tuple(w.shape)}, {w.dtype}), got "
                             f"{tuple(grad.shape)}, {grad.dtype}")
        if not (w.is_contiguous() and grad.is_contiguous()):
            raise ValueError(f"segment {k}: w and grad must be contiguous")
        ranges.append((start, start + n, k))
    ranges.sort()
    for (_, e0, k0), (s1, _, k1) in zip(ranges, ranges[1:]):
        if s1 < e0:
            raise ValueError(f"segments {k0} and {k1} overlap in the local buffers")
    if settings.preconditioned:
        if stat is None or stat.ndim != 2 or (segs and stat.shape[0] != chains) or stat.shape[1] != n_local:
            raise ValueError(f"stat must be [C, {n_local}], got {None if stat is None else tuple(stat.shape)}")
        if stat.dtype != compute_dtype(w_star.dtype) or not stat.is_contiguous():
            raise ValueError(f"stat must be contiguous {compute_dtype(w_star.dtype)}, got {stat.dtype}")
    if mask is not None and (mask.shape != (n_local,) or not mask.is_contiguous()):
        raise ValueError(f"mask must be a contiguous [{n_local}], got {tuple(mask.shape)}")
    if not w_star.is_contiguous():
        raise ValueError("w_star must be contiguous")
    return segs


def segments_by_loop(update):
    """The multi-segment update made of one call of the single-buffer ``update`` per segment (the
    definition of the multi-segment semantics, and the fallback of a backend without its own)."""

    def update_segments(segments, w_star, stat, *, lr, nbeta, gamma, settings, counters, seed, chain_ids,
                        mask=None) -> None:
        segs = check_segments(segments, w_star, stat, mask, settings)
        for w, grad, start, offset in segs:
            n = w.shape[1]
            sl = slice(start, start + n)
            st = None
            if settings.preconditioned:
                st = stat[:, sl]
                if not st.is_contiguous():
                    st = st.contiguous()
            update(w, grad, w_star[sl], st, lr=lr, nbeta=nbeta, gamma=gamma, settings=settings, counters=counters,
                   seed=seed, chain_ids=chain_ids, mask=None if mask is None else mask[sl], index_offset=offset)
            if st is not None and st.data_ptr() != stat[:, sl].data_ptr():
                stat[:, sl].copy_(st)

    update_segments.__name__ = f"{getattr(update, '__name__', 'update')}_segments_by_loop"
    return update_segments


#: The multi-segment reference: ``reference_update`` once per segment (w*, stat and mask sliced to the
#: segment's local range, ``index_offset`` = its global offset).
reference_update_segments = segments_by_loop(reference_update)
reference_update.update_segments = reference_update_segments
