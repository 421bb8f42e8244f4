"""llc_fast.files: results are written atomically (complete or untouched), with the mode a user expects."""
import os
import stat
import subprocess
import sys
from pathlib import Path

from torch import nn
from torch.utils.data import DataLoader

import llc_fast
from llc_fast import LLCResult

from conftest import mse, regression_data

REPO = Path(__file__).parent.parent

TWO_CHAINS = dict(lr=1e-3, nbeta=20.0, num_chains=2, num_draws=12, progress=False)


def _loader():
    return DataLoader(regression_data(), batch_size=16)


def test_saved_results_honour_the_umask_and_the_target_mode(tmp_path):
    r = llc_fast.estimate_llc(nn.Linear(3, 1), _loader(), mse, **TWO_CHAINS)
    old = os.umask(0o022)
    try:
        path = r.save(tmp_path / "r.json")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        os.chmod(path, 0o600)
        r.save(path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600  # an existing file keeps its mode
    finally:
        os.umask(old)


def test_a_killed_save_leaves_a_recognisable_partial_file_that_the_next_save_removes(tmp_path):
    r = llc_fast.estimate_llc(nn.Linear(3, 1), _loader(), mse, **TWO_CHAINS)
    code = ("import os, sys; from pathlib import Path; import llc_fast.files as files\n"
            "os.replace = lambda *a: os.kill(os.getpid(), 9)\n"
            f"files.write_atomically(Path({str(tmp_path / 'r.json')!r}), 'x' * 1000)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == -9
    partial = [p.name for p in tmp_path.iterdir()]
    assert len(partial) == 1 and partial[0].startswith("r.json.llc_fast-partial.")
    r.save(tmp_path / "r.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    assert LLCResult.load(tmp_path / "r.json").llc_mean == r.llc_mean
