"""Building the compiled kernels of ``csrc/``: where the sources are, where builds go, and how.

* The C++ update (``cpu_extension()``): ``csrc/sgld_update_cpu.cpp`` built with ninja through
  ``torch.utils.cpp_extension`` on first use (a pybind11 module without torch headers, some
  seconds), into torch's extension cache (``~/.cache/torch_extensions``) or ``$LLC_FAST_BUILD_DIR``.
  It is compiled for the building machine's CPU (``-march=native``). That flag reads the same on
  every machine, so neither torch's extension versioning nor ninja would notice a cache shared
  with another CPU (a home directory on a cluster): the extension's name carries a hash of the
  flags and of what they mean to the compiler here (its predefined macros: ISA extensions, CPU
  name, compiler version). ``$LLC_FAST_MARCH`` overrides the target (``none``: the compiler's
  default target).
* The CUDA update (``cuda_library(arch)``): ``csrc/sgld_update_cuda.cu`` built with plain
  ``nvcc -shared`` for one GPU architecture into ``$LLC_FAST_BUILD_DIR`` (else
  ``~/.cache/llc_fast``), named by a hash of the sources and flags.

Every failure is a RuntimeError that says what is missing.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from types import ModuleType

EXTENSION_NAME = "llc_fast_sgld_cpu"
CPU_SOURCE = "sgld_update_cpu.cpp"
CUDA_SOURCE = "sgld_update_cuda.cu"
#: -ffp-contract=off: no implicit fused multiply-add, so the update is the reference's sequence of
#: roundings (the noise code asks for its FMAs explicitly). -fno-math-errno: sqrtf is one (vector)
#: instruction. Never -ffast-math: it would change the update's roundings.
CPU_CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-std=c++17"]
CPU_LDFLAGS = ["-fopenmp"]
#: The target CPU: the building machine's own unless $LLC_FAST_MARCH says otherwise ("none": the
#: compiler's default target, e.g. baseline x86-64 without AVX; the kernel then runs its scalar Philox).
DEFAULT_MARCH = "native"
#: --fmad=false: every operation rounded as in the torch reference.
NVCC_FLAGS = ["-std=c++17", "-O3", "--fmad=false", "-shared", "-Xcompiler", "-fPIC"]

_LOCK = threading.Lock()
_CPU_MODULE: ModuleType | None = None


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
    """``$LLC_FAST_BUILD_DIR`` if set (created if missing), else None (the default caches)."""
    root = os.environ.get("LLC_FAST_BUILD_DIR")
    if not root:
        return None
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


# --- the C++ update ------------------------------------------------------------------------------


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
    loaded here.
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
        return cpp_extension.load(name=name, sources=[str(src / CPU_SOURCE)], extra_include_paths=[str(src)],
                                  extra_cflags=cflags, extra_ldflags=CPU_LDFLAGS, verbose=False, **kwargs)
    except Exception as e:
        raise RuntimeError(
            f"building the C++ update ({src / CPU_SOURCE}) failed: {type(e).__name__}: {e}\n"
            "It needs a C++17 compiler with OpenMP (g++; clang++ needs libomp), ninja (pip install ninja) "
            "and pybind11 (shipped with torch). Set LLC_FAST_BUILD_DIR to build elsewhere, or use backend='torch'."
        ) from e


def cpu_extension() -> ModuleType:
    """The compiled C++ module (built on first use, then cached in this process): ``sgld_update``,
    ``sgld_update_segments``, ``philox_debug``, ``philox4x32``, ``normals_debug`` and
    ``stochastic_round_debug``. A failed build is retried at the next call."""
    global _CPU_MODULE
    with _LOCK:
        if _CPU_MODULE is None:
            _CPU_MODULE = _build_cpu_extension()
        return _CPU_MODULE


# --- the CUDA update -----------------------------------------------------------------------------


def find_nvcc() -> str:
    """$NVCC, nvcc on PATH, under $CUDA_HOME / $CUDA_PATH, or /usr/local/cuda; RuntimeError if none."""
    homes = [os.environ[v] for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    for candidate in (os.environ.get("NVCC"), shutil.which("nvcc"), *(str(Path(h) / "bin" / "nvcc") for h in homes),
                      "/usr/local/cuda/bin/nvcc"):
        if candidate and Path(candidate).is_file():
            return candidate
    raise RuntimeError("the CUDA update is built with nvcc, which was not found (install the CUDA toolkit, "
                       "put nvcc on PATH or set CUDA_HOME or NVCC)")


def cuda_library(arch: str) -> Path:
    """The shared library of the CUDA update for ``arch`` (e.g. "sm_90"), built if not cached."""
    src_dir = csrc_dir()
    sources = [src_dir / CUDA_SOURCE, src_dir / "sgld_update.h", src_dir / "philox.h"]
    nvcc = find_nvcc()
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
