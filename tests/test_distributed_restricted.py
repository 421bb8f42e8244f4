"""Restricted, refined and susceptibility runs under torchrun (2 processes, gloo; ``llc_fast/distributed/rows.py``):
the chain rows split over the ranks, every rank returning the same result, equal to one process's; checkpoints and
resume per rank; a failing rank stopping both. The script torchrun runs is tests/dist_scripts/rows.py, the cases
tests/dist_scripts/row_cases.py."""
import importlib.util
import os
import sys

import numpy as np
import pytest
import torch

from llc_fast.config import LLCConfig
from llc_fast.distributed.rows import check_rows_run, rank_rows, row_split

from test_distributed import LAUNCH_TIMEOUT_S, SCRIPTS, needs_torchrun, torchrun


def _load_row_cases():
    sys.path.insert(0, str(SCRIPTS))  # row_cases imports cases
    spec = importlib.util.spec_from_file_location("row_cases", SCRIPTS / "row_cases.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


row_cases = _load_row_cases()
#: case -> the split a 2-process run takes and the rows' storage
SPLITS = {"restricted8": ("components", "sparse"), "restricted8_seq": ("components", "full"),
          "restricted1": ("chains", "sparse"), "refined": ("chains", "None"), "susceptibility": ("components", "full"),
          "susceptibility_tokens": ("components", "full")}


def _summaries(folder, stem: str) -> list[dict]:
    return [dict(np.load(folder / f"{stem}.rank{r}.npz")) for r in (0, 1)]


def _assert_same(got: dict, want: dict, atol: float = 0.0) -> None:
    assert set(got) == set(want), set(got) ^ set(want)
    for key in want:
        if atol:
            np.testing.assert_allclose(got[key], want[key], rtol=0, atol=atol, err_msg=key)
        else:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


# --- the split, without processes ---------------------------------------------------------------------

def test_rows_are_split_by_component_when_there_are_enough_else_by_chain():
    assert row_split(8, 3, 2) == ("components", [[0, 2, 4, 6], [1, 3, 5, 7]])
    assert rank_rows("components", [1, 3], 4, 3) == [3, 4, 5, 9, 10, 11]
    assert row_split(1, 4, 2) == ("chains", [[0, 2], [1, 3]]) and row_split(None, 3, 2)[0] == "chains"
    assert rank_rows("chains", [1, 3], 2, 4) == [1, 3, 5, 7] and rank_rows("chains", [1], None, 3) == [1]
    assert row_split(None, 1, 2) == ("chains", [[0], []])  # rank 1 then only joins the gather


def test_what_a_row_split_run_cannot_do_is_refused_saying_what_works():
    model = torch.nn.Linear(3, 1)
    base = dict(lr=1e-3, nbeta=10.0, components=(("a", None),))
    with pytest.raises(NotImplementedError, match=r"shard_group_size=2 \(the model sharded with FSDP\) is not "
                                                  r"supported for it yet. Pass shard_group_size=1"):
        check_rows_run(model, LLCConfig(shard_group_size=2, **base))
    with pytest.raises(NotImplementedError, match="stopping target yet .* Pass num_draws alone"):
        check_rows_run(model, LLCConfig(target_stderr=0.1, **base))
    check_rows_run(model, LLCConfig(shard_group_size=1, **base))


# --- two processes --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    """One torchrun launch: every case of row_cases, and two runs writing checkpoints every 5 steps."""
    out = tmp_path_factory.mktemp("rows")
    proc = torchrun("rows.py", str(out), *SPLITS, "restricted8:ckpt", "refined:ckpt", timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out, proc.stdout


@needs_torchrun
@pytest.mark.parametrize("case", list(SPLITS))
def test_two_processes_equal_one_process(two_process_runs, case):
    """Both ranks return the same numbers bitwise; they equal one process's: bitwise when every row runs alone on
    both sides (restricted8_seq), else to float32 rounding (a row batched with other rows in its vmapped pass)."""
    out, stdout = two_process_runs
    how, storage = SPLITS[case]
    assert f"{case}: row_split={how} world_size=2 row_storage={storage}" in stdout, stdout
    rank0, rank1 = _summaries(out, case)
    _assert_same(rank1, rank0)
    ref = row_cases.summary(row_cases.run(case))
    _assert_same(rank0, ref, atol=0.0 if case == "restricted8_seq" else 1e-6)
    assert np.isfinite(rank0[next(k for k in ref if k.endswith("loss_trace"))]).all()


@needs_torchrun
def test_checkpoint_and_resume_under_torchrun(two_process_runs, tmp_path):
    """Each rank checkpoints its rows to <path>.rank<r>-of-2. A run stopped after its first checkpoint (each rank's
    newest file replaced by the one before it, step 5 of 11) resumes under torchrun to the uninterrupted run, bit
    for bit; resuming it in one process is refused, naming both process counts."""
    out, _ = two_process_runs
    for case in ("restricted8", "refined"):
        for r in (0, 1):
            path = out / f"{case}.ckpt.rank{r}-of-2"
            assert path.is_file() and (out / f"{path.name}.previous").is_file()
            os.replace(out / f"{path.name}.previous", path)
        _assert_same(_summaries(out, f"{case}.ckpt")[0], _summaries(out, case)[0])
    proc = torchrun("rows.py", str(out), "restricted8:resume", "refined:resume", timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for case in ("restricted8", "refined"):
        uninterrupted = _summaries(out, case)[0]
        for resumed in _summaries(out, f"{case}.resume"):
            _assert_same(resumed, uninterrupted)
    ckpt = str(out / "restricted8.ckpt")
    with pytest.raises(ValueError, match=r"restricted8.ckpt was written by 2 process\(es\); resume it with as many "
                                         r"\(now 1\): launch it with torchrun --nproc_per_node=2"):
        row_cases.run("restricted8", checkpoint=ckpt, checkpoint_every=5, resume=ckpt)


@needs_torchrun
@pytest.mark.parametrize("mode", ["fail", "alive"])
def test_a_failing_rank_stops_both_with_an_error_naming_it(tmp_path, mode):
    """Rank 1's loss_fn raises while sampling its rows. "fail": its process ends and rank 0's gather breaks: a
    PeerFailedError naming rank 1 and its error. "alive": rank 1 catches the error and stays alive, so rank 0 stops
    at its next step (PeerFailedError) or, already waiting in the gather, is ended by the failure guard after its
    grace (10 s), naming rank 1's error either way. Nothing is written."""
    proc = torchrun("rows.py", str(tmp_path), f"restricted8:{mode}", timeout=LAUNCH_TIMEOUT_S)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-4000:]
    assert "ValueError: injected failure in loss_fn" in text
    if mode == "fail":
        assert "PeerFailedError: rank 0 stopped because rank 1 failed with ValueError: injected failure in " \
               "loss_fn" in text, text[-4000:]
    else:  # rank 0 still sampling stops at its next step; waiting in the gather, its guard ends the process
        stopped = "PeerFailedError: rank 0 stopped because rank 1 failed with ValueError: injected failure in loss_fn"
        ended = ("llc_fast [rank 0]: rank 1 failed with ValueError: injected failure in loss_fn" in text
                 and "ending the process (exit code 3)" in text)
        assert stopped in text or ended, text[-4000:]
    assert list(tmp_path.iterdir()) == []
