"""Rows per vmapped call chosen by measured speed (chains/row_timing.py): trial passes at the planned most, half and
a quarter before sampling, the fastest per row kept and recorded (rows_per_call, row_times_s, row_plan). A chain
does not depend on the rows it shares a call with, so runs forced into different calls give the same traces; sparse
runs split their component groups into calls that fit the memory budget the same way. Peak memory is a fact."""
import numpy as np
import pytest

import llc_fast
from llc_fast.chains import row_timing

from conftest import gpt2_case, mlp_case

KW = dict(lr=1e-3, nbeta=30.0, gamma=100.0, num_chains=8, num_draws=6, num_burnin_steps=3, progress=False, seed=7)
SPARSE_KW = dict(lr=1e-4, nbeta=10.0, gamma=100.0, num_chains=2, num_draws=5, num_burnin_steps=3, seed=3,
                 progress=False)


def _prefer(monkeypatch, rows_wanted) -> list:
    """Measure on every run (no minimum of steps) with trial times that make ``rows_wanted(size)`` the fastest
    (seconds per call: 1 for the wanted size, 10 per row for the others); returns the sizes timed."""
    timed_sizes = []
    monkeypatch.setattr(row_timing, "MIN_STEPS", 1)

    def fake_fastest(sizes, time_call, rows_timed=None, repeats=2):
        timed_sizes.extend(sizes)
        for s in sizes:  # the trials still run (no state advances), only their clock is replaced
            time_call(s)
        best = rows_wanted(sizes)
        return best, {s: (0.001 if s == best else 0.01) for s in sizes}

    monkeypatch.setattr(row_timing, "fastest", fake_fastest)
    return timed_sizes


def _full(**kw):
    model, loader, loss_fn = mlp_case()
    return llc_fast.estimate_llc(model, loader, loss_fn, **dict(KW, **kw))


@pytest.mark.parametrize("pick", [min, max, lambda sizes: sizes[1]])
def test_full_rows_measured_choice_is_recorded_and_changes_no_chain(monkeypatch, pick):
    fit = _full(row_batching="fit")
    assert "rows_per_call" not in fit.config and "measured" not in fit.config["row_plan"]
    sizes = _prefer(monkeypatch, pick)
    got = _full()
    assert sizes == [8, 4, 2]  # the plan's most, half and a quarter
    assert got.config["rows_per_group"] == 8 and got.config["rows_per_call"] == pick(sizes)
    assert set(got.config["row_times_s"]) == {"8", "4", "2"}
    assert f"measured: {pick(sizes)} rows per call is fastest" in got.config["row_plan"]
    for field in ("loss_trace", "burnin_loss_trace", "llc_per_chain"):
        np.testing.assert_array_equal(getattr(got, field), getattr(fit, field))


@pytest.mark.parametrize("cap", [2, 3, 5])
def test_forced_row_batch_sizes_give_identical_traces(cap):
    """Bit for bit between vmapped calls of any size (one row per group runs the sequential engine instead: the
    same chains to float rounding, tests/test_row_planning.py)."""
    every = _full(row_batching="fit")
    got = _full(row_batching="fit", max_batched_chains=cap)
    assert got.config["rows_per_group"] == cap
    np.testing.assert_array_equal(got.loss_trace, every.loss_trace)
    np.testing.assert_array_equal(got.llc_per_chain, every.llc_per_chain)


def test_measured_with_real_clocks_and_the_minimum_of_steps(monkeypatch):
    short = _full()  # 9 steps < MIN_STEPS: no trials
    assert "rows_per_call" not in short.config
    monkeypatch.setattr(row_timing, "MIN_STEPS", 1)
    got = _full()
    assert got.config["rows_per_call"] in (8, 4, 2) and all(t > 0 for t in got.config["row_times_s"].values())
    np.testing.assert_array_equal(got.loss_trace, short.loss_trace)


def test_peak_memory_is_a_fact():
    got = _full(num_chains=2)
    assert got.config["peak_rss_bytes"] > 10 * 2**20


@pytest.fixture(scope="module")
def gpt2_heads_fit():
    model, loader, loss_fn = gpt2_case()
    model.eval()
    run = llc_fast.estimate_restricted_llcs(model, loader, loss_fn, "heads", row_batching="fit", **SPARSE_KW)
    return model, loader, loss_fn, run


def _same(a, b):
    for name in a.names:
        np.testing.assert_array_equal(a[name].loss_trace, b[name].loss_trace)
        np.testing.assert_array_equal(a[name].llc_per_chain, b[name].llc_per_chain)


def test_sparse_rows_split_by_max_batched_chains_and_memory_give_identical_traces(gpt2_heads_fit):
    model, loader, loss_fn, every = gpt2_heads_fit
    assert every.facts["row_storage"] == "sparse" and every.facts["rows_per_call"] == 2 * 2  # 2 heads x 2 chains
    assert "one call per group fits" in every.facts["row_plan"] and every.facts["peak_rss_bytes"] > 0
    one = llc_fast.estimate_restricted_llcs(model, loader, loss_fn, "heads", row_batching="fit",
                                            max_batched_chains=2, **SPARSE_KW)
    assert one.facts["rows_per_call"] == 2 and "split to fit" in one.facts["row_plan"]
    _same(one, every)
    tight = llc_fast.estimate_restricted_llcs(model, loader, loss_fn, "heads", row_batching="fit",
                                              batch_memory_bytes=1, **SPARSE_KW)
    assert tight.facts["rows_per_call"] == 2 and "batch_memory_bytes=1" in tight.facts["row_plan"]
    _same(tight, every)


def test_sparse_rows_measured_choice(monkeypatch, gpt2_heads_fit):
    model, loader, loss_fn, every = gpt2_heads_fit
    sizes = _prefer(monkeypatch, min)
    got = llc_fast.estimate_restricted_llcs(model, loader, loss_fn, "heads", **SPARSE_KW)
    assert sizes == [2, 1]  # components per call: both heads of a layer, one
    assert got.facts["rows_per_call"] == 2 and set(got.facts["row_times_s"]) == {"4", "2"}
    assert "measured: 2 rows per call" in got.facts["row_plan"]
    _same(got, every)


def test_candidates():
    assert row_timing.candidates(8) == [8, 4, 2] and row_timing.candidates(5) == [5, 3, 2]
    assert row_timing.candidates(2) == [2, 1] and row_timing.candidates(1) == [1]
    best, per_row = row_timing.fastest([4, 2, 1], lambda s: {4: 4.0, 2: 1.0, 1: 1.0}[s], repeats=1)
    assert best == 2 and per_row == {4: 1.0, 2: 0.5, 1: 1.0}
