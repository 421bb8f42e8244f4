"""What the compiled kernels of ``csrc/`` (the C++ and CUDA backends) take: an ``UpdateCall`` as
raw pointers, codes and host scalars, the fields of ``UpdateArgs`` in ``csrc/sgld_update.h``
(``kernel_args``; ``NativeCall`` for a prepared update: built once, the step's scalars per launch)."""
from __future__ import annotations

import torch

from .backend import UpdateCall
from .update_spec import SAMPLERS, RowMasks, StepCounters

#: Codes the kernels take for the weights' dtype (bfloat16 is passed as its uint16 bits).
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2}
SAMPLER_CODES = {name: code for code, name in enumerate(SAMPLERS)}
#: The buffers every entry takes, in the order of their C signatures.
BUFFERS = ("w_star", "stat", "mask", "row_windows", "row_mask", "lr", "nbeta", "gamma", "chain_ids", "num_chains")
#: The scalars every entry takes, in the order of their C signatures (host float64: the kernel
#: rounds them once to its compute type).
SCALARS = ("seed", "step", "stat_scale", "sampler", "update_statistic", "has_mask", "has_box", "alpha",
           "one_minus_alpha", "eps", "weight_decay", "box", "noise_level")


def kernel_args(call: UpdateCall) -> tuple[dict, tuple]:
    """(arguments, keep): the ``BUFFERS`` (pointers as ints) and ``SCALARS`` of ``call``, plus
    ``dtype``; ``keep`` holds the temporaries the pointers point into (alive until the kernel has run).

    The mask goes as uint8 (nonzero = 1); a ``RowMasks`` as ``row_windows`` (int64 [C, 3], each row's
    (lo, hi, offset), offset -1 for an unrestricted row) and ``row_mask`` (its buffer), with
    ``mask`` 0 and has_mask false. The per-chain values as [C] of the compute dtype, the
    chain indices as int64 [C], all on the call's device.
    """
    s = call.settings
    mask, row_windows, row_mask = call.mask, None, None
    if isinstance(mask, RowMasks):  # each row's (lo, hi, offset) resolved on the host, and the buffer
        row_windows = mask.row_windows().to(call.device)
        row_mask = mask.buffer if mask.buffer.numel() else torch.zeros(1, dtype=torch.uint8, device=call.device)
        mask = None
    if mask is not None:
        mask = mask.view(torch.uint8) if mask.dtype == torch.bool else (
            mask if mask.dtype == torch.uint8 else (mask != 0).to(torch.uint8))
    ids = call.chain_ids.to(call.device).contiguous()
    lr, nbeta, gamma = call.per_chain_values()
    args = dict(
        w_star=call.w_star.data_ptr(),
        stat=call.stat.data_ptr() if call.stat is not None else 0,
        mask=mask.data_ptr() if mask is not None else 0,
        row_windows=row_windows.data_ptr() if row_windows is not None else 0,
        row_mask=row_mask.data_ptr() if row_mask is not None else 0,
        lr=lr.data_ptr(),
        nbeta=nbeta.data_ptr(),
        gamma=gamma.data_ptr(),
        chain_ids=ids.data_ptr(),
        num_chains=call.num_chains,
        seed=call.seed,
        step=call.step,
        stat_scale=s.statistic_scale(call.counters.stat_step) if s.preconditioned else 1.0,
        sampler=SAMPLER_CODES[s.sampler],
        update_statistic=bool(call.counters.update_statistic),
        has_mask=mask is not None,
        has_box=s.box is not None,
        alpha=float(s.rmsprop_alpha),
        one_minus_alpha=1.0 - s.rmsprop_alpha,
        eps=float(s.rmsprop_eps),
        weight_decay=float(s.weight_decay),
        box=float(s.box) if s.box is not None else 0.0,
        noise_level=float(s.noise_level),
        dtype=DTYPE_CODES[call.dtype],
    )
    return args, (ids, mask, row_windows, row_mask, lr, nbeta, gamma)


#: The scalars that change from one step to the next (``NativeCall.scalars_at``).
_STEP, _STAT_SCALE, _UPDATE_STATISTIC = (SCALARS.index(k) for k in ("step", "stat_scale", "update_statistic"))


class NativeCall:
    """``kernel_args`` of a prepared call, once: ``buffers`` (the ``BUFFERS``' values, in order),
    ``dtype``, ``keep`` (what the pointers point into, alive with this object), and the ``SCALARS``
    of a step from ``scalars_at``."""

    def __init__(self, call: UpdateCall):
        args, self.keep = kernel_args(call)
        self.buffers = [args[k] for k in BUFFERS]
        self._scalars = [args[k] for k in SCALARS]
        self.dtype = args["dtype"]
        self._settings = call.settings

    def scalars_at(self, counters: StepCounters, step: int) -> list:
        """The ``SCALARS``' values at ``counters`` (``step``: counters.step, checked), as ``kernel_args`` makes them."""
        s = self._settings
        scalars = self._scalars.copy()
        scalars[_STEP] = step
        scalars[_STAT_SCALE] = s.statistic_scale(counters.stat_step) if s.preconditioned else 1.0
        scalars[_UPDATE_STATISTIC] = bool(counters.update_statistic)
        return scalars


class GradPointers:
    """The grad pointers of a prepared call's segment table (column 1 of ``segment_table``'s host rows),
    kept up to date with a prepared update's gradients."""

    def __init__(self, table: torch.Tensor):
        self._rows = table.numpy()  # shares the table's memory
        self._ptrs = [int(p) for p in table[:, 1].tolist()]

    def update(self, grads) -> bool:
        """Write the pointers of ``grads`` (one per row) into the table; whether any changed."""
        changed = False
        for k, g in enumerate(grads):
            p = g.data_ptr()
            if p != self._ptrs[k]:
                self._ptrs[k] = p
                self._rows[k, 1] = p
                changed = True
        return changed


def segment_table(call: UpdateCall) -> torch.Tensor:
    """The kernels' segment table (``Segment`` in ``csrc/sgld_update.h``): int64 [S, 5] on the host,
    rows (w pointer, grad pointer, n, local_start, global_offset)."""
    return torch.tensor([[s.w.data_ptr(), s.grad.data_ptr(), s.n, s.local_start, s.global_offset]
                         for s in call.segments], dtype=torch.int64)
