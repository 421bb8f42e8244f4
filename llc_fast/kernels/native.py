"""What the compiled kernels of ``csrc/`` (the C++ and CUDA backends) take: one ``UpdateArgs``, the
mirror of the C struct ``UpdateArgs`` in ``csrc/sgld_update.h`` (same fields, same order), passed by
address to every update entry point. Adding an argument is one field there and one here (and its
value in ``kernel_args``). ``NativeCall`` fills one for a prepared update: built once, the step's
scalars set per launch."""
from __future__ import annotations

import ctypes

import torch

from .update_call import UpdateCall
from .update_spec import SAMPLERS, RowMasks, StepCounters

#: Codes the kernels take for the weights' dtype (bfloat16 is passed as its uint16 bits).
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2}
SAMPLER_CODES = {name: code for code, name in enumerate(SAMPLERS)}


class UpdateArgs(ctypes.Structure):
    """``UpdateArgs`` of ``csrc/sgld_update.h``, field for field (its comments say what each holds).
    Pointers are integers (0 for null); host scalars are float64, rounded once by the kernel."""

    _fields_ = [
        ("segments", ctypes.c_void_p),
        ("num_segments", ctypes.c_int64),
        ("total_blocks", ctypes.c_int64),
        ("w_star", ctypes.c_void_p),
        ("stat", ctypes.c_void_p),
        ("mask", ctypes.c_void_p),
        ("row_windows", ctypes.c_void_p),
        ("row_mask", ctypes.c_void_p),
        ("lr", ctypes.c_void_p),
        ("nbeta", ctypes.c_void_p),
        ("gamma", ctypes.c_void_p),
        ("chain_ids", ctypes.c_void_p),
        ("num_rows", ctypes.c_int64),
        ("n_local", ctypes.c_int64),
        ("seed", ctypes.c_uint64),
        ("step", ctypes.c_uint64),
        ("stat_scale", ctypes.c_double),
        ("sampler", ctypes.c_int32),
        ("update_statistic", ctypes.c_bool),
        ("has_mask", ctypes.c_bool),
        ("has_box", ctypes.c_bool),
        ("lm_noise", ctypes.c_bool),
        ("alpha", ctypes.c_double),
        ("one_minus_alpha", ctypes.c_double),
        ("eps", ctypes.c_double),
        ("weight_decay", ctypes.c_double),
        ("box", ctypes.c_double),
        ("noise_level", ctypes.c_double),
        ("dtype", ctypes.c_int32),
        ("num_threads", ctypes.c_int32),
        ("stream", ctypes.c_uint64),
    ]


def check_layout(size: int, where: str) -> None:
    """RuntimeError unless ``UpdateArgs`` has the size ``size`` that the compiled struct reports."""
    if ctypes.sizeof(UpdateArgs) != size:
        raise RuntimeError(f"{where}: the C struct UpdateArgs is {size} bytes but its mirror native.UpdateArgs is "
                           f"{ctypes.sizeof(UpdateArgs)}: csrc/sgld_update.h and native.py disagree")


def _mask_buffers(call: UpdateCall):
    """(mask as uint8 or None, row_windows or None, row_mask or None) on the call's device."""
    mask, row_windows, row_mask = call.mask, None, None
    if isinstance(mask, RowMasks):  # each row's (lo, hi, offset) resolved on the host, and the buffer
        row_windows = mask.row_windows().to(call.device)
        row_mask = mask.buffer if mask.buffer.numel() else torch.zeros(1, dtype=torch.uint8, device=call.device)
        mask = None
    if mask is not None:
        mask = mask.view(torch.uint8) if mask.dtype == torch.bool else (
            mask if mask.dtype == torch.uint8 else (mask != 0).to(torch.uint8))
    return mask, row_windows, row_mask


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def kernel_args(call: UpdateCall) -> tuple[UpdateArgs, tuple]:
    """(args, keep): the ``UpdateArgs`` of ``call`` but its segments (``segments``, ``num_segments``,
    ``total_blocks``), ``num_threads`` and ``stream``, which the backend sets, and the step's scalars
    (``step``, ``stat_scale``, ``update_statistic``: ``NativeCall.at``); ``keep`` holds the
    temporaries the pointers point into (alive until the kernel has run).

    The mask goes as uint8 (nonzero = 1); a ``RowMasks`` as ``row_windows`` (int64 [C, 3], each row's
    (lo, hi, offset), offset -1 for an unrestricted row) and ``row_mask`` (its buffer), with
    ``mask`` 0 and has_mask false. The per-row values as [C] of the compute dtype, the chain indices
    as int64 [C], all on the call's device.
    """
    s = call.settings
    mask, row_windows, row_mask = _mask_buffers(call)
    ids = call.chain_ids.to(call.device).contiguous()
    lr, nbeta, gamma = call.per_row_values()
    args = UpdateArgs(
        w_star=call.w_star.data_ptr(), stat=_ptr(call.stat), mask=_ptr(mask), row_windows=_ptr(row_windows),
        row_mask=_ptr(row_mask), lr=lr.data_ptr(), nbeta=nbeta.data_ptr(), gamma=gamma.data_ptr(),
        chain_ids=ids.data_ptr(), num_rows=call.num_rows, n_local=call.n_local, seed=call.seed,
        sampler=SAMPLER_CODES[s.sampler], has_mask=mask is not None, has_box=s.box is not None,
        lm_noise=s.noise_scheme == "lm", alpha=float(s.rmsprop_alpha),
        one_minus_alpha=1.0 - s.rmsprop_alpha, eps=float(s.rmsprop_eps), weight_decay=float(s.weight_decay),
        box=float(s.box) if s.box is not None else 0.0, noise_level=float(s.noise_level), dtype=DTYPE_CODES[call.dtype])
    return args, (ids, mask, row_windows, row_mask, lr, nbeta, gamma)


class NativeCall:
    """``kernel_args`` of a prepared call, once: ``args`` (the ``UpdateArgs``; ``address`` is where it
    lives, for the entry points) and ``keep`` (what its pointers point into, alive with this object);
    ``at(counters, step)`` sets a step's scalars."""

    def __init__(self, call: UpdateCall):
        self.args, self.keep = kernel_args(call)
        self.address = ctypes.addressof(self.args)
        self.settings = call.settings

    def at(self, counters: StepCounters, step: int) -> UpdateArgs:
        """The arguments at ``counters`` (``step``: counters.step, checked)."""
        s, args = self.settings, self.args
        args.step = step
        args.stat_scale = s.statistic_scale(counters.stat_step) if s.preconditioned else 1.0
        args.update_statistic = bool(counters.update_statistic)
        return args


class GradPointers:
    """The grad pointers of a prepared call's segment table (column 1 of ``segment_table``'s host rows),
    kept up to date with a prepared update's gradients."""

    def __init__(self, table: torch.Tensor):
        self.rows = table.numpy()  # shares the table's memory
        self.ptrs = [int(p) for p in table[:, 1].tolist()]

    def update(self, grads) -> bool:
        """Write the pointers of ``grads`` (one per row) into the table; whether any changed."""
        changed = False
        for k, g in enumerate(grads):
            p = g.data_ptr()
            if p != self.ptrs[k]:
                self.ptrs[k] = p
                self.rows[k, 1] = p
                changed = True
        return changed


def segment_table(call: UpdateCall) -> torch.Tensor:
    """The kernels' segment table (``Segment`` in ``csrc/sgld_update.h``): int64 [S, 5] on the host,
    rows (w pointer, grad pointer, n, local_start, global_offset)."""
    return torch.tensor([[s.w.data_ptr(), s.grad.data_ptr(), s.n, s.local_start, s.global_offset]
                         for s in call.segments], dtype=torch.int64)
