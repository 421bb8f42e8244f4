"""Studies: the perturbation probe and sweeps on exact answers, the LLC over checkpoints of deep linear networks
with known coefficients, a checkpoint sweep that survives kill -9, and plots with labelled axes."""
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

import llc_fast
from llc_fast import CheckpointSweepResult, ProbeResult
from llc_fast.oracles import dln_dataset, dln_learning_coefficient, make_dln, mse_loss, quadratic_sgld_expectation
from conftest import gpt2_checkpoint_run
from test_oracle_estimates import FULL_BATCH, Replicated, discretised_quadratic_stats, potential_loss

REPO = Path(__file__).parent.parent
H = torch.linspace(0.5, 2.0, 40, dtype=torch.float64)


def quadratic():
    return Replicated(1, H.numel(), lambda w: 0.5 * H * w**2)


@pytest.mark.parametrize("kind,factor", [("gaussian", 1.0), ("sphere", 1 / 40), ("ball", 1 / 42)])
def test_probe_matches_the_quadratic_formulas(kind, factor):
    """Delta L(eps) = 1/2 tr(H) eps^2 x (1, 1/d, 1/(d+2)) for Gaussian, sphere and ball perturbations."""
    model = quadratic()
    before = model.w.detach().clone()
    radii = [1e-3, 1e-2, 1e-1]
    r = llc_fast.perturbation_probe(model, FULL_BATCH, potential_loss, radii=radii, num_samples=300, kind=kind)
    exact = 0.5 * float(H.sum()) * np.square(radii) * factor
    z = (r.delta_loss - exact) / r.delta_loss_se
    assert np.all(np.abs(z) < 4), z
    assert r.exponent == pytest.approx(2.0, abs=1e-9)  # the same directions at every radius: exactly eps^2
    assert r.num_params == 40 and torch.equal(model.w, before)


def test_probe_restriction_and_results(tmp_path):
    model = quadratic()
    mask = {"w": torch.cat([torch.ones(1, 10), torch.zeros(1, 30)], dim=1)}
    r = llc_fast.perturbation_probe(model, FULL_BATCH, potential_loss, radii=[0.01, 0.1], num_samples=200,
                                    kind="sphere", mask=mask)
    exact = 0.5 * float(H[:10].sum()) / 10 * np.square([0.01, 0.1])  # only the 10 restricted coordinates
    assert r.num_params == 10 and np.all(np.abs(r.delta_loss - exact) < 4 * r.delta_loss_se)
    back = ProbeResult.load(r.save(tmp_path / "probe.json"))
    np.testing.assert_array_equal(back.samples, r.samples)
    fig = r.plot(tmp_path / "probe.png")
    ax = fig.axes[0]
    assert "radius" in ax.get_xlabel() and "Delta L" in ax.get_ylabel() and ax.get_xscale() == "log"
    assert (tmp_path / "probe.png").read_bytes()[:4] == b"\x89PNG"
    assert "local exponent" in r.table()
    with pytest.raises(ValueError, match="kind must be one of"):
        llc_fast.perturbation_probe(model, FULL_BATCH, potential_loss, radii=[0.1], kind="cube")
    with pytest.raises(ValueError, match="radii is empty"):
        llc_fast.perturbation_probe(model, FULL_BATCH, potential_loss, radii=[])


def test_sweep_gives_the_exact_discretised_answers(tmp_path):
    """A quadratic of 200 copies (h = 1): every setting's lambda_hat against the exact stationary mean of the
    discretised chain, within 4 of its exact standard errors (AR(1) chains)."""
    R, chains, draws = 200, 3, 600
    model = Replicated(R, 1, lambda w: 0.5 * w**2)
    s = llc_fast.sweep(model, FULL_BATCH, potential_loss, nbetas=[30.0, 100.0], gammas=[100.0], lrs=[1e-3],
                       chains_per_setting=chains, num_draws=draws, num_burnin_steps=300, mala_every=None,
                       progress=False)
    assert [(r.nbeta, r.gamma) for r in s.rows] == [(30.0, 100.0), (100.0, 100.0)]
    for r in s.rows:
        exact = quadratic_sgld_expectation(np.ones(R), r.nbeta, r.gamma, r.lr)
        _, var = discretised_quadratic_stats(np.ones(R), r.nbeta, r.gamma, r.lr, draws)
        assert abs(r.llc_mean - exact) < 4 * math.sqrt(var / chains), (r.llc_mean, exact)
    fig = s.plot(tmp_path / "sweep.png")
    assert [ax.get_xlabel().split()[0] for ax in fig.axes] == ["nbeta", "gamma"]
    assert all("λ̂" in ax.get_ylabel() for ax in fig.axes) and "MCSE" in s.table()


def _dln_data(teacher):
    ds = dln_dataset(teacher, 10_000, seed=2, input_range=1.0)
    return DataLoader(ds, batch_size=None, sampler=BatchSampler(RandomSampler(ds), 500, drop_last=True))


def test_checkpoints_of_known_dlns_give_their_exact_coefficients(tmp_path):
    """Checkpoints = deep linear networks 4-3-4 of teacher ranks 0 and 1 (exact 5 and 6), as state dicts of one
    architecture; the settings of tests/test_dln_estimates.py; within its 15 % band."""
    widths = (4, 3, 4)
    teachers = {r: make_dln(widths, r, seed=1) for r in (0, 1)}
    res = llc_fast.estimate_over_checkpoints([(r, m.state_dict()) for r, m in teachers.items()],
                                             lambda step: _dln_data(teachers[step]), mse_loss,
                                             model=make_dln(widths, 1, seed=9), lr=3e-4, gamma=1.0, num_chains=4,
                                             num_draws=3000, num_burnin_steps=3000, progress=False)
    for row in res.rows:
        exact = float(dln_learning_coefficient(widths, row.step).llc)
        assert abs(row.llc_mean - exact) < 0.15 * exact, res.table()
    fig = res.plot(tmp_path / "llc.png", log_x=False)
    assert fig.axes[0].get_xlabel() == "training step" and "λ̂" in fig.axes[0].get_ylabel()
    back = CheckpointSweepResult.load(res.save(tmp_path / "sweep.json"))
    assert back.table() == res.table()


def test_a_killed_checkpoint_sweep_reruns_only_what_was_not_finished(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    script = str(Path(__file__).parent / "scripts" / "checkpoint_sweep.py")
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    subprocess.run([sys.executable, script, str(full_dir), str(tmp_path / "full.json")], env=env, check=True,
                   timeout=300)
    proc = subprocess.Popen([sys.executable, script, str(cut_dir), str(tmp_path / "cut.json"), "0.005"], env=env)
    deadline = time.monotonic() + 120
    while len(list(cut_dir.glob("step*.json"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    done = {p.name: p.stat().st_mtime_ns for p in cut_dir.glob("step*.json")}
    assert 2 <= len(done) < 6 and not (tmp_path / "cut.json").exists()  # killed halfway
    subprocess.run([sys.executable, script, str(cut_dir), str(tmp_path / "cut.json")], env=env, check=True,
                   timeout=300)
    assert all((cut_dir / name).stat().st_mtime_ns == t for name, t in done.items())  # not recomputed
    a, b = CheckpointSweepResult.load(tmp_path / "full.json"), CheckpointSweepResult.load(tmp_path / "cut.json")
    assert [r.step for r in b.rows] == [0, 0, 1, 1, 3, 3] and [r.component for r in b.rows][:2] == ["full", "first"]
    strip = lambda rows: [(r.step, r.component, r.llc_mean, r.llc_std, r.mcse, r.rhat) for r in rows]  # noqa: E731
    assert strip(a.rows) == strip(b.rows)  # the table of an uninterrupted sweep
    fig = b.heatmap(tmp_path / "heat.png")
    assert fig.axes[0].get_ylabel() == "component" and (tmp_path / "heat.png").is_file()


def test_checkpoints_cli_on_huggingface_checkpoints(tmp_path, capsys):
    from llc_fast.cli import main

    args = gpt2_checkpoint_run(tmp_path, (10, 200)) + ["--lr", "1e-4",
            "--nbeta", "10", "--num-chains", "2", "--num-draws", "8", "--batch-size", "4", "--no-progress",
            "--save-dir", str(tmp_path / "sweep"), "--component", "attn=*.attn.*", "--output",
            str(tmp_path / "llc.csv"), "--plot", str(tmp_path / "llc.png")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "2 checkpoints" in out and "steps [10, 200]" in out and "table written" in out
    lines = (tmp_path / "llc.csv").read_text().splitlines()
    assert len(lines) == 1 + 4 and lines[1].startswith("10,full,") and lines[2].startswith("10,attn,")
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "sweep").iterdir()}
    assert main(args) == 0  # a rerun reads every estimate back
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "sweep").iterdir()} == stamps
    assert main([*args[:-4], "--component", "bad"]) == 2
    assert "NAME=GLOB" in capsys.readouterr().err


def test_the_worked_example_runs_and_writes_its_figures(tmp_path):
    """examples/grokking_or_stages.py at a reduced size (3 checkpoints, 50 draws): every output is written."""
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "grokking_or_stages.py"), "--out", str(tmp_path),
                           "--steps", "0", "50", "300", "--draws", "50"], env=dict(os.environ, PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("llc_over_training.png", "llc_per_layer.png", "probe.png", "sweep.json", "table.csv"):
        assert (tmp_path / name).is_file(), name
    sweep = CheckpointSweepResult.load(tmp_path / "sweep.json")
    assert sweep.steps == [0, 50, 300] and sweep.components == ["full", "embed", "layer 1", "layer 2"]
    assert sorted(sweep.probes) == [0, 50, 300]
