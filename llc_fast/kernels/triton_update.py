"""The "triton" backend: the update as one Triton launch over all chains (kernels: ``triton_kernels.py``).

Tensors on a CUDA device, or anywhere with TRITON_INTERPRET=1 (the tests). A single buffer
goes to the kernel whose LEAD (index_offset mod 4) is a constant, so its loads are known to be
aligned; several segments go to the segments kernel, which reads a small int64 table (one row
per segment: pointers as integers, n, local start, global offset, first block) copied to the
device when prepared and again when a gradient pointer changes, and finds its segment by a binary
search over the first blocks.

Hyperparameters. Python numbers go to the kernel as float32 scalars (no host-to-device copy
per step); per-chain tensors as a [3, C] device tensor. For float64 weights every value goes
through a float64 device tensor, since Triton passes Python floats as float32. Chain indices
given on the host as a contiguous range go as their first index (no tensor).

A prepared update (``TritonPrepared``) builds all of that once; a launch adds the step, the seed
and the statistic's scale (for float64 weights a new settings table only when the scale changes).

This module imports without triton; ``load()`` and the first launch import the kernels.
"""
from __future__ import annotations

import os

import torch

from . import native
from .backend import Backend, PreparedUpdate
from .update_call import UpdateCall
from .update_spec import NOISE_SCHEMES, RowMasks, StepCounters

# Quads (four elements each) per program: 256 quads = 1024 elements with 8 warps on a GPU; the
# interpreter pays per program, so it takes up to 16384 quads = 65536 elements at once.
GPU_QUADS = 256
GPU_NUM_WARPS = 8
INTERPRETER_QUADS = 16384
MAX_PROGRAMS = 2**31 - 1
#: Global element indices stay below this (the segment table's padding rows start at block 2**62).
MAX_GLOBAL_INDEX = 2**62


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _f32(value: float) -> float:
    """A Python float rounded to float32 (as torch and the kernel's float32 argument both do)."""
    return float(torch.tensor(float(value), dtype=torch.float32))


def _tiling(call: UpdateCall) -> tuple[int, list[int]]:
    """(quads per program, programs per chain of each segment)."""
    seg_quads = [(s.global_offset % 4 + s.n + 3) // 4 for s in call.segments]
    if _interpreting():
        quads = min(INTERPRETER_QUADS, max(16, 1 << (max(seg_quads, default=1) - 1).bit_length()))
    else:
        quads = GPU_QUADS
    return quads, [-(-ng // quads) for ng in seg_quads]


def _chain_args(call: UpdateCall) -> tuple[torch.Tensor | None, int]:
    """(device tensor or None, base): a contiguous range base..base+C-1 on the host needs no tensor."""
    ids = call.chain_ids
    if ids.device.type == "cpu":
        base = int(ids[0])
        if torch.equal(ids, base + torch.arange(call.num_rows, dtype=torch.int64)):
            return None, base
    return ids.to(call.device).contiguous(), 0


def _hyper_args(call: UpdateCall) -> tuple[torch.Tensor | None, list[float], list[float]]:
    """(hp [3, C] or None, (lr, nbeta, gamma) scalars, the 7 setting values (float64) with the statistic's
    scale, index 2, at 1.0: ``_settings_args`` makes a step's)."""
    is_f64 = call.dtype == torch.float64
    if not is_f64 and all(isinstance(v, (int, float)) for v in (call.lr, call.nbeta, call.gamma)):
        hp, scalars = None, [_f32(v) for v in (call.lr, call.nbeta, call.gamma)]
    else:
        hp, scalars = torch.stack(call.per_row_values()), [0.0] * 3
    s = call.settings
    values = [s.rmsprop_alpha, 1.0 - s.rmsprop_alpha, 1.0, s.rmsprop_eps, s.weight_decay,
              s.box if s.box is not None else 0.0, s.noise_level]
    return hp, scalars, values


_SCALE = 2  # the statistic's scale among the setting values


def _settings_args(values: list[float], scale: float, is_f64: bool,
                   device: torch.device) -> tuple[torch.Tensor | None, list[float]]:
    """(sp [7] float64 on the device or None, the 7 setting scalars) with the statistic's scale ``scale``:
    float64 weights take every value from the float64 table (Triton passes Python floats as float32)."""
    values = values.copy()
    values[_SCALE] = scale
    if is_f64:
        return torch.tensor(values, dtype=torch.float64).to(device), [0.0] * len(values)
    return None, [_f32(v) for v in values]


def _row_mask_args(call: UpdateCall) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A RowMasks's (buffer, each row's (lo, hi, offset) as int64 [C, 3] on the device), else None."""
    mask = call.mask
    if not isinstance(mask, RowMasks):
        return None
    buffer = mask.buffer if mask.buffer.numel() else torch.zeros(1, dtype=torch.uint8, device=call.device)
    return buffer, mask.row_windows().to(call.device)


def _mask_arg(call: UpdateCall) -> torch.Tensor | None:
    mask = call.mask
    if mask is None or isinstance(mask, RowMasks):
        return None
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8)
    if mask.dtype in (torch.bfloat16, torch.float16):  # no half-precision loads in the kernel
        return mask.to(call.compute_dtype)
    return mask


class TritonPrepared(PreparedUpdate):
    """The launch arguments, built once: tiling, chain indices, per-chain values, mask, flags, the segment
    table (on the device for CUDA, copied again only when a gradient pointer changes); a launch adds the
    step's settings scalars (the statistic's scale, cached per value), seed and step."""

    def __init__(self, backend: "TritonBackend", call: UpdateCall):
        super().__init__(backend, call)
        from . import triton_kernels as kernels

        s, num_rows = call.settings, call.num_rows
        is_bf16 = call.dtype == torch.bfloat16
        self.is_f64 = call.dtype == torch.float64
        quads, blocks = _tiling(call)
        chain_tensor, chain_base = _chain_args(call)
        hp, hyper, self.values = _hyper_args(call)
        mask, row_masks = _mask_arg(call), _row_mask_args(call)
        self.bits = bits = (lambda t: t.view(torch.int16)) if is_bf16 else (lambda t: t)  # bf16 as int16 patterns
        self.w_star = dummy = bits(call.w_star)
        m_arg, rw_arg = row_masks if row_masks is not None else (mask if mask is not None else dummy, dummy)
        self.head = [call.stat if call.stat is not None else dummy, m_arg, rw_arg, hp if hp is not None else dummy]
        self.chain = [chain_tensor if chain_tensor is not None else dummy, *hyper]
        self.keep = (chain_tensor, hp, mask, row_masks)
        self.dummy, self.seed, self.sp_cache = dummy, call.seed, (None, None)
        flags = dict(PRECOND=s.preconditioned, HAS_WD=s.weight_decay != 0.0, HAS_BOX=s.box is not None,
                     HAS_MASK=mask is not None, ROW_MASK=row_masks is not None, HP_PTR=hp is not None, SP_PTR=self.is_f64,
                     CHAIN_PTR=chain_tensor is not None, IS_BF16=is_bf16, IS_F64=self.is_f64,
                     LM=s.noise_scheme == "lm", num_warps=GPU_NUM_WARPS)
        self.flags = {update: dict(flags, UPDATE_V=s.preconditioned and update) for update in (False, True)}
        if call.single:
            (seg,) = call.segments
            self.kernel = kernels.sgld_update_kernel[(blocks[0] * num_rows,)]
            self.w, self.table = bits(seg.w), None
            self.tail = [seg.n, seg.global_offset // 4, chain_base, num_rows]
            self.consts = dict(QUADS=quads, LEAD=seg.global_offset % 4)
            return
        rows, first = [], 0
        for seg, b in zip(call.segments, blocks):
            rows.append([seg.w.data_ptr(), seg.grad.data_ptr(), seg.n, seg.local_start, seg.global_offset, first])
            first += b
        search_steps = max(1, (len(rows) - 1).bit_length())
        rows += [[0, 0, 0, 0, 0, 2**62]] * ((1 << search_steps) - len(rows))
        self.host_table = torch.tensor(rows, dtype=torch.int64)
        self.pointers = native.GradPointers(self.host_table)
        self.table = self._device_table()
        self.kernel = kernels.sgld_update_segments_kernel[(first * num_rows,)]
        self.tail = [call.n_local, chain_base, num_rows]
        self.consts = dict(QUADS=quads, SEARCH_STEPS=search_steps)

    def _device_table(self) -> torch.Tensor:
        """The segment table where the kernel reads it (a new device copy on CUDA: the last may still be read)."""
        if self.call.device.type == "cuda":
            return self.host_table.pin_memory().to(self.call.device, non_blocking=True)
        return self.host_table

    def _settings(self, counters: StepCounters) -> tuple[torch.Tensor | None, list[float]]:
        s = self.call.settings
        scale = s.statistic_scale(counters.stat_step) if s.preconditioned else 1.0
        cached_scale, cached = self.sp_cache
        if cached_scale != scale:
            cached = _settings_args(self.values, scale, self.is_f64, self.call.device)
            self.sp_cache = (scale, cached)
        return cached

    def launch_step(self, counters: StepCounters, step: int) -> None:
        sp, values = self._settings(counters)
        shared = [*self.head, sp if sp is not None else self.dummy, *self.chain, *values, self.seed, step]
        flags = self.flags[bool(counters.update_statistic)]
        if self.table is None:
            self.kernel(self.w, self.bits(self.grads[0]), self.w_star, *shared, *self.tail, **self.consts, **flags)
            return
        if self.pointers.update(self.grads) and self.call.device.type == "cuda":
            self.table = self._device_table()
        self.kernel(self.table, self.w_star, *shared, *self.tail, **self.consts, **flags)


class TritonBackend(Backend):
    """The Triton kernels (see the module docstring; ``TritonPrepared`` holds the launch arguments)."""

    name = "triton"
    noise_schemes = NOISE_SCHEMES

    @property
    def devices(self) -> tuple[str, ...]:
        return ("cuda", "cpu") if _interpreting() else ("cuda",)

    def load(self) -> None:
        from . import triton_kernels  # noqa: F401  (ImportError without triton)

    def not_supported_reasons(self, call: UpdateCall) -> list[str]:
        reasons = super().not_supported_reasons(call)
        for k, s in enumerate(call.segments):
            if s.global_offset + s.n > MAX_GLOBAL_INDEX:
                reasons.append(f"global element indices must stay below 2**62, got segment {k} at offset "
                               f"{s.global_offset} with {s.n} elements")
        if call.segments and sum(_tiling(call)[1]) * call.num_rows > MAX_PROGRAMS:
            reasons.append(f"{call.num_rows} chains x {sum(s.n for s in call.segments)} elements exceed one "
                           f"launch ({MAX_PROGRAMS} programs)")
        return reasons

    def prepare_call(self, call: UpdateCall) -> PreparedUpdate:
        return TritonPrepared(self, call)


triton_update = TritonBackend()
