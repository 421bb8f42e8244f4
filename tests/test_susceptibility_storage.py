"""Per-token losses streamed to .npy files (``estimate_susceptibilities(token_losses_path=...)``): before sampling the
free space is checked against everything the run will write (refused with both numbers) and every file is
allocated on disk, so a full file system is an error before the first step, never a SIGBUS (exit 135) halfway."""
import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from torch import nn

import llc_fast
from conftest import mlp_case
from llc_fast import files
from llc_fast.estimators.susceptibility import NPY_HEADER_BYTES

REPO = Path(__file__).parent.parent
SETTINGS = dict(lr=1e-3, nbeta=30.0, gamma=100.0, num_chains=2, progress=False)


def per_sample(m, b):
    return nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")


def _run(path, num_draws, per_token_fn=per_sample):
    model, loader, loss_fn = mlp_case()
    batches = list(loader)
    return llc_fast.estimate_susceptibilities(model, batches, loss_fn, {"first": ["0.*"], "last": ["2.*"]},
                                              {"other": batches[1:2]}, per_token_fn=per_token_fn, token_losses=True,
                                              token_losses_path=path, num_draws=num_draws, **SETTINGS)


def _counting():
    calls = []

    def per_token(m, b):
        calls.append(1)
        return per_sample(m, b)

    return per_token, calls


# 2 components x 2 chains x D draws x 32 samples x 4 bytes, for each of 'sampling' and 'other'
def _bytes(num_draws):
    return 2 * (2 * 2 * num_draws * 32 * 4)


def test_too_little_free_space_is_refused_before_sampling_with_both_numbers(tmp_path, monkeypatch):
    free = 100_000
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=free))
    per_token, calls = _counting()
    with pytest.raises(OSError) as e:
        _run(tmp_path / "tl", 1000, per_token)
    assert e.value.errno == errno.ENOSPC
    message = str(e.value)
    need = _bytes(1000) + 2 * NPY_HEADER_BYTES
    assert "per-token losses" in message and str(tmp_path / "tl") in message
    assert f"need {need / 2**20:.2f} MiB ({need} bytes)" in message  # both numbers
    assert f"{free / 2**20:.2f} MiB ({free} bytes) free" in message
    assert "token_losses_sampling.npy" in message and "token_losses_other.npy" in message
    assert "token_losses_path" in message and "fewer draws" in message
    assert len(calls) <= 4  # the checks at w* only (one per set and batch, twice): nothing sampled
    assert not list((tmp_path / "tl").iterdir())  # no file was created


def test_the_check_counts_the_files_a_rerun_replaces(tmp_path, monkeypatch):
    """A rerun into the same directory truncates the files of the last run: their space counts as free."""
    first = _run(tmp_path, 40)
    on_disk = sum(f.stat().st_size for f in tmp_path.glob("token_losses_*.npy"))
    assert on_disk > _bytes(40)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=8192))  # < one run, > the headers
    again = _run(tmp_path, 40)
    np.testing.assert_array_equal(again.token_losses["other"], first.token_losses["other"])


@pytest.mark.skipif(not hasattr(os, "posix_fallocate") or not Path("/proc/self/fd").is_dir(), reason="Linux only")
def test_files_are_allocated_on_disk_before_sampling(tmp_path, monkeypatch):
    allocated = []
    real = os.posix_fallocate

    def fallocate(fd, offset, length):
        allocated.append((os.readlink(f"/proc/self/fd/{fd}"), offset, length))
        return real(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    res = _run(tmp_path, 20)
    names = sorted(Path(f).name for f, _, _ in allocated)
    assert names == ["token_losses_other.npy", "token_losses_sampling.npy"]
    for file, offset, length in allocated:
        array = np.load(file, mmap_mode="r")
        assert offset + length == Path(file).stat().st_size and length == array.nbytes == 2 * 2 * 20 * 32 * 4
    np.testing.assert_array_equal(np.load(tmp_path / "token_losses_other.npy").reshape(2, 2, 20, 32),
                                  res.token_losses["other"])


@pytest.mark.parametrize("unsupported", ["missing", "EOPNOTSUPP"])
def test_without_fallocate_the_file_is_filled_with_zeros(tmp_path, monkeypatch, unsupported):
    if unsupported == "missing":
        monkeypatch.delattr(os, "posix_fallocate")
    else:
        def fallocate(fd, offset, length):
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")

        monkeypatch.setattr(os, "posix_fallocate", fallocate)
    path = tmp_path / "f.bin"
    path.write_bytes(b"head")
    with open(path, "r+b") as f:  # a sparse tail, as numpy's memmap makes it
        f.truncate(4 + 3 * 2**20 + 5)
    files.reserve(path, 4, 3 * 2**20 + 5)
    assert path.read_bytes()[:4] == b"head" and path.stat().st_size == 4 + 3 * 2**20 + 5
    assert path.stat().st_blocks * 512 >= 3 * 2**20  # written, not a hole


def test_a_full_tmpfs_is_an_error_before_sampling_not_a_sigbus(tmp_path, tiny_tmpfs):
    """For real, in a fresh process: without the check numpy's memmap on a full tmpfs dies of SIGBUS (exit 135)."""
    where = tiny_tmpfs("256k")
    script = ("import sys; sys.path.insert(0, 'tests'); from test_susceptibility_storage import _run; "
              "_run(sys.argv[1], 2000)")
    proc = subprocess.run([sys.executable, "-c", script, str(where / "tl")], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "OSError: [Errno 28] the per-token losses" in proc.stderr and "free" in proc.stderr
    assert not list((where / "tl").iterdir())


def test_a_run_that_fits_a_tmpfs_writes_its_files_there(tiny_tmpfs):
    where = tiny_tmpfs("1m")
    res = _run(where, 100)  # 2 x 102400 bytes
    np.testing.assert_array_equal(np.load(where / "token_losses_other.npy").reshape(2, 2, 100, 32),
                                  res.token_losses["other"])
    assert np.isfinite(res.chi).all()


def test_a_race_for_the_space_removes_what_was_made(tmp_path, monkeypatch):
    """Space taken by someone else between the check and the allocation: an error naming the folder, no files."""
    def full(path, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "reserve", full)
    monkeypatch.setattr("llc_fast.estimators.susceptibility.reserve", full)
    per_token, calls = _counting()
    with pytest.raises(OSError, match=r"could not allocate the per-token losses under .*No space left on device.*"
                                      r"nothing was sampled"):
        _run(tmp_path, 50, per_token)
    assert len(calls) <= 4 and not list(tmp_path.glob("*.npy"))


def test_subset_names_that_cannot_be_file_names_are_refused_up_front(tmp_path):
    model, loader, loss_fn = mlp_case()
    batches = list(loader)
    per_token, calls = _counting()
    for bad in ("a/b", "..", "", "x\0y"):
        with pytest.raises(ValueError) as e:
            llc_fast.estimate_susceptibilities(model, batches, loss_fn, {"first": ["0.*"]}, {bad: batches[:1]},
                                               per_token_fn=per_token, token_losses=True, token_losses_path=tmp_path,
                                               num_draws=5, **SETTINGS)
        assert f"subset name {bad!r} cannot be part of a file name" in str(e.value)
        assert "letters, digits, spaces and the characters _ - . + = ," in str(e.value)
    assert not calls and not list(tmp_path.iterdir())
