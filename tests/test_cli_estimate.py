"""``llc-fast estimate`` on a tiny random HuggingFace model saved to disk: one process and two agree."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from llc_fast import LLCResult
from llc_fast.cli import main
from llc_fast.integrations.hf import load_tokens

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

REPO = Path(__file__).parent.parent
ARGS = ["--lr", "1e-4", "--nbeta", "20", "--gamma", "10", "--num-chains", "2", "--num-draws", "6",
        "--num-burnin-steps", "2", "--batch-size", "8", "--num-init-loss-batches", "4", "--seed", "3",
        "--sampler", "rmsprop_sgld", "--no-progress"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny random GPTNeoX (Pythia's architecture) saved with save_pretrained, and token data in two formats."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    config = transformers.GPTNeoXConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2,
                                        intermediate_size=32, vocab_size=64, max_position_embeddings=32,
                                        bos_token_id=0, eos_token_id=0, hidden_dropout=0.0, attention_dropout=0.0)
    model = transformers.GPTNeoXForCausalLM(config)
    model.save_pretrained(root / "model")
    tokens = torch.randint(0, 64, (32, 12), generator=torch.Generator().manual_seed(1)).numpy()
    np.save(root / "tokens.npy", tokens.astype(np.uint16))
    datasets.Dataset.from_dict({"input_ids": tokens.tolist()}).save_to_disk(str(root / "tokens_ds"))
    return root


def _torchrun() -> str | None:
    beside = Path(sys.executable).with_name("torchrun")
    return str(beside) if beside.is_file() else shutil.which("torchrun")


def test_one_and_two_processes_agree(saved, tmp_path, capsys):
    one_npy, one_ds, two = tmp_path / "one_npy.json", tmp_path / "one_ds.json", tmp_path / "two.json"
    assert main(["estimate", "--model", str(saved / "model"), "--data", str(saved / "tokens.npy"), *ARGS,
                 "--chain-batching", "sequential", "--output", str(one_npy)]) == 0
    out = capsys.readouterr().out
    assert "memory per rank" in out and "LLC = " in out and "result written" in out
    assert main(["estimate", "--model", str(saved / "model"), "--data", str(saved / "tokens_ds"), *ARGS,
                 "--chain-batching", "sequential", "--output", str(one_ds)]) == 0
    a, b = LLCResult.load(one_npy), LLCResult.load(one_ds)
    np.testing.assert_allclose(a.loss_trace, b.loss_trace, rtol=0, atol=1e-5)  # same rows in both formats
    assert a.config["cli"] == "llc-fast estimate" and a.config["seq_len"] == 12 and a.config["dataset_size"] == 32

    if _torchrun() is None or not torch.distributed.is_gloo_available():
        pytest.skip("torchrun with gloo is not available")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([_torchrun(), "--standalone", "--nproc_per_node=2", "-m", "llc_fast", "estimate",
                           "--model", str(saved / "model"), "--data", str(saved / "tokens_ds"), *ARGS,
                           "--activation-checkpointing", "--output", str(two)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.stdout.count("memory per rank") == 1  # rank 0 prints, once
    c = LLCResult.load(two)  # FSDP over 2 ranks, with activation checkpointing: the same chains
    assert c.config["activation_checkpointing"]
    assert (c.config["world_size"], c.config["shard_group_size"], c.config["engine"]) == (2, 2, "fsdp")
    np.testing.assert_allclose(c.loss_trace, a.loss_trace, rtol=0, atol=1e-5)
    assert c.llc_mean == pytest.approx(a.llc_mean, rel=1e-4, abs=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one_ds.json", "one_npy.json", "two.json"]


def test_refuses_a_plan_that_does_not_fit(saved, tmp_path, capsys):
    out = tmp_path / "llc.json"
    code = main(["estimate", "--model", str(saved / "model"), "--data", str(saved / "tokens.npy"), *ARGS,
                 "--memory-limit-gib", "0.5", "--output", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "refused" in err and "GiB per rank" in err and "to fit, change one of" in err
    assert not out.exists()


def test_token_files(tmp_path):
    flat = np.arange(100, dtype=np.uint16)
    flat.tofile(tmp_path / "t.bin")
    rows = load_tokens(tmp_path / "t.bin", seq_len=9, token_dtype="uint16")
    assert (len(rows), rows.seq_len) == (11, 9) and rows[1].tolist() == list(range(9, 18))
    assert rows[[2, 0]].shape == (2, 9) and rows[0].dtype == torch.int64
    with pytest.raises(ValueError, match="--seq-len"):
        load_tokens(tmp_path / "t.bin")
    np.save(tmp_path / "t.npy", np.arange(40).reshape(4, 10))
    assert load_tokens(tmp_path / "t.npy", seq_len=6).seq_len == 6
    with pytest.raises(ValueError, match="longer"):
        load_tokens(tmp_path / "t.npy", seq_len=11)
    (tmp_path / "t.txt").write_text("1 2 3")
    with pytest.raises(ValueError, match=".npy or a .bin"):
        load_tokens(tmp_path / "t.txt")


# --- bad data and output paths, refused before any work; Ctrl-C keeps the run ---------------------------

@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("defects")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=50, n_positions=16)
    transformers.GPT2LMHeadModel(config).save_pretrained(root / "model")
    return root


def _estimate_gpt2(model_dir, data, *extra):
    return main(["estimate", "--model", str(model_dir), "--data", str(data), "--lr", "1e-4", "--nbeta", "10",
                 "--num-chains", "1", "--num-draws", "3", "--batch-size", "2", "--no-progress", *extra])


def test_cli_checks_tokens_against_the_file_dtype_and_the_vocabulary(tiny_model_dir, tmp_path, capsys,
                                                                        monkeypatch):
    from llc_fast.integrations import hf

    loaded = []
    monkeypatch.setattr(hf, "load_causal_lm", lambda *a, **k: loaded.append(1))  # must never be reached
    model = tiny_model_dir / "model"
    np.arange(60, dtype=np.int32).tofile(tmp_path / "t32.bin")  # int32 ids read as uint16
    assert _estimate_gpt2(model, tmp_path / "t32.bin", "--seq-len", "6", "--token-dtype", "uint16") == 2
    assert "looks like int32 or uint32 token ids; pass --token-dtype int32" in capsys.readouterr().err
    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02")
    assert _estimate_gpt2(model, tmp_path / "odd.bin", "--seq-len", "2", "--token-dtype", "uint16") == 2
    assert "not a whole number of uint16 token ids" in capsys.readouterr().err
    tokens = np.random.default_rng(0).integers(0, 50, (1000, 8))
    tokens[777, 3] = 50  # one id outside the vocabulary
    np.save(tmp_path / "oov.npy", tokens)
    assert _estimate_gpt2(model, tmp_path / "oov.npy") == 2
    assert "token id 50 at row 777, position 3 is outside the model's vocabulary [0, 50)" in capsys.readouterr().err
    np.save(tmp_path / "long.npy", np.zeros((4, 20), dtype=np.int64))
    assert _estimate_gpt2(model, tmp_path / "long.npy") == 2
    assert "longer than the model's 16 positions: pass --seq-len 16" in capsys.readouterr().err
    for bad in ("-3", "0"):
        with pytest.raises(SystemExit):
            _estimate_gpt2(model, tmp_path / "oov.npy", "--seq-len", bad)
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
        assert _estimate_gpt2(model, data, "--output", str(out)) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(ModelLoaded):  # --force gets past the check
        _estimate_gpt2(model, data, "--output", str(data), "--force")


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
