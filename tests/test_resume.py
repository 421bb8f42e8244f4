"""Long runs that survive: exact checkpoint/resume (also after kill -9, also under torchrun), Ctrl-C and
SIGTERM at a step boundary with a partial result, and drawing until a target MCSE."""
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import llc_fast
from llc_fast import LLCResult
from llc_fast.chains import checkpoint as ckpt
from llc_fast.chains.interrupt import SamplingInterrupted
from llc_fast.estimators.llc import LLCTargetNotMetWarning

from conftest import checkpoint_recorder, mlp_case

SCRIPTS = Path(__file__).parent / "dist_scripts"
REPO = Path(__file__).parent.parent
KW = dict(lr=1e-3, nbeta=30.0, gamma=100.0, num_chains=4, num_draws=40, num_burnin_steps=6, progress=False, seed=3,
          sampler="rmsprop_sgld")


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), str(SCRIPTS)]))


def _same(a: LLCResult, b: LLCResult) -> None:
    np.testing.assert_array_equal(a.loss_trace, b.loss_trace)
    np.testing.assert_array_equal(a.burnin_loss_trace, b.burnin_loss_trace)
    assert a.llc_mean == b.llc_mean and a.init_loss == b.init_loss


@pytest.mark.parametrize("extra", [dict(max_batched_chains=2), dict(chain_batching="sequential"), {}],
                         ids=["two_groups", "sequential", "one_group"])
def test_a_resumed_run_is_the_uninterrupted_run_bit_for_bit(tmp_path, extra):
    """Checkpoints every 7 steps; resuming from each written one (mid-group, between groups) gives the same run."""
    model, loader, loss_fn = mlp_case()
    full = llc_fast.estimate_llc(model, loader, loss_fn, **KW, **extra)
    path = tmp_path / "run.ckpt"
    recording, seen = checkpoint_recorder(path, loss_fn)
    again = llc_fast.estimate_llc(model, loader, recording, checkpoint=str(path), checkpoint_every=7, **KW, **extra)
    _same(full, again)
    assert len(seen) >= 3
    for k, (_, blob) in enumerate(seen[:: max(1, len(seen) // 3)]):
        copy = tmp_path / f"copy{k}.ckpt"
        copy.write_bytes(blob)
        _same(full, llc_fast.estimate_llc(model, loader, loss_fn, resume=str(copy), **KW, **extra))


def test_kill_minus_9_at_a_random_step_then_resume(tmp_path):
    out = str(tmp_path / "run")
    full = subprocess.run([sys.executable, "resumable.py", "full", out], cwd=SCRIPTS, env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert full.returncode == 0, full.stderr[-3000:]
    proc = subprocess.Popen([sys.executable, "resumable.py", "ckpt", out, "0.02"], cwd=SCRIPTS, env=_env())
    deadline = time.monotonic() + 60
    while not Path(out + ".ckpt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(random.Random().uniform(0.0, 0.8))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -9 and not Path(out + ".ckpt.json").exists()
    groups = ckpt.read(out + ".ckpt")["groups"]
    assert not all(g["done"] for g in groups)  # killed in the middle of the run
    resumed = subprocess.run([sys.executable, "resumable.py", "resume", out], cwd=SCRIPTS, env=_env(),
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _same(LLCResult.load(out + ".full.json"), LLCResult.load(out + ".resume.json"))


def test_a_checkpoint_from_other_settings_is_refused_naming_the_difference(tmp_path):
    model, loader, loss_fn = mlp_case()
    path = str(tmp_path / "run.ckpt")
    llc_fast.estimate_llc(model, loader, loss_fn, checkpoint=path, checkpoint_every=10, **KW)
    with pytest.raises(ValueError, match=r"other settings.*lr: before \[0.001, 0.001, 0.001, 0.001\], now \[0.002"):
        llc_fast.estimate_llc(model, loader, loss_fn, resume=path, **dict(KW, lr=2e-3))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        llc_fast.estimate_llc(model, loader, loss_fn, resume=str(tmp_path / "missing.ckpt"), **KW)
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(Exception):
        llc_fast.estimate_llc(model, loader, loss_fn, resume=str(tmp_path / "junk.ckpt"), **KW)
    with pytest.raises(ValueError, match="checkpoint_every needs checkpoint"):
        llc_fast.estimate_llc(model, loader, loss_fn, checkpoint_every=5, **KW)


INTERRUPTIBLE = """
import sys, time
sys.path.insert(0, {tests!r})
from conftest import checkpoint_recorder, mlp_case
import llc_fast
from llc_fast.chains.interrupt import SamplingInterrupted
model, loader, loss_fn = mlp_case()
calls = [0]
def slow(m, b):
    calls[0] += 1
    if calls[0] == 12:  # past L(w*), the gradient check and the batching probe: the chains are running
        print("sampling", flush=True)
    time.sleep(0.02)
    return loss_fn(m, b)
try:
    llc_fast.estimate_llc(model, loader, slow, checkpoint={ckpt!r}, **{kw!r})
except SamplingInterrupted as e:
    e.result.save({partial!r})
    print("STOPPED", e, flush=True)
    sys.exit(130)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_at_a_step_boundary_with_a_checkpoint_and_a_partial_result(tmp_path, sig):
    model, loader, loss_fn = mlp_case()
    kw = dict(KW, num_draws=200)
    full = llc_fast.estimate_llc(model, loader, loss_fn, **kw)
    ck, partial = str(tmp_path / "run.ckpt"), str(tmp_path / "partial.json")
    code = INTERRUPTIBLE.format(tests=str(Path(__file__).parent), ckpt=ck, kw=kw, partial=partial)
    proc = subprocess.Popen([sys.executable, "-c", code], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "sampling"
    time.sleep(2.0)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert f"stopped by {sig.name}" in out and f"resume={ck!r}" in out and "received: stopping" in err
    part = LLCResult.load(partial)
    assert part.config["partial"] and 0 < part.loss_trace.shape[1] < 200
    np.testing.assert_array_equal(part.loss_trace, full.loss_trace[:, :part.loss_trace.shape[1]])
    _same(full, llc_fast.estimate_llc(model, loader, loss_fn, resume=ck, **kw))


def test_a_second_ctrl_c_exits_at_once(tmp_path):
    code = INTERRUPTIBLE.format(tests=str(Path(__file__).parent), ckpt=str(tmp_path / "c.ckpt"),
                                kw=dict(KW, num_draws=100000), partial=str(tmp_path / "p.json"))
    code = code.replace("time.sleep(0.02)", "time.sleep(0.5)")  # a slow step: the second signal lands inside it
    proc = subprocess.Popen([sys.executable, "-c", code], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "sampling"
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode != 0 and "KeyboardInterrupt: second SIGINT: exiting at once" in err


def test_draw_until_the_target_mcse():
    """The chains are those of a run without a target (the first draws agree bit for bit); the run stops at the
    first check where the MCSE is at most the target, or says so at max_draws."""
    model, loader, loss_fn = mlp_case()
    kw = dict(KW, num_draws=40)
    full = llc_fast.estimate_llc(model, loader, loss_fn, **dict(kw, num_draws=400))
    loose = llc_fast.estimate_llc(model, loader, loss_fn, target_stderr=1e9, check_every=20, max_draws=400, **kw)
    assert loose.config["draws_taken"] == 40 and loose.config["stopped_by"] == "target"
    np.testing.assert_array_equal(loose.loss_trace, full.loss_trace[:, :40])
    mcse_full = full.diagnostics()["mcse"]
    target = 1.5 * mcse_full
    r = llc_fast.estimate_llc(model, loader, loss_fn, target_stderr=target, check_every=20, max_draws=400, **kw)
    taken = r.config["draws_taken"]
    assert 40 <= taken <= 400 and (taken < 400) == (r.config["stopped_by"] == "target")
    np.testing.assert_array_equal(r.loss_trace, full.loss_trace[:, :taken])
    if taken < 400:
        assert r.diagnostics()["mcse"] <= target
    with pytest.warns(LLCTargetNotMetWarning, match="max_draws=60 came before the target"):
        tight = llc_fast.estimate_llc(model, loader, loss_fn, target_rel_error=1e-9, check_every=10, max_draws=60, **kw)
    assert tight.config["draws_taken"] == 60 and tight.config["stopped_by"] == "max_draws"
    with pytest.raises(ValueError, match="not both"):
        llc_fast.estimate_llc(model, loader, loss_fn, target_stderr=1.0, target_rel_error=0.1, **kw)
    with pytest.raises(ValueError, match="max_draws applies when drawing until a target"):
        llc_fast.estimate_llc(model, loader, loss_fn, max_draws=100, **kw)


def _torchrun():
    import shutil

    beside = Path(sys.executable).with_name("torchrun")
    return str(beside) if beside.is_file() else shutil.which("torchrun")


@pytest.mark.skipif(_torchrun() is None or not torch.distributed.is_gloo_available(), reason="needs torchrun and gloo")
def test_torchrun_kill_minus_9_then_resume(tmp_path):
    """Two processes, FSDP over both: each rank writes its own checkpoint file; kill -9 the whole launch in the
    middle, resume with torchrun: the same chains as an uninterrupted launch."""
    out = str(tmp_path / "run")
    env = dict(_env(), RESUMABLE_DRAWS="40")
    launch = [_torchrun(), "--standalone", "--nproc_per_node=2", "resumable.py"]
    full = subprocess.run([*launch, "full", out], cwd=SCRIPTS, env=env, capture_output=True, text=True, timeout=240)
    assert full.returncode == 0, full.stderr[-4000:]
    proc = subprocess.Popen([*launch, "ckpt", out, "0.02"], cwd=SCRIPTS, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    files = [Path(f"{out}.ckpt.rank{r}-of-2") for r in (0, 1)]
    deadline = time.monotonic() + 120
    while not all(f.exists() for f in files) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(random.Random().uniform(0.0, 0.5))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert all(f.exists() for f in files)
    resumed = subprocess.run([*launch, "resume", out], cwd=SCRIPTS, env=env, capture_output=True, text=True,
                             timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    _same(LLCResult.load(out + ".full.json"), LLCResult.load(out + ".resume.json"))
