"""Building the compiled kernels of ``csrc/``: where the sources are, where builds go, and how.

* The C++ update (``cpu_extension()``): ``csrc/sgld_update_cpu.cpp`` compiled on first use with the C++
  compiler (``$CXX``, else ``c++``) into a pybind11 module without torch headers (some seconds), then
  imported from the cache. It is compiled for the building machine's CPU (``-march=native``). That flag
  reads the same on every machine, so the module's name carries a hash of the sources, the flags and
  what the flags mean to the compiler here (its predefined macros: ISA extensions, CPU name, compiler
  version): a build cached for another CPU (a home directory shared on a cluster) is never loaded.
  ``$LLC_FAST_MARCH`` overrides the target (``none``: the compiler's default target).
* The CUDA update (``cuda_library(arch)``): ``csrc/sgld_update_cuda.cu`` built with plain
  ``nvcc -shared`` for one GPU architecture, named by a hash of the sources and flags.

Both go to ``$LLC_FAST_BUILD_DIR`` (else ``$XDG_CACHE_HOME/llc_fast``, i.e. ``~/.cache/llc_fast``) the same
way (``build_once``): a file that is there is used as it is, without any lock; a missing one is built in a
private temporary folder and renamed into place (atomic), by one process at a time under an ``flock`` on
``<file>.lock``, which the operating system releases when its holder dies (a SIGKILL or an OOM kill leaves
nothing that blocks a later run). A process waits for another one's build at most
``$LLC_FAST_BUILD_TIMEOUT`` seconds (default ``DEFAULT_BUILD_TIMEOUT_S``), then raises an error naming the
lock file and the holder's pid.

Every failure is a RuntimeError that says what is missing.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: builds still land atomically, concurrent ones twice
    fcntl = None

EXTENSION_NAME = "llc_fast_sgld_cpu"
CPU_SOURCE = "sgld_update_cpu.cpp"
CUDA_SOURCE = "sgld_update_cuda.cu"
#: The sources every build includes (a change to any of them is a new build).
HEADERS = ("sgld_update.h", "philox.h")
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
#: How long a process waits for another one's build of the same file (seconds; $LLC_FAST_BUILD_TIMEOUT).
DEFAULT_BUILD_TIMEOUT_S = 900.0

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
    """``$LLC_FAST_BUILD_DIR`` if set (created if missing), else None (the default cache)."""
    root = os.environ.get("LLC_FAST_BUILD_DIR")
    if not root:
        return None
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir(kind: str) -> Path:
    """Where builds of ``kind`` go: ``$LLC_FAST_BUILD_DIR/kind`` or ``$XDG_CACHE_HOME/llc_fast/kind`` (created)."""
    root = build_root() or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llc_fast"
    out = root / kind
    out.mkdir(parents=True, exist_ok=True)
    return out


# --- one build of one file, never twice at once, never a lock that outlives its holder -----------


def build_timeout() -> float:
    """Seconds to wait for another process's build: ``$LLC_FAST_BUILD_TIMEOUT`` or ``DEFAULT_BUILD_TIMEOUT_S``."""
    raw = os.environ.get("LLC_FAST_BUILD_TIMEOUT", "").strip()
    if not raw:
        return DEFAULT_BUILD_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise RuntimeError(f"$LLC_FAST_BUILD_TIMEOUT must be a number of seconds, got {raw!r}") from None
    if not value >= 0:
        raise RuntimeError(f"$LLC_FAST_BUILD_TIMEOUT must be >= 0 seconds, got {raw!r}")
    return value


def _holder(lock: Path) -> str:
    """'pid N' as written by the lock's holder, or 'an unknown process'."""
    try:
        pid = lock.read_text().strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "an unknown process"


@contextlib.contextmanager
def build_lock(lock: Path, timeout: float | None = None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock`` (created if missing), waiting at most ``timeout`` seconds
    (default ``build_timeout()``) for another holder. The holder writes its pid into the file. The OS
    releases the lock when the holder's file descriptor closes, also when the holder is killed, so a
    lock file left behind by a dead process never blocks; only a live holder can make this wait."""
    timeout = build_timeout() if timeout is None else timeout
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if fcntl is not None:
            _acquire(fd, lock, timeout)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the flock


def _acquire(fd: int, lock: Path, timeout: float) -> None:
    deadline, told = time.monotonic() + timeout, False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(
                f"timed out after {timeout:g} s waiting for the build lock {lock}, held by {_holder(lock)} (another "
                "process building the same kernel). Wait for it to finish, end it if it hangs, or wait longer with "
                "LLC_FAST_BUILD_TIMEOUT=<seconds>; a lock whose holder has died is released by the OS by itself."
            )
        if not told:
            told = True
            warnings.warn(f"waiting up to {timeout:g} s for {_holder(lock)} building into {lock.parent} "
                          f"(lock file {lock})", stacklevel=4)
        time.sleep(min(0.2, left))


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """``target``, built by ``build(tmp_path)`` if it is not there yet.

    A file that is there is returned at once (no lock: it was renamed into place complete). Otherwise,
    under ``build_lock(<target>.lock)``, ``build`` writes a file in a private temporary folder beside
    ``target``, which is then renamed into place (atomic); a process that waited for another one's build
    finds ``target`` built and returns it. Temporary folders of killed builds are removed."""
    if target.is_file():
        return target
    with build_lock(target.with_name(target.name + ".lock")):
        if target.is_file():
            return target
        prefix = f".{target.name}.build-"
        for stale in target.parent.glob(prefix + "*"):  # left by a killed builder (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
        try:
            tmp = tmp_dir / target.name
            build(tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return target


def _source_digest(src: Path, main: str, extra: str) -> str:
    digest = hashlib.sha256()
    for name in (main, *HEADERS):
        digest.update(name.encode() + b"\0" + (src / name).read_bytes())
    digest.update(extra.encode())
    return digest.hexdigest()


def _run_compiler(cmd: list[str], what: str) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise RuntimeError(f"{what}: cannot run {cmd[0]!r} ({e})") from e
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{' '.join(cmd)}\n{(proc.stderr or proc.stdout)[-4000:]}")


# --- the C++ update ------------------------------------------------------------------------------


def target_macros(cxx: str, flags: list[str]) -> str | None:
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


def _cpu_include_dirs() -> list[str]:
    """pybind11's headers (shipped with torch) and Python's."""
    from torch.utils import cpp_extension

    return [*cpp_extension.include_paths("cpu"), sysconfig.get_path("include", scheme="posix_prefix")]


def cpu_build_config(cxx: str | None = None) -> tuple[str, list[str]]:
    """(extension name, compiler flags) of the C++ update on this machine with compiler ``cxx``.

    The flags are ``CPU_CFLAGS`` plus ``-march=<$LLC_FAST_MARCH or native>`` if the compiler takes
    it (else none). The name is ``EXTENSION_NAME`` plus a hash of the sources, the flags, the
    compiler's predefined macros under them and the Python ABI, so a build cached for another CPU,
    compiler, flag set or source is never loaded here.
    """
    cxx = cxx or os.environ.get("CXX", "c++")
    march = os.environ.get("LLC_FAST_MARCH", "").strip() or DEFAULT_MARCH
    flags, macros = list(CPU_CFLAGS), None
    if march.lower() != "none":
        arch_flags = flags + [f"-march={march}"]
        macros = target_macros(cxx, arch_flags)
        if macros is not None:
            flags = arch_flags
        elif "LLC_FAST_MARCH" in os.environ:
            warnings.warn(f"{cxx} rejects -march={march} ($LLC_FAST_MARCH); building for its default target")
    if macros is None:
        macros = target_macros(cxx, flags) or ""
    abi = f"{sys.implementation.cache_tag}{sysconfig.get_config_var('EXT_SUFFIX')}"
    key = _source_digest(csrc_dir(), CPU_SOURCE, "\0".join([cxx, *flags, *CPU_LDFLAGS, macros, abi]))[:12]
    return f"{EXTENSION_NAME}_{key}", flags


def _compile_cpu(cxx: str, name: str, cflags: list[str], out: Path) -> None:
    src = csrc_dir()
    includes = [f"-I{src}", *(f"-isystem{d}" for d in _cpu_include_dirs())]
    cmd = [cxx, *cflags, "-fPIC", "-shared", f"-DTORCH_EXTENSION_NAME={name}", *includes, str(src / CPU_SOURCE),
           "-o", str(out), *CPU_LDFLAGS]
    try:
        _run_compiler(cmd, f"building the C++ update ({src / CPU_SOURCE})")
    except RuntimeError as e:
        raise RuntimeError(
            f"{e}\nThe C++ update needs a C++17 compiler with OpenMP (g++; clang++ needs libomp), Python's headers "
            "(Python.h: e.g. apt-get install python3-dev) and pybind11's (shipped with torch). "
            "Set LLC_FAST_BUILD_DIR to build elsewhere, or use backend='torch'."
        ) from e


def _import_extension(name: str, path: Path) -> ModuleType:
    """Import the compiled module ``name`` from ``path`` (no lock: the file is complete once it exists)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build_cpu_extension() -> ModuleType:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(
            f"the C++ update needs a C++17 compiler with OpenMP; {cxx!r} was not found "
            "(install g++, e.g. apt-get install g++, or set CXX)"
        )
    name, cflags = cpu_build_config(cxx)
    target = cache_dir("sgld_update_cpu") / f"{name}{sysconfig.get_config_var('EXT_SUFFIX') or '.so'}"
    build_once(target, lambda tmp: _compile_cpu(cxx, name, cflags, tmp))
    try:
        return _import_extension(name, target)
    except ImportError as e:
        raise RuntimeError(f"the built C++ update {target} cannot be imported ({e}); delete it to rebuild") from e


def cpu_extension() -> ModuleType:
    """The compiled module (built on first use, then cached on disk and in this process): ``sgld_update``
    (of a ``native.UpdateArgs``), ``philox_debug``, ``philox4x32``, ``normals_debug`` and
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
    nvcc = find_nvcc()
    digest = _source_digest(src_dir, CUDA_SOURCE, " ".join(NVCC_FLAGS + [arch, nvcc]))
    lib = cache_dir("sgld_update_cuda") / f"llc_sgld_update_cuda_{arch}_{digest[:16]}.so"

    def compile_to(tmp: Path) -> None:
        cmd = [nvcc, *NVCC_FLAGS, f"-arch={arch}", f"-I{src_dir}", str(src_dir / CUDA_SOURCE), "-o", str(tmp)]
        _run_compiler(cmd, "nvcc building the CUDA update")

    return build_once(lib, compile_to)
