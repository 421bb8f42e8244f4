"""bench/bench_accuracy.py: its --quick run writes every table it promises, and the exact answers in it are right:
λ by hand from Aoyagi's theorem and by the independent two-layer formula, the Hessian's eigenvalues against
autograd's full Hessian, and each run's quadratic targets recomputed from those eigenvalues by direct sums and
by iterating the variance recursion of the SGLD chain step by step."""
import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llc_fast.oracles import reduced_rank_regression_coefficient

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("accuracy")
    sys.path.insert(0, str(BENCH))
    threads = torch.get_num_threads()
    try:
        import bench_accuracy

        assert bench_accuracy.main(["--quick", "--threads", "1", "--output", str(out / "a.json"),
                                    "--log", str(out / "a.txt")]) == 0
    finally:
        torch.set_num_threads(threads)
        sys.path.remove(str(BENCH))
    return bench_accuracy, json.loads((out / "a.json").read_text()), (out / "a.txt").read_text()


def autograd_eigenvalues(model, x: torch.Tensor) -> np.ndarray:
    """Every eigenvalue of the Hessian of the mean squared error at the teacher, by autograd in float64."""
    ws = [layer.weight.detach().double() for layer in model]
    x = x.double()
    target = x.T
    for w in ws:
        target = w @ target

    def loss(flat):
        out = x.T
        for w, shape in zip(torch.split(flat, [w.numel() for w in ws]), [w.shape for w in ws]):
            out = w.reshape(shape) @ out
        return ((out - target) ** 2).mean()

    hessian = torch.autograd.functional.hessian(loss, torch.cat([w.reshape(-1) for w in ws]))
    return np.sort(torch.linalg.eigvalsh(hessian).numpy())


def test_tables_have_every_method_and_network(quick):
    bench, out, log = quick
    assert out["header"]["quick"] is True and out["header"]["command"]
    (body,) = out["rows"]
    assert [n["name"] for n in body["nets"]] == [n.name for n in bench.QUICK_PANEL]
    assert [(r["net"], r["method"]) for r in body["runs"]] == [(n.name, m) for n in bench.QUICK_PANEL
                                                                for m in bench.METHODS]
    for r in body["runs"]:
        assert isinstance(r["trusted"], bool) and r["verdict"] and r["grad_evals"] > 0
        if math.isfinite(r["llc_mean"]):
            assert r["vs_llc"] == pytest.approx((r["llc_mean"] - r["llc"]) / r["llc"], rel=1e-12)
    assert [s["method"] for s in body["summary"]] == list(bench.METHODS)
    for s in body["summary"]:
        mine = [r for r in body["runs"] if r["method"] == s["method"]]
        errors = [abs(r["vs_llc"]) for r in mine if r["vs_llc"] is not None and math.isfinite(r["vs_llc"])]
        assert s["runs"] == len(mine) and s["estimates"] == len(errors)
        if errors:
            assert s["median_vs_llc"] == pytest.approx(statistics.median(errors)) and s["max_vs_llc"] == max(errors)
        assert s["trusted"] == sum(r["trusted"] for r in mine)
        assert s["grad_evals"] == pytest.approx(sum(r["grad_evals"] for r in mine))
    assert log.startswith("$ ") and "SUMMARY [quick: not a result]" in log and "q_stat" in log


def test_exact_llc_and_hessian_of_the_quick_networks(quick):
    bench, out, _ = quick
    nets = {n["name"]: n for n in out["rows"][0]["nets"]}
    # (3, 4, 3), r = 1: the two-layer formula of Aoyagi & Watanabe (2005), independent of Theorem 1
    assert nets["quick2"]["llc"] == float(reduced_rank_regression_coefficient(3, 4, 3, 1)) == 4.5
    # (2, 3, 3, 2), r = 1 by hand: M = (1, 2, 2, 1), Σ = all (ℓ = 3, S = 6, a = 3):
    # λ = (2·3·1·(2 + 2 − 1) + 0 + 36 − 3·10) / 12 = 2, m = a(ℓ − a) + 1 = 1
    assert nets["quick3"]["llc_exact"] == "2" and nets["quick3"]["multiplicity"] == 1
    for net in bench.QUICK_PANEL:
        model, data, _ = bench.build(net, torch.device("cpu"))
        full = autograd_eigenvalues(model, data.tensors[0])
        nonzero = full[full > 1e-9 * full[-1]]
        mine = np.array(nets[net.name]["eigenvalues"])
        assert mine.size == nets[net.name]["nonzero_eigenvalues"] == net.rank * (net.widths[0] + net.widths[-1] - 1)
        np.testing.assert_allclose(mine, nonzero, rtol=1e-8)
        assert nets[net.name]["h_max"] == pytest.approx(full[-1], rel=1e-9)
        assert nets[net.name]["condition"] == pytest.approx(nonzero[-1] / nonzero[0], rel=1e-8)


def variance_recursion_target(h, nbeta, gamma, lr, draw_steps) -> float:
    """Mean over the draw steps of E[nβ·K(w_t)] from w_0 = w*, by v_(t+1) = (1 − lr·a/2)² v_t + lr, step by step."""
    a = nbeta * h + gamma
    v, total = np.zeros_like(h), 0.0
    wanted = set(draw_steps)
    for t in range(max(draw_steps) + 1):
        if t in wanted:
            total += float(np.sum(nbeta * h * v / 2))
        v = (1 - lr * a / 2) ** 2 * v + lr
    return total / len(draw_steps)


def test_quadratic_targets_of_every_run_are_exact(quick):
    bench, out, _ = quick
    body = out["rows"][0]
    eigenvalues = {n["name"]: np.array(n["eigenvalues"]) for n in body["nets"]}
    checked = 0
    for r in body["runs"]:
        if r.get("lr") is None:  # no estimate (calibrate recommended nothing)
            continue
        h, nbeta, gamma, lr = eigenvalues[r["net"]], r["nbeta"], r["gamma"], r["lr"]
        assert r["q_post"] == pytest.approx(float(np.sum(nbeta * h / (2 * (nbeta * h + gamma)))), rel=1e-12)
        if r["method"] == "curvature":  # preconditioned: no quadratic chain target is claimed
            assert math.isnan(r["lr_limit"]) and math.isnan(r["q_stat"]) and math.isnan(r["q_run"])
            continue
        assert r["lr_limit"] == pytest.approx(4 / (nbeta * h.max() + gamma), rel=1e-12)
        if lr >= r["lr_limit"]:
            assert math.isnan(r["q_stat"]) and math.isnan(r["q_run"])  # the quadratic chain diverges
            continue
        a = nbeta * h + gamma
        if r["method"] == "lm":  # noise_scheme="lm": the stable quadratic chain's draws have the posterior law
            assert r["q_stat"] == r["q_post"] and math.isnan(r["q_run"])
            continue
        assert r["q_stat"] == pytest.approx(float(np.sum(nbeta * h / (2 * a * (1 - lr * a / 4)))), rel=1e-12)
        burnin, draws, every = r["num_burnin_steps"], r["num_draws"], r["num_steps_bw_draws"]
        expected = variance_recursion_target(h, nbeta, gamma, lr, list(range(burnin, burnin + draws * every, every)))
        assert r["q_run"] == pytest.approx(expected, rel=1e-9)
        checked += 1
    assert checked >= 3
