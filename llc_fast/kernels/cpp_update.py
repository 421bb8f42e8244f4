"""The "cpu" backend: the update as C++ with OpenMP over (segment, chain, block of groups), one pass
over memory (``csrc/sgld_update_cpu.cpp``, built on first use by ``build.cpu_extension``).

Agreement with the reference: the Philox words and uniforms are bit-exact; the normals come
from the kernel's own vectorized float32 log and sin/cos (polynomials) and are within about
1e-6 of the reference's (tested within 1e-5, docs/noise.md); everything else is the same
sequence of correctly rounded operations (compiled with ``-ffp-contract=off``, never
``-ffast-math``), so the weights differ by at most about ``noise_level * sqrt(lr * G) * 1e-5``
plus a few ulps, and the statistic V is bit-exact.

``cpu_update`` is the backend object: ``cpu_update(w, grad, w_star, stat, ...)`` and
``cpu_update.update_segments(...)`` (``backend.Backend``'s entry points) for CPU tensors.
"""
from __future__ import annotations

from types import ModuleType

import torch

from . import build, native
from .backend import Backend, PreparedUpdate, UpdateCall
from .build import CPU_CFLAGS, CPU_LDFLAGS, DEFAULT_MARCH, EXTENSION_NAME, cpu_build_config, csrc_dir  # noqa: F401
from .update_spec import StepCounters

#: Elements per OpenMP thread: the kernel uses up to torch.get_num_threads() threads, one per
#: ELEMENTS_PER_THREAD weights (waking threads for a small model costs more than the update).
ELEMENTS_PER_THREAD = 1 << 15


def load_cpu_extension() -> ModuleType:
    """The compiled module (``build.cpu_extension``); RuntimeError saying what is missing if it cannot be built."""
    return build.cpu_extension()


#: The kernels' positional arguments (the pybind11 signatures in ``csrc/sgld_update_cpu.cpp``).
SINGLE_ARGS = ("w", "grad", *native.BUFFERS, "n", *native.SCALARS, "index_offset", "dtype", "num_threads")
SEGMENTS_ARGS = ("segments", "num_segments", *native.BUFFERS, "n_local", *native.SCALARS, "dtype", "num_threads")


class _CpuPrepared(PreparedUpdate):
    """The C++ kernel's arguments, built once (``native.NativeCall``, the segment table); a launch sets the
    step's scalars and the gradient pointers and makes one call with positional arguments."""

    def __init__(self, backend: "CpuBackend", call: UpdateCall):
        super().__init__(backend, call)
        ext = load_cpu_extension()
        self.args = native.NativeCall(call)
        self.numel = call.numel
        if call.single:
            (seg,) = call.segments
            self.fn, self.table, self.pointers = ext.sgld_update, None, None
            self.w_ptr, self.size, self.tail = seg.w.data_ptr(), seg.n, (seg.global_offset, self.args.dtype)
        else:
            self.fn, self.table = ext.sgld_update_segments, native.segment_table(call)
            self.pointers = native.GradPointers(self.table)
            self.head, self.size, self.tail = (self.table.data_ptr(), len(self.table)), call.n_local, (self.args.dtype,)

    def _launch(self, counters: StepCounters, step: int) -> None:
        threads = max(1, min(torch.get_num_threads(), self.numel // ELEMENTS_PER_THREAD))
        scalars = self.args.scalars_at(counters, step)
        if self.table is None:
            self.fn(self.w_ptr, self.grads[0].data_ptr(), *self.args.buffers, self.size, *scalars, *self.tail, threads)
        else:
            self.pointers.update(self.grads)
            self.fn(*self.head, *self.args.buffers, self.size, *scalars, *self.tail, threads)


class CpuBackend(Backend):
    """The C++ kernel on CPU tensors: one call of ``sgld_update`` for a single buffer, else one
    call of ``sgld_update_segments`` over the segment table (the same arithmetic per element);
    ``_CpuPrepared`` holds the arguments."""

    name = "cpu"
    devices = ("cpu",)

    def load(self) -> None:
        load_cpu_extension()

    def prepare_call(self, call: UpdateCall) -> PreparedUpdate:
        return _CpuPrepared(self, call)


cpu_update = CpuBackend()


def load_cpu_update() -> CpuBackend:
    """Build (once) and return ``cpu_update``; RuntimeError saying what is missing if it cannot be built."""
    cpu_update.load()
    return cpu_update
