"""Sampling under torchrun (2 processes, gloo): the same chains as one process, chains in parallel, and
a failing rank stopping every rank. The scripts torchrun runs are in tests/dist_scripts/."""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import llc_fast
from llc_fast import LLCResult
from llc_fast.distributed.mesh import batch_part, chain_assignment, check_shard_group_size

SCRIPTS = Path(__file__).parent / "dist_scripts"
REPO = Path(__file__).parent.parent


def _torchrun() -> str | None:
    beside = Path(sys.executable).with_name("torchrun")
    return str(beside) if beside.is_file() else shutil.which("torchrun")


def _can_launch() -> str:
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        return "torch.distributed with gloo is not available"
    if _torchrun() is None:
        return "torchrun is not installed"
    return ""


needs_torchrun = pytest.mark.skipif(bool(_can_launch()), reason=_can_launch() or "torchrun available")


def _load_cases():
    spec = importlib.util.spec_from_file_location("dist_cases", SCRIPTS / "cases.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cases = _load_cases()


def torchrun(*args: str, nproc: int = 2, timeout: float = 300, module: bool = False) -> subprocess.CompletedProcess:
    """torchrun --standalone --nproc_per_node=nproc ARGS (a script in dist_scripts, or -m MODULE ...)."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [_torchrun(), "--standalone", f"--nproc_per_node={nproc}", *(["-m"] if module else []), *args]
    return subprocess.run(cmd, cwd=SCRIPTS, env=env, capture_output=True, text=True, timeout=timeout)


# --- the layout, without processes ----------------------------------------------------------------

def test_chain_assignment_and_shard_group_size():
    assert chain_assignment(5, 2) == [[0, 2, 4], [1, 3]]
    assert chain_assignment(1, 4) == [[0], [], [], []]
    assert check_shard_group_size(None, 8) == 8 and check_shard_group_size(2, 8) == 2
    with pytest.raises(ValueError, match="divisor"):
        check_shard_group_size(3, 8)


def test_batch_part_splits_rows_or_replicates():
    x, y = torch.arange(8).reshape(4, 2), torch.arange(4)
    a, b = batch_part((x, y), 0, 2), batch_part((x, y), 1, 2)
    assert torch.equal(torch.cat([a[0], b[0]]), x) and torch.equal(torch.cat([a[1], b[1]]), y)
    assert batch_part({"ids": x, "n": 3}, 1, 2)["n"] == 3
    odd = (torch.zeros(3, 2),)
    assert batch_part(odd, 1, 2) is odd  # auto: not divisible -> every rank takes the whole batch
    assert batch_part((x, y), 1, 2, "replicate")[0] is x
    with pytest.raises(ValueError, match="replicate"):
        batch_part(odd, 0, 2, "split")


def test_without_a_process_group_it_is_estimate_llc():
    from llc_fast.distributed import estimate_llc_sharded

    make_model, make_data, loss, kwargs = cases.CASES["mlp_chains"]
    a = llc_fast.estimate_llc(make_model(), make_data(), loss, **kwargs)
    b = estimate_llc_sharded(make_model(), make_data(), loss, **kwargs)
    np.testing.assert_array_equal(a.loss_trace, b.loss_trace)
    with pytest.raises(ValueError, match="torchrun"):
        estimate_llc_sharded(make_model(), make_data(), loss, shard_group_size=2, **kwargs)


# --- two processes ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    """One torchrun launch for all cases: S = 2 (FSDP, through estimate_llc's dispatch), a model the caller
    sharded, and S = 1. The script also checks that every model holds w* again afterwards, bitwise."""
    out = tmp_path_factory.mktemp("two_processes")
    proc = torchrun("run_cases.py", str(out), "mlp_rmsprop", "mlp_bf16", "gpt2", "gpt2:presharded", "mlp_chains:1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out


@needs_torchrun
@pytest.mark.parametrize("case, file, atol", [("mlp_rmsprop", "mlp_rmsprop", 1e-5), ("gpt2", "gpt2", 1e-5),
                                              ("gpt2", "gpt2_presharded", 1e-5), ("mlp_bf16", "mlp_bf16", 2e-2)])
def test_two_process_fsdp_run_equals_one_process_run(two_process_results, case, file, atol):
    """Same seed: the noise is keyed by global element index, so sharding changes nothing but rounding.
    mlp_rmsprop: uneven shards, an empty shard, RMSProp (bias-corrected), a mask and a box; gpt2: tied
    embeddings, FSDP per block (sharded by llc_fast, or by the caller before the call); bf16: stochastic
    rounding keyed the same way (the loss is bf16 too, hence the tolerance)."""
    make_model, make_data, loss, kwargs = cases.CASES[case]
    ref = llc_fast.estimate_llc(make_model(), make_data(), loss, **kwargs)
    got = LLCResult.load(two_process_results / f"{file}.json")
    assert (got.config["world_size"], got.config["shard_group_size"], got.config["engine"]) == (2, 2, "fsdp")
    assert got.config["num_params"] == ref.config["num_params"]
    np.testing.assert_allclose(got.loss_trace, ref.loss_trace, rtol=0, atol=atol)
    np.testing.assert_allclose(got.burnin_loss_trace, ref.burnin_loss_trace, rtol=0, atol=atol)
    assert got.init_loss == pytest.approx(ref.init_loss, abs=atol)
    assert np.all(np.isfinite(got.loss_trace))


@needs_torchrun
def test_chains_in_parallel_match_the_sequential_run(two_process_results):
    """W = 2, S = 1: two chain groups, each running its chains (0, 2 and 1, 3) at the same time."""
    make_model, make_data, loss, kwargs = cases.CASES["mlp_chains"]
    ref = llc_fast.estimate_llc(make_model(), make_data(), loss, chain_batching="sequential", **kwargs)
    got = LLCResult.load(two_process_results / "mlp_chains_S1.json")
    assert (got.config["world_size"], got.config["shard_group_size"], got.config["num_chain_groups"]) == (2, 1, 2)
    assert got.num_chains == 4
    np.testing.assert_allclose(got.loss_trace, ref.loss_trace, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got.llc_per_chain, ref.llc_per_chain, rtol=1e-5)
    assert got.llc_mean == pytest.approx(ref.llc_mean, rel=1e-5)


#: The line fail.py's rank 1 prints, with time.time(), just before it fails (fail.py's INJECTED).
INJECTED = "fail.py: failure injected at"
#: A hang guard only (a test that reaches it has failed anyway): generous for a busy 2-core machine.
LAUNCH_TIMEOUT_S = 600


def _communicate_all(procs: dict) -> dict:
    """{name: (output, time.time() when that process ended)}, waiting for all of them at once."""
    from concurrent.futures import ThreadPoolExecutor

    def wait(proc):
        text, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
        return text, time.time()

    with ThreadPoolExecutor(len(procs)) as pool:
        futures = {name: pool.submit(wait, proc) for name, proc in procs.items()}
        return {name: f.result() for name, f in futures.items()}


def _assert_stopped_in_time(text: str, launched: float, ended: float, bound_s: float) -> None:
    """Every rank stopped within ``bound_s`` (the guard's own bound) of the failure fail.py injected, plus the
    time this machine took from the launch to the failure (imports, rendezvous, 19 loss calls): a busy machine
    slows stopping (the guard's polls, the tracebacks, the launcher's clean-up) as it slows starting, so the
    bound scales with the load instead of racing it. Stopped by the collective timeout (30 min) it would fail."""
    found = re.search(re.escape(INJECTED) + r" ([0-9.]+)", text)
    assert found, f"fail.py never reached its failure:\n{text[-4000:]}"
    injected = float(found.group(1))
    startup, stopping = injected - launched, ended - injected
    assert stopping < bound_s + startup, (
        f"the ranks stopped {stopping:.1f} s after the failure; the bound is {bound_s:g} s plus the {startup:.1f} s "
        f"the launch took to reach the failure\n{text[-4000:]}")


@needs_torchrun
def test_a_failing_rank_stops_every_rank_and_writes_nothing(tmp_path):
    """Rank 1 raises in loss_fn at step 3. "exit": its process ends; "alive": it catches the error and
    keeps running, so rank 0, blocked in FSDP's all-gather, must end itself (failure.py's watchdog, within
    fail.py's grace of 2 s and a poll). Both launches run at the same time."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    runs = {}
    launched = time.time()
    for mode in ("exit", "alive"):
        (tmp_path / mode).mkdir()
        out = tmp_path / mode / "result.json"
        cmd = [_torchrun(), "--standalone", "--nproc_per_node=2", "fail.py", mode, str(out)]
        runs[mode] = subprocess.Popen(cmd, cwd=SCRIPTS, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True)
    for mode, (text, ended) in _communicate_all(runs).items():
        assert runs[mode].returncode != 0, text[-4000:]
        assert "ValueError: injected failure in loss_fn" in text  # the failing rank's own traceback
        if mode == "exit":  # rank 0's collective broke when rank 1's process ended: a PeerFailedError naming rank 1
            assert "PeerFailedError: rank 0 stopped because rank 1 failed with ValueError" in text, text[-4000:]
        else:  # rank 0 was blocked in a collective with a live peer: the watchdog ended it
            assert "llc_fast [rank 0]: rank 1 failed with ValueError: injected failure in loss_fn" in text, text[-4000:]
            assert "ending the process (exit code 3)" in text, text[-4000:]
        _assert_stopped_in_time(text, launched, ended, bound_s=2.0 + 3.0)  # grace 2 s, polls of 0.5 s
        assert list((tmp_path / mode).iterdir()) == []  # no output, no half-written temporary file


@needs_torchrun
def test_a_hung_rank_is_named_and_every_rank_stops_in_bounded_time(tmp_path):
    """Rank 1 sleeps in loss_fn, outside any collective; rank 0 waits in FSDP's all-gather. With a stall bound of
    5 s the heartbeats name rank 1 and where it is stuck, and the launch ends well before any collective timeout."""
    env = dict(os.environ, OMP_NUM_THREADS="1", LLC_FAST_STALL_TIMEOUT="5",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    launched = time.time()
    proc = subprocess.run([_torchrun(), "--standalone", "--nproc_per_node=2", "fail.py", "hang",
                           str(tmp_path / "r.json")], cwd=SCRIPTS, env=env, capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT_S)
    ended = time.time()
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "llc_fast [rank 1]: no rank finished a step for 5 s and this rank is not in a collective (it is in " \
           "failing_loss at" in text, text[-4000:]
    _assert_stopped_in_time(text, launched, ended, bound_s=5.0 + 2.0 + 3.0)  # stall bound, grace, polls
    assert not (tmp_path / "r.json").exists()


def _launch_without_torchrun(mode: str, out: Path, port: int):
    """The two ranks of fail.py as plain processes (env:// rendezvous): no launcher stops the survivor."""
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, OMP_NUM_THREADS="1", RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        procs.append(subprocess.Popen([sys.executable, "fail.py", mode, str(out)], cwd=SCRIPTS, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


@needs_torchrun
def test_a_rank_killed_with_sigkill_is_named_by_the_heartbeat(tmp_path):
    """Rank 1 SIGKILLs itself mid-run. Under torchrun the launcher names it at once; without a launcher rank 0's
    collective breaks and its guard names rank 1 from the missing heartbeat within dead_s (10 s) + polls."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launched = time.time()
    rank0, rank1 = _launch_without_torchrun("kill", tmp_path / "r.json", port)
    ends = _communicate_all({0: rank0, 1: rank1})
    (text, ended), (text1, _) = ends[0], ends[1]
    assert rank1.returncode == -9 and rank0.returncode != 0
    assert "PeerFailedError: rank 0 stopped because rank 1 stopped answering (no heartbeat for" in text, text[-3000:]
    _assert_stopped_in_time(text1 + text, launched, ended, bound_s=10.0 + 2 * 0.5 + 3.0)  # dead_s, 2 polls, slack

    proc = subprocess.run([_torchrun(), "--standalone", "--nproc_per_node=2", "fail.py", "kill",
                           str(tmp_path / "r2.json")], cwd=SCRIPTS, env=dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])),
        capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "rank      : 1" in text and "(SIGKILL)" in text
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "r2.json").exists()
