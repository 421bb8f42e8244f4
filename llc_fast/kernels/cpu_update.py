"""The "cpu" backend: the update as C++ with OpenMP over (segment, chain row, block of quads), one
pass over memory (``csrc/sgld_update_cpu.cpp``, built on first use by ``build.cpu_extension``).

Agreement with the reference: the Philox words and uniforms are bit-exact; the normals come
from the kernel's own vectorized float32 log and sin/cos (polynomials) and are within about
1e-6 of the reference's (tested within 1e-5, docs/noise.md); everything else is the same
sequence of correctly rounded operations (compiled with ``-ffp-contract=off``, never
``-ffast-math``), so the weights differ by at most about ``noise_level * sqrt(lr * G) * 1e-5``
plus a few ulps, and the statistic V is bit-exact.

``cpu_update`` is the backend object (``backend.Backend``: ``prepare`` and ``update``) for CPU
tensors. One entry point, ``sgld_update(address of a native.UpdateArgs)``, runs every update over
a host segment table (a single buffer is its one row).
"""
from __future__ import annotations

from types import ModuleType

import torch

from . import build, native
from .backend import Backend, PreparedUpdate
from .build import CPU_CFLAGS, CPU_LDFLAGS, DEFAULT_MARCH, EXTENSION_NAME, cpu_build_config, csrc_dir  # noqa: F401
from .update_call import UpdateCall
from .update_spec import NOISE_SCHEMES, StepCounters

#: Elements per OpenMP thread: the kernel uses up to torch.get_num_threads() threads, one per
#: ELEMENTS_PER_THREAD weights (waking threads for a small model costs more than the update).
ELEMENTS_PER_THREAD = 1 << 15


def load_cpu_extension() -> ModuleType:
    """The compiled module (``build.cpu_extension``); RuntimeError saying what is missing if it cannot be built."""
    ext = build.cpu_extension()
    native.check_layout(ext.UPDATE_ARGS_SIZE, "the C++ update")
    return ext


class CpuPrepared(PreparedUpdate):
    """The C++ kernel's arguments, built once (``native.NativeCall``, the segment table); a launch sets the
    step's scalars, the thread count and the gradient pointers and makes one call."""

    def __init__(self, backend: "CpuBackend", call: UpdateCall):
        super().__init__(backend, call)
        self.fn = load_cpu_extension().sgld_update
        self.native = native.NativeCall(call)
        self.numel = call.numel
        self.table = native.segment_table(call)
        self.pointers = native.GradPointers(self.table)
        self.native.args.segments = self.table.data_ptr()
        self.native.args.num_segments = len(self.table)

    def launch_step(self, counters: StepCounters, step: int) -> None:
        args = self.native.at(counters, step)
        args.num_threads = max(1, min(torch.get_num_threads(), self.numel // ELEMENTS_PER_THREAD))
        self.pointers.update(self.grads)
        self.fn(self.native.address)


class CpuBackend(Backend):
    """The C++ kernel on CPU tensors: one call of ``sgld_update`` over the segment table (a single
    buffer is one segment); ``CpuPrepared`` holds the arguments."""

    name = "cpu"
    devices = ("cpu",)
    noise_schemes = NOISE_SCHEMES

    def load(self) -> None:
        load_cpu_extension()

    def prepare_call(self, call: UpdateCall) -> PreparedUpdate:
        return CpuPrepared(self, call)


cpu_update = CpuBackend()


def load_cpu_update() -> CpuBackend:
    """Build (once) and return ``cpu_update``; RuntimeError saying what is missing if it cannot be built."""
    cpu_update.load()
    return cpu_update
