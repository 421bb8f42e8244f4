"""The defects a new-user probe found (silent wrong answers first, then work lost late): each is caught, with a
message that says what was wrong and what to do, before any sampling work where possible."""
import os
import signal
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import llc_fast
from llc_fast import LLCDivergenceWarning, LLCResult
from llc_fast.estimators.llc import LLCChainsStuckWarning

from conftest import mlp_case, mse, regression_data

FAST = dict(lr=1e-3, nbeta=20.0, num_chains=2, num_draws=12, progress=False)
REPO = Path(__file__).parent.parent


def _data():
    return DataLoader(regression_data(), batch_size=16)


# --- silent wrong answers -----------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ["vmap", "sequential"])
@pytest.mark.parametrize("bad_loss", [
    lambda m, b: mse(m, b).detach(),
    lambda m, b: torch.no_grad()(mse)(m, b),
    lambda m, b: torch.tensor(3),
], ids=["detached", "no_grad", "int_tensor"])
def test_a_loss_without_gradient_is_refused_before_sampling(engine, bad_loss):
    calls = []

    def loss_fn(m, b):
        calls.append(1)
        return bad_loss(m, b)

    with pytest.raises(ValueError, match=r"loss_fn returned (a tensor without gradient|an integer tensor).*at w\*"):
        llc_fast.estimate_llc(nn.Linear(3, 1), _data(), loss_fn, chain_batching=engine, **FAST)
    assert len(calls) <= 5  # the initial-loss batches and the check, never a sampling step


def test_finite_but_absurd_chains_are_flagged_and_excluded():
    """RMSProp-SGLD at nbeta = 1e8 explodes to finite losses of 1e20 and more: the bound |L - L(w*)| <=
    100 max(|L(w*)|, 1) flags it; no estimate of 1e30 comes back."""
    model, loader, loss_fn = mlp_case()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(llc_fast.AllChainsDivergedError) as err:
            llc_fast.estimate_llc(model, loader, loss_fn, sampler="rmsprop_sgld", lr=1e-3, nbeta=1e8, num_chains=2,
                                  num_draws=50, progress=False)
    result = err.value.result
    assert result.diverged_chains == [0, 1]
    assert any("moved more than 100x" in str(w.message) for w in caught if w.category is LLCDivergenceWarning)
    bound = 100 * max(abs(result.init_loss), 1.0)
    for c, step in result.diverged_at_step.items():  # the first step out of bound is the one named
        steps = np.concatenate([result.burnin_loss_trace[c], result.loss_trace[c]])
        assert steps[step] > bound or not np.isfinite(steps[step]) or np.isnan(steps[step])


def test_the_first_bad_step_is_named_not_the_step_it_was_seen():
    """Checks run every 16 steps, but the warning names the first step whose loss left the bound."""
    model = nn.Linear(3, 1)
    data = [tuple(regression_data().tensors)]
    with pytest.warns(LLCDivergenceWarning) as caught:
        r = llc_fast.estimate_llc(model, data, mse, **dict(FAST, lr=[1e-3, 3.0], num_draws=40))
    assert r.diverged_chains == [1]
    losses = r.loss_trace[1]  # no burn-in: draw d is step d
    first = r.diverged_at_step[1]
    assert np.all(np.abs(losses[:first] - r.init_loss) <= 100 * max(r.init_loss, 1))
    assert np.isnan(losses[first:]).all()
    assert first % 16 != 15 and f"diverged at step {first} " in str(caught[0].message)


def test_chains_that_never_move_are_flagged():
    model = nn.Linear(3, 1)
    with pytest.warns(LLCChainsStuckWarning, match=r"never moved from w\*.*below the float resolution.*larger lr"):
        llc_fast.estimate_llc(model, _data(), mse, **dict(FAST, lr=1e-300))
    with warnings.catch_warnings():
        warnings.simplefilter("error", LLCChainsStuckWarning)  # a normal step size moves every chain
        llc_fast.estimate_llc(model, _data(), mse, **FAST)


def test_no_step_and_nothing_to_sample_are_refused():
    with pytest.raises(ValueError, match="num_draws=1 with num_burnin_steps=0 takes no sampler step"):
        llc_fast.estimate_llc(nn.Linear(3, 1), _data(), mse, **dict(FAST, num_draws=1))
    llc_fast.estimate_llc(nn.Linear(3, 1), _data(), mse, **dict(FAST, num_draws=1, num_burnin_steps=5))
    with pytest.raises(ValueError, match="the mask samples nothing"):
        llc_fast.estimate_llc(nn.Linear(3, 1), _data(), mse, mask={"weight": torch.zeros(1, 3)}, **FAST)


def test_torchrun_without_a_process_group_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match=r"WORLD_SIZE=2.*not initialised.*llc_fast.distributed.init_from_env\(\)"):
        llc_fast.estimate_llc(nn.Linear(3, 1), _data(), mse, **FAST)


# --- misleading results ---------------------------------------------------------------------------------

def test_mask_with_none_values_samples_whole_parameters():
    """What devinterp's create_param_masks returns (None: the whole parameter) works natively."""
    model = nn.Linear(3, 1)
    r = llc_fast.estimate_llc(model, _data(), mse, mask={"weight": None}, **FAST)
    assert r.config["mask"] == ["weight"] and np.isfinite(r.llc_mean)


def test_divergence_advice_depends_on_what_is_out_of_scale():
    model = nn.Linear(3, 1)
    with pytest.warns(LLCDivergenceWarning) as caught:
        llc_fast.estimate_llc(model, _data(), mse, **dict(FAST, lr=1e-2, gamma=[1.0, 1e4], num_draws=30))
    text = str(caught[0].message)
    assert "lr*gamma = 100" in text and "smaller gamma" in text and "larger gamma" not in text
    from llc_fast.estimators.llc import divergence_advice

    assert "smaller step size than lr=0.1" in divergence_advice(0.1, 1e6, 1.0)


def test_compat_optimizers_validate_their_hyperparameters():
    from llc_fast.compat import devinterp as compat

    params = nn.Linear(3, 1).parameters
    for kw, message in [(dict(lr=0.0), "lr must be a finite number > 0"), (dict(lr=float("nan")), "lr must be"),
                        (dict(nbeta=-1.0), "nbeta must be a finite number > 0"),
                        (dict(localization=-1.0), "localization must be a finite number >= 0")]:
        with pytest.raises(ValueError, match=message):
            compat.SGLD(params(), **kw)
        with pytest.raises(ValueError, match=message):
            compat.SGMCMC.rmsprop_sgld(params(), **kw)


def test_small_input_defects():
    model = nn.Linear(3, 1)
    r = llc_fast.estimate_llc(model, _data(), mse, **dict(FAST, lr=np.array([1e-3, 2e-3])))  # numpy per chain
    assert r.config["lr"] == [1e-3, 2e-3]
    with pytest.raises(TypeError, match=r"mask must be a dict \{parameter name"):
        llc_fast.estimate_llc(model, _data(), mse, mask=[torch.ones(1, 3)], **FAST)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device='cuda' but no CUDA GPU is visible.*device='cpu'"):
            llc_fast.estimate_llc(model, _data(), mse, device="cuda", **FAST)


def test_saved_results_honour_the_umask_and_the_target_mode(tmp_path):
    r = llc_fast.estimate_llc(nn.Linear(3, 1), _data(), mse, **FAST)
    old = os.umask(0o022)
    try:
        path = r.save(tmp_path / "r.json")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        os.chmod(path, 0o600)
        r.save(path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600  # an existing file keeps its mode
    finally:
        os.umask(old)


def test_a_killed_save_leaves_a_recognisable_partial_file_that_the_next_save_removes(tmp_path):
    r = llc_fast.estimate_llc(nn.Linear(3, 1), _data(), mse, **FAST)
    code = ("import os, sys; from pathlib import Path; import llc_fast.estimators.result as res\n"
            "os.replace = lambda *a: os.kill(os.getpid(), 9)\n"
            f"res.write_atomically(Path({str(tmp_path / 'r.json')!r}), 'x' * 1000)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == -9
    partial = [p.name for p in tmp_path.iterdir()]
    assert len(partial) == 1 and partial[0].startswith("r.json.llc_fast-partial.")
    r.save(tmp_path / "r.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    assert LLCResult.load(tmp_path / "r.json").llc_mean == r.llc_mean


# --- the CLI: bad data and output paths, before any work -----------------------------------------------

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("defects")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=50, n_positions=16)
    transformers.GPT2LMHeadModel(config).save_pretrained(root / "model")
    return root


def _estimate(model_dir, data, *extra):
    from llc_fast.cli import main

    return main(["estimate", "--model", str(model_dir), "--data", str(data), "--lr", "1e-4", "--nbeta", "10",
                 "--num-chains", "1", "--num-draws", "3", "--batch-size", "2", "--no-progress", *extra])


def test_cli_checks_tokens_against_the_file_dtype_and_the_vocabulary(tiny_model_dir, tmp_path, capsys,
                                                                        monkeypatch):
    from llc_fast.integrations import hf

    loaded = []
    monkeypatch.setattr(hf, "load_causal_lm", lambda *a, **k: loaded.append(1))  # must never be reached
    model = tiny_model_dir / "model"
    np.arange(60, dtype=np.int32).tofile(tmp_path / "t32.bin")  # int32 ids read as uint16
    assert _estimate(model, tmp_path / "t32.bin", "--seq-len", "6", "--token-dtype", "uint16") == 2
    assert "looks like int32 or uint32 token ids; pass --token-dtype int32" in capsys.readouterr().err
    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02")
    assert _estimate(model, tmp_path / "odd.bin", "--seq-len", "2", "--token-dtype", "uint16") == 2
    assert "not a whole number of uint16 token ids" in capsys.readouterr().err
    tokens = np.random.default_rng(0).integers(0, 50, (1000, 8))
    tokens[777, 3] = 50  # one id outside the vocabulary
    np.save(tmp_path / "oov.npy", tokens)
    assert _estimate(model, tmp_path / "oov.npy") == 2
    assert "token id 50 at row 777, position 3 is outside the model's vocabulary [0, 50)" in capsys.readouterr().err
    np.save(tmp_path / "long.npy", np.zeros((4, 20), dtype=np.int64))
    assert _estimate(model, tmp_path / "long.npy") == 2
    assert "longer than the model's 16 positions: pass --seq-len 16" in capsys.readouterr().err
    for bad in ("-3", "0"):
        with pytest.raises(SystemExit):
            _estimate(model, tmp_path / "oov.npy", "--seq-len", bad)
        assert "--seq-len: must be >= 1" in capsys.readouterr().err
    assert loaded == []


def test_cli_checks_the_output_path_before_any_work(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from llc_fast.integrations import hf

    class ModelLoaded(Exception):
        pass

    def load(*a, **k):
        raise ModelLoaded

    monkeypatch.setattr(hf, "load_causal_lm", load)
    model = tiny_model_dir / "model"
    np.save(tmp_path / "ok.npy", np.zeros((8, 8), dtype=np.int64))
    data = tmp_path / "ok.npy"
    cases = [(tmp_path / "missing" / "r.json", "does not exist"), (tmp_path, "is a directory"),
             (model / "r.json", "inside the model directory"), (data, "exists; pass --force")]
    for out, message in cases:
        assert _estimate(model, data, "--output", str(out)) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(ModelLoaded):  # --force gets past the check
        _estimate(model, data, "--output", str(data), "--force")


def test_the_result_says_what_was_sampled():
    """Frozen parameters are named, tied ones are sampled once (and named with the slot they share)."""
    from conftest import TokenModel

    model = TokenModel()
    model.norm.weight.requires_grad_(False)
    tokens = torch.randint(0, 11, (16, 5), generator=torch.Generator().manual_seed(0))

    def loss_fn(m, batch):
        logits = m(batch[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    r = llc_fast.estimate_llc(model, [tokens], loss_fn, **FAST)
    assert r.config["frozen_params"] == ["norm.weight"]
    assert r.config["tied_params"] == {"out.weight": "emb.weight"}
    assert r.config["num_params"] == sum(p.numel() for n, p in model.named_parameters() if n != "norm.weight")


def test_dropout_in_train_mode_and_a_certain_divergence_are_said_before_sampling():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.2), nn.Linear(4, 1))
    with pytest.warns(RuntimeWarning, match=r"dropout is active \(train mode\) in \['1'\].*model.eval\(\)"):
        llc_fast.estimate_llc(model, _data(), mse, **FAST)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # in eval mode: no warning
        llc_fast.estimate_llc(model.eval(), _data(), mse, **FAST)
    calls = []
    with pytest.warns(LLCDivergenceWarning) as caught:
        with pytest.raises(llc_fast.AllChainsDivergedError):
            llc_fast.estimate_llc(nn.Linear(3, 1), _data(), lambda m, b: calls.append(1) or mse(m, b),
                                  **dict(FAST, lr=1.0, gamma=10.0, num_draws=40))
    first = str(caught[0].message)
    assert "will diverge: lr*gamma = 10 >= 4" in first and "Use lr < 0.4" in first


def test_cli_ctrl_c_keeps_the_run_and_says_how_to_resume(tiny_model_dir, tmp_path):
    np.save(tmp_path / "tokens.npy", np.random.default_rng(0).integers(0, 50, (64, 8)))
    out, ck = tmp_path / "llc.json", tmp_path / "run.ckpt"
    args = [sys.executable, "-m", "llc_fast", "estimate", "--model", str(tiny_model_dir / "model"), "--data",
            str(tmp_path / "tokens.npy"), "--lr", "1e-4", "--nbeta", "10", "--num-chains", "2", "--num-draws", "100000",
            "--batch-size", "4", "--no-progress", "--output", str(out), "--checkpoint", str(ck),
            "--chain-batching", "sequential"]
    proc = subprocess.Popen(args, env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # the memory table is printed just before sampling starts
        if "total" in line and "fits" in line:
            break
    time.sleep(3.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert "partial result" in err and f"--resume {ck}" in err and ck.exists()
    partial = LLCResult.load(tmp_path / "llc.partial.json")
    assert partial.config["partial"] and partial.loss_trace.shape[1] > 0 and not out.exists()
