"""RestrictedLLCResult's table, CSV, JSON and bar chart: a data-refined subset's name never takes the place of
another column (llc_mean, llc_std, ...), and every row says whether to trust it (R-hat, trusted, verdict)."""
import csv
import io

import pytest

import llc_fast

from conftest import mlp_case

NAMES = ("mean", "std", "llc", "stderr", "mcse")  # subset names that were, or look like, column names


@pytest.fixture(scope="module")
def run():
    model, loader, loss_fn = mlp_case()
    batches = list(loader)
    refine = {name: batches[k % 3:k % 3 + 1] for k, name in enumerate(NAMES)}
    return llc_fast.estimate_restricted_llcs(model, loader, loss_fn, {"first": ["0.*"], "last": ["2.*"]},
                                             refine=refine, lr=1e-3, nbeta=30.0, gamma=100.0, num_chains=3,
                                             num_draws=12, seed=1, progress=False)


def _columns_hold_their_own_values(res, rows):
    for row, (name, r) in zip(rows, res.items()):
        assert row["name"] == name
        assert (float(row["llc_mean"]), float(row["llc_std"]), float(row["llc_stderr"])) == (
            r.llc_mean, r.llc_std, r.llc_stderr)
        assert {k: float(row[f"refined[{k}]_mean"]) for k in NAMES} == {k: r.refined[k].llc_mean for k in NAMES}


def test_subset_names_never_replace_the_estimate_columns(run, tmp_path):
    assert len({run["first"].refined[k].llc_mean for k in NAMES} | {run["first"].llc_mean}) > 2  # values differ
    _columns_hold_their_own_values(run, run.rows())
    _columns_hold_their_own_values(run, list(csv.DictReader(io.StringIO(run.to_csv()))))
    header = next(csv.reader(io.StringIO(run.to_csv())))
    assert len(header) == len(set(header)) == 10 + len(NAMES)
    back = llc_fast.RestrictedLLCResult.load(run.save(tmp_path / "r.json"))
    _columns_hold_their_own_values(run, list(csv.DictReader(io.StringIO(back.to_csv()))))
    assert back.table() == run.table()
    line = run.table().splitlines()[1].split()
    assert line[:3] == ["first", "112", f"{run['first'].llc_mean:.4g}"] and line[3] == f"{run['first'].llc_std:.3g}"


def test_the_bar_chart_shows_each_components_own_estimate(run, tmp_path):
    pytest.importorskip("matplotlib")
    fig = run.plot(tmp_path / "r.png")
    assert [bar.get_height() for bar in fig.axes[0].patches] == [run[n].llc_mean for n in run.names]


def test_every_row_says_whether_to_trust_it(run):
    pytest.importorskip("arviz_stats")
    rows = list(csv.DictReader(io.StringIO(run.to_csv())))
    for row, r in zip(rows, run.results.values()):
        d = r.diagnostics()
        assert (float(row["rhat"]), row["trusted"], row["verdict"]) == (d["rhat"], str(d["ok"]), d["verdict"])
    for line, r in zip(run.table().splitlines()[1:], run.results.values()):
        d = r.diagnostics()
        assert line.endswith(f"{'trust' if d['ok'] else 'do not trust'}: {d['verdict']}")
