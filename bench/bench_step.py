"""End to end: seconds per SGLD step of ``llc_fast.estimate_llc`` with the fused C++ update against the reference.

    .venv/bin/python bench/bench_step.py [--chains 2] [--draws 100] [--rounds 3] [--quick] [--threads N]
                                          [--output step.json] [--log step.txt]

On the CPU, for a ~1.07M-parameter MLP (784-1024-256-10, ReLU) on random data (4096 samples,
batch 256, cross-entropy), runs ``estimate_llc`` with ``backend="cpu"`` and ``backend="torch"``
(same seed and hyperparameters) for sgld and rmsprop_sgld and reports seconds per step from
``result.timing``. Baselines on the same model, data, batch and steps: fwd+bwd alone (the floor
of any sampler); fwd+bwd + the devinterp-style eager update of ``bench_update.py``; and each
update alone on the model's flat buffer. Timing and load guard: ``harness.py``.
"""
from __future__ import annotations

import argparse
import inspect
import math
import statistics
import time

import torch
from torch import nn

from harness import (LoadGuard, add_common_options, environment, loadavg, print_environment, set_threads,  # noqa: E402
                     time_calls, transcript, validate, write_results)

import llc_fast  # noqa: E402  (harness puts the repository on sys.path)
from llc_fast.kernels.dispatch import select_backend  # noqa: E402
from llc_fast.kernels.update_spec import SamplerSettings  # noqa: E402
from bench_update import _make_call, eager_rmsprop_sgld_step, eager_sgld_step  # noqa: E402


def make_model(widths, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def make_loader(n: int, widths, batch_size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, widths[0], generator=g)
    y = torch.randint(0, widths[-1], (n,), generator=g)
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, generator=g)


def loss_fn(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def cycle(loader):
    while True:
        yield from loader


def manual_loop(model, loader, *, chains: int, steps: int, update=None) -> float:
    """Seconds per step of ``chains`` x ``steps`` forward+backward passes (and ``update()`` after each,
    except after the last, as in estimate_llc). Each chain starts from a copy of the weights."""
    start = [p.detach().clone() for p in model.parameters()]
    params = list(model.parameters())
    t0 = time.perf_counter()
    for _ in range(chains):
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)
        if update is not None:
            update.reset()
        batches = cycle(loader)
        for t in range(steps):
            for p in params:
                p.grad = None if p.grad is None else p.grad.zero_()
            loss = loss_fn(model, next(batches))
            if t == steps - 1:
                break
            loss.backward()
            if update is not None:
                with torch.no_grad():
                    update()
    elapsed = time.perf_counter() - t0
    with torch.no_grad():
        for p, s in zip(params, start):
            p.copy_(s)
        for p in params:
            p.grad = None
    return elapsed / (chains * steps)


class EagerUpdate:
    """The devinterp-style update of bench_update.py on the model's own parameters."""

    def __init__(self, model, sampler, *, lr, nbeta, gamma):
        self.params = list(model.parameters())
        self.inits = [p.detach().clone() for p in self.params]
        self.sampler, self.lr, self.nbeta, self.gamma = sampler, lr, nbeta, gamma
        self.vs = [torch.zeros_like(p) for p in self.params]

    def reset(self):
        for v in self.vs:
            v.zero_()

    def __call__(self):
        grads = [p.grad for p in self.params]
        ps = [p.data for p in self.params]
        if self.sampler == "sgld":
            eager_sgld_step(ps, grads, self.inits, lr=self.lr, nbeta=self.nbeta, localization=self.gamma)
        else:
            eager_rmsprop_sgld_step(ps, grads, self.inits, self.vs, lr=self.lr, nbeta=self.nbeta,
                                    localization=self.gamma)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", default="784,1024,256,10", help="MLP layer widths (default: 1.07M parameters)")
    ap.add_argument("--samples", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--chains", type=int, default=None, help="chains per estimate_llc call (default 2; 1 with --quick)")
    ap.add_argument("--draws", type=int, default=None, help="draws per chain (default 100; 10 with --quick)")
    ap.add_argument("--samplers", nargs="+", default=["sgld", "rmsprop_sgld"], choices=["sgld", "rmsprop_sgld"])
    ap.add_argument("--backends", nargs="+", default=["cpu", "torch"], help="llc_fast backends to compare")
    ap.add_argument("--no-eager", action="store_true", help="skip the devinterp-style eager-update baseline")
    ap.add_argument("--chain-batching", default="sequential",
                    help="estimate_llc's chain_batching ('sequential': one chain at a time, like devinterp and the "
                         "baselines here; 'auto'/'vmap': chains batched in one vmapped pass)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--gamma", type=float, default=100.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=None,
                    help="repeat every measurement this many times (median; default 3, 1 with --quick)")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run (1 chain x 10 draws, 1 round, no busy retries; seconds, not steady-state figures)")
    add_common_options(ap, each="run")
    ap.set_defaults(retry_busy=None)
    args = ap.parse_args(argv)
    for name, full, quick in (("chains", 2, 1), ("draws", 100, 10), ("rounds", 3, 1), ("retry_busy", 2, 0)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    with transcript(args.log, argv):
        return bench(args, argv)


def bench(args, argv) -> int:
    set_threads(args.threads)
    widths = [int(w) for w in args.widths.split(",")]
    model = make_model(widths, args.seed)
    loader = make_loader(args.samples, widths, args.batch_size, args.seed)
    num_params = sum(p.numel() for p in model.parameters())
    nbeta = args.samples / math.log(args.samples)
    steps = args.draws  # num_burnin_steps=0, num_steps_bw_draws=1: num_draws forward passes per chain
    extra = {}  # options of newer estimate_llc versions
    if "chain_batching" in inspect.signature(llc_fast.estimate_llc).parameters:
        extra["chain_batching"] = args.chain_batching
    packages = ("torch", "llc_fast")
    header = environment(
        torch.device("cpu"), argv, packages, model=f"MLP {args.widths} (ReLU), {num_params} parameters, float32",
        samples=args.samples, batch_size=args.batch_size, chains=args.chains, draws=args.draws, lr=args.lr,
        nbeta=nbeta, gamma=args.gamma, seed=args.seed, quick=args.quick, estimate_llc_extra=extra)
    print_environment("bench_step", header, packages)
    print(f"# model: {header['model']}; data: {args.samples} random samples, batch {args.batch_size}, cross-entropy")
    print(f"# estimate_llc: {args.chains} chains x {args.draws} draws, lr={args.lr}, nbeta={nbeta:.1f}, "
          f"gamma={args.gamma}, seed={args.seed}, progress=False"
          + "".join(f", {k}={v!r}" for k, v in extra.items()))
    print()
    guard = LoadGuard(args.wait_quiet, args.retry_busy)

    def measure(label, fn):
        """``fn() -> (s_per_step, info)`` under the load guard; returns (seconds, other cores, info)."""
        def report(a, again):
            sec, info = a.value
            print(f"  {label}: {sec * 1e3:.2f} ms" + (f" ({info['note']})" if info.get("note") else "")
                  + (f"; other processes kept {a.other:.2f} cores busy" if not guard.clean(a) else ""))
            if again:
                print("#   timing it again")

        last = guard.run(fn, report=report)[-1]
        return last.value[0], last.other, last.value[1]

    def run_llc(sampler, b):
        def fn():
            r = llc_fast.estimate_llc(model, loader, loss_fn, sampler=sampler, lr=args.lr, nbeta=nbeta,
                                      gamma=args.gamma, num_chains=args.chains, num_draws=args.draws, seed=args.seed,
                                      progress=False, backend=b, **extra)
            return r.timing["sampling_s"] / r.timing["steps"], dict(
                llc_mean=r.llc_mean, engine=r.config.get("engine"), backend=r.config["backend"],
                note=f"llc {r.llc_mean:.4g}")
        return fn

    def update_alone(sampler, name):
        """Seconds per call of the update alone on this model's flat buffer (eager: its parameter tensors)."""
        shapes = [tuple(p.shape) for p in model.parameters()]
        n = sum(p.numel() for p in model.parameters())
        settings = SamplerSettings(sampler=sampler)
        w_star = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        w = w_star.clone().view(1, n)
        grad = torch.randn(1, n) * 1e-2
        stat = torch.zeros(1, n) if settings.preconditioned and name != "eager" else None
        fn = None if name == "eager" else select_backend(name, torch.device("cpu")).update
        call = _make_call(name, fn, w, grad, w_star, stat, settings, shapes, lr=args.lr, nbeta=nbeta, gamma=args.gamma)

        def run():
            med, times = time_calls(call, torch.device("cpu"), warmup=2, min_repeats=5, max_repeats=50, target_s=0.5)
            return med, dict(note="update alone, median of %d calls" % len(times))
        return run

    # validate, then time: warm-up calls build/load the C++ kernel and touch every code path once
    for b in args.backends:
        err = validate(lambda: llc_fast.estimate_llc(model, loader, loss_fn, lr=args.lr, nbeta=nbeta, gamma=args.gamma,
                                                     num_chains=1, num_draws=3, seed=args.seed, progress=False,
                                                     backend=b, **extra))
        if err:
            raise SystemExit(f"bench_step: estimate_llc(backend={b!r}) failed its warm-up: {err}")
    manual_loop(model, loader, chains=1, steps=3)

    # Per sampler and round, side by side: fwd+bwd alone, each backend, the eager loop, the updates alone.
    FB, EAGER = "fwd+bwd only (no update)", "fwd+bwd + eager update (devinterp-style)"
    samples: dict[tuple[str, str], list] = {}  # (sampler, run) -> [(seconds, other cores, info)]
    for sampler in args.samplers:
        for rnd in range(args.rounds):
            print(f"{sampler}, round {rnd + 1} of {args.rounds}:")
            todo = [(FB, lambda: (manual_loop(model, loader, chains=args.chains, steps=steps), {}))]
            todo += [(f"estimate_llc backend={b}", run_llc(sampler, b)) for b in args.backends]
            if not args.no_eager:
                upd = EagerUpdate(model, sampler, lr=args.lr, nbeta=nbeta, gamma=args.gamma)
                todo.append((EAGER, lambda upd=upd: (manual_loop(model, loader, chains=args.chains, steps=steps,
                                                                 update=upd), {})))
            todo += [(f"update alone: {b}", update_alone(sampler, b))
                     for b in list(args.backends) + ([] if args.no_eager else ["eager"])]
            for run, fn in todo:
                samples.setdefault((sampler, run), []).append(measure(run, fn))

    results = []
    for (sampler, run), got in samples.items():
        secs = [g[0] for g in got]
        others = [g[1] for g in got if g[1] is not None]
        info = {k: v for k, v in got[-1][2].items() if k != "note"}
        results.append(dict(sampler=sampler, run=run, s_per_step=statistics.median(secs), s_min=min(secs),
                            s_max=max(secs), rounds=len(secs), other_cores=max(others) if others else None, **info))

    header["loadavg_end"] = loadavg()
    print()
    print("# ms: median over rounds of seconds per chain-step x 1000 (estimate_llc: result.timing['sampling_s'] /")
    print("# result.timing['steps']); 'update alone' rows: ms per call of the update by itself on the same flat buffer")
    print("# (eager: on the model's parameter tensors). range = fastest .. slowest round. vs fused: / backend=cpu's ms.")
    print("# beyond fwd+bwd = ms - fwd+bwd ms (the update plus the sampling loop's own work); other = most CPU cores")
    print("# other processes kept busy during any round")
    line = (f"{'sampler':>12}  {'run':<42} {'ms':>8} {'range':>15} {'vs fused':>8} {'beyond fwd+bwd':>14} "
            f"{'share':>6} {'other':>5}")
    print(line)
    print("-" * len(line))
    for sampler in args.samplers:
        same = {x["run"]: x for x in results if x["sampler"] == sampler}
        fused, fb = same.get("estimate_llc backend=cpu"), same[FB]["s_per_step"]
        fused_alone = same.get("update alone: cpu")
        for rr in [x for x in results if x["sampler"] == sampler]:
            alone = rr["run"].startswith("update alone")
            ref = fused_alone if alone else fused
            rr["ratio_to_fused"] = rr["s_per_step"] / ref["s_per_step"] if ref else None
            rr["beyond_fwd_bwd_s"] = None if alone or rr["run"] == FB else rr["s_per_step"] - fb
            ratio = f"{rr['ratio_to_fused']:.2f}x" if rr["ratio_to_fused"] else ""
            beyond = "" if rr["beyond_fwd_bwd_s"] is None else f"{rr['beyond_fwd_bwd_s'] * 1e3:+.2f}"
            share = "" if rr["beyond_fwd_bwd_s"] is None else f"{rr['beyond_fwd_bwd_s'] / rr['s_per_step']:.0%}"
            other = "" if rr["other_cores"] is None else f"{rr['other_cores']:.2f}"
            rng = f"{rr['s_min'] * 1e3:.2f}..{rr['s_max'] * 1e3:.2f}"
            print(f"{sampler:>12}  {rr['run']:<42} {rr['s_per_step'] * 1e3:>8.2f} {rng:>15} {ratio:>8} {beyond:>14} "
                  f"{share:>6} {other:>5}")
        print()
    for sampler in args.samplers:
        get = {x["run"]: x["s_per_step"] for x in results if x["sampler"] == sampler}
        fused, ref, eager, fb = (get.get("estimate_llc backend=cpu"), get.get("estimate_llc backend=torch"),
                                 get.get(EAGER), get[FB])
        parts = []
        if fused and ref:
            parts.append(f"backend='torch' / backend='cpu' = {ref / fused:.2f}x per step")
        if fused and eager:
            parts.append(f"eager loop / backend='cpu' = {eager / fused:.2f}x")
        if fused:
            parts.append(f"fwd+bwd alone = {fb / fused:.0%} of a backend='cpu' step")
        alone = {b: get.get(f"update alone: {b}") for b in ("cpu", "torch", "eager")}
        if alone["cpu"]:
            parts.append("update alone: " + ", ".join(f"{b} {v * 1e3:.2f} ms" for b, v in alone.items() if v))
        print(f"# {sampler}: " + "; ".join(parts))
    print(f"# load average at end: {header['loadavg_end']}")
    if args.output:
        write_results(args.output, header, results, key="results")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
