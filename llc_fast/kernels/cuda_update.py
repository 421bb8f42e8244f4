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
from .backend import Backend, PreparedUpdate
from .build import CUDA_SOURCE, NVCC_FLAGS  # noqa: F401
from .update_call import UpdateCall
from .update_spec import NOISE_SCHEMES, StepCounters

_LOCK = threading.Lock()
_LIBS: dict[str, ctypes.CDLL] = {}  # architecture -> loaded library


def arch_of(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def library(device: torch.device) -> ctypes.CDLL:
    """The CUDA update's library for ``device``'s architecture, built and loaded once."""
    arch = arch_of(device)
    with _LOCK:
        if arch not in _LIBS:
            lib = ctypes.CDLL(str(build.cudalibrary(arch)))
            u64, i64, ptr = ctypes.c_uint64, ctypes.c_int64, ctypes.c_size_t
            for entry in (lib.llc_sgld_update_cuda, lib.llc_sgld_update_segments_cuda):
                entry.argtypes = [ctypes.c_void_p]  # the address of a native.UpdateArgs
                entry.restype = ctypes.c_int
            lib.llc_update_args_size.argtypes = []
            lib.llc_update_args_size.restype = i64
            native.check_layout(lib.llc_update_args_size(), "the CUDA update")
            lib.llc_cuda_segment_block_quads.argtypes = []
            lib.llc_cuda_segment_block_quads.restype = ctypes.c_int
            lib.llc_philox_debug_cuda.argtypes = [u64, ptr, i64, u64, i64, i64, ctypes.c_uint32, ptr, ptr, ptr, ptr]
            lib.llc_philox_debug_cuda.restype = ctypes.c_int
            lib.llc_cuda_error_string.argtypes = [ctypes.c_int]
            lib.llc_cuda_error_string.restype = ctypes.c_char_p
            _LIBS[arch] = lib
        return _LIBS[arch]


def check(lib: ctypes.CDLL, code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"{what} failed: {lib.llc_cuda_error_string(code).decode()}")


class CudaBackend(Backend):
    """The CUDA kernel: one launch of ``llc_sgld_update_cuda`` for a single buffer, else one launch
    of ``llc_sgld_update_segments_cuda``, whose blocks find their segment by a binary search over a
    table on the device (the [S, 5] rows, then the S + 1 first blocks); ``CudaPrepared``."""

    name = "cuda"
    devices = ("cuda",)
    noise_schemes = NOISE_SCHEMES

    def load(self) -> None:
        if torch.version.cuda is None:
            raise RuntimeError(f"torch {torch.__version__} was built without CUDA; the CUDA update needs a CUDA "
                               "build of torch")
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA GPU is visible (torch.cuda.is_available() is False)")
        device = torch.device("cuda", torch.cuda.current_device())
        try:
            library(device)
            # One tiny launch: catches a driver older than nvcc's runtime or a missing kernel image here,
            # not at the first update.
            cuda_philox_debug(0, torch.zeros(1, dtype=torch.int64, device=device), 0, 0, 4)
            torch.cuda.synchronize(device)
        except RuntimeError:
            raise
        except Exception as e:
            raise RuntimeError(f"loading the CUDA update failed: {type(e).__name__}: {e}") from e

    def prepare_call(self, call: UpdateCall) -> PreparedUpdate:
        return CudaPrepared(self, call)


class CudaPrepared(PreparedUpdate):
    """The CUDA kernel's arguments, built once (``native.NativeCall``, the segment table: for one buffer its
    one row on the host; for segments with their first blocks, on the device, copied again only when a
    gradient pointer changes). A launch sets the step's scalars and launches on the device's current
    stream: the stream current at prepare, which the per-row values and the table were copied on (or
    synchronise before launching on another)."""

    def __init__(self, backend: CudaBackend, call: UpdateCall):
        super().__init__(backend, call)
        self.lib = lib = library(self.device)
        self.native = native.NativeCall(call)
        table = native.segment_table(call)
        self.native.args.num_segments = len(table)
        if call.single:
            self.entry, self.host, self.table = lib.llc_sgld_update_cuda, table, None
            self.pointers = native.GradPointers(table)
            self.native.args.segments = table.data_ptr()
            return
        self.entry = lib.llc_sgld_update_segments_cuda
        per_block = lib.llc_cuda_segment_block_quads()
        ns, offsets = table[:, 2], table[:, 4]
        quads = (offsets + ns - 1) // 4 + 1 - offsets // 4
        first = torch.zeros(len(table) + 1, dtype=torch.int64)
        first[1:] = torch.cumsum((quads + per_block - 1) // per_block, 0)
        self.host = torch.cat([table.reshape(-1), first])  # the [S, 5] rows, then the S + 1 first blocks
        self.pointers = native.GradPointers(self.host[:table.numel()].view(table.shape))
        self.native.args.total_blocks = int(first[-1])
        with torch.cuda.device(self.device):
            self.set_device_table()

    def set_device_table(self) -> None:
        """A new device copy of the table (the last one may still be read by a kernel in flight)."""
        self.table = self.host.pin_memory().to(self.device, non_blocking=True)
        self.native.args.segments = self.table.data_ptr()

    def launch_step(self, counters: StepCounters, step: int) -> None:
        args = self.native.at(counters, step)
        with torch.cuda.device(self.device):
            args.stream = torch.cuda.current_stream(self.device).cuda_stream
            if self.pointers.update(self.grads) and self.table is not None:
                self.set_device_table()
            code = self.entry(self.native.address)
        check(self.lib, code, "the CUDA SGLD update")
        # What the pointers point into (native.keep: ids, mask, per-row values; the table) lives with this
        # object and is freed through torch's caching allocator, which orders its reuse after this stream's
        # kernels.


cuda_update = CudaBackend()


def cuda_philox_debug(seed: int, chain_ids: torch.Tensor, step: int, start: int, count: int, stream: int = 0):
    """(words int64, uniforms float32, normals float32), each [C, count], computed on the GPU (tests)."""
    ids = chain_ids.to(dtype=torch.int64).contiguous()
    device = ids.device
    lib = library(device)
    words = torch.empty((ids.numel(), count), dtype=torch.int32, device=device)
    uniforms = torch.empty((ids.numel(), count), dtype=torch.float32, device=device)
    normals = torch.empty((ids.numel(), count), dtype=torch.float32, device=device)
    with torch.cuda.device(device):
        code = lib.llc_philox_debug_cuda(seed, ids.data_ptr(), ids.numel(), step, start, count, stream,
                                         words.data_ptr(), uniforms.data_ptr(), normals.data_ptr(),
                                         torch.cuda.current_stream(device).cuda_stream)
    check(lib, code, "the CUDA Philox debug kernel")
    return words.to(torch.int64) & 0xFFFFFFFF, uniforms, normals


def load_cuda_update() -> CudaBackend:
    """Build (once per GPU architecture) and return ``cuda_update``; RuntimeError saying why it cannot run here."""
    cuda_update.load()
    return cuda_update
