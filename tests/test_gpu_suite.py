"""bench/gpu_suite.sh, the GPU campaign, cannot rot: its dry run (every stage at toy sizes on the CPU,
CUDA hidden, Triton in its interpreter) runs every stage, writes every result file and fails none; and a
stage that fails or outlives its cap is reported as such while the stages after it still run."""
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "bench" / "gpu_suite.sh"
STAGES = {  # id: (name, raw output, result files)
    "a": ("environment", "env.txt", ["env.json"]),
    "b": ("build", "build.txt", ["build.json"]),
    "c": ("gpu-tests", "pytest-gpu.txt", ["pytest-gpu.xml"]),
    "d": ("bench_update", "bench_update.txt", ["bench_update.json"]),
    "e": ("e2e-devinterp", "e2e.txt", ["e2e.json"]),
    "f": ("lm-1b", "lm.txt", ["lm.json"]),
    "g": ("overhead", "overhead.txt", ["overhead.json"]),
    "h": ("restricted", "restricted.txt", ["restricted.json"]),
}

pytestmark = pytest.mark.skipif(os.environ.get("LLC_FAST_GPU_SUITE") == "1",
                                reason="running inside gpu_suite.sh already")


def _suite(out: Path, *args: str, env=None, timeout=240) -> subprocess.CompletedProcess:
    env = dict(os.environ if env is None else env)
    env.pop("TRITON_INTERPRET", None)  # the suite sets what it needs
    return subprocess.run(["bash", str(SUITE), "--dry-run", "--out", str(out), "--python", sys.executable, *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _summary(out: Path) -> dict:
    lines = (out / "summary.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["id", "stage", "status", "seconds", "cap", "file", "note"]
    rows = [line.split("\t") for line in lines[1:]]
    return {r[0]: dict(zip(["id", "stage", "status", "seconds", "cap", "file", "note"], r)) for r in rows}


def test_dry_run_runs_every_stage(tmp_path):
    out = tmp_path / "dry"
    proc = _suite(out)
    log = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, log
    rows = _summary(out)
    assert list(rows) == list(STAGES), log
    for sid, (name, raw, results) in STAGES.items():
        row = rows[sid]
        assert row["stage"] == name
        assert row["status"] in ("ok", "skipped"), f"stage {sid} {name}: {row}\n{(out / raw).read_text()[-3000:]}"
        if row["status"] == "skipped":  # only for want of a GPU
            assert row["note"].startswith("no GPU"), row
        assert row["file"] == raw and (out / raw).stat().st_size > 0
        text = (out / raw).read_text()
        assert text.startswith("$ ") and f"# exit code {77 if row['status'] == 'skipped' else 0} after" in text
        for f in results:
            assert (out / f).is_file() and (out / f).stat().st_size > 0, f"stage {sid}: {f} missing"
        assert int(row["seconds"]) <= int(row["cap"])
    assert rows["b"]["status"] == "skipped"  # no GPU: the CUDA build is only compiled (or reported missing)
    assert "passed" in rows["c"]["note"] and "skipped" in rows["c"]["note"]  # CUDA tests skip, Triton's run
    for sid in "efg":
        assert "[quick: not a result]" in rows[sid]["note"]
    summary = (out / "summary.txt").read_text()
    assert "DRY RUN" in summary and "exit code 0" in summary
    for sid, (name, raw, _) in STAGES.items():  # the table printed last lists every stage
        assert any(line.split()[:3] in ([sid, name, "ok"], [sid, name, "skipped"]) for line in summary.splitlines())
    assert summary.strip().splitlines()[-1] == proc.stdout.strip().splitlines()[-1]


def test_failing_and_slow_stages_are_reported_and_the_rest_still_run(tmp_path):
    """A wrapper interpreter makes stage d fail and stage e outlive a 3 s cap (g stands in for the stages
    after them, answered at once by the wrapper); a and g still run, and the exit code is 1."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\n"
                    'case "$1" in\n'
                    '  bench/bench_update.py) echo "SUMMARY: this stage was made to fail"; exit 3 ;;\n'
                    "  bench/bench_e2e.py) echo started; exec sleep 60 ;;\n"
                    '  bench/bench_overhead.py) echo "SUMMARY: stand-in"; exit 0 ;;\n'
                    "esac\n"
                    f'exec "{sys.executable}" "$@"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "bad"
    env = dict(os.environ, GPU_SUITE_CAP_E="3")
    proc = subprocess.run(["bash", str(SUITE), "--dry-run", "--out", str(out), "--python", str(fake), "--only",
                           "a,d,e,g", "--archive", str(tmp_path / "results.tar.gz")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-2000:]
    rows = _summary(out)
    assert list(rows) == ["a", "d", "e", "g"]
    assert rows["a"]["status"] == "ok" and rows["g"]["status"] == "ok" and rows["g"]["note"] == "stand-in"
    assert rows["d"]["status"] == "FAILED" and "exit code 3" in rows["d"]["note"]
    assert "made to fail" in rows["d"]["note"]
    assert rows["e"]["status"] == "TIMEOUT" and rows["e"]["cap"] == "3" and int(rows["e"]["seconds"]) < 15
    assert "exit code 1" in (out / "summary.txt").read_text()
    listing = subprocess.run(["tar", "-tzf", str(tmp_path / "results.tar.gz")], capture_output=True, text=True).stdout
    assert "bad/summary.txt" in listing and "bad/env.txt" in listing


def test_environment_stage_writes_its_json(tmp_path):
    """Stage a (``gpu_build.py --env``) prints the header and its SUMMARY line and writes env.json, without a GPU too."""
    out = tmp_path / "env.json"
    proc = subprocess.run([sys.executable, "bench/gpu_build.py", "--env", "--output", str(out)], cwd=ROOT,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "# gpu_suite environment" in proc.stdout and "$ nvcc --version" in proc.stdout
    assert proc.stdout.splitlines()[-2].startswith("SUMMARY: ")
    header = json.loads(out.read_text())["header"]
    assert header["cuda_available"] is False and "version_devinterp" in header and "git_commit" in header
