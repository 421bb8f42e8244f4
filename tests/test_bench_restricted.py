"""bench/bench_restricted.py cannot rot: its main, run with --quick on the smallest settings, writes a JSON
whose ratios (a/b, c/a and, where devinterp is installed, d/a) are there and finite, with the chain rows and
the engine of the batched run, and the batched run's estimates equal to one estimate_llc(mask=...) per head."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
TINY = ["--quick", "--layers", "1", "--heads", "2", "--embd", "8", "--vocab", "16", "--seq-len", "6",
        "--sequences", "4", "--batch-size", "2", "--chains", "2", "--draws", "2", "--init-batches", "1"]


def _main(argv):
    sys.path.insert(0, str(BENCH))
    threads = torch.get_num_threads()
    try:
        import bench_restricted

        return bench_restricted.main(argv + ["--threads", str(threads)])
    finally:
        torch.set_num_threads(threads)
        sys.path.remove(str(BENCH))


def _check(path: Path, ratios: list[str]) -> dict:
    out = json.loads(path.read_text())
    assert out["header"]["quick"] is True and out["header"]["command"]
    (row,) = out["rows"]
    assert row["K"] == 2 and row["components"] == ["l0h0", "l0h1"] and row["chain_rows"] == 2 * 2
    assert row["engine"] in ("vmap", "sequential") and row["batched"] == (row["engine"] == "vmap")
    for key in ratios:
        r = row["ratios"][key]
        assert set(r) >= {"median", "min", "max", "n", "meaning"}
        assert math.isfinite(r["median"]) and r["median"] > 0 and r["min"] <= r["median"] <= r["max"], (key, r)
    for part in ("a", "b", "c"):
        p = row["parts"][part]
        assert math.isfinite(p["timed_s"]["median"]) and p["timed_s"]["median"] > 0
    assert row["parts"]["a"]["chain_rows"] == 4 and row["parts"]["c"]["calls"] == 2
    assert row["checks"]["b_same_as_a"] == 0 and row["checks"]["c_same_as_a_max_abs_diff"] == 0
    assert len(row["rounds"]) == 1 and isinstance(row["busy_rounds"], int)
    return row


def test_quick_run_without_devinterp(tmp_path, capsys):
    out = tmp_path / "r.json"
    log = tmp_path / "r.txt"
    assert _main(TINY + ["--parts", "a,b,c", "--output", str(out), "--log", str(log)]) == 0
    row = _check(out, ["a_over_b", "c_over_a", "a_over_b_wall", "c_over_a_wall"])
    assert "d_over_a" not in row["ratios"] and "d" not in row["parts"] and row["devinterp_error"] is None
    text = log.read_text()
    assert text.startswith("$ ") and "SUMMARY: [quick: not a result]" in text and "a/b" in text


@pytest.mark.skipif(importlib.util.find_spec("devinterp") is None or importlib.util.find_spec("datasets") is None,
                    reason="devinterp (and datasets) not installed")
def test_quick_run_with_devinterp(tmp_path):
    out = tmp_path / "r.json"
    assert _main(TINY + ["--output", str(out)]) == 0
    row = _check(out, ["a_over_b", "c_over_a", "d_over_a", "d_over_a_wall"])
    assert row["devinterp_error"] is None, row["devinterp_error"]
    assert row["parts"]["d"]["calls"] == 2 and row["parts"]["d"]["chain_rows"] == 4
    assert all(math.isfinite(v) for v in row["checks"]["devinterp_llc"].values())


def test_quick_run_of_the_full_model_part_and_the_memory_columns(tmp_path):
    """(f): one estimate_llc of the whole model beside (a), with a/f, the state bytes per row of each (sparse
    rows >= 10x smaller on real models; here the tiny model's ratio only has to exist) and peak RSS."""
    out = tmp_path / "r.json"
    assert _main(TINY + ["--parts", "a,f", "--output", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["case"] == "default" and row["parts"]["f"]["chain_rows"] == 2 and row["parts"]["f"]["calls"] == 1
    for key in ("a_over_f", "a_over_f_wall"):
        assert math.isfinite(row["ratios"][key]["median"]) and row["ratios"][key]["median"] > 0
    mem = row["memory"]
    assert mem["full_row_bytes"] > mem["sparse_row_bytes"] > 0 and mem["full_over_sparse_row_bytes"] > 1
    assert mem["a_peak_rss_bytes"] > 0 and mem["f_peak_rss_bytes"] >= mem["a_peak_rss_bytes"]
    assert mem["sparse_rows_per_call"] >= 2 and "sparse rows" in mem["a_row_plan"]


def test_gpt2_small_shape_case_plans_and_runs_at_a_tiny_size(tmp_path):
    out = tmp_path / "s.json"
    assert _main(["--quick", "--case", "gpt2-small-shape", "--layers", "1", "--heads", "2", "--embd", "8",
                  "--vocab", "16", "--seq-len", "6", "--batch-size", "2", "--chains", "2", "--steps", "2",
                  "--output", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["case"] == "gpt2-small-shape" and row["components"] == 2 and row["chains"] == 2
    assert "full rows" in row["plan"] and "sparse rows" in row["plan"] and sum(row["calls_planned"]) == 4
    assert row["seconds_per_step"] > 0 and row["peak_rss_bytes"] > 0 and row["row_storage"] == "sparse"
    assert row["max_batched_chains"] == 4 and row["setup_s"] >= 0 and row["sampling_s"] > 0  # the case's 16, capped
