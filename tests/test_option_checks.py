"""Every option of every stage of a study is checked before the first sampling step: the estimate options, the
calibration grid and the probe options of a checkpoint sweep, calibrate's and sweep's own options, and the
component names that become file names. Each refusal names the function the user called and what it takes."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import llc_fast
from llc_fast.studies.probe import check_probe_options

from conftest import mse, regression_data

FAST = dict(num_chains=1, num_draws=10, progress=False)


def sweep(case, tmp_path, **kw):
    model, loader, loss_fn, _ = case
    return llc_fast.estimate_over_checkpoints([(0, model), (5, model)], loader, loss_fn,
                                              save_dir=tmp_path / "sweep", **kw)


@pytest.mark.parametrize("probe, error, message", [
    (dict(radii=[1e-2], kind="gausian"), ValueError, "estimate_over_checkpoints(probe=...): the probe's kind must be "
                                                     "one of ('gaussian', 'sphere', 'ball'), got 'gausian'"),
    (dict(radii=[1e-2], kinds="sphere"), TypeError, "estimate_over_checkpoints(probe=...) got unknown option(s) "
                                                    "'kinds' (did you mean 'kind'?); it takes perturbation_probe's "
                                                    "options: radii, num_samples, kind,"),
    (dict(kind="ball"), TypeError, "estimate_over_checkpoints(probe=...): the probe needs radii"),
    (dict(radii=[]), ValueError, "radii is empty"),
    (dict(radii=[1e-2, -1.0]), ValueError, "radii must be a finite number > 0, got -1.0"),
    (dict(radii=[1e-2], num_samples=1), ValueError, "num_samples must be >= 2"),
    (dict(radii=[1e-2], mask=["0.weight"]), TypeError, "the probe's mask is a dict"),
    ([1e-2], TypeError, "probe= takes a dict of keyword arguments, got list"),
])
def test_probe_options_of_a_sweep_are_checked_before_the_first_checkpoint(counted_mlp, tmp_path,
                                                                          probe, error, message):
    with pytest.raises(error) as e:
        sweep(counted_mlp, tmp_path, probe=probe, lr=1e-4, **FAST)
    assert message in str(e.value)
    assert not counted_mlp[3] and not (tmp_path / "sweep").exists()  # nothing sampled, nothing written


def test_the_probe_checks_its_own_options_with_the_same_check(counted_mlp):
    model, loader, loss_fn, calls = counted_mlp
    with pytest.raises(ValueError, match=r"^perturbation_probe: the probe's kind must be one of"):
        llc_fast.perturbation_probe(model, loader, loss_fn, radii=[1e-2], kind="gausian")
    with pytest.raises(ValueError, match="num_batches must be an integer >= 1, got 0"):
        llc_fast.perturbation_probe(model, loader, loss_fn, radii=[1e-2], num_batches=0)
    assert not calls
    checked = check_probe_options(dict(radii=(1e-3, 1e-2)))
    assert checked["kind"] == "gaussian" and checked["num_samples"] == 64 and checked["radii"].tolist() == [1e-3, 1e-2]


@pytest.mark.parametrize("grid, error, message", [
    (dict(lrs=[1e-4], gamas=[1.0]), TypeError, "estimate_over_checkpoints(calibrate=...) got unknown option(s) "
                                               "'gamas' (did you mean 'gammas'?); it takes calibrate's options, "
                                               "then estimate_llc's: lrs, gammas, nbetas, chains_per_setting,"),
    (dict(gammas=[1.0]), TypeError, "estimate_over_checkpoints(calibrate=...) needs lrs"),
    (dict(lrs=[-1e-4]), ValueError, "lrs must be a finite number > 0, got -0.0001"),
    (dict(lrs=[1e-4], lr=1e-4), TypeError, "estimate_over_checkpoints(calibrate=...) sets 'lr' itself from the grid: "
                                           "pass lrs= instead"),
    (dict(lrs=[1e-4], num_draws=3), ValueError, "num_draws must be an integer >= 10, got 3"),
    (dict(lrs=[1e-4], sampler="sgldd"), ValueError, "sampler"),
])
def test_the_calibration_grid_of_a_sweep_is_checked_before_anything_runs(counted_mlp, tmp_path,
                                                                         grid, error, message):
    with pytest.raises(error) as e:
        sweep(counted_mlp, tmp_path, calibrate=grid, **FAST)
    assert message in str(e.value)
    assert not counted_mlp[3] and not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("options, error, message", [
    (dict(lr=1e-4, lrr=3), TypeError, "estimate_over_checkpoints got unknown option(s) 'lrr' (did you mean 'lr'?); "
                                      "it takes estimate_llc's options: sampler, lr,"),
    (dict(lr=1e-4, num_chains=0), ValueError, "num_chains must be an integer >= 1, got 0"),
    (dict(lr=1e-4, sampler="bogus"), ValueError, "bogus"),
    (dict(lr=1e-4, checkpoint_every=5), ValueError, "checkpoint_every needs checkpoint=PATH"),
    (dict(nbeta=10.0), TypeError, "estimate_over_checkpoints needs lr= (the SGLD step size), or calibrate="),
    (dict(lr=1e-4, mask={"0.weight": None}), ValueError, "estimate_over_checkpoints takes components=, not mask="),
])
def test_the_estimate_options_of_a_sweep_are_checked_up_front(counted_mlp, tmp_path,
                                                              options, error, message):
    with pytest.raises(error) as e:
        sweep(counted_mlp, tmp_path, **{"progress": False, **options})
    assert message in str(e.value)
    assert not counted_mlp[3] and not (tmp_path / "sweep").exists()


def test_a_sweep_over_data_of_unknown_size_needs_nbeta_up_front(counted_mlp, tmp_path):
    model, loader, loss_fn, calls = counted_mlp

    class Batches:  # re-iterable, without a length
        def __iter__(self):
            return iter(loader)

    with pytest.raises(ValueError, match="nbeta is required when the data's size is unknown"):
        llc_fast.estimate_over_checkpoints([(0, model)], Batches(), loss_fn, lr=1e-4, **FAST)
    assert not calls


@pytest.mark.parametrize("name", ["attn/l0", "", "..", ".", "a\0b", " lead", "x:y", "back\\slash"])
def test_component_names_that_cannot_be_file_names_are_refused_up_front(counted_mlp, tmp_path, name):
    with pytest.raises(ValueError) as e:
        sweep(counted_mlp, tmp_path, components={"ok": ["0.*"], name: ["2.*"]}, lr=1e-4, **FAST)
    message = str(e.value)
    assert f"component name {name!r} cannot be part of a file name ({tmp_path / 'sweep'}/step<step>_<name>.json)" \
        in message
    assert "use letters, digits, spaces and the characters _ - . + = , only" in message
    assert not counted_mlp[3] and not (tmp_path / "sweep").exists()


def test_names_with_spaces_and_names_without_a_save_dir_run(counted_mlp, tmp_path):
    model, loader, loss_fn, calls = counted_mlp
    result = sweep(counted_mlp, tmp_path, components={"l0 attn": ["0.*"], "l1.mlp-2": ["2.*"]}, lr=1e-4, **FAST)
    assert (tmp_path / "sweep" / "step5_l0 attn.json").is_file() and result.components == ["l0 attn", "l1.mlp-2"]
    unsaved = llc_fast.estimate_over_checkpoints([(0, model)], loader, loss_fn, components={"attn/l0": ["0.*"]},
                                                 lr=1e-4, **FAST)
    assert unsaved.components == ["attn/l0"]  # no file is named after it


def test_calibrate_names_itself_and_its_options(counted_mlp):
    model, loader, loss_fn, calls = counted_mlp
    with pytest.raises(TypeError) as e:
        llc_fast.calibrate(model, loader, loss_fn, lrs=[1e-4], gamas=[1.0], progress=False)
    message = str(e.value)
    assert message.startswith("calibrate got unknown option(s) 'gamas' (did you mean 'gammas'?)")
    assert "estimate_llc()" not in message
    for valid in ("lrs", "gammas", "nbetas", "chains_per_setting", "mala_every", "num_init_loss_batches"):
        assert valid in message
    with pytest.raises(TypeError, match=r"^sweep got unknown option\(s\) 'num_draw' \(did you mean 'num_draws'\?\)"):
        llc_fast.sweep(model, loader, loss_fn, lrs=[1e-4], nbetas=[10.0], num_draw=20, progress=False)
    with pytest.raises(ValueError, match="checkpoint_every needs checkpoint=PATH"):  # estimate_llc's, before the run
        llc_fast.calibrate(model, loader, loss_fn, lrs=[1e-4], checkpoint_every=3, progress=False)
    assert not calls


TWO_CHAINS = dict(lr=1e-3, nbeta=20.0, num_chains=2, num_draws=12, progress=False)


def _loader():
    return DataLoader(regression_data(), batch_size=16)


def test_no_step_and_nothing_to_sample_are_refused():
    with pytest.raises(ValueError, match="num_draws=1 with num_burnin_steps=0 takes no sampler step"):
        llc_fast.estimate_llc(nn.Linear(3, 1), _loader(), mse, **dict(TWO_CHAINS, num_draws=1))
    llc_fast.estimate_llc(nn.Linear(3, 1), _loader(), mse, **dict(TWO_CHAINS, num_draws=1, num_burnin_steps=5))
    with pytest.raises(ValueError, match="the mask samples nothing"):
        llc_fast.estimate_llc(nn.Linear(3, 1), _loader(), mse, mask={"weight": torch.zeros(1, 3)}, **TWO_CHAINS)
