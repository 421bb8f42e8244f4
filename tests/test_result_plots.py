"""Plots of results that must stay readable: a checkpoint sweep of many steps (few tick labels, untrusted cells
of the heat map hatched) and the susceptibility heat map (unresolved cells hatched, per-token lines)."""
import numpy as np
import pytest

from llc_fast.estimators.restricted import RestrictedLLCResult
from llc_fast.estimators.susceptibility import SusceptibilityResult
from llc_fast.studies.checkpoints import CheckpointRow, CheckpointSweepResult

pytest.importorskip("matplotlib")

STEPS = [1000 * s for s in range(60)]
COMPONENTS = ["full", "l0h0", "l0h1"]


def sweep() -> CheckpointSweepResult:
    rows = [CheckpointRow(step=s, component=c, llc_mean=float(k + i), llc_std=0.1, llc_stderr=0.05, mcse=0.05,
                          rhat=1.0, trusted=(i + k) % 7 != 0, verdict="", diverged=0)
            for i, s in enumerate(STEPS) for k, c in enumerate(COMPONENTS)]
    return CheckpointSweepResult(rows)


def _hatched(ax, hatch: str) -> int:
    return sum(p.get_hatch() == hatch for p in ax.patches)


def test_the_heat_map_hatches_untrusted_cells_and_thins_its_ticks(tmp_path):
    res = sweep()
    fig = res.heatmap(tmp_path / "h.png")
    ax = fig.axes[0]
    untrusted = sum(not r.trusted for r in res.rows)
    assert untrusted == 25 and _hatched(ax, "//") == untrusted
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == [str(s) for s in STEPS[::4]]  # 15 of 60, every 4th from the first
    assert [t.get_text() for t in ax.get_yticklabels()] == COMPONENTS
    assert "hatched" in ax.get_title() and (tmp_path / "h.png").stat().st_size > 1000


def test_the_sweep_plot_labels_a_few_steps_compactly(tmp_path):
    fig = sweep().plot(tmp_path / "p.png")
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    shown = [t for t in ax.get_xticklabels() if lo <= t.get_position()[0] <= hi]
    assert 3 <= len(shown) <= 8
    assert all(len(t.get_text()) <= 4 for t in shown) and any(t.get_text().endswith("k") for t in shown)
    assert (tmp_path / "p.png").stat().st_size > 1000


def susceptibilities(token_chi: dict) -> SusceptibilityResult:
    chi = np.array([[1.0, 0.1, -0.5], [-3.0, np.nan, 0.0]])
    se = np.array([[0.1, 0.2, 0.2], [1.0, 0.1, 0.0]])
    return SusceptibilityResult(["a", "b"], ["s", "t", "u"], chi, se, np.zeros((2, 4, 3)), RestrictedLLCResult({}),
                                token_chi=token_chi)


def test_the_susceptibility_heat_map_hatches_chi_within_two_standard_errors(tmp_path):
    res = susceptibilities({})
    assert res.unresolved().tolist() == [[False, True, False], [False, True, True]]
    fig = res.plot(tmp_path / "s.png")
    ax = fig.axes[0]
    assert len(fig.axes) == 2 and _hatched(ax, "..") == 3  # the heat map and its colour bar
    assert [t.get_text() for t in ax.texts] == ["1\n± 0.1", "0.1\n± 0.2", "-0.5\n± 0.2", "-3\n± 1", "nan\n± 0.1",
                                                "0\n± 0"]
    assert "hatched" in ax.get_title() and (tmp_path / "s.png").stat().st_size > 1000


def test_per_token_susceptibilities_get_a_line_per_component(tmp_path):
    tokens = np.arange(10.0)
    res = susceptibilities({"s": np.stack([tokens, -tokens]), "u": np.stack([tokens, tokens ** 2])})
    fig = res.plot(tmp_path / "t.png")
    panels = [ax for ax in fig.axes if ax.get_xlabel() == "token index"]
    assert [ax.get_title() for ax in panels] == ["per-token susceptibility, subset 's'",
                                                 "per-token susceptibility, subset 'u'"]
    for ax, subset in zip(panels, ["s", "u"]):
        lines = [ln for ln in ax.get_lines() if ln.get_label() in ("a", "b")]
        assert [ln.get_label() for ln in lines] == ["a", "b"]
        np.testing.assert_array_equal(lines[1].get_ydata(), res.token_chi[subset][1])
