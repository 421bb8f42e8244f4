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
from .backend import Backend, UpdateCall
from .build import CPU_CFLAGS, CPU_LDFLAGS, DEFAULT_MARCH, EXTENSION_NAME, cpu_build_config, csrc_dir  # noqa: F401

#: Elements per OpenMP thread: the kernel uses up to torch.get_num_threads() threads, one per
#: ELEMENTS_PER_THREAD weights (waking threads for a small model costs more than the update).
ELEMENTS_PER_THREAD = 1 << 15


def load_cpu_extension() -> ModuleType:
    """The compiled module (``build.cpu_extension``); RuntimeError saying what is missing if it cannot be built."""
    return build.cpu_extension()


class CpuBackend(Backend):
    """The C++ kernel on CPU tensors: one call of ``sgld_update`` for a single buffer, else one
    call of ``sgld_update_segments`` over the segment table (the same arithmetic per element)."""

    name = "cpu"
    devices = ("cpu",)

    def load(self) -> None:
        load_cpu_extension()

    def launch(self, call: UpdateCall) -> None:
        ext = load_cpu_extension()
        args, keep = native.kernel_args(call)
        threads = max(1, min(torch.get_num_threads(), call.numel // ELEMENTS_PER_THREAD))
        if call.single:
            (seg,) = call.segments
            ext.sgld_update(w=seg.w.data_ptr(), grad=seg.grad.data_ptr(), n=seg.n, index_offset=seg.global_offset,
                            **args, num_threads=threads)
        else:
            table = native.segment_table(call)
            ext.sgld_update_segments(segments=table.data_ptr(), num_segments=len(table), n_local=call.n_local,
                                     **args, num_threads=threads)
        del keep


cpu_update = CpuBackend()


def load_cpu_update() -> CpuBackend:
    """Build (once) and return ``cpu_update``; RuntimeError saying what is missing if it cannot be built."""
    cpu_update.load()
    return cpu_update
