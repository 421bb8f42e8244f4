"""``llc-fast bif`` on a tiny random GPT-2 saved to disk: per-token and per-row BIFs, its three outputs, the
refusals that come before any sampling, and Ctrl-C with the command that resumes."""
import json

import numpy as np
import pytest
import torch

import llc_fast
from llc_fast.cli import main

transformers = pytest.importorskip("transformers")

ARGS = ["--lr", "1e-4", "--nbeta", "10", "--gamma", "100", "--num-chains", "2", "--num-draws", "6", "--batch-size", "4",
        "--num-init-loss-batches", "2", "--seed", "1", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A 1-layer, 2-head random GPT-2 saved with save_pretrained; 16 train rows and 3 query rows of 8 token ids."""
    root = tmp_path_factory.mktemp("bif")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    np.save(root / "train.npy", rng.integers(0, 32, (16, 8)).astype(np.uint16))
    np.save(root / "query.npy", rng.integers(0, 32, (3, 8)).astype(np.uint16))
    np.save(root / "bad.npy", np.full((3, 8), 40, dtype=np.uint16))
    return root


def _command(saved, out, *more, query="query.npy"):
    return ["bif", "--model", str(saved / "model"), "--query", str(saved / query), "--train",
            str(saved / "train.npy"), *ARGS, "--output", str(out), *more]


def test_per_token_bif_and_its_three_outputs_then_no_overwrite(saved, tmp_path, capsys):
    out = tmp_path / "bif.json"
    assert main(_command(saved, out)) == 0
    printed = capsys.readouterr().out
    assert "query" in printed and "whole model" in printed and "BIF (correlation) of 21 query x 112 train" in printed
    result = llc_fast.BIFResult.load(out)
    assert result.components == ["full"] and result.bif.shape == (1, 3 * 7, 16 * 7)
    assert np.isfinite(result.bif).all() and np.isfinite(result.bif_stderr).all()
    assert result.config["cli"] == "llc-fast bif" and result.config["per"] == "token" and "fingerprint" in result.config
    xr = pytest.importorskip("xarray")
    with xr.open_dataset(tmp_path / "bif.nc") as ds:
        np.testing.assert_allclose(ds.bif.values, result.bif)
        assert json.loads(ds.attrs["config"])["cli"] == "llc-fast bif"
    assert (tmp_path / "bif.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert main(_command(saved, out)) == 2  # every output exists: refused, nothing rewritten
    assert "exists; pass --force" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamps


def test_per_sequence_heads_covariance(saved, tmp_path, capsys):
    out = tmp_path / "heads.json"
    assert main(_command(saved, out, "--per", "sequence", "--kind", "covariance", "--components", "heads",
                         "--include-full")) == 0
    result = llc_fast.BIFResult.load(out)
    assert result.components == ["full", "l0h0", "l0h1"] and result.bif.shape == (3, 3, 16) and result.kind == \
        "covariance"
    assert np.isfinite(result.bif).all()


@pytest.mark.parametrize("more, query, message", [
    ([], "missing.npy", "--query"),
    ([], "bad.npy", "--query"),
    (["--include-full"], "query.npy", "--include-full adds the whole model"),
    (["--components-file", "nowhere.json"], "query.npy", "does not exist"),
    (["--resume", "nowhere.ckpt"], "query.npy", "--resume nowhere.ckpt"),
    (["--batch-size", "17"], "query.npy", "--batch-size must lie in"),
])
def test_bad_inputs_are_refused_before_loading_the_model(saved, tmp_path, capsys, monkeypatch, more, query, message):
    from llc_fast.integrations import hf

    monkeypatch.setattr(hf, "load_causal_lm", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(_command(saved, tmp_path / "x.json", *more, query=query)) == 2
    err = capsys.readouterr().err
    assert err.startswith("llc-fast bif: ") and message in err
    assert not list(tmp_path.iterdir())


def test_output_must_be_json_and_sampler_options_are_checked(saved, tmp_path, capsys):
    assert main(_command(saved, tmp_path / "x.csv")) == 2
    assert "name a .json file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(_command(saved, tmp_path / "x.json", "--num-chains", "0"))


def test_ctrl_c_writes_a_partial_result_and_the_resume_command(saved, tmp_path, capsys, monkeypatch):
    import os
    import signal

    from llc_fast.integrations import hf

    real, calls = hf.causal_lm_loss, []

    def interrupting(m, b):
        calls.append(1)
        if len(calls) == 8:
            os.kill(os.getpid(), signal.SIGINT)
        return real(m, b)

    monkeypatch.setattr(hf, "causal_lm_loss", interrupting)
    out = tmp_path / "bif.json"
    assert main(_command(saved, out, "--checkpoint", str(tmp_path / "run.ckpt"))) == 130
    err = capsys.readouterr().err
    assert "partial result" in err and "--resume" in err and (tmp_path / "bif.partial.json").is_file()
    partial = llc_fast.BIFResult.load(tmp_path / "bif.partial.json")
    assert partial.config["partial"]
    monkeypatch.setattr(hf, "causal_lm_loss", real)
    assert main(_command(saved, out, "--resume", str(tmp_path / "run.ckpt"))) == 0
    whole = tmp_path / "whole.json"
    assert main(_command(saved, whole)) == 0
    np.testing.assert_array_equal(llc_fast.BIFResult.load(out).bif, llc_fast.BIFResult.load(whole).bif)
