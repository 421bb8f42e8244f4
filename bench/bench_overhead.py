"""Per-step overhead of ``llc_fast.estimate_llc``: against the minimal hand-written loop of the same
math, and beside the forward and backward passes alone.

    .venv/bin/python bench/bench_overhead.py [--device cpu|cuda] [--parts dln,mlp] [--rounds R] [--quick]
                                             [--threads N] [--wait-quiet S] [--retry-busy K]
                                             [--output FILE.json] [--log FILE.txt]

(a) ``dln``: a deep linear network 4-3-4 of rank 2 (``llc_fast.oracles.make_dln``: 24 parameters,
    no biases), 8 chains, 1000 samples in batches of 100, plain SGLD. ``estimate_llc`` (shared
    batches, ``chain_batching="vmap"``, the backend named by ``--backend``) against the minimal loop
    of the same math: ``torch.func.vmap`` of ``grad_and_value`` of the loss of one flat row over the
    chains' flat weights w [C, N], then one call of ``select_backend(backend, device).update`` per
    step; nothing checked, nothing recorded. The model sees views of the row as its parameters,
    assigned into its modules for the call (the fewest operations, as llc_fast's engine does); the
    same loop with ``torch.func.functional_call`` instead, and the same loop with the update prepared
    once (``backend.prepare_segments``, then ``launch`` per step, as estimate_llc's own loop does) are
    timed beside it. Microseconds per step (one step = every chain's forward, backward and update) and
    the ratios.
(b) ``mlp``: a 784-1024-256-10 ReLU MLP (1,068,810 parameters), 8 chains, 4096 random samples in
    batches of 256, cross-entropy. An ``estimate_llc`` step beside the same vmapped forward+backward
    alone and the update alone on the [8, N] buffers: step / fwd+bwd, and the share of the step
    spent outside the forward and backward passes (the update, and the rest: llc_fast's loop).

Per-step times are marginal: (t(S2) - t(S1)) / (S2 - S1) for two step counts S1 < S2 timed within
one round, so what a call pays once cancels (for ``estimate_llc`` t is ``result.timing["sampling_s"]``,
the sampling loop without L(w*); for the hand loop the wall time of its loop, synchronized on a GPU).
The calls of one round run back to back, side by side, and each ratio is taken within its round;
medians over rounds are reported with their range. On the CPU a round during which other processes
kept cores busy is timed again (``harness.LoadGuard``: ``--wait-quiet``, ``--retry-busy``); rows whose
every round was contended are marked "busy" and must be ignored. ``--quick``: few steps, one round
(a smoke run; its figures are not results).
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from harness import (LoadGuard, add_common_options, checked_device, environment, loadavg, print_environment,
                     set_threads, synchronize, transcript, validate, write_results)

import llc_fast  # noqa: E402  (harness puts the repository on sys.path)
from llc_fast.kernels import SamplerSettings, StepCounters, select_backend  # noqa: E402
from llc_fast.oracles import dln_dataset, make_dln, mse_loss  # noqa: E402

DLN_WIDTHS, DLN_RANK = (4, 3, 4), 2
MLP_WIDTHS = (784, 1024, 256, 10)


# --- the hand-written loop: shared with gpu_lm.py ------------------------------------------------

def wall(fn, device: torch.device) -> float:
    """Wall seconds of ``fn()``, the device synchronized before and after."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


class FlatChains:
    """The minimal batched-chains code a user would write: the sampled parameters of ``model`` as one
    flat row w* [N], chain weights w [C, N], and ``grad_and_value`` of ``loss_fn(model, batch)`` at one
    row, vmapped over the rows of w (the batch shared by every chain). Inside, the model sees views of
    the row as its parameters, put in place either by assigning them into the modules' ``_parameters``
    for the call (``how="swap"``, the fewest Python operations; what llc_fast's vmap engine does too)
    or by ``torch.func.functional_call`` (``how="functional_call"``, torch's documented way)."""

    def __init__(self, model: nn.Module, loss_fn, chains: int, how: str = "swap"):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.w_star = torch.cat([p.detach().reshape(-1) for _, p in named])
        self.w = self.w_star.expand(chains, -1).clone()
        self.chains, self.numel, self.how = chains, self.w_star.numel(), how
        index = {id(p): k for k, (_, p) in enumerate(named)}
        owners = []  # (module, attribute, k) for every registration, tied parameters included
        for name, p in model.named_parameters(remove_duplicate=False):
            if id(p) in index:
                mod_name, _, attr = name.rpartition(".")
                owners.append((model.get_submodule(mod_name), attr, index[id(p)]))
        names, sizes, shapes = self.names, self.sizes, self.shapes

        if how == "swap":
            def flat_loss(row, batch):
                pieces = [t.view(s) for t, s in zip(row.split(sizes), shapes)]
                saved = [m._parameters[a] for m, a, _ in owners]
                try:
                    for m, a, k in owners:
                        m._parameters[a] = pieces[k]
                    return loss_fn(model, batch).reshape(())
                finally:
                    for (m, a, _), p in zip(owners, saved):
                        m._parameters[a] = p
        elif how == "functional_call":
            def flat_loss(row, batch):
                params = {n: t.view(s) for n, t, s in zip(names, row.split(sizes), shapes)}

                def call(*args, **kwargs):
                    return functional_call(model, params, args, kwargs)

                return loss_fn(call, batch).reshape(())  # loss_fn(model, batch) only calls model(...)
        else:
            raise ValueError(f"how must be 'swap' or 'functional_call', got {how!r}")

        self.grad_and_loss = vmap(grad_and_value(flat_loss), in_dims=(0, None), randomness="different")

    def reset(self) -> None:
        self.w.copy_(self.w_star.expand_as(self.w))


def hand_loop(chains: FlatChains, batches: list, steps: int, update, *, lr, nbeta, gamma, sampler="sgld") -> None:
    """``steps`` steps of the same math as estimate_llc: one vmapped forward+backward and one fused update
    call each (``update`` = ``select_backend(...).update``); no checks, no recording."""
    chains.reset()
    settings = SamplerSettings(sampler=sampler)
    ids = torch.arange(chains.chains, device=chains.w.device)  # on the device once, not copied per step
    w, w_star, nb = chains.w, chains.w_star, len(batches)
    for t in range(steps):
        grad, _loss = chains.grad_and_loss(w, batches[t % nb])
        update(w, grad, w_star, None, lr=lr, nbeta=nbeta, gamma=gamma, settings=settings,
               counters=StepCounters(step=t), seed=0, chain_ids=ids)


def hand_loop_prepared(chains: FlatChains, batches: list, steps: int, backend, *, lr, nbeta, gamma,
                       sampler="sgld") -> None:
    """``hand_loop`` with the update checked and packed once (``backend.prepare_segments``) and launched
    at each step with that step's gradients, as estimate_llc's loop does."""
    chains.reset()
    ids = torch.arange(chains.chains, device=chains.w.device)
    w, w_star, nb = chains.w, chains.w_star, len(batches)
    prepared = backend.prepare_segments([(w, torch.zeros_like(w), 0, 0)], w_star, None, lr=lr, nbeta=nbeta,
                                        gamma=gamma, settings=SamplerSettings(sampler=sampler), seed=0, chain_ids=ids)
    for t in range(steps):
        grad, _loss = chains.grad_and_loss(w, batches[t % nb])
        prepared.launch(StepCounters(step=t), grad.contiguous())


def fwd_bwd_loop(chains: FlatChains, batches: list, steps: int) -> None:
    """``steps`` vmapped forward+backward passes alone (the gradients are computed and dropped)."""
    nb = len(batches)
    for t in range(steps):
        chains.grad_and_loss(chains.w, batches[t % nb])


def update_loop(chains: FlatChains, steps: int, update, *, lr, nbeta, gamma, sampler="sgld") -> None:
    """``steps`` fused update calls alone on the [C, N] buffers, with a fixed small gradient."""
    chains.reset()
    settings = SamplerSettings(sampler=sampler)
    ids = torch.arange(chains.chains, device=chains.w.device)  # on the device once, not copied per step
    grad = torch.full_like(chains.w, 1e-3)
    for t in range(steps):
        update(chains.w, grad, chains.w_star, None, lr=lr, nbeta=nbeta, gamma=gamma, settings=settings,
               counters=StepCounters(step=t), seed=0, chain_ids=ids)


# --- the two cases --------------------------------------------------------------------------------

def dln_case(device):
    model = make_dln(DLN_WIDTHS, DLN_RANK, seed=1).to(device)
    n = 1000
    x, y = dln_dataset(model, n, seed=2, input_range=1.0).tensors
    batches = [(x[i:i + 100].to(device), y[i:i + 100].to(device)) for i in range(0, n, 100)]
    return model, batches, mse_loss, dict(lr=3e-4, nbeta=n / math.log(n), gamma=1.0)


def ce_loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def mlp_case(device, widths=MLP_WIDTHS, samples=4096, batch_size=256):
    torch.manual_seed(0)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(widths) - 2 else [])
    model = nn.Sequential(*layers).to(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(samples, widths[0], generator=gen)
    y = torch.randint(0, widths[-1], (samples,), generator=gen)
    batches = [(x[i:i + batch_size].to(device), y[i:i + batch_size].to(device))
               for i in range(0, samples - batch_size + 1, batch_size)]
    return model, batches, ce_loss, dict(lr=1e-4, nbeta=samples / math.log(samples), gamma=1000.0)


COMPILE = False  # --compile: estimate_llc(compile_step=True), the batched pass through torch.compile


def run_estimate(model, batches, loss_fn, hyper, *, chains, steps, backend) -> float:
    """Seconds of estimate_llc's sampling loop for ``steps`` steps of ``chains`` chains (L(w*) excluded)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = llc_fast.estimate_llc(model, batches, loss_fn, sampler="sgld", **hyper, num_chains=chains,
                                  num_draws=steps, num_burnin_steps=0, num_init_loss_batches=1, shared_batches=True,
                                  chain_batching="vmap", backend=backend, progress=False, seed=0,
                                  compile_step=COMPILE)
    if r.config.get("engine") != "vmap":
        raise RuntimeError(f"estimate_llc ran engine {r.config.get('engine')!r}, not the vmapped one")
    return r.timing["sampling_s"]


def marginal(t1: float, t2: float, s1: int, s2: int) -> float:
    return (t2 - t1) / (s2 - s1)


def _spread(values: list[float]) -> dict:
    return dict(median=statistics.median(values), min=min(values), max=max(values), n=len(values))


def _fmt_us(v: dict) -> str:
    return f"{v['median'] * 1e6:10.1f} ({v['min'] * 1e6:.1f}-{v['max'] * 1e6:.1f})"


def _fmt_ms(v: dict) -> str:
    return f"{v['median'] * 1e3:10.2f} ({v['min'] * 1e3:.2f}-{v['max'] * 1e3:.2f})"


def _clean_values(guard, attempts):
    clean = [a for a in attempts if guard.clean(a)]
    return (clean or attempts), bool(clean)


def part_dln(args, device, backend_name, guard, log) -> dict:
    model, batches, loss_fn, hyper = dln_case(device)
    C, (s1, s2) = args.chains, args.dln_steps
    hands = {"swap": FlatChains(model, loss_fn, C, "swap"), "functional_call": FlatChains(model, loss_fn, C,
                                                                                         "functional_call")}
    numel = hands["swap"].numel
    backend = select_backend(backend_name, device)
    update = backend.update
    prepared = hasattr(backend, "prepare_segments")  # llc_fast's own loop prepares its update once per group
    log(f"## (a) DLN {'-'.join(map(str, DLN_WIDTHS))} rank {DLN_RANK} ({numel} parameters), {C} chains, batch "
        f"{batches[0][0].shape[0]}, sgld lr={hyper['lr']:g} nbeta={hyper['nbeta']:.4g} gamma={hyper['gamma']:g}, "
        f"backend {backend_name}; steps S1={s1}, S2={s2}; {args.rounds} round(s)")
    warm = [lambda: run_estimate(model, batches, loss_fn, hyper, chains=C, steps=3, backend=backend_name)]
    warm += [lambda fc=fc: hand_loop(fc, batches, 3, update, **hyper) for fc in hands.values()]
    if prepared:
        warm.append(lambda: hand_loop_prepared(hands["swap"], batches, 3, backend, **hyper))
    for fn in warm:
        err = validate(fn, warmup=2, device=device)
        if err:
            raise SystemExit(f"bench_overhead: the DLN warm-up failed: {err}")

    def one_round():
        t = {}
        for s, tag in ((s1, "1"), (s2, "2")):
            t["est" + tag] = run_estimate(model, batches, loss_fn, hyper, chains=C, steps=s, backend=backend_name)
            for how, fc in hands.items():
                t[how + tag] = wall(lambda fc=fc, s=s: hand_loop(fc, batches, s, update, **hyper), device)
            if prepared:
                t["prepared" + tag] = wall(lambda s=s: hand_loop_prepared(hands["swap"], batches, s, backend, **hyper),
                                           device)
        v = dict(t, est=marginal(t["est1"], t["est2"], s1, s2))
        for how in list(hands) + (["prepared"] if prepared else []):
            v[how] = marginal(t[how + "1"], t[how + "2"], s1, s2)
        v["ratio"] = v["est"] / v["swap"] if v["swap"] > 0 else math.nan
        v["ratio_fc"] = v["est"] / v["functional_call"] if v["functional_call"] > 0 else math.nan
        if prepared:
            v["ratio_prepared"] = v["est"] / v["prepared"] if v["prepared"] > 0 else math.nan
        return v

    def report(a, again):
        v = a.value
        other = "" if a.other is None else f"; other processes kept {a.other:.2f} cores busy"
        log(f"  round: estimate_llc {v['est'] * 1e6:.1f} us/step, hand loop {v['swap'] * 1e6:.1f} us/step "
            f"(functional_call {v['functional_call'] * 1e6:.1f}"
            + (f", prepared update {v['prepared'] * 1e6:.1f}" if "prepared" in v else "")
            + f"), ratio {v['ratio']:.2f}x{other}"
            + ("; timing it again" if again else ""))

    attempts = guard.run(one_round, want=args.rounds, report=report)
    used, clean = _clean_values(guard, attempts)
    est, hand, hand_fc, ratio, ratio_fc = (_spread([a.value[k] for a in used])
                                           for k in ("est", "swap", "functional_call", "ratio", "ratio_fc"))
    busy = "" if clean else "  <- machine busy in every round: ignore"
    log(f"{'':<48} {'us/step median (range)':>28} {'us/chain-step':>14}")
    log(f"{'estimate_llc (sampling loop)':<48} {_fmt_us(est):>28} {est['median'] * 1e6 / C:>14.1f}{busy}")
    log(f"{'hand loop: vmap grad (swap) + update':<48} {_fmt_us(hand):>28} {hand['median'] * 1e6 / C:>14.1f}{busy}")
    log(f"{'hand loop: vmap grad (functional_call) + update':<48} {_fmt_us(hand_fc):>28} "
        f"{hand_fc['median'] * 1e6 / C:>14.1f}{busy}")
    extra = {}
    if prepared:
        hand_p, ratio_p = (_spread([a.value[k] for a in used]) for k in ("prepared", "ratio_prepared"))
        extra = dict(hand_loop_prepared_s_per_step=hand_p, ratio_vs_prepared=ratio_p)
        log(f"{'hand loop: vmap grad (swap) + prepared update':<48} {_fmt_us(hand_p):>28} "
            f"{hand_p['median'] * 1e6 / C:>14.1f}{busy}")
    log(f"estimate_llc / hand loop: {ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f}x, within each "
        f"round); / the functional_call loop: {ratio_fc['median']:.2f}x"
        + (f"; / the prepared-update loop: {extra['ratio_vs_prepared']['median']:.2f}x" if prepared else "") + busy)
    log()
    return dict(part="dln", model=f"DLN {'-'.join(map(str, DLN_WIDTHS))} rank {DLN_RANK}", params=numel, chains=C,
                batch_size=batches[0][0].shape[0], steps=[s1, s2], backend=backend_name, hyper=hyper,
                estimate_llc_s_per_step=est, hand_loop_s_per_step=hand, hand_loop_functional_call_s_per_step=hand_fc,
                ratio=ratio, ratio_vs_functional_call=ratio_fc, **extra, clean=clean,
                rounds=[dict(a.value, other_cores=a.other, waited_s=a.waited) for a in attempts])


def part_mlp(args, device, backend_name, guard, log) -> dict:
    model, batches, loss_fn, hyper = mlp_case(device, args.mlp_widths, args.samples, args.batch_size)
    C, (s1, s2) = args.mlp_chains, args.mlp_steps
    fc = FlatChains(model, loss_fn, C, "swap")
    update = select_backend(backend_name, device).update
    log(f"## (b) MLP {'-'.join(map(str, args.mlp_widths))} ({fc.numel:,} parameters), {C} chains, batch "
        f"{args.batch_size}, sgld lr={hyper['lr']:g} gamma={hyper['gamma']:g}, backend {backend_name}; steps S1={s1}, "
        f"S2={s2}; {args.rounds} round(s)")
    for fn in (lambda: run_estimate(model, batches, loss_fn, hyper, chains=C, steps=2, backend=backend_name),
               lambda: fwd_bwd_loop(fc, batches, 2), lambda: update_loop(fc, 2, update, **hyper)):
        err = validate(fn, warmup=1, device=device)
        if err:
            raise SystemExit(f"bench_overhead: the MLP warm-up failed: {err}")

    def one_round():
        t = {}
        t["est1"] = run_estimate(model, batches, loss_fn, hyper, chains=C, steps=s1, backend=backend_name)
        t["fb1"] = wall(lambda: fwd_bwd_loop(fc, batches, s1), device)
        t["upd1"] = wall(lambda: update_loop(fc, s1, update, **hyper), device)
        t["est2"] = run_estimate(model, batches, loss_fn, hyper, chains=C, steps=s2, backend=backend_name)
        t["fb2"] = wall(lambda: fwd_bwd_loop(fc, batches, s2), device)
        t["upd2"] = wall(lambda: update_loop(fc, s2, update, **hyper), device)
        est, fb = marginal(t["est1"], t["est2"], s1, s2), marginal(t["fb1"], t["fb2"], s1, s2)
        upd = marginal(t["upd1"], t["upd2"], s1, s2)
        return dict(t, est=est, fb=fb, upd=upd, ratio=est / fb if fb > 0 else math.nan,
                    outside=1 - fb / est if est > 0 else math.nan, update_share=upd / est if est > 0 else math.nan)

    def report(a, again):
        v = a.value
        other = "" if a.other is None else f"; other processes kept {a.other:.2f} cores busy"
        log(f"  round: estimate_llc step {v['est'] * 1e3:.2f} ms, fwd+bwd {v['fb'] * 1e3:.2f} ms, update "
            f"{v['upd'] * 1e3:.2f} ms; step / fwd+bwd {v['ratio']:.3f}x{other}"
            + ("; timing it again" if again else ""))

    attempts = guard.run(one_round, want=args.rounds, report=report)
    used, clean = _clean_values(guard, attempts)
    est, fb, upd = (_spread([a.value[k] for a in used]) for k in ("est", "fb", "upd"))
    ratio, outside, upd_share = (_spread([a.value[k] for a in used]) for k in ("ratio", "outside", "update_share"))
    rest = _spread([a.value["est"] - a.value["fb"] - a.value["upd"] for a in used])
    busy = "  <- machine busy in every round: ignore" if not clean else ""
    log(f"{'':<40} {'ms/step median (range)':>28}")
    log(f"{'estimate_llc step (sampling loop)':<40} {_fmt_ms(est):>28}{busy}")
    log(f"{'vmapped forward+backward alone':<40} {_fmt_ms(fb):>28}{busy}")
    log(f"{'fused update alone ([C, N] buffers)':<40} {_fmt_ms(upd):>28}{busy}")
    log(f"{'rest (step - fwd+bwd - update)':<40} {_fmt_ms(rest):>28}{busy}")
    log(f"step / fwd+bwd: {ratio['median']:.3f}x ({ratio['min']:.3f}-{ratio['max']:.3f}x, within each round); outside "
        f"forward/backward: {outside['median']:.1%} of the step ({outside['min']:.1%}-{outside['max']:.1%}); the update "
        f"alone is {upd_share['median']:.1%} of the step{busy}")
    log()
    return dict(part="mlp", model=f"MLP {'-'.join(map(str, args.mlp_widths))}", params=fc.numel, chains=C,
                batch_size=args.batch_size, steps=[s1, s2], backend=backend_name, hyper=hyper,
                estimate_llc_s_per_step=est, fwd_bwd_s_per_step=fb, update_s_per_step=upd, rest_s_per_step=rest,
                step_over_fwd_bwd=ratio, outside_share=outside, update_share=upd_share, clean=clean,
                rounds=[dict(a.value, other_cores=a.other, waited_s=a.waited) for a in attempts])


def _steps(text: str) -> tuple[int, int]:
    a, b = (int(v) for v in text.split(","))
    if not 0 < a < b:
        raise argparse.ArgumentTypeError(f"need S1,S2 with 0 < S1 < S2, got {text!r}")
    return a, b


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--parts", default="dln,mlp", help="comma-separated subset of dln,mlp")
    ap.add_argument("--backend", default="auto", help="the update backend of both sides (default: auto, i.e. cpu on "
                    "the CPU and cuda on a GPU)")
    ap.add_argument("--chains", type=int, default=8, help="chains of the DLN part")
    ap.add_argument("--dln-steps", type=_steps, default=None, metavar="S1,S2",
                    help="step counts of the DLN part (default 100,500; 50,250 with --quick)")
    ap.add_argument("--mlp-widths", type=lambda s: tuple(int(v) for v in s.split(",")), default=MLP_WIDTHS)
    ap.add_argument("--mlp-chains", type=int, default=8)
    ap.add_argument("--samples", type=int, default=4096, help="samples of the MLP part")
    ap.add_argument("--batch-size", type=int, default=256, help="batch of the MLP part")
    ap.add_argument("--mlp-steps", type=_steps, default=None, metavar="S1,S2",
                    help="step counts of the MLP part (default 5,25; 2,5 with --quick)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per part (default 5; 1 with --quick)")
    ap.add_argument("--quick", action="store_true", help="few steps, one round, no busy retries: a smoke run")
    ap.add_argument("--compile", action="store_true",
                    help="estimate_llc with compile_step=True (torch.compile of the batched forward/backward; the "
                         "compile, at the first step of each run, cancels in the marginal per-step time)")
    add_common_options(ap, each="round")
    ap.set_defaults(retry_busy=None)  # 2, or 0 with --quick
    args = ap.parse_args(argv)
    global COMPILE
    COMPILE = args.compile
    if args.dln_steps is None:
        args.dln_steps = (50, 250) if args.quick else (100, 500)
    if args.mlp_steps is None:
        args.mlp_steps = (2, 5) if args.quick else (5, 25)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 5
    if args.retry_busy is None:
        args.retry_busy = 0 if args.quick else 2
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    for p in parts:
        if p not in ("dln", "mlp"):
            ap.error(f"unknown part {p!r}; choose from dln, mlp")
    device = checked_device(ap, args.device)
    with transcript(args.log, argv):
        return bench(args, argv, device, parts)


def bench(args, argv, device, parts) -> int:
    set_threads(args.threads)
    backend = select_backend(args.backend, device)  # resolve "auto" once: both sides use this one
    cpu = device.type == "cpu"
    guard = LoadGuard(args.wait_quiet if cpu else 0.0, args.retry_busy if cpu else 0)
    header = environment(device, argv, backend=backend.name, parts=parts, rounds=args.rounds, quick=args.quick,
                         dln_steps=list(args.dln_steps), mlp_steps=list(args.mlp_steps))
    print_environment("bench_overhead", header)
    print("# per step = (t(S2) - t(S1)) / (S2 - S1) within one round; estimate_llc: result.timing['sampling_s'] "
          "(shared batches, chain_batching='vmap'); hand loop / fwd+bwd / update: wall time, synchronized")
    print()

    def log(line=""):
        print(line, flush=True)

    rows = []
    t0 = time.perf_counter()
    if "dln" in parts:
        rows.append(part_dln(args, device, backend.name, guard, log))
    if "mlp" in parts:
        rows.append(part_mlp(args, device, backend.name, guard, log))
    header["loadavg_end"] = loadavg()
    header["wall_s"] = time.perf_counter() - t0
    summary = []
    for r in rows:
        flag = "" if r["clean"] else " (busy)"
        if r["part"] == "dln":
            summary.append(f"DLN {r['params']} params x {r['chains']} chains: estimate_llc "
                           f"{r['estimate_llc_s_per_step']['median'] * 1e6:.0f} us/step vs hand loop "
                           f"{r['hand_loop_s_per_step']['median'] * 1e6:.0f} us ({r['ratio']['median']:.2f}x)"
                           + (f", prepared-update loop {r['hand_loop_prepared_s_per_step']['median'] * 1e6:.0f} us "
                              f"({r['ratio_vs_prepared']['median']:.2f}x)" if "ratio_vs_prepared" in r else "")
                           + flag)
        else:
            size = f"{r['params'] / 1e6:.2f}M" if r["params"] >= 100_000 else f"{r['params']:,}-parameter"
            summary.append(f"MLP {size} x {r['chains']} chains: step/fwd+bwd "
                           f"{r['step_over_fwd_bwd']['median']:.2f}x, {r['outside_share']['median']:.0%} outside "
                           f"fwd+bwd{flag}")
    print(f"# done in {header['wall_s']:.0f} s; load average at end: {header['loadavg_end']}")
    print("SUMMARY: " + ("[quick: not a result] " if args.quick else "") + "; ".join(summary))
    if args.output:
        write_results(args.output, header, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
