"""Record the golden traces: ``python tests/golden/record.py`` (rewrites traces.npz and dist_traces.npz).

Run it only when an issue asks for new math: the test ``tests/test_golden_traces.py`` pins every chain of
these runs (to a tolerance of a few float32 ulps of the loss, the last-bit differences between CPUs), so a
refactor that changes a chain fails there.
"""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
import cases  # noqa: E402

import llc_fast  # noqa: E402


def one_process() -> dict:
    out = {}
    for name, (make_model, make_data, loss_fn, kwargs) in cases.CASES.items():
        result = llc_fast.estimate_llc(make_model(), make_data(), loss_fn, **kwargs)
        out.update({f"{name}/{k}": v for k, v in cases.arrays(result).items()})
    return out


def two_processes() -> dict:
    from llc_fast import LLCResult

    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        torchrun = Path(sys.executable).with_name("torchrun")
        proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "run_cases.py", tmp,
                               *cases.DIST_SPECS], cwd=REPO / "tests" / "dist_scripts", env=env)
        assert proc.returncode == 0
        out = {}
        for spec in cases.DIST_SPECS:
            name, _, s = spec.partition(":")
            file = f"{name}{'_S' + s if s else ''}.json"
            out.update({f"{spec}/{k}": v for k, v in cases.arrays(LLCResult.load(Path(tmp) / file)).items()})
        return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    np.savez(HERE / "traces.npz", **one_process())
    np.savez(HERE / "dist_traces.npz", **two_processes())
    print("recorded", HERE / "traces.npz", HERE / "dist_traces.npz")
