"""A saved or resumed result is reused only when its fingerprint proves it answers the same question: every
resolved option (defaults included), each mask's content, the probe's options, the evaluation sets, the data at
w* and the weights. Any difference is refused, naming it; the same question is reused, unchanged."""
import copy
import os
import signal
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import llc_fast
from llc_fast import LLCResult
from llc_fast.chains.identity import data_identity, differences, digest, weights_digest
from llc_fast.chains.observe import Observers
from llc_fast.chains.interrupt import SamplingInterrupted

from conftest import gpt2_checkpoint_run, mlp_case

KW = dict(lr=1e-3, nbeta=30.0, num_chains=2, num_draws=12, num_burnin_steps=2, progress=False, seed=3)


def _checkpoints():
    model, loader, loss_fn = mlp_case()
    later = copy.deepcopy(model)
    with torch.no_grad():
        for p in later.parameters():
            p.mul_(1.1)
    return model, loader, loss_fn, [(0, copy.deepcopy(model.state_dict())), (5, later.state_dict())]


def _sweep(tmp_path, checkpoints, model, loader, loss_fn, **options):
    return llc_fast.estimate_over_checkpoints(checkpoints, loader, loss_fn, model=model, save_dir=tmp_path / "sweep",
                                              **dict(KW, **options))


def _stamps(tmp_path):
    return {p.name: p.stat().st_mtime_ns for p in (tmp_path / "sweep").iterdir()}


# --- the pieces ---------------------------------------------------------------------------------------------------

def test_digests_see_content_dtype_and_shape():
    a = torch.arange(6.0)
    assert digest(a) == digest(a.clone()) and digest([a, {"y": 1}]) == digest([a.clone(), {"y": 1}])
    assert digest(a) != digest(a.double()) and digest(a) != digest(a.reshape(2, 3))
    b = a.clone()
    b[5] = float(np.nextafter(np.float32(5), np.float32(6)))  # one ulp
    assert digest(a) != digest(b)
    model, _, _ = mlp_case()
    before = weights_digest(model)
    with torch.no_grad():
        model[0].bias[0] += 1e-6
    assert weights_digest(model) != before


def test_differences_name_each_nested_key():
    saved = dict(lr=[1.0], mask={"a": "x", "b": None}, identity=dict(data=dict(size=10)))
    now = dict(lr=[2.0], mask={"a": "y"}, identity=dict(data=dict(size=10)), extra=1)
    assert differences(saved, now) == ["extra: absent before, now 1", "lr: before [1.0], now [2.0]",
                                       "mask.a: before 'x', now 'y'", "mask.b: before None, absent now"]
    assert differences(saved, copy.deepcopy(saved)) == []


def test_the_data_identity_is_the_batches_read_at_w_star():
    _, loader, _ = mlp_case()  # a shuffling DataLoader: the order is drawn under the run's seed
    first = data_identity(loader, seed=3, num_batches=16)
    assert first == data_identity(loader, seed=3, num_batches=16)
    assert first["size"] == 96 and first["num_batches"] == 3  # one pass of 3 batches, fewer than 16
    other = DataLoader(TensorDataset(loader.dataset.tensors[0] + 1, loader.dataset.tensors[1]), batch_size=32,
                       shuffle=True)
    assert data_identity(other, seed=3, num_batches=16)["batches"] != first["batches"]


def test_a_shuffled_evaluation_set_gives_the_same_batches_every_time():
    _, loader, _ = mlp_case()
    obs = Observers({"eval": loader}, num_batches=2)
    torch.manual_seed(1)
    one = obs.identity()
    torch.manual_seed(2)  # the global RNG does not choose the batches
    assert obs.identity() == one and one["sets"]["eval"]["num_batches"] == 2
    assert Observers({"eval": loader}, num_batches=1).identity() != one


# --- checkpoint sweeps --------------------------------------------------------------------------------------------

def test_a_rerun_of_the_same_sweep_reuses_every_estimate_also_with_the_default_nbeta(tmp_path):
    model, loader, loss_fn, cps = _checkpoints()
    options = dict(nbeta=None, components={"full": None, "first": ["0.*"]})
    first = _sweep(tmp_path, cps, model, loader, loss_fn, **options)
    stamps = _stamps(tmp_path)
    again = _sweep(tmp_path, cps, model, loader, loss_fn, **options)
    assert _stamps(tmp_path) == stamps and again.table() == first.table()
    saved = LLCResult.load(tmp_path / "sweep" / "step5_first.json").config["fingerprint"]
    assert saved["gamma"] == [1.0, 1.0] and saved["nbeta"] == [pytest.approx(96 / np.log(96))] * 2


@pytest.mark.parametrize("change,named", [
    (dict(gamma=1.0), "gamma: before [100.0, 100.0], now [1.0, 1.0]"),  # explicitly the default
    ({}, "gamma: before [100.0, 100.0], now [1.0, 1.0]"),  # gamma omitted: the default, not the saved 100
    (dict(gamma=100.0, num_init_loss_batches=1), "num_init_loss_batches"),
    (dict(gamma=100.0, noise_level=0.5), "noise_level"),
])
def test_a_sweep_with_other_options_is_refused_naming_them(tmp_path, change, named):
    model, loader, loss_fn, cps = _checkpoints()
    _sweep(tmp_path, cps, model, loader, loss_fn, gamma=100.0)
    stamps = _stamps(tmp_path)
    with pytest.raises(ValueError, match="does not answer this question") as err:
        _sweep(tmp_path, cps, model, loader, loss_fn, **change)
    assert named in str(err.value) and "step0_full.json" in str(err.value)
    assert _stamps(tmp_path) == stamps  # nothing overwritten


def test_a_component_with_other_mask_values_is_refused(tmp_path):
    """The same parameter names, the other half of the tensor: the old estimate must not be shown."""
    model, loader, loss_fn, cps = _checkpoints()
    half = torch.zeros(16, 6)
    half[:8] = 1
    _sweep(tmp_path, cps, model, loader, loss_fn, components={"part": {"0.weight": half}})
    with pytest.raises(ValueError, match=r"step0_part.json.*mask\.0\.weight: before '[0-9a-f]+', now '[0-9a-f]+'"):
        _sweep(tmp_path, cps, model, loader, loss_fn, components={"part": {"0.weight": 1 - half}})
    again = _sweep(tmp_path, cps, model, loader, loss_fn, components={"part": {"0.weight": half.clone()}})
    assert len(again.rows) == 2  # the same content in a new tensor is the same question


def test_other_data_or_replaced_checkpoints_are_refused(tmp_path):
    model, loader, loss_fn, cps = _checkpoints()
    _sweep(tmp_path, cps, model, loader, loss_fn)
    x, y = loader.dataset.tensors
    other = DataLoader(TensorDataset(x.flip(0), y.flip(0)), batch_size=32, shuffle=True)
    with pytest.raises(ValueError, match=r"identity\.data\.batches"):
        _sweep(tmp_path, cps, model, other, loss_fn)
    replaced = [(0, cps[0][1]), (5, {k: v + 0.01 for k, v in cps[1][1].items()})]
    with pytest.raises(ValueError, match=r"step5_full.json.*identity\.weights"):
        _sweep(tmp_path, replaced, model, loader, loss_fn)


def test_a_probe_with_other_radii_is_refused_and_the_same_probe_reused(tmp_path):
    model, loader, loss_fn, cps = _checkpoints()
    probe = dict(radii=[1e-3, 1e-2], num_samples=8)
    first = _sweep(tmp_path, cps, model, loader, loss_fn, probe=probe)
    stamps = _stamps(tmp_path)
    again = _sweep(tmp_path, cps, model, loader, loss_fn, probe=dict(probe, kind="gaussian"))  # kind's default
    assert _stamps(tmp_path) == stamps
    np.testing.assert_array_equal(again.probes[5].delta_loss, first.probes[5].delta_loss)
    with pytest.raises(ValueError, match=r"probe_step0.json.*options\.radii: before \[0.001, 0.01\], now"):
        _sweep(tmp_path, cps, model, loader, loss_fn, probe=dict(probe, radii=[1e-3, 1e-1]))


def test_a_saved_estimate_without_a_fingerprint_is_not_reused(tmp_path):
    model, loader, loss_fn, cps = _checkpoints()
    _sweep(tmp_path, cps, model, loader, loss_fn)
    file = tmp_path / "sweep" / "step0_full.json"
    old = LLCResult.load(file)
    del old.config["fingerprint"]
    old.save(file)
    with pytest.raises(ValueError, match="holds no fingerprint.*delete it to recompute it"):
        _sweep(tmp_path, cps, model, loader, loss_fn)


def test_the_checkpoints_cli_continues_a_sweep_without_nbeta(tmp_path, capsys):
    from llc_fast.cli import main

    args = gpt2_checkpoint_run(tmp_path, (10, 20)) + [
        "--lr", "1e-4", "--num-chains", "2", "--num-draws", "6", "--batch-size", "4", "--no-progress",
        "--save-dir", str(tmp_path / "sweep"), "--output", str(tmp_path / "llc.csv")]
    assert main(args) == 0
    table = (tmp_path / "llc.csv").read_text()
    stamps = _stamps(tmp_path)
    assert main(args) == 0  # the documented way to continue: the same command, nbeta left at its default
    assert _stamps(tmp_path) == stamps and (tmp_path / "llc.csv").read_text() == table
    assert main(args[:5] + ["--lr", "2e-4"] + args[7:]) == 2
    assert "lr: before [0.0001, 0.0001], now [0.0002, 0.0002]" in capsys.readouterr().err


# --- resume -------------------------------------------------------------------------------------------------------

def _interrupted(tmp_path, model, loader, loss_fn, **options):
    """A run stopped at its 12th loss call; its checkpoint."""
    path, calls = tmp_path / "run.ckpt", [0]

    def stopping(m, b):
        calls[0] += 1
        if calls[0] == 12:  # past L(w*) and the gradient check: Ctrl-C while the chains run
            os.kill(os.getpid(), signal.SIGINT)
        return loss_fn(m, b)

    with pytest.raises(SamplingInterrupted), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        llc_fast.estimate_llc(model, loader, stopping, checkpoint=str(path), **dict(KW, **options))
    assert path.is_file()
    return str(path)


@pytest.mark.parametrize("change,named", [
    (dict(num_eval_batches=1), "identity.eval.sets.code.num_batches: before 2, now 1"),
    (dict(refine={"code": "other"}), r"identity.eval.sets.code.batches"),
    (dict(refine={"code": "code", "prose": "other"}), "identity.eval.sets.prose: absent before"),
    (dict(refine=None), "identity.eval: before"),
])
def test_a_resume_with_other_evaluation_sets_is_refused_naming_them(tmp_path, change, named):
    model, loader, loss_fn = mlp_case()
    x, y = loader.dataset.tensors
    sets = dict(code=DataLoader(TensorDataset(x, y), batch_size=16),
                other=DataLoader(TensorDataset(x.flip(0), y), batch_size=16))
    eval_opts = dict(refine={"code": sets["code"]}, num_eval_batches=2)
    path = _interrupted(tmp_path, model, loader, loss_fn, **eval_opts)
    now = {**eval_opts, "refine": {"code": "code"}, **change}
    if now["refine"] is not None:
        now["refine"] = {name: sets[which] for name, which in now["refine"].items()}
    with pytest.raises(ValueError, match="does not answer this question") as err:
        llc_fast.estimate_llc(model, loader, loss_fn, resume=path, **KW, **now)
    assert named in str(err.value).replace("\\", ""), str(err.value)


def test_a_resume_with_other_weights_or_data_is_refused(tmp_path):
    model, loader, loss_fn = mlp_case()
    path = _interrupted(tmp_path, model, loader, loss_fn)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved[2].bias.add_(0.01)
    with pytest.raises(ValueError, match=r"identity\.weights"):
        llc_fast.estimate_llc(moved, loader, loss_fn, resume=path, **KW)
    x, y = loader.dataset.tensors
    other = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=32, shuffle=True)
    with pytest.raises(ValueError, match=r"identity\.data\.batches.*identity\.data\.size: before 96, now 64"):
        llc_fast.estimate_llc(model, other, loss_fn, resume=path, **KW)
    resumed = llc_fast.estimate_llc(model, loader, loss_fn, resume=path, **KW)  # the same question resumes
    assert np.isfinite(resumed.llc_mean)


def test_a_refined_estimate_resumed_is_the_uninterrupted_one(tmp_path):
    model, loader, loss_fn = mlp_case()
    x, y = loader.dataset.tensors
    eval_opts = dict(refine={"code": DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)},
                     num_eval_batches=2)
    path = _interrupted(tmp_path, model, loader, loss_fn, **eval_opts)
    resumed = llc_fast.estimate_llc(model, loader, loss_fn, resume=path, **KW, **eval_opts)
    whole = llc_fast.estimate_llc(model, loader, loss_fn, **KW, **eval_opts)
    assert resumed.refined["code"].llc_mean == whole.refined["code"].llc_mean
    np.testing.assert_array_equal(resumed.refined["code"].loss_trace, whole.refined["code"].loss_trace)
