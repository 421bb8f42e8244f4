"""Accuracy of llc_fast's estimates against exact answers, on a panel of deep linear networks.

    .venv/bin/python bench/bench_accuracy.py [--quick] [--nets 0,3,5] [--methods ...] [...: --help]

The panel (``PANEL``, built by ``build``), the exact answers (``exact_answers``, ``quadratic_targets``: λ, the
Hessian at w*, q_post, q_stat, q_run), the methods (``METHODS``: defaults, calibrated, paper, curvature,
sgld-rule, auto, each with 4 chains and seed 0) and how to read the table: bench/README.md, "bench_accuracy.py".
``--quick`` runs two tiny networks with every step count divided by ``QUICK_DIVISOR`` (a smoke run).
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from harness import add_common_options, checked_device, environment, print_environment, set_threads, transcript, \
    write_results

import llc_fast  # noqa: E402  (harness puts the repository on sys.path)
from llc_fast.chains.schedule import Schedule  # noqa: E402
from llc_fast.oracles import (dln_dataset, dln_hessian_eigenvalues, dln_learning_coefficient, make_dln,  # noqa: E402
                              mse_loss, quadratic_posterior_expectation, quadratic_sgld_expectation,
                              quadratic_sgld_transient_expectation)

BATCH, CHAINS, OFF = 500, 4, 0.15
QUICK_DIVISOR = 50
NONZERO_RTOL = 1e-10  # eigenvalues below this fraction of h_max are rounding (the gap is ~1e-16 on the panel)


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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
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


RULE_FRACTION = 0.2  # lr·(largest eigenvalue of the (preconditioned) drift) of the rule's methods
RULE_BATCHES, RULE_ITERS = 8, 20  # the power iteration's batches at w* and steps


def run_rule(model, loader, quick, preconditioned: bool):
    """``curvature`` (preconditioned) or ``sgld-rule``: lr from the (preconditioned) top curvature at w*."""
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
    lr = RULE_FRACTION / (config.nbeta[0] * mu + gamma * (1.0 if gains is None else float(gains.max())))
    options = dict(preconditioner="curvature") if preconditioned else {}
    result = estimate(model, loader, lr=lr, gamma=gamma, num_draws=steps(6000, quick),
                      num_burnin_steps=steps(6000, quick), **options)
    rule_cost = HVP_GRAD_EVALS * probe.products - result.config.get("curvature_grad_evals", 0)  # the run counts its own
    what = "max G" if preconditioned else "1"
    return result, rule_cost, f"lr = {RULE_FRACTION}/(nβ·{mu:.3g} + γ·{what})"


def run_auto(model, loader, quick):
    """``auto``: estimate_llc_auto with the budget of ``calibrated``'s final run; its cost includes the calibration."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
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
           "auto": run_auto}


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
                      preconditioned: bool = False) -> dict:
    """q_post, q_stat and q_run of the module docstring; q_stat and q_run NaN where lr is past the stability
    limit (the quadratic chain diverges) or the run was preconditioned (G is diagonal in the weights, not in
    the Hessian's eigenbasis: its lr_limit is NaN too)."""
    out = dict(q_post=quadratic_posterior_expectation(h, nbeta, gamma), q_stat=math.nan, q_run=math.nan,
               lr_limit=math.nan if preconditioned else 4 / (nbeta * h[-1] + gamma))
    if lr < out["lr_limit"]:
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
    targets = quadratic_targets(exact["h"], nbeta, gamma, lr, schedule, preconditioned=bool(c.get("preconditioner")))
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

        def errors(key):
            return [abs(r[key]) for r in mine if math.isfinite(r[key])]

        entry = dict(method=m, runs=len(mine), estimates=len(errors("vs_llc")),
                     trusted=sum(r["trusted"] for r in mine),
                     trusted_off_llc=sum(r["trusted"] and not abs(r["vs_llc"]) <= OFF for r in mine),
                     trusted_off_q=sum(r["trusted"] and not abs(r["vs_q_stat"]) <= OFF for r in mine),
                     grad_evals=float(sum(r["grad_evals"] for r in mine)))
        for key in ("vs_llc", "vs_q_stat"):
            e = errors(key)
            entry[f"median_{key}"] = statistics.median(e) if e else math.nan
            entry[f"max_{key}"] = max(e) if e else math.nan
        out.append(entry)
    return out


def print_nets(nets, answers, log) -> None:
    log(f"{'net':<8} {'widths':<26} {'r':>3} {'d':>6} {'n':>7} {'λ':>7} {'m':>2} {'#h>0':>5} {'h_max':>8} "
        f"{'cond':>8} {'lr<':>9} {'q_post γ=1':>10}")
    for net in nets:
        a = answers[net.name]
        log(f"{net.name:<8} {str(net.widths):<26} {net.rank:>3} {net.num_params:>6} {net.n:>7} {a['llc']:>7.4g} "
            f"{a['multiplicity']:>2} {a['nonzero_eigenvalues']:>5} {a['h_max']:>8.3g} {a['condition']:>8.2g} "
            f"{a['lr_limit_gamma1']:>9.3g} {a['q_post_gamma1']:>10.4g}")


def print_rows(rows, log) -> None:
    log(f"{'net':<8} {'method':<10} {'lr':>8} {'γ':>4} {'λ̂':>8} {'±SE':>7} {'λ':>7} {'vs λ':>7} {'q_stat':>8} "
        f"{'vs q':>7} {'q_run':>8} {'grad evals':>11}  verdict")
    for r in rows:
        def g(k, width, spec):
            v = r.get(k, math.nan)
            sign, spec = ("+", spec[1:]) if spec.startswith("+") else ("", spec)
            return format(v, f">{sign}{width}{spec}") if math.isfinite(v) else "—".rjust(width)

        log(f"{r['net']:<8} {r['method']:<10} {g('lr', 8, '.2g')} {g('gamma', 4, 'g')} {g('llc_mean', 8, '.4g')} "
            f"{g('mcse', 7, '.2g')} {r['llc']:>7.4g} {g('vs_llc', 7, '+.1%')} {g('q_stat', 8, '.4g')} "
            f"{g('vs_q_stat', 7, '+.1%')} {g('q_run', 8, '.4g')} {r['grad_evals']:>11.3g}  "
            f"{'trust' if r['trusted'] else 'do not trust'}: {r['verdict'][:90]}")


def print_summary(summary, quick, log) -> None:
    log(f"SUMMARY{' [quick: not a result]' if quick else ''}: |relative error| (median / max) against λ and against "
        f"q_stat; 'trust' runs more than {OFF:.0%} off; gradient evaluations")
    def pct(v):
        return f"{v:6.1%}" if math.isfinite(v) else "     —"

    for s in summary:
        log(f"  {s['method']:<10} vs λ {pct(s['median_vs_llc'])} / {pct(s['max_vs_llc'])}   vs q_stat "
            f"{pct(s['median_vs_q_stat'])} / {pct(s['max_vs_q_stat'])}   estimates {s['estimates']}/{s['runs']}, "
            f"trust {s['trusted']} (off vs λ {s['trusted_off_llc']}, vs q_stat {s['trusted_off_q']})   "
            f"{s['grad_evals']:.3g} grad evals")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="two tiny networks, step counts / 50: a smoke run")
    ap.add_argument("--nets", help="comma-separated indices into the panel (default: all)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    add_common_options(ap, each="network", retry_busy=False)
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    panel = QUICK_PANEL if args.quick else PANEL
    try:
        nets = [panel[int(i)] for i in args.nets.split(",")] if args.nets else list(panel)
    except (ValueError, IndexError):
        ap.error(f"--nets takes comma-separated indices 0..{len(panel) - 1}, got {args.nets!r}")
    device = checked_device(ap, args.device)
    with transcript(args.log, argv):
        return bench(args, argv, device, nets, methods)


def bench(args, argv, device, nets, methods) -> int:
    set_threads(args.threads)

    def log(line=""):
        print(line, flush=True)

    header = environment(device, argv, quick=args.quick, methods=methods, nets=[n.name for n in nets])
    print_environment("bench_accuracy", header, log=log)
    answers, rows = {}, []
    for net in nets:
        model, data, loader = build(net, device)
        answers[net.name] = exact_answers(net, model, data)
        for method in methods:
            rows.append(run_row(net, answers[net.name], method, model, loader, args.quick))
    log()
    print_nets(nets, answers, log)
    log()
    print_rows(rows, log)
    log()
    summary = summarize(rows, methods)
    print_summary(summary, args.quick, log)
    if args.output:
        nets_out = [dict(name=n.name, widths=list(n.widths), rank=n.rank, n=n.n, seed=n.seed, num_params=n.num_params,
                         **{k: v for k, v in answers[n.name].items() if k != "h"},
                         eigenvalues=answers[n.name]["h"].tolist()) for n in nets]
        write_results(args.output, dict(header, quick=args.quick), [dict(nets=nets_out, runs=rows, summary=summary)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
