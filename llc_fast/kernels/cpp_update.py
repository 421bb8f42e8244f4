"""The C++ backend of the fused update: OpenMP over (chain, block of groups), one pass over memory.

``load_cpu_update()`` builds ``csrc/sgld_update_cpu.cpp`` with ninja on first use (a pybind11
module without torch headers, some seconds) and returns ``cpu_update``, which has exactly
``reference.reference_update``'s signature and math, for tensors on the CPU. The build goes
to torch's extension cache (``~/.cache/torch_extensions``) or to ``$LLC_FAST_BUILD_DIR``.

The kernel is compiled for the building machine's CPU (``-march=native``: AVX2 / AVX-512
Philox, vectorized noise and update loops). ``-march=native`` reads the same on every machine,
so neither torch's extension versioning nor ninja would notice a build cache shared with a
different CPU (a home directory on a cluster): the extension's name carries a hash of the flags
and of what they mean to the compiler here (its predefined macros: ISA extensions, CPU name,
compiler version), so a different CPU or compiler builds its own copy. ``$LLC_FAST_MARCH``
overrides the target (``-march=$LLC_FAST_MARCH``; ``none``: the compiler's default target).

Agreement with the reference: the Philox words and uniforms are bit-exact; the normals come
from the kernel's own vectorized float32 log and sin/cos (polynomials) and are within about
1e-6 of the reference's (tested within 1e-5, docs/noise.md); everything else is the same
sequence of correctly rounded operations (compiled with ``-ffp-contract=off``, never
``-ffast-math``), so the weights differ by at most about ``noise_level * sqrt(lr * G) * 1e-5``
plus a few ulps, and the statistic V is bit-exact.

The argument checks and conversions here (``prepare_update_args``) are shared with the CUDA
backend, ``cuda_update.py``.
"""
from __future__ import annotations

import hashlib
import operator
import os
import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

from . import philox
from .reference import check_segments, check_update_args, compute_dtype
from .update_spec import SAMPLERS, SamplerSettings, StepCounters, per_chain

EXTENSION_NAME = "llc_fast_sgld_cpu"
CPU_SOURCE = "sgld_update_cpu.cpp"
#: -ffp-contract=off: no implicit fused multiply-add, so the update is the reference's sequence of
#: roundings (the noise code asks for its FMAs explicitly). -fno-math-errno: sqrtf is one (vector)
#: instruction. Never -ffast-math: it would change the update's roundings.
CPU_CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-std=c++17"]
CPU_LDFLAGS = ["-fopenmp"]
#: The target CPU: the building machine's own unless $LLC_FAST_MARCH says otherwise ("none": the
#: compiler's default target, e.g. baseline x86-64 without AVX; the kernel then runs its scalar Philox).
DEFAULT_MARCH = "native"

#: Codes the kernels take for the weights' dtype (bfloat16 is passed as its uint16 bits).
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2}
SAMPLER_CODES = {name: code for code, name in enumerate(SAMPLERS)}
MAX_INDEX = 2**63 - 1 - 8  # index_offset + N must stay inside int64, with room for a group of four

ELEMENTS_PER_THREAD = 1 << 15

_LOCK = threading.Lock()
_MODULE: ModuleType | None = None


def csrc_dir() -> Path:
    """The folder holding the C++/CUDA sources: ``<repo>/csrc`` (or ``llc_fast/csrc`` if shipped there)."""
    here = Path(__file__).resolve()
    candidates = (here.parents[2] / "csrc", here.parents[1] / "csrc")
    for d in candidates:
        if (d / "sgld_update.h").is_file() and (d / "philox.h").is_file():
            return d
    raise RuntimeError(
        "the C++/CUDA sources of llc_fast (csrc/philox.h, csrc/sgld_update.h, ...) were not found in "
        + " or ".join(str(d) for d in candidates)
        + "; install llc_fast from a source checkout (pip install -e .) to use the compiled backends"
    )


def build_root() -> Path | None:
    """``$LLC_FAST_BUILD_DIR`` if set (created if missing), else None (torch's default cache)."""
    root = os.environ.get("LLC_FAST_BUILD_DIR")
    if not root:
        return None
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _ensure_ninja_on_path() -> None:
    """torch runs ``ninja`` from PATH; a virtualenv's ninja is not on it unless the venv is activated."""
    if shutil.which("ninja") is None:
        venv_bin = Path(sys.executable).parent
        if (venv_bin / "ninja").is_file():
            os.environ["PATH"] = f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"


def _target_macros(cxx: str, flags: list[str]) -> str | None:
    """The compiler's predefined macros under ``flags`` (what ``-march=...`` resolves to: the ISA
    extensions, the CPU name, the compiler version), or None if the compiler rejects the flags."""
    try:
        proc = subprocess.run([cxx, *flags, "-dM", "-E", "-x", "c++", os.devnull], capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    return "\n".join(sorted(proc.stdout.splitlines()))


def cpu_build_config(cxx: str | None = None) -> tuple[str, list[str]]:
    """(extension name, compiler flags) of the C++ update on this machine with compiler ``cxx``.

    The flags are ``CPU_CFLAGS`` plus ``-march=<$LLC_FAST_MARCH or native>`` if the compiler takes
    it (else none). The name is ``EXTENSION_NAME`` plus a hash of the flags and of the compiler's
    predefined macros under them, so a build cached for another CPU, compiler or flag set is never
    loaded here (the text ``-march=native`` is the same everywhere; its meaning is not).
    """
    cxx = cxx or os.environ.get("CXX", "c++")
    march = os.environ.get("LLC_FAST_MARCH", "").strip() or DEFAULT_MARCH
    flags, macros = list(CPU_CFLAGS), None
    if march.lower() != "none":
        arch_flags = flags + [f"-march={march}"]
        macros = _target_macros(cxx, arch_flags)
        if macros is not None:
            flags = arch_flags
        elif "LLC_FAST_MARCH" in os.environ:
            warnings.warn(f"{cxx} rejects -march={march} ($LLC_FAST_MARCH); building for its default target")
    if macros is None:
        macros = _target_macros(cxx, flags) or ""
    key = hashlib.sha256("\0".join([cxx, *flags, *CPU_LDFLAGS, macros]).encode()).hexdigest()[:12]
    return f"{EXTENSION_NAME}_{key}", flags


def _build_cpu_extension() -> ModuleType:
    src = csrc_dir()
    try:
        from torch.utils import cpp_extension
    except Exception as e:  # pragma: no cover - torch without its build helpers
        raise RuntimeError(f"torch.utils.cpp_extension cannot be imported ({e}); it builds the C++ update") from e
    _ensure_ninja_on_path()
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("the C++ update is built with ninja, which was not found: pip install ninja")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(
            f"the C++ update needs a C++17 compiler with OpenMP; {cxx!r} was not found "
            "(install g++, e.g. apt-get install g++, or set CXX)"
        )
    name, cflags = cpu_build_config(cxx)
    kwargs = {}
    root = build_root()
    if root is not None:
        build_dir = root / name
        build_dir.mkdir(parents=True, exist_ok=True)
        kwargs["build_directory"] = str(build_dir)
    try:
        return cpp_extension.load(
            name=name,
            sources=[str(src / CPU_SOURCE)],
            extra_include_paths=[str(src)],
            extra_cflags=cflags,
            extra_ldflags=CPU_LDFLAGS,
            verbose=False,
            **kwargs,
        )
    except Exception as e:
        raise RuntimeError(
            f"building the C++ update ({src / CPU_SOURCE}) failed: {type(e).__name__}: {e}\n"
            "It needs a C++17 compiler with OpenMP (g++; clang++ needs libomp), ninja (pip install ninja) "
            "and pybind11 (shipped with torch). Set LLC_FAST_BUILD_DIR to build elsewhere, or use backend='torch'."
        ) from e


def scalar_args(settings: SamplerSettings, counters: StepCounters) -> dict:
    """The scalar arguments every kernel entry takes (host float64; the kernel rounds them once)."""
    pre = settings.preconditioned
    return dict(
        stat_scale=settings.statistic_scale(counters.stat_step) if pre else 1.0,
        sampler=SAMPLER_CODES[settings.sampler],
        update_statistic=bool(counters.update_statistic),
        has_box=settings.box is not None,
        alpha=float(settings.rmsprop_alpha),
        one_minus_alpha=1.0 - settings.rmsprop_alpha,
        eps=float(settings.rmsprop_eps),
        weight_decay=float(settings.weight_decay),
        box=float(settings.box) if settings.box is not None else 0.0,
        noise_level=float(settings.noise_level),
    )


def load_cpu_extension() -> ModuleType:
    """The compiled module (built on first use, then cached): ``sgld_update``, ``philox_debug``,
    ``philox4x32`` and ``stochastic_round_debug``. Raises RuntimeError if it cannot be built."""
    global _MODULE
    with _LOCK:
        if _MODULE is None:
            _MODULE = _build_cpu_extension()
        return _MODULE


def _check_int(name: str, value, lo: int, hi: int) -> int:
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {type(value).__name__}") from None
    if not lo <= value <= hi:
        raise ValueError(f"{name} must lie in [{lo}, {hi}], got {value}")
    return value


def prepare_update_args(
    w, grad, w_star, stat, *, lr, nbeta, gamma, settings, counters, seed, chain_ids, mask, index_offset, device_type
) -> dict | None:
    """Check the arguments of one update and convert them for a kernel taking raw pointers.

    Returns None when there is nothing to update (no chains or no elements), else the keyword
    arguments of the extensions' ``sgld_update`` (pointers as ints) plus ``_keep``, the tensors
    the pointers point into, which must stay alive until the kernel has run.
    """
    if not isinstance(settings, SamplerSettings):
        raise ValueError(f"settings must be a SamplerSettings, got {type(settings).__name__}")
    if not isinstance(counters, StepCounters):
        raise ValueError(f"counters must be a StepCounters, got {type(counters).__name__}")
    check_update_args(w, grad, w_star, stat, mask, settings)
    for name, t in (("w", w), ("grad", grad), ("w_star", w_star), ("mask", mask)) + (
        (("stat", stat),) if settings.preconditioned else ()
    ):
        if t is not None and t.device.type != device_type:
            raise ValueError(f"{name} must be on {device_type}, got {t.device}")
    if device_type == "cuda":
        devices = {t.device for t in (w, grad, w_star, stat if settings.preconditioned else None, mask) if t is not None}
        if len(devices) != 1:
            raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    num_chains, n = w.shape
    seed = _check_int("seed", seed, 0, philox.MAX_SEED)
    step = _check_int("counters.step", counters.step, 0, philox.MAX_STEP)
    index_offset = _check_int("index_offset", index_offset, 0, MAX_INDEX - n)
    if not isinstance(chain_ids, torch.Tensor):
        chain_ids = torch.as_tensor(chain_ids)
    if chain_ids.is_floating_point() or chain_ids.is_complex() or chain_ids.dtype == torch.bool:
        raise ValueError(f"chain_ids must be an integer tensor, got {chain_ids.dtype}")
    if chain_ids.shape != (num_chains,):
        raise ValueError(f"chain_ids must have shape ({num_chains},), got {tuple(chain_ids.shape)}")
    ids = chain_ids.to(device=w.device, dtype=torch.int64).contiguous()
    if num_chains and not (0 <= int(ids.min()) and int(ids.max()) <= philox.MAX_CHAIN):
        raise ValueError(f"chain indices must lie in [0, 2**31), got {chain_ids.tolist()}")
    if num_chains == 0 or n == 0:
        return None
    cdt = compute_dtype(w.dtype)
    hyper = {name: per_chain(v, num_chains, w.device, cdt).contiguous() for name, v in
             (("lr", lr), ("nbeta", nbeta), ("gamma", gamma))}
    if mask is not None:
        # The kernels take a uint8 mask and treat any nonzero value as 1 (the mask is 0/1).
        if mask.dtype == torch.bool:
            mask = mask.view(torch.uint8)
        elif mask.dtype != torch.uint8:
            mask = (mask != 0).to(torch.uint8)
    pre = settings.preconditioned
    args = dict(
        w=w.data_ptr(),
        grad=grad.data_ptr(),
        w_star=w_star.data_ptr(),
        stat=stat.data_ptr() if pre else 0,
        mask=mask.data_ptr() if mask is not None else 0,
        lr=hyper["lr"].data_ptr(),
        nbeta=hyper["nbeta"].data_ptr(),
        gamma=hyper["gamma"].data_ptr(),
        chain_ids=ids.data_ptr(),
        num_chains=num_chains,
        n=n,
        seed=seed,
        step=step,
        has_mask=mask is not None,
        **scalar_args(settings, counters),
        index_offset=index_offset,
        dtype=DTYPE_CODES[w.dtype],
    )
    args["_keep"] = (ids, mask, *hyper.values())
    return args


def prepare_segments_args(
    segments, w_star, stat, *, lr, nbeta, gamma, settings, counters, seed, chain_ids, mask, device_type
) -> dict | None:
    """``prepare_update_args`` for a multi-segment update (``cpu_update_segments``).

    Returns None when there is nothing to update, else the keyword arguments of the extensions'
    ``sgld_update_segments``: ``segments`` points at an int64 [S, 5] table (w pointer, grad
    pointer, n, local_start, global_offset) on the host, ``table`` is that tensor (the CUDA
    backend copies it to the device), and ``_keep`` holds the tensors the pointers point into.
    """
    if not isinstance(settings, SamplerSettings):
        raise ValueError(f"settings must be a SamplerSettings, got {type(settings).__name__}")
    if not isinstance(counters, StepCounters):
        raise ValueError(f"counters must be a StepCounters, got {type(counters).__name__}")
    segs = check_segments(segments, w_star, stat, mask, settings)
    tensors = [("w_star", w_star), ("mask", mask)] + ([("stat", stat)] if settings.preconditioned else [])
    for k, (w, grad, _, _) in enumerate(segs):
        tensors += [(f"segment {k} w", w), (f"segment {k} grad", grad)]
    for name, t in tensors:
        if t is not None and t.device.type != device_type:
            raise ValueError(f"{name} must be on {device_type}, got {t.device}")
    if device_type == "cuda":
        devices = {t.device for _, t in tensors if t is not None}
        if len(devices) != 1:
            raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    n_local = w_star.shape[0]
    if not segs:
        return None
    num_chains = segs[0][0].shape[0]
    seed = _check_int("seed", seed, 0, philox.MAX_SEED)
    step = _check_int("counters.step", counters.step, 0, philox.MAX_STEP)
    for k, (w, _, _, offset) in enumerate(segs):
        _check_int(f"segment {k} global_offset", offset, 0, MAX_INDEX - w.shape[1])
    if not isinstance(chain_ids, torch.Tensor):
        chain_ids = torch.as_tensor(chain_ids)
    if chain_ids.is_floating_point() or chain_ids.is_complex() or chain_ids.dtype == torch.bool:
        raise ValueError(f"chain_ids must be an integer tensor, got {chain_ids.dtype}")
    if chain_ids.shape != (num_chains,):
        raise ValueError(f"chain_ids must have shape ({num_chains},), got {tuple(chain_ids.shape)}")
    device = w_star.device
    ids = chain_ids.to(device=device, dtype=torch.int64).contiguous()
    if num_chains and not (0 <= int(ids.min()) and int(ids.max()) <= philox.MAX_CHAIN):
        raise ValueError(f"chain indices must lie in [0, 2**31), got {chain_ids.tolist()}")
    segs = [s for s in segs if s[0].shape[1] > 0]
    if num_chains == 0 or not segs:
        return None
    cdt = compute_dtype(w_star.dtype)
    hyper = {name: per_chain(v, num_chains, device, cdt).contiguous() for name, v in
             (("lr", lr), ("nbeta", nbeta), ("gamma", gamma))}
    if mask is not None:
        if mask.dtype == torch.bool:
            mask = mask.view(torch.uint8)
        elif mask.dtype != torch.uint8:
            mask = (mask != 0).to(torch.uint8)
    table = torch.tensor([[w.data_ptr(), g.data_ptr(), w.shape[1], start, offset] for w, g, start, offset in segs],
                         dtype=torch.int64)
    pre = settings.preconditioned
    args = dict(
        segments=table.data_ptr(),
        num_segments=len(segs),
        w_star=w_star.data_ptr(),
        stat=stat.data_ptr() if pre else 0,
        mask=mask.data_ptr() if mask is not None else 0,
        lr=hyper["lr"].data_ptr(),
        nbeta=hyper["nbeta"].data_ptr(),
        gamma=hyper["gamma"].data_ptr(),
        chain_ids=ids.data_ptr(),
        num_chains=num_chains,
        n_local=n_local,
        seed=seed,
        step=step,
        has_mask=mask is not None,
        **scalar_args(settings, counters),
        dtype=DTYPE_CODES[w_star.dtype],
    )
    args["table"] = table
    args["_keep"] = (ids, mask, table, *hyper.values())
    args["_numel"] = num_chains * sum(w.shape[1] for w, _, _, _ in segs)
    return args


def cpu_update(
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
    """``reference_update`` on the CPU by the compiled kernel; same arguments, same result (see module doc).

    w, grad, w_star, stat and mask must be CPU tensors (ValueError otherwise); per-chain
    hyperparameters and chain_ids are converted to CPU as the reference converts them. The
    kernel uses up to ``torch.get_num_threads()`` OpenMP threads, one per ``ELEMENTS_PER_THREAD``
    elements: waking threads for a small model costs more than the update (and on a loaded
    machine far more).
    """
    ext = load_cpu_extension()
    args = prepare_update_args(
        w, grad, w_star, stat, lr=lr, nbeta=nbeta, gamma=gamma, settings=settings, counters=counters, seed=seed,
        chain_ids=chain_ids, mask=mask, index_offset=index_offset, device_type="cpu",
    )
    if args is None:
        return
    keep = args.pop("_keep")
    threads = max(1, min(torch.get_num_threads(), w.numel() // ELEMENTS_PER_THREAD))
    ext.sgld_update(**args, num_threads=threads)
    del keep


def cpu_update_segments(
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
    """``reference.reference_update_segments`` by one call of the compiled kernel: OpenMP over
    (segment, chain, block) work items in one parallel region, the same result as one
    ``cpu_update`` per segment (the same arithmetic, element by element).

    segments: (w_k [C, n_k], grad_k [C, n_k], local_start_k, global_offset_k); w_star [N_local],
    stat [C, N_local], mask [N_local]: segment k is columns [local_start_k, local_start_k + n_k).
    """
    ext = load_cpu_extension()
    args = prepare_segments_args(
        segments, w_star, stat, lr=lr, nbeta=nbeta, gamma=gamma, settings=settings, counters=counters, seed=seed,
        chain_ids=chain_ids, mask=mask, device_type="cpu",
    )
    if args is None:
        return
    keep, numel = args.pop("_keep"), args.pop("_numel")
    args.pop("table")
    threads = max(1, min(torch.get_num_threads(), numel // ELEMENTS_PER_THREAD))
    ext.sgld_update_segments(**args, num_threads=threads)
    del keep


cpu_update.update_segments = cpu_update_segments


def load_cpu_update():
    """Build (once) and return ``cpu_update``; RuntimeError saying what is missing if it cannot be built."""
    load_cpu_extension()
    return cpu_update
