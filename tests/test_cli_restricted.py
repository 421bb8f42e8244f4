"""``llc-fast restricted`` on a tiny random GPT-2 saved to disk: one batched run of every head (and the full
model), its three outputs, and the refusals that come before any sampling."""
import csv
import json
import math
import sys

import numpy as np
import pytest
import torch

from llc_fast.cli import main
from llc_fast.cli.estimate import COMPONENT_SETS
from llc_fast.estimators.restricted import RestrictedLLCResult

transformers = pytest.importorskip("transformers")

ARGS = ["--lr", "1e-4", "--nbeta", "10", "--num-chains", "2", "--num-draws", "4", "--batch-size", "4",
        "--num-init-loss-batches", "2", "--seed", "1", "--device", "cpu", "--no-progress"]
CSV_HEADER = ["name", "num_params", "llc_mean", "llc_std", "llc_stderr", "mcse", "rhat", "trusted", "verdict", "diverged"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A 1-layer, 2-head random GPT-2 saved with save_pretrained, and 16 rows of 8 token ids (.npy)."""
    root = tmp_path_factory.mktemp("restricted")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(root / "model")
    np.save(root / "tokens.npy", np.random.default_rng(0).integers(0, 32, (16, 8)).astype(np.uint16))
    return root


def _command(saved, out, *more):
    return ["restricted", "--model", str(saved / "model"), "--data", str(saved / "tokens.npy"), *ARGS,
            "--output", str(out), *more]


def _stamps(paths):
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in paths}


def test_heads_and_full_in_one_run_then_no_overwrite(saved, tmp_path, capsys):
    from llc_fast.integrations import hf
    from llc_fast.integrations.components import standard

    names = list(standard(hf.load_causal_lm(saved / "model"), "heads"))
    assert names == ["full", "l0h0", "l0h1"]
    out = tmp_path / "heads.json"
    assert main(_command(saved, out, "--components", "heads", "--include-full")) == 0
    printed = capsys.readouterr().out
    assert "3 components (full, l0h0, l0h1)" in printed and "component" in printed and "l0h1" in printed

    result = RestrictedLLCResult.load(out)
    assert result.names == names
    for name in names:
        assert math.isfinite(result[name].llc_mean), name
        assert result[name].config["cli"] == "llc-fast restricted" and result[name].config["component_set"] == "heads"
        assert result[name].config["component"] == name
    assert result["l0h0"].config["num_params"] < result["full"].config["num_params"]

    with open(tmp_path / "heads.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0][:len(CSV_HEADER)] == CSV_HEADER
    assert [row[0] for row in table[1:]] == names
    assert [float(row[2]) for row in table[1:]] == pytest.approx([result[n].llc_mean for n in names])
    diagnosed = [result[n].diagnostics() for n in names]
    assert [(float(row[6]), row[7], row[8]) for row in table[1:]] == [
        (pytest.approx(d["rhat"]), str(d["ok"]), d["verdict"]) for d in diagnosed]
    png = tmp_path / "heads.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    outputs = [out, tmp_path / "heads.csv", png]
    before = _stamps(outputs)
    for existing in outputs:  # each output alone blocks a rerun, and is named
        others = [p for p in outputs if p != existing]
        hidden = {p: p.read_bytes() for p in others}
        for p in others:
            p.unlink()
        assert main(_command(saved, out, "--components", "heads", "--include-full")) == 2
        captured = capsys.readouterr()
        assert str(existing) in captured.err and "--force" in captured.err
        assert "components" not in captured.out  # refused before the model was loaded or sampled
        assert not any(p.exists() for p in others)
        for p, data in hidden.items():
            p.write_bytes(data)
    assert {p.name: p.read_bytes() for p in outputs} == {k: v for k, (_, v) in before.items()}

    # --force overwrites; without matplotlib the PNG is skipped with a message, not an error
    saved_modules = {k: v for k, v in sys.modules.items() if k == "matplotlib" or k.startswith("matplotlib.")}
    png.unlink()
    try:
        for k in saved_modules:
            sys.modules[k] = None
        sys.modules["matplotlib"] = None
        assert main(_command(saved, out, "--components", "heads", "--force", "--seed", "2")) == 0
    finally:
        sys.modules.pop("matplotlib", None)
        sys.modules.update(saved_modules)
    captured = capsys.readouterr()
    assert "matplotlib" in captured.err and str(png) in captured.err and not png.exists()
    again = RestrictedLLCResult.load(out)
    assert again.names == ["l0h0", "l0h1"]  # without --include-full: the heads only
    assert again["l0h0"].llc_mean != result["l0h0"].llc_mean  # rewritten (another seed)
    assert len((tmp_path / "heads.csv").read_text().splitlines()) == 1 + 2


def test_bad_components_are_refused_before_sampling(saved, tmp_path, capsys):
    out = tmp_path / "x.json"
    with pytest.raises(SystemExit) as exc:
        main(_command(saved, out, "--components", "bogus"))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "bogus" in err and all(choice in err for choice in ("layers", "heads", "attn-mlp", "embeddings"))
    assert not list(tmp_path.iterdir())
    from llc_fast.integrations.components import STANDARD

    assert sorted(COMPONENT_SETS) == sorted(STANDARD)  # the CLI's choices are the library's sets

    with pytest.raises(SystemExit):  # --components and --components-file exclude each other
        main(_command(saved, out, "--components", "heads", "--components-file", str(tmp_path / "c.json")))
    assert "not allowed with" in capsys.readouterr().err


def test_components_file(saved, tmp_path, capsys):
    spec = tmp_path / "components.json"
    out = tmp_path / "custom.json"
    spec.write_text(json.dumps({"attn": ["transformer.h.0.attn.*"], "nothing": ["transformer.h.7.*"]}))
    assert main(_command(saved, out, "--components-file", str(spec))) == 2
    captured = capsys.readouterr()
    assert "'nothing'" in captured.err and "'transformer.h.7.*'" in captured.err and "matches no" in captured.err
    assert "components (" not in captured.out and not out.exists()  # nothing sampled, nothing written

    spec.write_text(json.dumps({"attn": "transformer.h.0.attn.*"}))
    assert main(_command(saved, out, "--components-file", str(spec), "--include-full")) == 0
    assert RestrictedLLCResult.load(out).names == ["full", "attn"]
    capsys.readouterr()

    for text, message in (("[1, 2]", "non-empty object"), ("{not json", "not valid JSON"),
                          ('{"a": {"x": 1}}', "list of parameter-name patterns")):
        spec.write_text(text)
        assert main(_command(saved, tmp_path / "other.json", "--components-file", str(spec))) == 2
        assert message in capsys.readouterr().err
    assert main(_command(saved, tmp_path / "other.json", "--components-file", str(tmp_path / "missing.json"))) == 2
    assert "missing.json does not exist" in capsys.readouterr().err
    assert main(_command(saved, tmp_path / "other.csv", "--components", "heads")) == 2
    assert "name a .json file" in capsys.readouterr().err


def test_ctrl_c_keeps_the_partial_run_and_says_how_to_resume(saved, tmp_path):
    import os
    import signal
    import subprocess
    import time
    from pathlib import Path

    out, ck = tmp_path / "heads.json", tmp_path / "run.ckpt"
    command = _command(saved, out, "--components", "heads", "--checkpoint", str(ck))
    command[command.index("--num-draws") + 1] = "100000"
    proc = subprocess.Popen([sys.executable, "-m", "llc_fast", *command], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent), OMP_NUM_THREADS="1"))
    for line in proc.stdout:  # printed just before sampling starts
        if "components (" in line:
            break
    time.sleep(2.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert "llc-fast restricted: partial result" in err and f"--resume {ck}" in err and ck.exists()
    partial = RestrictedLLCResult.load(tmp_path / "heads.partial.json")
    assert partial.names == ["l0h0", "l0h1"] and partial["l0h1"].config["partial"]
    assert partial["l0h0"].loss_trace.shape[1] > 0
    assert not any(out.with_suffix(s).exists() for s in (".json", ".csv", ".png"))


def test_checkpoint_and_resume_paths_and_options_are_checked_before_the_model_loads(saved, tmp_path, capsys,
                                                                                    monkeypatch):
    from llc_fast.integrations import hf

    def never(*a, **k):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(hf, "load_causal_lm", never)
    out = tmp_path / "x.json"
    cases = [
        (["--resume", str(tmp_path / "gone.ckpt")],
         f"--resume {tmp_path / 'gone.ckpt'}: the checkpoint to continue, does not exist"),
        (["--checkpoint", str(tmp_path / "no" / "run.ckpt")],
         f"--checkpoint {tmp_path / 'no' / 'run.ckpt'}: the directory {tmp_path / 'no'} does not exist"),
        (["--checkpoint", str(tmp_path)], f"--checkpoint {tmp_path} is a directory; name a file"),
        (["--checkpoint", str(saved / "model" / "run.ckpt")], "is inside the model directory"),
        (["--checkpoint-every", "5"], "checkpoint_every needs checkpoint=PATH"),
    ]
    for more, message in cases:
        assert main(_command(saved, out, "--components", "heads", *more)) == 2, more
        captured = capsys.readouterr()
        line = captured.err.strip()
        assert line.startswith("llc-fast restricted: ") and message in line and "\n" not in line, line
        assert "Traceback" not in captured.err and not captured.out
    assert not out.exists() and not (tmp_path / "no").exists()
