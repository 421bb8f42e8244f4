"""Builds of the compiled kernels (kernels/build.py) never hang on a lock: a build that is there loads without
any lock, a lock whose holder died (SIGKILL, an OOM kill) is released by the OS, and a wait on a live holder
ends after $LLC_FAST_BUILD_TIMEOUT seconds with an error naming the lock file and the holder's pid.

The lock holders are subprocesses that load kernels/build.py by path (no torch import: they start in well
under a second); no test here compiles anything."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llc_fast.kernels import build

HOLDER = """
import importlib.util, sys, time
from pathlib import Path
spec = importlib.util.spec_from_file_location("llc_fast_build", sys.argv[1])
build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build)
with build.build_lock(Path(sys.argv[2])):
    print("held", flush=True)
    time.sleep(float(sys.argv[3]))
    target = sys.argv[4] if len(sys.argv) > 4 else ""
    if target:  # a builder that finishes: its file lands, then the lock is released
        Path(target).write_text("built by the holder")
"""

pytestmark = pytest.mark.skipif(build.fcntl is None, reason="no fcntl (not POSIX): builds are not locked here")


def _holder(lock: Path, seconds: float, target: Path | None = None) -> subprocess.Popen:
    """A process holding ``lock`` for ``seconds`` (then writing ``target``), started once it holds it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, build.__file__, str(lock), str(seconds),
                             str(target or "")], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held", "the lock holder did not start"
    return proc


def _builder(calls: list):
    def compile_to(tmp: Path) -> None:
        calls.append(tmp)
        tmp.write_text("built here")
    return compile_to


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path, monkeypatch):
    """The holder is SIGKILLed mid-build (what an OOM kill or a scheduler does): its lock file stays, with its pid,
    and the next build takes the lock at once."""
    monkeypatch.setenv("LLC_FAST_BUILD_TIMEOUT", "10")
    target = tmp_path / "kernel.so"
    lock = tmp_path / "kernel.so.lock"
    holder = _holder(lock, 600)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    assert lock.read_text().strip() == str(holder.pid)  # left behind, naming a dead process
    calls = []
    t0 = time.monotonic()
    assert build.build_once(target, _builder(calls)) == target
    assert time.monotonic() - t0 < 5 and len(calls) == 1 and target.read_text() == "built here"
    assert lock.read_text().strip() == str(os.getpid())


def test_a_leftover_lock_file_of_an_older_build_does_not_block(tmp_path, monkeypatch):
    """Any file at the lock's path (torch's FileBaton left a bare "lock" file) is only a file, not a lock."""
    monkeypatch.setenv("LLC_FAST_BUILD_TIMEOUT", "1")
    target = tmp_path / "kernel.so"
    (tmp_path / "kernel.so.lock").write_text("12345\n")
    (tmp_path / ".kernel.so.build-left").mkdir()  # the temporary folder of a killed build
    calls = []
    build.build_once(target, _builder(calls))
    assert len(calls) == 1 and not (tmp_path / ".kernel.so.build-left").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kernel.so", "kernel.so.lock"]


def test_a_wait_on_a_live_holder_times_out_naming_the_lock_and_its_pid(tmp_path, monkeypatch):
    monkeypatch.setenv("LLC_FAST_BUILD_TIMEOUT", "0.5")
    target, lock = tmp_path / "kernel.so", tmp_path / "kernel.so.lock"
    holder = _holder(lock, 600)
    try:
        t0 = time.monotonic()
        with pytest.warns(UserWarning, match=f"waiting up to 0.5 s for pid {holder.pid}"), \
                pytest.raises(RuntimeError, match=rf"timed out after 0.5 s waiting for the build lock {lock}, held by "
                                                  rf"pid {holder.pid}.*LLC_FAST_BUILD_TIMEOUT"):
            build.build_once(target, _builder([]))
        assert time.monotonic() - t0 < 5
    finally:
        holder.kill()
        holder.wait()
    assert not target.exists()


def test_a_waiting_loader_takes_the_holders_build(tmp_path, monkeypatch):
    """Two processes building the same file: the second waits for the first and loads its file, not building."""
    monkeypatch.setenv("LLC_FAST_BUILD_TIMEOUT", "60")
    target, lock = tmp_path / "kernel.so", tmp_path / "kernel.so.lock"
    holder = _holder(lock, 0.5, target)
    calls = []
    with pytest.warns(UserWarning, match="waiting"):
        assert build.build_once(target, _builder(calls)) == target
    holder.wait(timeout=30)
    assert calls == [] and target.read_text() == "built by the holder"


def test_the_cached_cpu_extension_loads_without_a_lock(monkeypatch):
    """With the build there, loading takes no lock at all: a live process holding the build's lock does not
    delay it, and build_lock is never called."""
    from conftest import update_backend

    update_backend("cpu")  # built once for the suite (skips where it cannot be)
    name, _ = build.cpu_build_config()
    target = next(p for p in build.cache_dir("sgld_update_cpu").glob(f"{name}.*") if p.suffix != ".lock")
    holder = _holder(target.with_name(target.name + ".lock"), 600)
    try:
        monkeypatch.setattr(build, "_CPU_MODULE", None)
        monkeypatch.setenv("LLC_FAST_BUILD_TIMEOUT", "0")

        def no_lock(*a, **k):
            raise AssertionError("a lock was taken to load a cached build")

        monkeypatch.setattr(build, "build_lock", no_lock)
        module = build.cpu_extension()
    finally:
        holder.kill()
        holder.wait()
    assert hasattr(module, "sgld_update") and module.__file__ == str(target)


def test_the_cuda_library_is_built_once_the_same_way(tmp_path, monkeypatch):
    """The CUDA update goes through the same build_once: nvcc writes a private temporary file that is renamed
    into place, and a second call loads it without running nvcc (a stand-in nvcc counts its runs)."""
    nvcc = tmp_path / "nvcc"
    runs = tmp_path / "runs"
    nvcc.write_text(f'#!/bin/sh\necho run >> {runs}\nwhile [ "$1" != "-o" ]; do shift; done\necho lib > "$2"\n')
    nvcc.chmod(0o755)
    monkeypatch.setenv("NVCC", str(nvcc))
    monkeypatch.setenv("LLC_FAST_BUILD_DIR", str(tmp_path / "builds"))
    lib = build.cuda_library("sm_90")
    assert lib.parent == tmp_path / "builds" / "sgld_update_cuda" and lib.read_text() == "lib\n"
    assert build.cuda_library("sm_90") == lib and runs.read_text().count("run") == 1
    assert sorted(p.name for p in lib.parent.iterdir()) == sorted([lib.name, lib.name + ".lock"])


def test_a_bad_timeout_is_refused(monkeypatch):
    monkeypatch.setenv("LLC_FAST_BUILD_TIMEOUT", "soon")
    with pytest.raises(RuntimeError, match=r"LLC_FAST_BUILD_TIMEOUT must be a number of seconds, got 'soon'"):
        build.build_timeout()
