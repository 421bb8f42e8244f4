"""End to end: seconds per SGLD step of ``llc_fast.estimate_llc`` with the fused C++ update against the reference.

    .venv/bin/python bench/bench_step.py [--chains 2] [--draws 100] [--threads N] [--output step.json]

On the CPU, for a ~1.07M-parameter MLP (784-1024-256-10, ReLU) on random data (4096 samples,
batch 256, cross-entropy), runs ``estimate_llc`` with ``backend="cpu"`` (the fused C++ kernel)
and ``backend="torch"`` (the reference update) with the same seed and hyperparameters, for the
samplers sgld and rmsprop_sgld, and reports seconds per step from ``result.timing``.

Two baselines use the same model, data, batch size and number of steps:

* fwd+bwd: the forward and backward passes alone (no update): the floor any sampler pays, so
  (step - fwd+bwd) is the update's (and the loop's) share of a step;
* eager: the forward and backward passes followed by the devinterp-style eager update of
  ``bench_update.py`` (separate torch ops per parameter tensor), i.e. what a devinterp user's
  step costs without devinterp's own extra bookkeeping (metrics, host syncs).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a fresh clone without installing
sys.path.insert(0, str(HERE))

import llc_fast  # noqa: E402
from bench_update import (_cpu_busy, _cpu_name, _loadavg, _other_cores, eager_rmsprop_sgld_step,  # noqa: E402
                          eager_sgld_step, wait_quiet)


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
    ap.add_argument("--chains", type=int, default=2)
    ap.add_argument("--draws", type=int, default=100)
    ap.add_argument("--samplers", nargs="+", default=["sgld", "rmsprop_sgld"], choices=["sgld", "rmsprop_sgld"])
    ap.add_argument("--backends", nargs="+", default=["cpu", "torch"], help="llc_fast backends to compare")
    ap.add_argument("--no-eager", action="store_true", help="skip the devinterp-style eager-update baseline")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--gamma", type=float, default=100.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each run wait up to S seconds until other processes keep < 0.25 cores busy")
    ap.add_argument("--output", type=Path, help="write the results as JSON")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads if args.threads is not None else (os.cpu_count() or 1))
    threads = torch.get_num_threads()
    widths = [int(w) for w in args.widths.split(",")]
    model = make_model(widths, args.seed)
    loader = make_loader(args.samples, widths, args.batch_size, args.seed)
    num_params = sum(p.numel() for p in model.parameters())
    nbeta = args.samples / math.log(args.samples)
    steps = args.draws  # num_burnin_steps=0, num_steps_bw_draws=1: num_draws forward passes per chain
    header = dict(
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        command=" ".join([Path(sys.executable).name] + sys.argv) if argv is None else " ".join(argv),
        device=_cpu_name() or platform.processor(), platform=platform.platform(), torch=torch.__version__,
        llc_fast=llc_fast.__version__, torch_threads=threads, cpu_count=os.cpu_count(), loadavg_start=_loadavg(),
        model=f"MLP {args.widths} (ReLU), {num_params} parameters, float32", samples=args.samples,
        batch_size=args.batch_size, chains=args.chains, draws=args.draws, lr=args.lr, nbeta=nbeta, gamma=args.gamma,
        seed=args.seed,
    )
    print(f"# bench_step  {header['date']}")
    print(f"# command: {header['command']}")
    print(f"# device: {header['device']} (cpu); torch {header['torch']}, llc_fast {header['llc_fast']}; "
          f"torch threads: {threads} (os.cpu_count() = {header['cpu_count']}); load average: {header['loadavg_start']}")
    print(f"# model: {header['model']}; data: {args.samples} random samples, batch {args.batch_size}, cross-entropy")
    print(f"# estimate_llc: {args.chains} chains x {args.draws} draws, lr={args.lr}, nbeta={nbeta:.1f}, "
          f"gamma={args.gamma}, seed={args.seed}, progress=False")
    print()

    def quiet():
        if args.wait_quiet > 0:
            waited, ok = wait_quiet(args.wait_quiet)
            if waited >= 1:
                print(f"# waited {waited:.0f} s for other processes to go quiet" + ("" if ok else " (they did not)"))

    results = []
    # warm-up: builds/loads the C++ kernel and touches the code paths once
    for b in args.backends:
        llc_fast.estimate_llc(model, loader, loss_fn, lr=args.lr, nbeta=nbeta, gamma=args.gamma, num_chains=1,
                              num_draws=3, seed=args.seed, progress=False, backend=b)
    manual_loop(model, loader, chains=1, steps=3)

    quiet()
    c0 = _cpu_busy()
    fb = manual_loop(model, loader, chains=args.chains, steps=steps)
    results.append(dict(sampler="-", run="fwd+bwd", s_per_step=fb, other_cores=_other_cores(c0)))
    print(f"fwd+bwd only: {fb * 1e3:.2f} ms per step")
    for sampler in args.samplers:
        for b in args.backends:
            quiet()
            c0 = _cpu_busy()
            r = llc_fast.estimate_llc(model, loader, loss_fn, sampler=sampler, lr=args.lr, nbeta=nbeta,
                                      gamma=args.gamma, num_chains=args.chains, num_draws=args.draws, seed=args.seed,
                                      progress=False, backend=b)
            s = r.timing["sampling_s"] / r.timing["steps"]
            results.append(dict(sampler=sampler, run=f"estimate_llc backend={r.config['backend']}", s_per_step=s,
                                other_cores=_other_cores(c0), llc_mean=r.llc_mean, timing=r.timing))
            print(f"{sampler} {b}: {s * 1e3:.2f} ms per step (llc {r.llc_mean:.4g})")
        if not args.no_eager:
            quiet()
            c0 = _cpu_busy()
            upd = EagerUpdate(model, sampler, lr=args.lr, nbeta=nbeta, gamma=args.gamma)
            s = manual_loop(model, loader, chains=args.chains, steps=steps, update=upd)
            results.append(dict(sampler=sampler, run="fwd+bwd + eager update (devinterp-style)", s_per_step=s,
                                other_cores=_other_cores(c0)))
            print(f"{sampler} eager: {s * 1e3:.2f} ms per step")

    header["loadavg_end"] = _loadavg()
    print()
    print("# ms/step: seconds per step x 1000 (estimate_llc: result.timing['sampling_s'] / result.timing['steps']);")
    print("# update share = (ms/step - fwd+bwd ms/step) / ms/step; other = CPU cores busy with other processes meanwhile")
    line = f"{'sampler':>12}  {'run':<44} {'ms/step':>8} {'vs fused':>8} {'update share':>12} {'other':>5}"
    print(line)
    print("-" * len(line))
    for rr in results:
        fused = next((x["s_per_step"] for x in results if x["sampler"] == rr["sampler"]
                      and x["run"] == "estimate_llc backend=cpu"), None)
        rr["ratio_to_fused"] = rr["s_per_step"] / fused if fused else None
        rr["update_share"] = (rr["s_per_step"] - fb) / rr["s_per_step"] if rr["run"] != "fwd+bwd" else None
        ratio = f"{rr['ratio_to_fused']:.2f}x" if rr["ratio_to_fused"] else ""
        share = f"{rr['update_share']:.0%}" if rr["update_share"] is not None else ""
        other = "" if rr["other_cores"] is None else f"{rr['other_cores']:.2f}"
        print(f"{rr['sampler']:>12}  {rr['run']:<44} {rr['s_per_step'] * 1e3:>8.2f} {ratio:>8} {share:>12} {other:>5}")
    print()
    for sampler in args.samplers:
        get = {x["run"]: x["s_per_step"] for x in results if x["sampler"] == sampler}
        fused, ref = get.get("estimate_llc backend=cpu"), get.get("estimate_llc backend=torch")
        if fused and ref:
            print(f"# {sampler}: backend='torch' / backend='cpu' = {ref / fused:.2f}x per step")
        eager = get.get("fwd+bwd + eager update (devinterp-style)")
        if fused and eager:
            print(f"# {sampler}: eager loop / backend='cpu' = {eager / fused:.2f}x per step")
    print(f"# load average at end: {header['loadavg_end']}")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(dict(header=header, results=results), indent=1, default=str))
        print(f"# wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
