"""Every benchmark of bench/ cannot rot: its --quick smoke run (at toy sizes where the default quick sizes
would take minutes on a 2-core machine) exits 0, prints its environment header and the columns of its
table, and writes its JSON and its transcript. The figures are not checked: a smoke run's are not results."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HAS_DEVINTERP = importlib.util.find_spec("devinterp") is not None and importlib.util.find_spec("datasets") is not None

SMOKE = {  # id: (script, options after --quick, columns and lines its output must contain, needs devinterp)
    "update": ("bench_update.py", ["--sizes", "2^12", "2^14", "--copy-size", "2^16", "--repeats", "1",
                                   "--target-s", "0.01", "--max-repeats", "3", "--dtypes", "float32"],
               ["size", "backend", "sampler", "dtype", "ms(med)", "ms(min)", "GB/s", "of copy", "Gelem/s",
                "vs eager", "reps", "other", "# copy bandwidth", "eager", "adamw", "SUMMARY: [quick: not a result]"],
               False),
    "step": ("bench_step.py", ["--widths", "32,16,4", "--samples", "256", "--batch-size", "32", "--draws", "4",
                               "--samplers", "sgld"],
             ["sampler", "run", "ms", "range", "vs fused", "beyond fwd+bwd", "share", "other",
              "fwd+bwd only (no update)", "estimate_llc backend=cpu", "update alone: eager"], False),
    "e2e": ("bench_e2e.py", ["--cases", "gpu"],
            ["model", "params", "chains", "steps", "llc_fast st/s", "devinterp st/s", "speedup", "λ̂ llc_fast ± se",
             "λ̂ devinterp ± se", "agree", "fwd+bwd st/s", "bound", "vmap fwd+bwd/s", "same batches in both: yes",
             "SUMMARY: [quick: not a result] llc_fast / devinterp chain-steps/s"], True),
    "overhead": ("bench_overhead.py", ["--mlp-widths", "64,128,10", "--samples", "512", "--batch-size", "64"],
                 ["us/step median (range)", "us/chain-step", "estimate_llc (sampling loop)",
                  "hand loop: vmap grad (swap) + update", "estimate_llc / hand loop", "ms/step median (range)",
                  "vmapped forward+backward alone", "fused update alone", "step / fwd+bwd",
                  "SUMMARY: [quick: not a result] DLN"], False),
    "overhead-lm": ("bench_overhead.py", ["--parts", "lm"],
                    ["plan_memory", "timed calls:", "seconds per step", "forward+backward alone",
                     "outside forward/backward", "SUMMARY: [quick: not a result]"], False),
    "restricted": ("bench_restricted.py", ["--layers", "1", "--heads", "2", "--embd", "8", "--vocab", "16",
                                           "--seq-len", "6", "--sequences", "4", "--batch-size", "2", "--chains", "2",
                                           "--draws", "2", "--init-batches", "1", "--parts", "a,b,c"],
                   ["calls", "chain rows", "engine", "timed s median (range)", "wall s median",
                    "ratios within each round", "a/b: K components in one run", "c/a: speed-up",
                    "SUMMARY: [quick: not a result] K=2 heads"], False),
    "accuracy": ("bench_accuracy.py", [],
                 ["net", "widths", "method", "λ̂", "±SE", "vs λ", "q_stat"], False),
}


@pytest.mark.parametrize("name", list(SMOKE))
def test_quick_run_prints_its_table(name, tmp_path):
    script, options, columns, needs_devinterp = SMOKE[name]
    if needs_devinterp and not HAS_DEVINTERP:
        pytest.skip("devinterp (and datasets) not installed")
    out, log = tmp_path / "out.json", tmp_path / "out.txt"
    cmd = [sys.executable, f"bench/{script}", "--quick", *options, "--threads", "1", "--output", str(out),
           "--log", str(log)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    text = proc.stdout
    assert proc.returncode == 0, text[-4000:] + proc.stderr[-4000:]
    assert f"# command: {sys.executable} bench/{script} --quick" in text or "# command:" in text
    for column in columns:
        assert column in text, f"{script}: {column!r} missing from its output:\n{text[-4000:]}"
    result = json.loads(out.read_text())
    assert result["header"]["command"] and result[next(k for k in result if k != "header")]
    transcript = log.read_text()
    assert transcript.startswith("$ ") and "# date:" in transcript and columns[0] in transcript


@pytest.mark.parametrize("script", ["bench_accuracy.py", "bench_e2e.py", "bench_overhead.py", "bench_restricted.py",
                                    "bench_step.py", "bench_update.py", "gpu_build.py"])
def test_every_benchmark_prints_its_help(script):
    """--help formats every option's help (a bare % in one raised TypeError instead of printing)."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]
