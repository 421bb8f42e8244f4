"""End to end: seconds per SGLD step of ``llc_fast.estimate_llc`` with the fused C++ update against the reference.

    .venv/bin/python bench/bench_step.py [--chains 2] [--draws 100] [--rounds 3] [--quick] [...: --help]

On the CPU, the 1.07M-parameter MLP (784-1024-256-10) on random data, batch 256: ``estimate_llc`` with
``backend="cpu"`` and ``backend="torch"``, beside fwd+bwd alone, fwd+bwd + the devinterp-style eager update,
and each update alone. The grid: sampler x round x run. bench/README.md has the details.
"""
from __future__ import annotations

import math
import statistics
import time

import torch

from harness import Table, begin, cli, finish, grid, guard_for, log, run_grid, spread, time_interleaved, validate

import llc_fast  # noqa: E402  (harness puts the repository on sys.path)
from llc_fast.kernels.dispatch import select_backend  # noqa: E402
from llc_fast.kernels.update_spec import SamplerSettings  # noqa: E402
from bench_update import make_call  # noqa: E402
from models import ce_loss, eager_step, mlp, mlp_data  # noqa: E402

FB, EAGER = "fwd+bwd only (no update)", "fwd+bwd + eager update (devinterp-style)"


def manual_loop(model, loader, *, chains: int, steps: int, eager=None) -> float:
    """Seconds per step of ``chains`` x ``steps`` forward+backward passes (``eager``: (sampler, hyperparameters)
    of the devinterp-style update, ``models.eager_step`` on the model's parameters, after each pass but the last,
    as in estimate_llc). Each chain starts from a copy of the weights (and zero RMSProp state)."""
    params = list(model.parameters())
    start = [p.detach().clone() for p in params]
    vs = [torch.zeros_like(p) for p in params]
    t0 = time.perf_counter()
    for _ in range(chains):
        with torch.no_grad():
            for p, s, v in zip(params, start, vs):
                p.copy_(s)
                v.zero_()
        batches = (b for _ in iter(int, 1) for b in loader)  # the loader, cycled
        for t in range(steps):
            for p in params:
                p.grad = None if p.grad is None else p.grad.zero_()
            loss = ce_loss(model, next(batches))
            if t == steps - 1:
                break
            loss.backward()
            if eager is not None:
                with torch.no_grad():
                    eager_step(eager[0], [p.data for p in params], [p.grad for p in params], start, vs, **eager[1])
    elapsed = time.perf_counter() - t0
    with torch.no_grad():
        for p, s in zip(params, start):
            p.copy_(s)
            p.grad = None
    return elapsed / (chains * steps)


def bench(args, argv) -> int:
    widths = [int(w) for w in args.widths.split(",")]
    model = mlp(widths, seed=args.seed)
    x, y, gen = mlp_data(widths, args.samples, args.seed)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=args.batch_size,
                                         shuffle=True, generator=gen)
    num_params = sum(p.numel() for p in model.parameters())
    nbeta = args.samples / math.log(args.samples)
    extra = dict(chain_batching=args.chain_batching)
    header = begin("bench_step", args.device, argv, ("torch", "llc_fast"), model=f"MLP {args.widths} (ReLU), "
                   f"{num_params} parameters, float32", samples=args.samples, batch_size=args.batch_size,
                   chains=args.chains, draws=args.draws, lr=args.lr, nbeta=nbeta, gamma=args.gamma, seed=args.seed,
                   quick=args.quick, estimate_llc_extra=extra)
    log(f"# model: {header['model']}; data: {args.samples} random samples, batch {args.batch_size}, cross-entropy")
    log(f"# estimate_llc: {args.chains} chains x {args.draws} draws, lr={args.lr}, nbeta={nbeta:.1f}, "
        f"gamma={args.gamma}, seed={args.seed}, progress=False" + "".join(f", {k}={v!r}" for k, v in extra.items()))
    log()
    hyper, steps, guard = dict(lr=args.lr, nbeta=nbeta, gamma=args.gamma), args.draws, guard_for(args)  # draws = steps

    def estimate(sampler, b, chains, draws):
        return llc_fast.estimate_llc(model, loader, ce_loss, sampler=sampler, **hyper, num_chains=chains,
                                     num_draws=draws, seed=args.seed, progress=False, backend=b, **extra)

    def update_alone(sampler, name):
        """Seconds per call of the update alone on this model's flat buffer (eager: its parameter tensors)."""
        shapes = [tuple(p.shape) for p in model.parameters()]
        settings = SamplerSettings(sampler=sampler)
        w_star = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        w, grad = w_star.clone().view(1, -1), torch.randn(1, num_params) * 1e-2
        fn = None if name == "eager" else select_backend(name, args.device).update
        call = make_call(name, fn, w, grad, w_star, settings, shapes, **hyper)
        times = time_interleaved({0: call}, args.device, warmup=2, min_repeats=5, max_repeats=50, target_s=0.5)[0][0]
        return statistics.median(times), dict(note="update alone, median of %d calls" % len(times))

    def run(sampler, name):
        """(seconds per step, info) of one run of the grid."""
        if name == FB:
            return manual_loop(model, loader, chains=args.chains, steps=steps), {}
        if name == EAGER:
            return manual_loop(model, loader, chains=args.chains, steps=steps, eager=(sampler, hyper)), {}
        if name.startswith("update alone: "):
            return update_alone(sampler, name.split(": ")[1])
        r = estimate(sampler, name.split("=")[1], args.chains, args.draws)
        return r.timing["sampling_s"] / r.timing["steps"], dict(
            llc_mean=r.llc_mean, engine=r.config.get("engine"), backend=r.config["backend"], note=f"llc {r.llc_mean:.4g}")

    def measure(p):
        """One run of the grid under the load guard (its last try): seconds, other cores, info."""
        if p["run"] == FB:
            log(f"{p['sampler']}, round {p['round'] + 1} of {args.rounds}:")
        last = guard.rounds(lambda: run(p["sampler"], p["run"]), 1, lambda v: f"{v[0] * 1e3:.2f} ms" + (
            f" ({v[1]['note']})" if v[1].get("note") else ""), p["run"])[2][-1]
        return dict(s=last.value[0], other=last.other, info=last.value[1])

    # validate, then time: warm-up calls build/load the C++ kernel and touch every code path once
    for b in args.backends:
        if err := validate(lambda: estimate("sgld", b, 1, 3)):
            raise SystemExit(f"bench_step: estimate_llc(backend={b!r}) failed its warm-up: {err}")
    manual_loop(model, loader, chains=1, steps=3)
    eager = [] if args.no_eager else ["eager"]
    runs = [FB] + [f"estimate_llc backend={b}" for b in args.backends] + ([] if args.no_eager else [EAGER])
    runs += [f"update alone: {b}" for b in list(args.backends) + eager]
    got = run_grid(grid(sampler=args.samplers, round=range(args.rounds), run=runs), measure)
    results = []
    for mine in ([g for g in got if g["sampler"] == s and g["run"] == r] for s in args.samplers for r in runs):
        t, others = spread(g["s"] for g in mine), [g["other"] for g in mine if g["other"] is not None]
        results.append(dict(sampler=mine[0]["sampler"], run=mine[0]["run"], s_per_step=t["median"], s_min=t["min"],
                            s_max=t["max"], rounds=t["n"], other_cores=max(others, default=None),
                            **{k: v for k, v in mine[-1]["info"].items() if k != "note"}))  # over the rounds
    report_table(results, args.samplers)
    return finish(args, header, results, None, key="results")


def report_table(results: list[dict], samplers) -> None:
    log("\n# ms: median over rounds of seconds per chain-step x 1000 (estimate_llc: result.timing['sampling_s'] /\n"
        "# result.timing['steps']); 'update alone' rows: ms per call of the update by itself on the same flat buffer\n"
        "# (eager: on the model's parameter tensors). range = fastest .. slowest round. vs fused: / backend=cpu's ms.\n"
        "# beyond fwd+bwd = ms - fwd+bwd ms (the update plus the sampling loop's own work); other = most CPU cores\n"
        "# other processes kept busy during any round")
    for sampler in samplers:
        same = {x["run"]: x for x in results if x["sampler"] == sampler}
        fused, fb, fused_alone = same.get("estimate_llc backend=cpu"), same[FB]["s_per_step"], same.get(
            "update alone: cpu")
        for rr in same.values():
            alone = rr["run"].startswith("update alone")
            ref = fused_alone if alone else fused
            rr["ratio_to_fused"] = rr["s_per_step"] / ref["s_per_step"] if ref else None
            rr["beyond_fwd_bwd_s"] = None if alone or rr["run"] == FB else rr["s_per_step"] - fb
            rr["share"] = None if rr["beyond_fwd_bwd_s"] is None else rr["beyond_fwd_bwd_s"] / rr["s_per_step"]
            rr["range"] = f"{rr['s_min'] * 1e3:.2f}..{rr['s_max'] * 1e3:.2f}"
    Table(("sampler", 12, "s"), ("run", 43, lambda v: f" {v:<42}", f" {'run':<42}"),
          ("s_per_step", 8, lambda v: f"{v * 1e3:.2f}", "ms"), ("range", 15, "s"),
          ("ratio_to_fused", 8, lambda v: f"{v:.2f}x", "vs fused"),
          ("beyond_fwd_bwd_s", 14, lambda v: f"{v * 1e3:+.2f}", "beyond fwd+bwd"), ("share", 6, ".0%"),
          ("other_cores", 5, ".2f", "other")).print(results, group=lambda r: r["sampler"])


def options(ap) -> None:
    ap.add_argument("--widths", default="784,1024,256,10", help="MLP layer widths (default: 1.07M parameters)")
    ap.add_argument("--samples", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--chains", type=int, help="chains per estimate_llc call (default 2; 1 with --quick)")
    ap.add_argument("--draws", type=int, help="draws per chain (default 100; 10 with --quick)")
    ap.add_argument("--samplers", nargs="+", default=["sgld", "rmsprop_sgld"], choices=["sgld", "rmsprop_sgld"])
    ap.add_argument("--backends", nargs="+", default=["cpu", "torch"], help="llc_fast backends to compare")
    ap.add_argument("--no-eager", action="store_true", help="skip the devinterp-style eager-update baseline")
    ap.add_argument("--chain-batching", default="sequential",
                    help="estimate_llc's chain_batching ('sequential': one chain at a time, like devinterp and the "
                         "baselines here; 'auto'/'vmap': chains batched in one vmapped pass)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--gamma", type=float, default=100.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, help="repeat every measurement this many times (median; default 3, 1 with "
                    "--quick)")


main = cli(__doc__, options, bench, each="run", device=None,
           quick=dict(chains=(2, 1), draws=(100, 10), rounds=(3, 1), retry_busy=(2, 0)))

if __name__ == "__main__":
    raise SystemExit(main())
