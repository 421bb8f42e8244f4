"""A checkpoint that cannot be written (ENOSPC, ...) does not end the run: a warning names the file and the error, the
last checkpoint written stays (no temporary file left), sampling goes on; a run stopped by Ctrl-C keeps its partial
result even when its last checkpoint cannot be written."""
import errno
import io
import os
import signal
import types

import numpy as np
import pytest
import torch
from torch import nn

import llc_fast
from conftest import mlp_case
from llc_fast import files
from llc_fast.chains import checkpoint
from llc_fast.chains.checkpoint import CheckpointWriteWarning
from llc_fast.chains.interrupt import SamplingInterrupted

SETTINGS = dict(lr=1e-3, nbeta=30.0, gamma=100.0, num_chains=2, seed=3, progress=False)


def disk_full_at(monkeypatch, *failing: int):
    """Make the n-th files written by ``files.write_atomically`` (1-based, in ``failing``) fail with ENOSPC after
    part of their content reached the temporary file, as a full disk does. Returns the list of written paths."""
    opened = []

    class Full(io.RawIOBase):
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()
            return False

        def write(self, data):
            self.f.write(bytes(data)[:10])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    def fdopen(fd, *args, **kwargs):
        f = os.fdopen(fd, *args, **kwargs)
        opened.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.isdir("/proc/self/fd") else fd)
        return Full(f) if len(opened) in failing else f

    fake_os = types.ModuleType("os")
    fake_os.__dict__.update(os.__dict__)
    fake_os.fdopen = fdopen
    monkeypatch.setattr(files, "os", fake_os)
    return opened


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if files.PARTIAL_SUFFIX in p.name or p.name.endswith(".next")]


def test_a_failed_checkpoint_write_warns_keeps_the_last_one_and_sampling_goes_on(tmp_path, monkeypatch):
    model, loader, loss_fn = mlp_case()
    reference = llc_fast.estimate_llc(model, loader, loss_fn, num_draws=25, **SETTINGS)
    path = tmp_path / "run.ckpt"
    disk_full_at(monkeypatch, 2)  # checkpoints at steps 10 and 20: the second fails
    with pytest.warns(CheckpointWriteWarning) as caught:
        result = llc_fast.estimate_llc(model, loader, loss_fn, num_draws=25, checkpoint=str(path),
                                       checkpoint_every=10, **SETTINGS)
    (warning,) = [w for w in caught if issubclass(w.category, CheckpointWriteWarning)]
    message = str(warning.message)
    assert f"the checkpoint {path} could not be written" in message and "No space left on device" in message
    assert f"the last one written, {path}, is kept" in message and "Sampling goes on" in message
    np.testing.assert_array_equal(result.loss_trace, reference.loss_trace)  # the run went on to its end
    assert checkpoint.read(path)["generation"] == 1 and not _leftovers(tmp_path)
    monkeypatch.undo()
    resumed = llc_fast.estimate_llc(model, loader, loss_fn, num_draws=25, resume=str(path), **SETTINGS)
    np.testing.assert_array_equal(resumed.loss_trace, reference.loss_trace)  # the kept one is a good checkpoint


def test_a_later_write_succeeds_again(tmp_path, monkeypatch):
    model, loader, loss_fn = mlp_case()
    path = tmp_path / "run.ckpt"
    written = disk_full_at(monkeypatch, 1)  # the first fails: nothing of this run was written yet
    with pytest.warns(CheckpointWriteWarning, match="no checkpoint of this run was written yet"):
        llc_fast.estimate_llc(model, loader, loss_fn, num_draws=35, checkpoint=str(path), checkpoint_every=10,
                              **SETTINGS)
    assert len(written) == 3 and checkpoint.read(path)["generation"] == 3 and not _leftovers(tmp_path)


def test_a_failed_write_with_keep_previous_leaves_both_generations(tmp_path, monkeypatch):
    """Under torchrun each rank keeps its previous checkpoint too: a failed write leaves both files as they were."""
    path = tmp_path / "c.ckpt.rank0-of-2"
    checkpoint.write(path, dict(generation=1), keep_previous=True)
    checkpoint.write(path, dict(generation=2), keep_previous=True)
    disk_full_at(monkeypatch, 1)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.write(path, dict(generation=3), keep_previous=True)
    assert sorted(checkpoint.read_generations(path)) == [1, 2] and checkpoint.read(path)["generation"] == 2
    assert not _leftovers(tmp_path)


def _interrupting(loss_fn, at_call: int):
    calls = []

    def loss(m, b):
        calls.append(1)
        if len(calls) == at_call:
            os.kill(os.getpid(), signal.SIGINT)
        return loss_fn(m, b)

    return loss


@pytest.mark.parametrize("earlier", [True, False])
def test_ctrl_c_keeps_the_partial_result_when_its_checkpoint_cannot_be_written(tmp_path, monkeypatch, earlier):
    model, loader, loss_fn = mlp_case()
    path = tmp_path / "run.ckpt"
    disk_full_at(monkeypatch, *range(2 if earlier else 1, 1000))  # with earlier: the first write succeeds
    options = dict(checkpoint=str(path), checkpoint_every=10) if earlier else dict(checkpoint=str(path))
    with pytest.warns(CheckpointWriteWarning), pytest.raises(SamplingInterrupted) as e:
        llc_fast.estimate_llc(model, loader, _interrupting(loss_fn, 40), num_draws=10_000, **options, **SETTINGS)
    message = str(e.value)
    assert f"the checkpoint {path} could not be written ([Errno 28] No space left on device)" in message
    assert e.value.result is not None and e.value.result.config["partial"]
    assert e.value.result.loss_trace.shape[1] > 0 and np.isfinite(e.value.result.llc_mean)
    if earlier:
        assert e.value.checkpoint == str(path) and checkpoint.read(path)["generation"] == 1
        assert f"saved only as far as its last checkpoint, {path}: resume it with the same call plus resume=" in message
    else:
        assert e.value.checkpoint is None and not path.exists()
        assert "there is no checkpoint to resume" in message and "resume=" not in message
    assert not _leftovers(tmp_path)


def test_on_a_full_tmpfs_every_checkpoint_fails_and_the_run_still_ends(tmp_path, tiny_tmpfs):
    """For real: a checkpoint larger than the file system (ENOSPC from the kernel), no temporary file left."""
    where = tiny_tmpfs("64k")
    torch.manual_seed(0)
    model = nn.Linear(100, 100)  # 10100 weights: a checkpoint of more than 64 KiB
    data = [(torch.randn(8, 100), torch.randn(8, 100)) for _ in range(4)]

    def loss_fn(m, b):
        return ((m(b[0]) - b[1]) ** 2).mean()

    reference = llc_fast.estimate_llc(model, data, loss_fn, num_draws=12, **SETTINGS)
    with pytest.warns(CheckpointWriteWarning, match=f"the checkpoint {where / 'run.ckpt'} could not be written "
                                                    r"\(\[Errno 28\] No space left on device\)"):
        result = llc_fast.estimate_llc(model, data, loss_fn, num_draws=12, checkpoint=str(where / "run.ckpt"),
                                       checkpoint_every=5, **SETTINGS)
    np.testing.assert_array_equal(result.loss_trace, reference.loss_trace)
    assert list(where.iterdir()) == []
