"""The CUDA backend of the fused update: ``csrc/sgld_update_cuda.cu`` built with plain nvcc.

The kernel takes raw pointers and the stream as integers, so it needs neither torch's CUDA
headers nor ``CUDAExtension``: ``load_cuda_update()`` compiles it once with ``nvcc -shared`` for
the GPU's architecture into ``$LLC_FAST_BUILD_DIR`` (else ``~/.cache/llc_fast``), loads it with
ctypes and returns ``cuda_update``, which has ``reference_update``'s signature and math for
tensors on one CUDA device. It raises RuntimeError, saying why, where torch has no CUDA, no GPU
is visible, or nvcc is missing or fails.

Built with ``--fmad=false``: every operation is rounded as in the torch reference, so the weights
differ from it only through the normals (libdevice log/cos/sin, a few float32 ulps).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from .cpp_update import build_root, csrc_dir, prepare_segments_args, prepare_update_args
from .update_spec import SamplerSettings, StepCounters

CUDA_SOURCE = "sgld_update_cuda.cu"
NVCC_FLAGS = ["-std=c++17", "-O3", "--fmad=false", "-shared", "-Xcompiler", "-fPIC"]

_LOCK = threading.Lock()
_LIBS: dict[str, ctypes.CDLL] = {}  # architecture -> loaded library


def _find_nvcc() -> str:
    for candidate in (os.environ.get("NVCC"), shutil.which("nvcc"),
                      *(str(Path(os.environ[v]) / "bin" / "nvcc") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)),
                      "/usr/local/cuda/bin/nvcc"):
        if candidate and Path(candidate).is_file():
            return candidate
    raise RuntimeError("the CUDA update is built with nvcc, which was not found (install the CUDA toolkit, "
                       "put nvcc on PATH or set CUDA_HOME or NVCC)")


def _arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def _build(arch: str) -> Path:
    src_dir = csrc_dir()
    sources = [src_dir / CUDA_SOURCE, src_dir / "sgld_update.h", src_dir / "philox.h"]
    nvcc = _find_nvcc()
    digest = hashlib.sha256()
    for p in sources:
        digest.update(p.read_bytes())
    digest.update(" ".join(NVCC_FLAGS + [arch, nvcc]).encode())
    root = build_root() or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llc_fast"
    out_dir = root / "sgld_update_cuda"
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / f"llc_sgld_update_cuda_{arch}_{digest.hexdigest()[:16]}.so"
    if lib.is_file():
        return lib
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    cmd = [nvcc, *NVCC_FLAGS, f"-arch={arch}", f"-I{src_dir}", str(src_dir / CUDA_SOURCE), "-o", tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed building the CUDA update:\n{' '.join(cmd)}\n{proc.stderr[-4000:]}")
        os.replace(tmp, lib)  # atomic: concurrent builders each write their own temp file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def _load_library(arch: str) -> ctypes.CDLL:
    with _LOCK:
        if arch not in _LIBS:
            lib = ctypes.CDLL(str(_build(arch)))
            u64, i64, i32, f64, ptr = ctypes.c_uint64, ctypes.c_int64, ctypes.c_int32, ctypes.c_double, ctypes.c_size_t
            lib.llc_sgld_update_cuda.argtypes = [ptr] * 9 + [i64, i64, u64, u64, f64, i32, i32, i32, i32] + [f64] * 6 + [
                i64, i32, ptr]
            lib.llc_sgld_update_cuda.restype = ctypes.c_int
            lib.llc_sgld_update_segments_cuda.argtypes = [ptr, i64, i64] + [ptr] * 7 + [i64, i64, u64, u64, f64] + [
                i32] * 4 + [f64] * 6 + [i32, ptr]
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


def cuda_update(
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
    """``reference_update`` by the CUDA kernel, on the current stream of ``w``'s device.

    w, grad, w_star, stat and mask must be on one CUDA device (ValueError otherwise).
    """
    args = prepare_update_args(
        w, grad, w_star, stat, lr=lr, nbeta=nbeta, gamma=gamma, settings=settings, counters=counters, seed=seed,
        chain_ids=chain_ids, mask=mask, index_offset=index_offset, device_type="cuda",
    )
    if args is None:
        return
    keep = args.pop("_keep")
    lib = _load_library(_arch(w.device))
    with torch.cuda.device(w.device):
        stream = torch.cuda.current_stream(w.device).cuda_stream
        code = lib.llc_sgld_update_cuda(
            args["w"], args["grad"], args["w_star"], args["stat"], args["mask"], args["lr"], args["nbeta"],
            args["gamma"], args["chain_ids"], args["num_chains"], args["n"], args["seed"], args["step"],
            args["stat_scale"], args["sampler"], int(args["update_statistic"]), int(args["has_mask"]),
            int(args["has_box"]), args["alpha"], args["one_minus_alpha"], args["eps"], args["weight_decay"],
            args["box"], args["noise_level"], args["index_offset"], args["dtype"], stream,
        )
    _check(lib, code, "the CUDA SGLD update")
    # The temporaries in keep (ids, mask, per-chain values) are freed through torch's caching
    # allocator, which orders their reuse after this stream's kernel.
    del keep


def cuda_update_segments(
    segments,
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
) -> None:
    """``reference.reference_update_segments`` in ONE launch of the CUDA kernel, on the current stream.

    The segment table (int64: the [S, 5] rows of ``prepare_segments_args``, then the S + 1 first
    virtual blocks of 256 groups) is copied to the device each call; blockIdx.x finds its segment
    by a binary search over it.
    """
    args = prepare_segments_args(
        segments, w_star, stat, lr=lr, nbeta=nbeta, gamma=gamma, settings=settings, counters=counters, seed=seed,
        chain_ids=chain_ids, mask=mask, device_type="cuda",
    )
    if args is None:
        return
    keep, table = args.pop("_keep"), args.pop("table")
    args.pop("_numel")
    lib = _load_library(_arch(w_star.device))
    per_block = lib.llc_cuda_segment_block_groups()
    ns, offsets = table[:, 2], table[:, 4]
    groups = (offsets + ns - 1) // 4 + 1 - offsets // 4
    first = torch.zeros(len(table) + 1, dtype=torch.int64)
    first[1:] = torch.cumsum((groups + per_block - 1) // per_block, 0)
    total_blocks = int(first[-1])
    host = torch.cat([table.reshape(-1), first]).pin_memory()
    device_table = host.to(w_star.device, non_blocking=True)
    with torch.cuda.device(w_star.device):
        stream = torch.cuda.current_stream(w_star.device).cuda_stream
        code = lib.llc_sgld_update_segments_cuda(
            device_table.data_ptr(), args["num_segments"], total_blocks, args["w_star"], args["stat"], args["mask"],
            args["lr"], args["nbeta"], args["gamma"], args["chain_ids"], args["num_chains"], args["n_local"],
            args["seed"], args["step"], args["stat_scale"], args["sampler"], int(args["update_statistic"]),
            int(args["has_mask"]), int(args["has_box"]), args["alpha"], args["one_minus_alpha"], args["eps"],
            args["weight_decay"], args["box"], args["noise_level"], args["dtype"], stream,
        )
    _check(lib, code, "the CUDA multi-segment SGLD update")
    del keep, device_table


cuda_update.update_segments = cuda_update_segments


def cuda_philox_debug(seed: int, chain_ids: torch.Tensor, step: int, start: int, count: int, stream: int = 0):
    """(words int64, uniforms float32, normals float32), each [C, count], computed on the GPU (tests)."""
    ids = chain_ids.to(dtype=torch.int64).contiguous()
    device = ids.device
    lib = _load_library(_arch(device))
    words = torch.empty((ids.numel(), count), dtype=torch.int32, device=device)
    uniforms = torch.empty((ids.numel(), count), dtype=torch.float32, device=device)
    normals = torch.empty((ids.numel(), count), dtype=torch.float32, device=device)
    with torch.cuda.device(device):
        code = lib.llc_philox_debug_cuda(seed, ids.data_ptr(), ids.numel(), step, start, count, stream,
                                         words.data_ptr(), uniforms.data_ptr(), normals.data_ptr(),
                                         torch.cuda.current_stream(device).cuda_stream)
    _check(lib, code, "the CUDA Philox debug kernel")
    return words.to(torch.int64) & 0xFFFFFFFF, uniforms, normals


def load_cuda_update():
    """Build (once per GPU architecture) and return ``cuda_update``; RuntimeError saying why it cannot run here."""
    if torch.version.cuda is None:
        raise RuntimeError(f"torch {torch.__version__} was built without CUDA; the CUDA update needs a CUDA build of torch")
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA GPU is visible (torch.cuda.is_available() is False)")
    device = torch.device("cuda", torch.cuda.current_device())
    try:
        _load_library(_arch(device))
        # One tiny launch: catches a driver older than nvcc's runtime or a missing kernel image here,
        # not at the first update.
        cuda_philox_debug(0, torch.zeros(1, dtype=torch.int64, device=device), 0, 0, 4)
        torch.cuda.synchronize(device)
    except RuntimeError:
        raise
    except Exception as e:
        raise RuntimeError(f"loading the CUDA update failed: {type(e).__name__}: {e}") from e
    return cuda_update
