"""Accuracy of llc_fast's estimates against exact answers, on a panel of deep linear networks.

    .venv/bin/python bench/bench_accuracy.py [--quick] [--nets 0,3,5] [--methods ...] [...: --help]

The panel (``PANEL``, built by ``build``), the exact answers (``exact_answers``, ``quadratic_targets``: λ, the
Hessian at w*, q_post, q_stat, q_run), the methods (``METHODS``: defaults, calibrated, paper, curvature,
sgld-rule, auto, lm, each with 4 chains and seed 0) and how to read the table: bench/README.md, "bench_accuracy.py".
``--quick`` runs two tiny networks with every step count divided by ``QUICK_DIVISOR`` (a smoke run).
"""
from __future__ import annotations

import math
import statistics
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from harness import Table, begin, cli, finish, log, recorded_warnings

import llc_fast  # noqa: E402  (harness puts the repository on sys.path)
from llc_fast.chains.schedule import Schedule  # noqa: E402
from llc_fast.oracles import (dln_dataset, dln_hessian_eigenvalues, dln_learning_coefficient, make_dln,  # noqa: E402
                              mse_loss, quadratic_posterior_expectation, quadratic_sgld_expectation,
                              quadratic_sgld_transient_expectation)

BATCH, CHAINS, OFF = 500, 4, 0.15
QUICK_DIVISOR = 50
NONZERO_RTOL = 1e-10  # eigenvalues below this fraction of h_max are rounding (the gap is ~1e-16 on the panel)
RULE_FRACTION = 0.2  # lr·(largest eigenvalue of the (preconditioned) drift) of the rule's methods
RULE_BATCHES, RULE_ITERS = 8, 20  # the power iteration's batches at w* and steps
LM_FRACTION, LM_STEPS = 1.2, 40_000  # "lm": lr·a_max = 1.2 (0.3 of the stability limit 4); burn-in and draws each


@dataclass(frozen=True)
class Net:
    name: str
    widths: tuple
    rank: int
    n: int
    seed: int

    @property
    def num_params(self) -> int:
        return sum(a * b for a, b in zip(self.widths[:-1], self.widths[1:]))


PANEL = (Net("dln2-a", (6, 10, 5), 2, 10_000, 10), Net("dln2-b", (10, 8, 12), 3, 20_000, 11),
         Net("dln3-a", (12, 16, 9, 12), 4, 30_000, 12), Net("dln3-b", (20, 25, 15, 20), 5, 50_000, 13),
         Net("dln4-a", (15, 20, 20, 15, 15), 3, 10_000, 14), Net("dln4-b", (30, 40, 25, 30, 20), 8, 100_000, 15),
         Net("dln5", (25, 30, 35, 30, 25, 20), 6, 50_000, 16), Net("dln6", (40, 45, 50, 45, 40, 35, 30), 10, 100_000, 17))
QUICK_PANEL = (Net("quick2", (3, 4, 3), 1, 2_000, 1), Net("quick3", (2, 3, 3, 2), 1, 2_000, 2))


def steps(full: int, quick: bool) -> int:
    return max(10, full // QUICK_DIVISOR) if quick else full


def run_defaults(model, loader, quick):
    return estimate(model, loader, lr=1e-4, gamma=1.0, num_draws=steps(200, quick),
                    num_burnin_steps=steps(100, quick)), 0.0, "README example call"


def run_calibrated(model, loader, quick):
    lrs = [1e-7, 3e-7, 1e-6, 3e-6, 1e-5, 3e-5]
    with recorded_warnings():
        calib = llc_fast.calibrate(model, loader, mse_loss, lrs=lrs, gammas=[1.0, 100.0], chains_per_setting=2,
                                   num_draws=steps(200, quick), mala_every=10, progress=False)
    cost = calib.result.grad_evals or 0.0
    best, how = calib.recommended, "calibrate recommended"
    if best is None:  # what a user does next: the setting calibrate's reason names as the closest to mixing
        stable = [r for r in calib.rows if r.diverged == 0 and r.within_limit and math.isfinite(r.rhat)]
        if not stable:
            return None, cost, calib.recommendation()
        best, how = min(stable, key=lambda r: (r.rhat, r.setting)), "no recommendation; the closest to mixing:"
    result = estimate(model, loader, lr=best.lr, gamma=best.gamma, nbeta=best.nbeta, num_draws=steps(6000, quick),
                      num_burnin_steps=steps(6000, quick))
    return result, cost, f"{how} lr={best.lr:g}, gamma={best.gamma:g}"


def run_paper(model, loader, quick):
    total = steps(10_000, quick)
    return estimate(model, loader, lr=5e-7, gamma=1.0, num_draws=total // 10,
                    num_burnin_steps=total - total // 10), 0.0, "Lau et al.: last 10 % of the steps"


def run_rule(model, loader, quick, preconditioned: bool, fraction: float = RULE_FRACTION, run_steps: int = 6000,
             **options):
    """``curvature`` (preconditioned), ``sgld-rule`` or ``lm``: lr = fraction/(top (preconditioned) curvature of the
    drift at w*), run_steps of burn-in and as many draws; options: more of estimate_llc's."""
    from llc_fast.chains.curvature import HVP_GRAD_EVALS, HessianProbe, curvature_batches, gains_for, top_eigenvalue
    from llc_fast.config import LLCConfig
    from llc_fast.estimators.sampling import curvature_spec
    from llc_fast.state.flat import FlatLayout

    gamma, layout = 1.0, FlatLayout.for_sampling(model)
    device = layout.device
    config = LLCConfig(lr=1.0, gamma=gamma, seed=0, preconditioner="curvature").for_data(loader)
    # G as the run computes it (the run's own probes are in its grad_evals), or G = 1
    gains, probe = gains_for(model, layout, loader, mse_loss, curvature_spec(config), device) if preconditioned else \
        (None, HessianProbe(model, layout, mse_loss, device))
    mu = top_eigenvalue(probe, curvature_batches(loader, seed=0, count=RULE_BATCHES, device=device), gains,
                        max_iters=RULE_ITERS, rtol=0.0)
    lr = fraction / (config.nbeta[0] * mu + gamma * (1.0 if gains is None else float(gains.max())))
    if preconditioned:
        options["preconditioner"] = "curvature"
    result = estimate(model, loader, lr=lr, gamma=gamma, num_draws=steps(run_steps, quick),
                      num_burnin_steps=steps(run_steps, quick), **options)
    rule_cost = HVP_GRAD_EVALS * probe.products - result.config.get("curvature_grad_evals", 0)  # the run counts its own
    what = "max G" if preconditioned else "1"
    return result, rule_cost, f"lr = {fraction}/(nβ·{mu:.3g} + γ·{what})"


def run_auto(model, loader, quick):
    """``auto``: estimate_llc_auto with the budget of ``calibrated``'s final run; its cost includes the calibration."""
    with recorded_warnings():
        try:
            result = llc_fast.estimate_llc_auto(model, loader, mse_loss, num_chains=CHAINS, seed=0, progress=False,
                                                num_draws=steps(6000, quick), num_burnin_steps=steps(6000, quick))
        except llc_fast.AutoCalibrationError as e:
            return None, e.calibration.result.grad_evals or 0.0, str(e)
    c = result.config["calibration"]
    return result, c["calibration_grad_evals"], (
        f"lr {c['step_fraction']:.2f} of the limit, γ {c['gamma']:.3g}, budget {'ok' if c['budget_ok'] else 'short'}"
        f", calibration {c['cost_ratio']:.2f}x the estimate")


METHODS = {"defaults": run_defaults, "calibrated": run_calibrated, "paper": run_paper,
           "curvature": lambda model, loader, quick: run_rule(model, loader, quick, True),
           "sgld-rule": lambda model, loader, quick: run_rule(model, loader, quick, False),
           "auto": run_auto,
           "lm": lambda model, loader, quick: run_rule(model, loader, quick, False, LM_FRACTION, LM_STEPS,
                                                       noise_scheme="lm")}


def estimate(model, loader, **options) -> llc_fast.LLCResult:
    """estimate_llc with 4 chains, seed 0, no progress bar; a run whose every chain diverged returns its
    partial result (the verdict then says so), divergence warnings are counted in the result, not printed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", llc_fast.LLCDivergenceWarning)
        try:
            return llc_fast.estimate_llc(model, loader, mse_loss, num_chains=CHAINS, seed=0, progress=False,
                                         **options)
        except llc_fast.AllChainsDivergedError as e:
            return e.result


def build(net: Net, device: torch.device):
    """(teacher, data set, loader of shuffled batches of 500): the teacher's layers each of rank net.rank."""
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler

    model = make_dln(net.widths, net.rank, seed=net.seed, scale=1 / math.sqrt(float(np.mean(net.widths[1:]))))
    model = model.to(device)
    data = dln_dataset(model, net.n, seed=net.seed + 1000, input_range=10.0)
    loader = DataLoader(data, batch_size=None, sampler=BatchSampler(RandomSampler(data), BATCH, drop_last=True))
    return model, data, loader


def exact_answers(net: Net, model, data) -> dict:
    """λ, m, the Hessian's nonzero eigenvalues and what follows from them at nβ = n/log n, γ = 1."""
    coefficient = dln_learning_coefficient(net.widths, net.rank)
    h = dln_hessian_eigenvalues(model, data.tensors[0])
    h = h[h > NONZERO_RTOL * h[-1]]
    nbeta = net.n / math.log(net.n)
    return dict(llc=float(coefficient.llc), llc_exact=str(coefficient.llc), multiplicity=coefficient.multiplicity,
                nonzero_eigenvalues=int(h.size), expected_nonzero=net.rank * (net.widths[0] + net.widths[-1] - net.rank),
                h=h, h_max=float(h[-1]), condition=float(h[-1] / h[0]), nbeta=nbeta,
                lr_limit_gamma1=4 / (nbeta * h[-1] + 1.0), q_post_gamma1=quadratic_posterior_expectation(h, nbeta, 1.0))


def quadratic_targets(h: np.ndarray, nbeta: float, gamma: float, lr: float, schedule: Schedule,
                      preconditioned: bool = False, lm: bool = False) -> dict:
    """q_post, q_stat and q_run of the module docstring; q_stat and q_run NaN where lr is past the stability
    limit (the quadratic chain diverges) or the run was preconditioned (G is diagonal in the weights, not in
    the Hessian's eigenbasis: its lr_limit is NaN too). lm (noise_scheme="lm"): the stable chain's quadratic
    draws have the posterior law, so q_stat = q_post (q_run, the transient of the Euler chain, is NaN)."""
    out = dict(q_post=quadratic_posterior_expectation(h, nbeta, gamma), q_stat=math.nan, q_run=math.nan,
               lr_limit=math.nan if preconditioned else 4 / (nbeta * h[-1] + gamma))
    if lm and lr < out["lr_limit"]:
        out["q_stat"] = out["q_post"]
    elif lr < out["lr_limit"]:
        out["q_stat"] = quadratic_sgld_expectation(h, nbeta, gamma, lr)
        out["q_run"] = quadratic_sgld_transient_expectation(h, nbeta, gamma, lr, list(schedule.draw_steps))
    return out


def rel(x: float, ref: float) -> float:
    return (x - ref) / ref if math.isfinite(x) and math.isfinite(ref) and ref else math.nan


def run_row(net: Net, exact: dict, method: str, model, loader, quick: bool) -> dict:
    t0 = time.perf_counter()
    result, extra_cost, note = METHODS[method](model, loader, quick)
    row = dict(net=net.name, method=method, note=note, seconds=time.perf_counter() - t0, llc=exact["llc"])
    if result is None:
        return dict(row, llc_mean=math.nan, trusted=False, verdict=note, grad_evals=extra_cost, vs_llc=math.nan,
                    vs_q_stat=math.nan)
    c = result.config
    lr, gamma, nbeta = (float(np.asarray(c[k]).reshape(-1)[0]) for k in ("lr", "gamma", "nbeta"))
    schedule = Schedule(num_draws=result.loss_trace.shape[1], num_burnin_steps=c["num_burnin_steps"],
                        num_steps_bw_draws=c["num_steps_bw_draws"])
    d = result.diagnostics()
    targets = quadratic_targets(exact["h"], nbeta, gamma, lr, schedule, preconditioned=bool(c.get("preconditioner")),
                                lm=c.get("noise_scheme") == "lm")
    return dict(row, lr=lr, gamma=gamma, nbeta=nbeta, num_burnin_steps=schedule.num_burnin_steps,
                num_draws=schedule.num_draws, num_steps_bw_draws=schedule.num_steps_bw_draws,
                llc_mean=result.llc_mean, llc_stderr=result.llc_stderr,
                mcse=d["mcse"], diverged=len(result.diverged_chains), **targets,
                vs_llc=rel(result.llc_mean, exact["llc"]), vs_q_stat=rel(result.llc_mean, targets["q_stat"]),
                vs_q_run=rel(result.llc_mean, targets["q_run"]), trusted=bool(d["ok"]), verdict=d["verdict"],
                drift_z=d["drift_z"], grad_evals=(result.grad_evals or 0.0) + extra_cost)


def summarize(rows: list[dict], methods: list[str]) -> list[dict]:
    """Per method: median and max |relative error| (against λ and q_stat), verdicts, gradient evaluations."""
    out = []
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        errors = {key: [abs(r[key]) for r in mine if math.isfinite(r[key])] for key in ("vs_llc", "vs_q_stat")}
        entry = dict(method=m, runs=len(mine), estimates=len(errors["vs_llc"]),
                     trusted=sum(r["trusted"] for r in mine),
                     trusted_off_llc=sum(r["trusted"] and not abs(r["vs_llc"]) <= OFF for r in mine),
                     trusted_off_q=sum(r["trusted"] and not abs(r["vs_q_stat"]) <= OFF for r in mine),
                     grad_evals=float(sum(r["grad_evals"] for r in mine)))
        for key, e in errors.items():
            entry[f"median_{key}"] = statistics.median(e) if e else math.nan
            entry[f"max_{key}"] = max(e) if e else math.nan
        out.append(entry)
    return out


NETS = Table(("name", 8, "<8", f"{'net':<8}"), ("widths", 26, lambda v: f"{str(v):<26}", f"{'widths':<26}"),
             ("rank", 3, "d", "r"), ("num_params", 6, "d", "d"), ("n", 7, "d"), ("llc", 7, ".4g", "λ"),
             ("multiplicity", 2, "d", "m"), ("nonzero_eigenvalues", 5, "d", "#h>0"), ("h_max", 8, ".3g"),
             ("condition", 8, ".2g", "cond"), ("lr_limit_gamma1", 9, ".3g", "lr<"), ("q_post_gamma1", 10, ".4g",
                                                                                      "q_post γ=1"))
RUNS = Table(("net", 8, "<8", f"{'net':<8}"), ("method", 10, "<10", f"{'method':<10}"), ("lr", 8, ".2g"),
             ("gamma", 4, "g", "γ"), ("llc_mean", 8, ".4g", "λ̂"), ("mcse", 7, ".2g", "±SE"), ("llc", 7, ".4g", "λ"),
             ("vs_llc", 7, "+.1%", "vs λ"), ("q_stat", 8, ".4g"), ("vs_q_stat", 7, "+.1%", "vs q"),
             ("q_run", 8, ".4g"), ("grad_evals", 11, ".3g", "grad evals"), ("said", 0, "s", " verdict"))
SUMMARY = Table(("method", 10, "<10", f"{'method':<10}"), ("median_vs_llc", 8, ".1%", "λ median"),
                ("max_vs_llc", 7, ".1%", "λ max"), ("median_vs_q_stat", 8, ".1%", "q median"),
                ("max_vs_q_stat", 7, ".1%", "q max"), ("estimated", 9, "s", "estimates"), ("trusted", 5, "d", "trust"),
                ("trusted_off_llc", 8, "d", "off vs λ"), ("trusted_off_q", 8, "d", "off vs q"),
                ("grad_evals", 10, ".3g", "grad evals"))


def bench(args, argv) -> int:
    header = begin("bench_accuracy", args.device, argv, quick=args.quick, methods=args.methods,
                   nets=[n.name for n in args.nets])
    answers, rows = {}, []
    for net in args.nets:
        model, data, loader = build(net, args.device)
        answers[net.name] = exact_answers(net, model, data)
        for method in args.methods:
            rows.append(run_row(net, answers[net.name], method, model, loader, args.quick))
    nets = [dict(name=n.name, widths=n.widths, rank=n.rank, n=n.n, seed=n.seed, num_params=n.num_params,
                 **{k: v for k, v in answers[n.name].items() if k != "h"}, eigenvalues=answers[n.name]["h"].tolist())
            for n in args.nets]
    log()
    NETS.print(nets)
    log()
    RUNS.print([dict(r, said=f"{'trust' if r['trusted'] else 'do not trust'}: {r['verdict'][:90]}") for r in rows])
    log()
    summary = summarize(rows, args.methods)
    log(f"SUMMARY{' [quick: not a result]' if args.quick else ''}: |relative error| (median / max) against λ (λ "
        f"median, max) and against q_stat (q median, max); 'trust' runs more than {OFF:.0%} off; gradient evaluations")
    SUMMARY.print([dict(s, estimated=f"{s['estimates']}/{s['runs']}") for s in summary])
    return finish(args, header, [dict(nets=nets, runs=rows, summary=summary)], None)


def options(ap) -> None:
    ap.add_argument("--nets", help="comma-separated indices into the panel (default: all; --quick: two tiny networks, "
                    "step counts / 50)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")


def check(args, ap) -> None:
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if bad := [m for m in args.methods if m not in METHODS]:
        ap.error(f"unknown method {bad[0]!r}; choose from {', '.join(METHODS)}")
    panel = QUICK_PANEL if args.quick else PANEL
    try:
        args.nets = [panel[int(i)] for i in args.nets.split(",")] if args.nets else list(panel)
    except (ValueError, IndexError):
        ap.error(f"--nets takes comma-separated indices 0..{len(panel) - 1}, got {args.nets!r}")


main = cli(__doc__, options, bench, check=check, each="network", retry_busy=False)

if __name__ == "__main__":
    raise SystemExit(main())
