"""calibrate: a grid of (lr, gamma, nbeta) settings as the chains of one run, on a quadratic with exact answers.

The model is K(w) = Σ_e w_e²/2 over R = 400 copies (h = 1), full batch, nbeta = 100. The discretised chain is
stable iff lr·(nbeta·h + gamma) < 4, so lr = 0.1 (10.1 and 20 for gamma = 1, 100) diverges and the others do
not. Stable rows are compared with the exact stationary mean of the discretised chain within 3 of its exact
standard errors (AR(1) chains, `discretised_quadratic_stats`). The burn-in (300 steps) is over 18 relaxation
times of the slowest stable setting, so the transient's bias is below 1e-7 of the estimate.
"""
import csv
import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from test_oracle_estimates import FULL_BATCH, Replicated, discretised_quadratic_stats, potential_loss
from torch.utils.data import DataLoader, TensorDataset

from llc_fast import CalibrationResult, LLCDivergenceWarning, calibrate
from llc_fast import default_nbeta
from llc_fast.cli import main
from llc_fast.diagnostics.convergence import DRIFT_Z_MAX
from llc_fast.studies.calibrate import CalibrationRow, _chain_subset, recommend
from llc_fast.studies.recommend import ACCEPTANCE_TARGET
from llc_fast.oracles import quadratic_sgld_expectation

R, NBETA = 400, 100.0
LRS, GAMMAS = (6e-4, 1.2e-3, 3e-3, 1e-1), (1.0, 100.0)
UNSTABLE = 1e-1
CHAINS, DRAWS, BURNIN = 3, 400, 300


def quadratic():
    return Replicated(R, 1, lambda w: 0.5 * w**2)


def calibrate_quietly(**kw):
    """calibrate with LLCDivergenceWarning turned into an error: calibrate must not let one through."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", LLCDivergenceWarning)
        return calibrate(quadratic(), FULL_BATCH, potential_loss, nbetas=[NBETA], progress=False, **kw)


@pytest.fixture(scope="module")
def grid() -> CalibrationResult:
    return calibrate_quietly(lrs=LRS, gammas=GAMMAS, chains_per_setting=CHAINS, num_draws=DRAWS,
                             num_burnin_steps=BURNIN, mala_every=2)


def stable(row: CalibrationRow) -> bool:
    return row.lr * (NBETA + row.gamma) < 4


def test_every_setting_is_a_group_of_chains_of_one_run(grid):
    settings = list(itertools.product(LRS, GAMMAS))
    assert [(r.lr, r.gamma, r.nbeta) for r in grid.rows] == [(lr, g, NBETA) for lr, g in settings]
    config = grid.result.config
    assert config["num_chains"] == len(settings) * CHAINS
    for k in range(config["num_chains"]):
        assert (config["lr"][k], config["gamma"][k]) == settings[k // CHAINS]
        assert k in grid.rows[k // CHAINS].chains


def test_stable_settings_match_the_discretised_chain(grid):
    for row in filter(stable, grid.rows):
        expected, var = discretised_quadratic_stats(np.ones(R), NBETA, row.gamma, row.lr, DRAWS)
        assert expected == pytest.approx(quadratic_sgld_expectation(np.ones(R), NBETA, row.gamma, row.lr), rel=1e-12)
        se = math.sqrt(var / CHAINS)
        assert abs(row.llc_mean - expected) < 3 * se, f"{row.label}: {row.llc_mean:.3f} vs exact {expected:.3f}"
        assert row.diverged == 0 and row.diverged_at_step == []
        # at stationarity the trend over the draws is noise: its change is within 4 of its exact standard
        # errors (sqrt(12) SEs of the mean, to O(tau/D)), and the drift test flags it only by its false alarm
        # (about 0.5 % per setting at >= 50 autocorrelation times, up to 3 % for the slowest ones here)
        assert abs(row.drift) < 4 * math.sqrt(12 * var / CHAINS), (row.label, row.drift)
        assert row.flattened, row.label


def test_unstable_setting_is_flagged_with_every_chain_diverged(grid):
    unstable = [r for r in grid.rows if not stable(r)]
    assert [r.lr for r in unstable] == [UNSTABLE] * len(GAMMAS)
    for row in unstable:
        assert row.diverged == CHAINS and len(row.diverged_at_step) == CHAINS
        assert math.isnan(row.llc_mean) and not row.flattened
    assert sorted(grid.result.diverged_chains) == sorted(c for r in unstable for c in r.chains)


def test_acceptance_falls_with_lr(grid):
    for gamma in GAMMAS:
        acceptance = [r.mala_mean for r in grid.rows if r.gamma == gamma and stable(r)]
        assert all(0 < a < 1 for a in acceptance)
        assert acceptance == sorted(acceptance, reverse=True) and len(set(acceptance)) == len(acceptance)


def test_recommends_only_a_setting_whose_chains_mixed(grid):
    """With 3 chains of 400 draws the gamma = 1 settings relax slowly (ESS of a few dozen): their R-hat stays
    above 1.01, so however high their acceptance they are not recommended; a mixed setting is."""
    best = grid.recommended
    assert best.mixed and best.rhat <= 1.01 and best.max_chain_drift_z <= 3 and best.diverged == 0, grid.table()
    assert all(not r.mixed for r in grid.rows if r.diverged == 0 and r.mala_mean > best.mala_mean)
    better = [r for r in grid.rows if r.mixed and r.flattened and r.mala_mean >= ACCEPTANCE_TARGET]
    if better:  # rule 1: the largest lr among the settings meeting every condition
        assert best.lr == max(r.lr for r in better) and "largest lr" in grid.reason
    else:  # rule 2: the mixed setting with the highest acceptance
        assert best.mala_mean == max(r.mala_mean for r in grid.rows if r.mixed and r.diverged == 0)
        assert grid.reason.startswith("no setting has")
    assert grid.recommendation().startswith(f"recommended: setting {best.setting}")


def row(setting, lr, *, acceptance=0.95, flattened=True, diverged=0, gamma=1.0):
    return CalibrationRow(setting=setting, lr=lr, gamma=gamma, nbeta=NBETA, chains=[setting], llc_mean=1.0,
                          llc_std=math.nan, llc_stderr=math.nan, llc_first_half=1.0, llc_second_half=1.0, drift=0.0,
                          drift_se=math.nan, flattened=flattened, mala_mean=acceptance, diverged=diverged,
                          diverged_at_step=[5] * diverged)


def test_recommendation_rule_on_made_up_rows():
    rows = [row(0, 1e-3), row(1, 2e-3, acceptance=0.91, gamma=1.0), row(2, 2e-3, acceptance=0.93, gamma=100.0),
            row(3, 4e-3, flattened=False), row(4, 8e-3, acceptance=0.89), row(5, 1e-2, diverged=1)]
    assert recommend(rows, acceptance_recorded=True)[0] is rows[2]  # largest qualifying lr, then higher acceptance
    assert recommend(rows, acceptance_recorded=False)[0] is rows[4]  # without acceptance: largest stable flat lr
    fallback = [row(0, 1e-3, acceptance=0.5), row(1, 2e-3, acceptance=0.8, flattened=False), rows[5]]
    best, reason = recommend(fallback, acceptance_recorded=True)
    assert best is fallback[1] and reason.startswith("no setting") and "not flattened" in reason
    best, reason = recommend([rows[5]], acceptance_recorded=True)
    assert best is None and "smaller lrs" in reason
    unmixed = row(6, 3e-3)
    unmixed.mixed, unmixed.rhat, unmixed.max_chain_drift_z = False, 1.2, 4.0
    assert recommend([*rows, unmixed], acceptance_recorded=True)[0] is rows[2]  # never the unmixed one
    best, reason = recommend([unmixed, rows[5]], acceptance_recorded=True)
    assert best is None and "no setting's chains mixed" in reason and "R-hat 1.2" in reason


def test_a_trace_still_rising_is_not_flat_and_the_halves_are_exact():
    """From w* with no burn-in at lr = 2e-4 the variance relaxes over ~50 steps: the first half is far lower, and
    the drift is the change over the draws of the least-squares line through the chains' mean (numpy's polyfit)."""
    c = calibrate_quietly(lrs=[2e-4], chains_per_setting=2, num_draws=DRAWS, mala_every=None)
    (r,), res = c.rows, c.result
    half = DRAWS // 2
    assert r.llc_first_half == pytest.approx(NBETA * (res.loss_trace[:, :half].mean() - res.init_loss), rel=1e-12)
    assert r.llc_second_half == pytest.approx(NBETA * (res.loss_trace[:, -half:].mean() - res.init_loss), rel=1e-12)
    slope = np.polyfit(np.arange(DRAWS), NBETA * (res.loss_trace.mean(axis=0) - res.init_loss), 1)[0]
    assert r.drift == pytest.approx(slope * (DRAWS - 1), rel=1e-9) and r.drift > DRIFT_Z_MAX * r.drift_se
    assert not r.flattened and not r.trusted and r.verdict == _chain_subset(res, r.chains).diagnostics()["verdict"]
    assert not r.mixed and r.rhat > 1.01 and c.recommended is None and "no setting's chains mixed" in c.reason

def test_a_single_stationary_chain_is_flat():
    """lr = 1.2e-3 after burn-in, 800 draws (about 50 autocorrelation times): flagged only by a false alarm."""
    c = calibrate_quietly(lrs=[1.2e-3], chains_per_setting=1, num_draws=800, num_burnin_steps=BURNIN, mala_every=None)
    (r,) = c.rows
    assert r.flattened and math.isfinite(r.drift_se) and math.isnan(r.llc_std) and math.isfinite(r.rhat)
    assert (c.recommended is r) == r.mixed


def test_all_settings_diverged_gives_rows_and_no_recommendation():
    c = calibrate_quietly(lrs=[UNSTABLE], gammas=GAMMAS, chains_per_setting=2, num_draws=DRAWS,
                          num_burnin_steps=BURNIN)
    assert [r.diverged for r in c.rows] == [2, 2] and c.recommended is None
    assert c.recommendation().startswith("no recommendation") and "smaller lrs" in c.reason


def test_every_row_carries_the_diagnostics_own_verdict(grid):
    """One verdict everywhere: a row's trusted/verdict/flattened are LLCResult.diagnostics() of its chains."""
    for r in grid.rows:
        d = _chain_subset(grid.result, r.chains).diagnostics()
        assert (r.trusted, r.verdict) == (bool(d["ok"]), d["verdict"]) and d["verdict"]
        np.testing.assert_array_equal([r.drift, r.drift_se], [d["drift"], d["drift_se"]])  # NaN where none survived
        assert r.flattened == (math.isfinite(d["drift"]) and not d["drifting"])
    assert grid.table().splitlines()[0].split()[-1] == "trust"


def test_table_csv_json_and_png(grid, tmp_path):
    lines = grid.table().splitlines()
    assert len(lines) == 1 + len(grid.rows) and "accept" in lines[0]
    assert [line.lstrip().startswith("*") for line in lines[1:]] == [r is grid.recommended for r in grid.rows]

    with open(grid.to_csv(tmp_path / "calib.csv")) as f:
        table = list(csv.DictReader(f))
    assert [float(t["lr"]) for t in table] == [r.lr for r in grid.rows]
    assert [t["recommended"] == "True" for t in table] == [r is grid.recommended for r in grid.rows]
    assert [t["llc_mean"] == "" for t in table] == [math.isnan(r.llc_mean) for r in grid.rows]

    back = CalibrationResult.load(grid.save(tmp_path / "calib.json"))
    assert back.recommended.setting == grid.recommended.setting and back.reason == grid.reason
    assert back.chains_per_setting == CHAINS
    assert [r.to_dict() for r in back.rows] == [r.to_dict() for r in grid.rows]  # NaN as None on both sides
    assert any(math.isnan(r.llc_mean) for r in back.rows)
    np.testing.assert_array_equal(back.result.loss_trace, grid.result.loss_trace)
    assert not list(tmp_path.glob(".calib*"))  # no temporary file left behind

    import matplotlib.pyplot as plt

    fig = grid.plot(tmp_path / "calib.png")
    assert len([ax for ax in fig.axes if ax.get_visible()]) == len(grid.rows)
    plt.close(fig)
    assert (tmp_path / "calib.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("kw,message", [
    (dict(lrs=[]), "lrs is empty"),
    (dict(lrs=[1e-3, 0.0]), "lrs must be a finite number > 0, got 0.0"),
    (dict(lrs=[-1e-3]), "lrs must be a finite number > 0, got -0.001"),
    (dict(lrs=[1e-3], gammas=[]), "gammas is empty"),
    (dict(lrs=[1e-3], gammas=[-1.0]), "gammas must be a finite number >= 0"),
    (dict(lrs=[1e-3], nbetas=[0.0]), "nbetas must be a finite number > 0"),
    (dict(lrs=[1e-3], chains_per_setting=0), "chains_per_setting must be an integer >= 1, got 0"),
    (dict(lrs=[1e-3], num_draws=5), "num_draws must be an integer >= 10, got 5"),
])
def test_bad_inputs_raise_a_clear_error(kw, message):
    kw = {"nbetas": [NBETA], **kw}
    with pytest.raises(ValueError, match=message):
        calibrate(quadratic(), FULL_BATCH, potential_loss, progress=False, **kw)


def test_nbetas_none_takes_estimate_llcs_default():
    data = DataLoader(TensorDataset(torch.zeros(1000, 1)), batch_size=100)
    c = calibrate(quadratic(), data, potential_loss, lrs=[1e-4, 2e-4], num_draws=10, progress=False)
    assert [r.nbeta for r in c.rows] == [default_nbeta(1000)] * 2
    with pytest.raises(ValueError, match="nbeta is required when the data's size is unknown"):
        calibrate(quadratic(), FULL_BATCH, potential_loss, lrs=[1e-4], progress=False)


def test_grid_arguments_are_not_taken_twice():
    with pytest.raises(TypeError, match="pass lrs= instead"):
        calibrate(quadratic(), FULL_BATCH, potential_loss, lrs=[1e-3], lr=1e-3, nbetas=[NBETA])


SCRIPT = """
import torch
from torch import nn

class Quadratic(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(400, dtype=torch.float64))

    def forward(self):
        return 0.5 * (self.w ** 2).sum()

model = Quadratic()
data = [None]
nbeta = 100.0

def loss_fn(model, batch):
    return model()
"""


def test_cli_prints_the_table_and_the_recommendation(tmp_path, capsys):
    script = tmp_path / "quadratic.py"
    script.write_text(SCRIPT)
    files = {"--plot": tmp_path / "c.png", "--table": tmp_path / "c.csv", "--output": tmp_path / "c.json"}
    argv = ["calibrate", "--script", str(script), "--lrs", "6e-4", "1.2e-3", "1", "--gammas", "1", "100",
            "--num-draws", "50", "--num-burnin-steps", "100", "--mala-every", "2", "--no-progress"]
    assert main(argv + [str(x) for pair in files.items() for x in pair]) == 0
    out = capsys.readouterr().out
    saved = CalibrationResult.load(files["--output"])
    assert saved.recommendation() in out and saved.table() in out
    assert [r.nbeta for r in saved.rows] == [NBETA] * 6  # the script's nbeta
    assert [r.diverged for r in saved.rows][-2:] == [2, 2]
    assert all(path.is_file() for path in files.values())


def test_cli_names_what_the_script_is_missing(tmp_path, capsys):
    script = tmp_path / "broken.py"
    script.write_text(SCRIPT.replace("def loss_fn", "def other_fn"))
    assert main(["calibrate", "--script", str(script), "--lrs", "1e-3", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "does not define loss_fn" in err
    assert main(["calibrate", "--script", str(tmp_path / "absent.py"), "--lrs", "1e-3"]) == 2
    assert "not found" in capsys.readouterr().err


def test_chains_drifting_in_opposite_directions_are_not_mixed():
    """The probe's case: two chains whose halves go 1.69 -> 4.40 and 5.54 -> 2.20. Averaged over chains the
    halves agree (3.6 vs 3.3: "flattened"), but each chain drifts and R-hat sees it: not mixed, never recommended."""
    from llc_fast import LLCResult
    from llc_fast.studies.calibrate import _row

    rng = np.random.default_rng(0)
    draws, init, nbeta = 400, 1.0, 10.0
    levels = [(1.69, 4.40), (5.54, 2.20)]
    trace = np.stack([init + np.repeat(np.array(lv) / nbeta, draws // 2) + 0.005 * rng.standard_normal(draws)
                      for lv in levels])
    config = dict(lr=[1e-5, 1e-5], nbeta=[nbeta, nbeta], gamma=[1.0, 1.0], num_chains=2, mala_every=None)
    result = LLCResult.from_traces(trace, init, np.array([nbeta, nbeta]), {}, config)
    r = _row(result, 0, [0, 1])
    assert r.flattened and not r.mixed and r.max_chain_drift_z > 3
    assert recommend([r], acceptance_recorded=False)[0] is None
