"""Every chain of the pinned runs is bit for bit the chain recorded in tests/golden (see record.py there):
refactors of the sampling path must not change a single draw."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

import llc_fast
from llc_fast import LLCResult

GOLDEN = Path(__file__).parent / "golden"
_spec = importlib.util.spec_from_file_location("golden_cases", GOLDEN / "cases.py")
cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cases)


def _assert_same(name: str, got: dict, golden) -> None:
    for field, value in got.items():
        want = golden[f"{name}/{field}"]
        assert value.shape == want.shape, (name, field)
        same = (value == want) | (np.isnan(value) & np.isnan(want))
        assert same.all(), f"{name} {field}: {int((~same).sum())} values differ, e.g. {value[~same][:3]} vs {want[~same][:3]}"


@pytest.mark.parametrize("name", sorted(cases.CASES))
def test_one_process_chain_is_unchanged(name):
    make_model, make_data, loss_fn, kwargs = cases.CASES[name]
    result = llc_fast.estimate_llc(make_model(), make_data(), loss_fn, **kwargs)
    _assert_same(name, cases.arrays(result), np.load(GOLDEN / "traces.npz"))


def test_torchrun_chains_are_unchanged(tmp_path):
    from test_distributed import _can_launch, torchrun

    if _can_launch():
        pytest.skip(_can_launch())
    proc = torchrun("run_cases.py", str(tmp_path), *cases.DIST_SPECS)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    golden = np.load(GOLDEN / "dist_traces.npz")
    for spec in cases.DIST_SPECS:
        name, _, s = spec.partition(":")
        result = LLCResult.load(tmp_path / f"{name}{'_S' + s if s else ''}.json")
        _assert_same(spec, cases.arrays(result), golden)
