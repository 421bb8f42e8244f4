"""What cannot run under torchrun yet is refused at once, before any model is loaded or any step sampled, in the terms
the user typed: a command line gets one line and exit code 2 naming the command, a function call names the
function and the options passed, and the advice given works (it is not refused in turn). torchrun is simulated
by its WORLD_SIZE (or by a process group's size): the refusals come before any process group is needed."""
import types

import pytest
from torch import nn
from torch.utils.data import DataLoader

import llc_fast
import llc_fast.distributed.mesh as mesh
from llc_fast.cli import main
from llc_fast.config import LLCConfig

from conftest import mse, regression_data

UNDER_TORCHRUN = "cannot run under torchrun yet (this process is one of 2 it started)"


@pytest.fixture(params=["WORLD_SIZE", "process group"])
def torchrun(request, monkeypatch):
    """Two processes: torchrun's WORLD_SIZE before init_process_group, or an initialised group of 2."""
    if request.param == "WORLD_SIZE":
        monkeypatch.setenv("WORLD_SIZE", "2")
    else:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
        monkeypatch.setattr(mesh, "world_size", lambda: 2)


def _refused(call, *needles):
    with pytest.raises(ValueError) as e:
        call()
    message = str(e.value)
    assert UNDER_TORCHRUN in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def test_functions_are_refused_naming_what_was_passed(torchrun, counted_mlp):
    model, loader, loss_fn, calls = counted_mlp
    kw = dict(lr=1e-4, num_draws=10, progress=False)
    _refused(lambda: llc_fast.estimate_susceptibilities(model, loader, loss_fn, {"a": ["0.*"]}, {"s": loader},
                                                        token_losses_path="tokens", **kw),
             "estimate_susceptibilities(token_losses_path=...) cannot", "leave token_losses_path out")
    message = _refused(lambda: llc_fast.sweep(model, loader, loss_fn, nbetas=[10.0], lrs=[1e-4], progress=False),
                       "sweep with mala_every=10 (the default) cannot", "set mala_every=None")
    assert "shard_group_size" not in message  # an option sweep does not take
    _refused(lambda: llc_fast.calibrate(model, loader, loss_fn, lrs=[1e-4], mala_every=3, progress=False),
             "calibrate with mala_every=3 cannot")
    checkpoints = [(0, model), (1, model)]
    for components in ("layers", {"a": ["0.*"], "b": ["2.*"]}):
        _refused(lambda: llc_fast.estimate_over_checkpoints(checkpoints, loader, loss_fn, components=components, **kw),
                 "estimate_over_checkpoints(components=...) with several components", "call it once per component")
    _refused(lambda: llc_fast.estimate_over_checkpoints(checkpoints, loader, loss_fn, calibrate=dict(lrs=[1e-4])),
             "estimate_over_checkpoints(calibrate=...) with mala_every=10 (the default) cannot")
    _refused(lambda: llc_fast.estimate_over_checkpoints(checkpoints, loader, loss_fn, refine={"x": loader}, **kw),
             "estimate_over_checkpoints(refine=...) cannot")
    assert not calls


def test_the_advice_given_is_not_refused_in_turn(monkeypatch, counted_mlp):
    """With the advice followed, the call gets past every refusal to the torchrun run itself (which here, with no
    process group, asks for one)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    model, loader, loss_fn, calls = counted_mlp
    follow = [
        lambda: llc_fast.calibrate(model, loader, loss_fn, lrs=[1e-4], mala_every=None, progress=False),
        lambda: llc_fast.sweep(model, loader, loss_fn, nbetas=[10.0], lrs=[1e-4], mala_every=None, progress=False),
        lambda: llc_fast.estimate_llc(model, loader, loss_fn, lr=1e-4, mask={"0.weight": None}, progress=False),
        # restricted, refined and susceptibility runs split their rows over the ranks (distributed/rows.py)
        lambda: llc_fast.estimate_restricted_llcs(model, loader, loss_fn, {"a": ["0.*"]}, lr=1e-4, progress=False),
        lambda: llc_fast.estimate_susceptibilities(model, loader, loss_fn, {"a": ["0.*"]}, {"s": loader}, lr=1e-4,
                                                   progress=False),
        lambda: llc_fast.estimate_llc(model, loader, loss_fn, lr=1e-4, eval_data=loader, refine={"x": loader},
                                      progress=False),
        lambda: llc_fast.estimate_over_checkpoints([(0, model)], loader, loss_fn, components={"a": ["0.*"]},
                                                   calibrate=dict(lrs=[1e-4], mala_every=None), progress=False),
    ]
    for call in follow:
        with pytest.raises(RuntimeError, match=r"WORLD_SIZE=2\) but torch.distributed is not initialised"):
            call()
    assert not calls


def test_mala_on_a_sharded_model_names_a_call_that_records_it(monkeypatch, counted_mlp):
    """estimate_llc takes no shard_group_size: its refusal points to estimate_llc_sharded, which does."""
    import llc_fast.distributed.sharded as sharded

    model, loader, loss_fn, calls = counted_mlp
    monkeypatch.setattr(mesh, "make_chain_mesh", lambda size, device: types.SimpleNamespace(shard_group_size=2))
    config = LLCConfig(lr=1e-4, nbeta=10.0, mala_every=5, device="cpu")
    with pytest.raises(NotImplementedError, match=r"mala_every=5 \(MALA acceptance\) is not supported on a model "
                                                  r"sharded over 2 ranks yet: call llc_fast.distributed."
                                                  r"estimate_llc_sharded\(..., shard_group_size=1, mala_every=...\) "
                                                  r"instead of estimate_llc"):
        sharded._sample(model, loader, loss_fn, config, guard=None)
    with pytest.raises(NotImplementedError, match="yet: pass shard_group_size=1 "):
        sharded._sample(model, loader, loss_fn, config.replace(shard_group_size=2), guard=None)
    assert not calls


@pytest.mark.parametrize("command, prog", [
    (["restricted", "--model", "m", "--data", "d.npy", "--components", "heads", "--lr", "1e-4", "--output", "o.json"],
     "llc-fast restricted"),
    (["checkpoints", "--models", "run", "--data", "d.npy", "--lr", "1e-4", "--save-dir", "s"], "llc-fast checkpoints"),
    (["calibrate", "--script", "s.py", "--lrs", "1e-4"], "llc-fast calibrate"),
    (["demo"], "llc-fast demo"),
])
def test_commands_are_refused_in_one_line_with_exit_code_2(torchrun, monkeypatch, capsys, command, prog):
    from llc_fast.integrations import hf

    def never(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(hf, "load_causal_lm", never)
    monkeypatch.setattr(llc_fast, "estimate_llc", never)
    assert main(command) == 2
    captured = capsys.readouterr()
    line = captured.err.strip()
    assert "\n" not in line and "Traceback" not in captured.err and not captured.out
    assert line.startswith(f"{prog}") and f"{prog} {UNDER_TORCHRUN}" in line
    assert "run the same command without torchrun" in line or "run it without torchrun" in line
    assert "from a script" not in line and "init_from_env" not in line  # advice a command-line user can follow


TWO_CHAINS = dict(lr=1e-3, nbeta=20.0, num_chains=2, num_draws=12, progress=False)


def _loader():
    return DataLoader(regression_data(), batch_size=16)


def test_torchrun_without_a_process_group_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match=r"WORLD_SIZE=2.*not initialised.*llc_fast.distributed.init_from_env\(\)"):
        llc_fast.estimate_llc(nn.Linear(3, 1), _loader(), mse, **TWO_CHAINS)
