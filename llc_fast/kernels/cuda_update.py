"""The "cuda" backend: the update as a CUDA kernel (``csrc/sgld_update_cuda.cu``), built with plain
nvcc by ``build.cuda_library`` and loaded with ctypes.

The kernel takes raw pointers and the stream as integers, so it needs neither torch's CUDA
headers nor ``CUDAExtension``. Built with ``--fmad=false``: every operation is rounded as in the
torch reference, so the weights differ from it only through the normals (libdevice log/cos/sin,
a few float32 ulps). ``cuda_update`` is the backend object (``backend.Backend``'s entry points)
for tensors on one CUDA device, launched on that device's current stream; ``load_cuda_update()``
raises RuntimeError, saying why, where torch has no CUDA, no GPU is visible, or nvcc is missing
or fails.
"""
from __future__ import annotations

import ctypes
import threading

import torch

from . import build, native
from .backend import Backend, PreparedUpdate, UpdateCall
from .build import CUDA_SOURCE, NVCC_FLAGS  # noqa: F401
from .update_spec import StepCounters

_LOCK = threading.Lock()
_LIBS: dict[str, ctypes.CDLL] = {}  # architecture -> loaded library


def _arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def _library(device: torch.device) -> ctypes.CDLL:
    """The CUDA update's library for ``device``'s architecture, built and loaded once."""
    arch = _arch(device)
    with _LOCK:
        if arch not in _LIBS:
            lib = ctypes.CDLL(str(build.cuda_library(arch)))
            u64, i64, i32, f64, ptr = ctypes.c_uint64, ctypes.c_int64, ctypes.c_int32, ctypes.c_double, ctypes.c_size_t
            buffers = [ptr] * 9 + [i64]  # native.BUFFERS
            scalars = [u64, u64, f64] + [i32] * 4 + [f64] * 6  # native.SCALARS
            lib.llc_sgld_update_cuda.argtypes = [ptr, ptr, *buffers, i64, *scalars, i64, i32, ptr]
            lib.llc_sgld_update_cuda.restype = ctypes.c_int
            lib.llc_sgld_update_segments_cuda.argtypes = [ptr, i64, i64, *buffers, i64, *scalars, i32, ptr]
            lib.llc_sgld_update_segments_cuda.restype = ctypes.c_int
            lib.llc_cuda_segment_block_groups.argtypes = []
            lib.llc_cuda_segment_block_groups.restype = ctypes.c_int
            lib.llc_philox_debug_cuda.argtypes = [u64, ptr, i64, u64, i64, i64, ctypes.c_uint32, ptr, ptr, ptr, ptr]
            lib.llc_philox_debug_cuda.restype = ctypes.c_int
            lib.llc_cuda_error_string.argtypes = [ctypes.c_int]
            lib.llc_cuda_error_string.restype = ctypes.c_char_p
            _LIBS[arch] = lib
        return _LIBS[arch]


def _check(lib: ctypes.CDLL, code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"{what} failed: {lib.llc_cuda_error_string(code).decode()}")


class CudaBackend(Backend):
    """The CUDA kernel: one launch of ``llc_sgld_update_cuda`` for a single buffer, else one launch
    of ``llc_sgld_update_segments_cuda``, whose blocks find their segment by a binary search over a
    table on the device (the [S, 5] rows, then the S + 1 first blocks); ``_CudaPrepared``."""

    name = "cuda"
    devices = ("cuda",)

    def load(self) -> None:
        if torch.version.cuda is None:
            raise RuntimeError(f"torch {torch.__version__} was built without CUDA; the CUDA update needs a CUDA "
                               "build of torch")
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA GPU is visible (torch.cuda.is_available() is False)")
        device = torch.device("cuda", torch.cuda.current_device())
        try:
            _library(device)
            # One tiny launch: catches a driver older than nvcc's runtime or a missing kernel image here,
            # not at the first update.
            cuda_philox_debug(0, torch.zeros(1, dtype=torch.int64, device=device), 0, 0, 4)
            torch.cuda.synchronize(device)
        except RuntimeError:
            raise
        except Exception as e:
            raise RuntimeError(f"loading the CUDA update failed: {type(e).__name__}: {e}") from e

    def prepare_call(self, call: UpdateCall) -> PreparedUpdate:
        return _CudaPrepared(self, call)


class _CudaPrepared(PreparedUpdate):
    """The CUDA kernel's arguments, built once (``native.NativeCall``; for segments the table with its
    first blocks, on the device, copied again only when a gradient pointer changes). A launch sets the
    step's scalars and launches on the device's current stream: the stream current at prepare, which
    the per-chain values and the table were copied on (or synchronise before launching on another)."""

    def __init__(self, backend: CudaBackend, call: UpdateCall):
        super().__init__(backend, call)
        self.device = device = call.device
        self.lib = lib = _library(device)
        self.args = native.NativeCall(call)
        self.n_local = call.n_local
        if call.single:
            (seg,) = call.segments
            self.table, self.w_ptr, self.size, self.offset = None, seg.w.data_ptr(), seg.n, seg.global_offset
            return
        table = native.segment_table(call)
        per_block = lib.llc_cuda_segment_block_groups()
        ns, offsets = table[:, 2], table[:, 4]
        groups = (offsets + ns - 1) // 4 + 1 - offsets // 4
        first = torch.zeros(len(table) + 1, dtype=torch.int64)
        first[1:] = torch.cumsum((groups + per_block - 1) // per_block, 0)
        self.host = torch.cat([table.reshape(-1), first])  # the [S, 5] rows, then the S + 1 first blocks
        self.pointers = native.GradPointers(self.host[:table.numel()].view(table.shape))
        self.head = (len(table), int(first[-1]))
        with torch.cuda.device(device):
            self.table = self._device_table()

    def _device_table(self) -> torch.Tensor:
        """A new device copy of the table (the last one may still be read by a kernel in flight)."""
        return self.host.pin_memory().to(self.device, non_blocking=True)

    def _launch(self, counters: StepCounters, step: int) -> None:
        lib, args = self.lib, self.args
        scalars = args.scalars_at(counters, step)
        with torch.cuda.device(self.device):
            stream = torch.cuda.current_stream(self.device).cuda_stream
            if self.table is None:
                code = lib.llc_sgld_update_cuda(self.w_ptr, self.grads[0].data_ptr(), *args.buffers, self.size,
                                                *scalars, self.offset, args.dtype, stream)
            else:
                if self.pointers.update(self.grads):
                    self.table = self._device_table()
                code = lib.llc_sgld_update_segments_cuda(self.table.data_ptr(), *self.head, *args.buffers,
                                                         self.n_local, *scalars, args.dtype, stream)
        _check(lib, code, "the CUDA SGLD update")
        # What the pointers point into (args.keep: ids, mask, per-chain values; the table) lives with this
        # object and is freed through torch's caching allocator, which orders its reuse after this stream's
        # kernels.


cuda_update = CudaBackend()


def cuda_philox_debug(seed: int, chain_ids: torch.Tensor, step: int, start: int, count: int, stream: int = 0):
    """(words int64, uniforms float32, normals float32), each [C, count], computed on the GPU (tests)."""
    ids = chain_ids.to(dtype=torch.int64).contiguous()
    device = ids.device
    lib = _library(device)
    words = torch.empty((ids.numel(), count), dtype=torch.int32, device=device)
    uniforms = torch.empty((ids.numel(), count), dtype=torch.float32, device=device)
    normals = torch.empty((ids.numel(), count), dtype=torch.float32, device=device)
    with torch.cuda.device(device):
        code = lib.llc_philox_debug_cuda(seed, ids.data_ptr(), ids.numel(), step, start, count, stream,
                                         words.data_ptr(), uniforms.data_ptr(), normals.data_ptr(),
                                         torch.cuda.current_stream(device).cuda_stream)
    _check(lib, code, "the CUDA Philox debug kernel")
    return words.to(torch.int64) & 0xFFFFFFFF, uniforms, normals


def load_cuda_update() -> CudaBackend:
    """Build (once per GPU architecture) and return ``cuda_update``; RuntimeError saying why it cannot run here."""
    cuda_update.load()
    return cuda_update
