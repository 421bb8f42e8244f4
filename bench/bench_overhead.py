"""Per-step overhead of ``llc_fast.estimate_llc``: against the minimal hand-written loop of the same
math, and beside the forward and backward passes alone, from a 24-parameter DLN to a 1B-parameter LM.

    .venv/bin/python bench/bench_overhead.py [--device cpu|cuda] [--parts dln,mlp,lm] [--quick] [...: --help]

The parts (a) ``dln``, (b) ``mlp`` and (c) ``lm`` (gpu_suite.sh's stage f, not in the default parts), and the
marginal per-step times, (t(S2) - t(S1)) / (S2 - S1) within one round: bench/README.md, "bench_overhead.py".
"""
from __future__ import annotations

import argparse
import math
import re
import time

import torch

from harness import (BUSY, begin, cli, finish, fmt_spread, guard_for, log, recorded_warnings, run_grid, spread,
                     synchronize, validate, wall)

import llc_fast  # noqa: E402  (harness puts the repository on sys.path)
from llc_fast.kernels import select_backend  # noqa: E402
from llc_fast.oracles import dln_dataset, make_dln, mse_loss  # noqa: E402
from models import (LM_ARCHS, MLP_WIDTHS, FlatChains, causal_lm, ce_loss, fmt_params, fwd_bwd_loop, hand_loop,  # noqa
                    lm_loss, mlp, mlp_data, module_passes)

DLN_WIDTHS, DLN_RANK = (4, 3, 4), 2
LM_QUICK = (2, 64, 128, 4, 2, 128)
LM_HYPER = dict(lr=1e-6, nbeta=30.0, gamma=300.0)
GiB = 1 << 30


def estimate(args, model, batches, loss_fn, hyper, *, chains, steps, burnin=0, **kw):
    """estimate_llc of ``steps`` steps, shared batches, ``--backend``; its warnings kept as ``result.caught``."""
    with recorded_warnings(300) as caught:
        r = llc_fast.estimate_llc(model, batches, loss_fn, sampler="sgld", **hyper, num_chains=chains,
                                  num_draws=steps - burnin, num_burnin_steps=burnin, num_init_loss_batches=1,
                                  shared_batches=True, backend=args.backend.name, progress=False, seed=0, **kw)
    r.caught = caught
    return r


def run_estimate(args, model, batches, loss_fn, hyper, *, chains, steps) -> float:
    """Seconds of estimate_llc's sampling loop (vmap engine) for ``steps`` steps of ``chains`` chains."""
    r = estimate(args, model, batches, loss_fn, hyper, chains=chains, steps=steps, chain_batching="vmap",
                 compile_step=args.compile)
    if r.config.get("engine") != "vmap":
        raise RuntimeError(f"estimate_llc ran engine {r.config.get('engine')!r}, not the vmapped one")
    return r.timing["sampling_s"]


def marginal_rounds(args, guard, title, loops: dict, steps, derive, describe, labels: dict, *, warm: int, chains=None):
    """A part's ``title`` printed, its loops (``loops``: steps -> seconds) validated (``warm`` steps, twice), then
    ``--rounds`` clean rounds (``guard.rounds``), each timing every loop at S1 and S2 steps: per step, the marginal
    (t(S2) - t(S1)) / (S2 - S1), and ``derive(v)``'s figures. Prints the ``labels``' rows (with ``chains``: per
    chain-step too); returns (the spread of each figure over the rounds used, the run's steps, backend, whether
    its rounds were clean and every round)."""
    (s1, s2), scale = steps, dict(scale=1e6, spec=".1f") if chains else dict(scale=1e3, spec=".2f")
    log(f"{title}, backend {args.backend.name}; steps S1={s1}, S2={s2}; {args.rounds} round(s)")
    for fn in loops.values():
        if err := validate(lambda: fn(warm), warmup=2, device=args.device):
            raise SystemExit(f"bench_overhead: a warm-up failed: {err}")

    def one_round():
        t = {f"{k}{tag}": fn(s) for s, tag in ((s1, "1"), (s2, "2")) for k, fn in loops.items()}
        v = dict(t, **{k: (t[k + "2"] - t[k + "1"]) / (s2 - s1) for k in loops})
        return dict(v, **derive(v))

    used, clean, attempts = guard.rounds(one_round, args.rounds, describe)
    s = {k: spread(v[k] for v in used) for k in used[0] if not k[-1].isdigit()}
    busy, w, unit = "" if clean else BUSY, max(40, 1 + max(map(len, labels.values()))), "us" if chains else "ms"
    log(f"{'':<{w}} {unit + '/step median (range)':>28}" + (f" {'us/chain-step':>14}" if chains else ""))
    for k, label in labels.items():
        per_chain = f" {s[k]['median'] * 1e6 / chains:>14.1f}" if chains else ""
        log(f"{label:<{w}} {fmt_spread(s[k], **scale):>28}{per_chain}{busy}")
    return s, dict(steps=[s1, s2], backend=args.backend.name, clean=clean,
                   rounds=[dict(a.value, other_cores=a.other, waited_s=a.waited) for a in attempts])


def part_dln(args, guard) -> dict:
    device, C, backend = args.device, args.chains, args.backend
    model = make_dln(DLN_WIDTHS, DLN_RANK, seed=1).to(device)
    x, y = dln_dataset(model, 1000, seed=2, input_range=1.0).tensors
    batches = [(x[i:i + 100].to(device), y[i:i + 100].to(device)) for i in range(0, 1000, 100)]
    hyper = dict(lr=3e-4, nbeta=1000 / math.log(1000), gamma=1.0)
    loops = {"est": lambda s: run_estimate(args, model, batches, mse_loss, hyper, chains=C, steps=s)}
    for k, how in (("swap", "swap"), ("functional_call", "functional_call"), ("prepared", "swap")):
        fc = FlatChains(model, mse_loss, C, how)  # "prepared": the update prepared once, as llc_fast's own loop does
        loops[k] = lambda s, fc=fc, k=k: wall(lambda: hand_loop(fc, batches, s, backend, prepared=k == "prepared",
                                                                **hyper), device)
    title = (f"## (a) DLN {'-'.join(map(str, DLN_WIDTHS))} rank {DLN_RANK} (24 parameters), {C} chains, batch 100, "
             f"sgld lr={hyper['lr']:g} nbeta={hyper['nbeta']:.4g} gamma={hyper['gamma']:g}")
    s, run = marginal_rounds(args, guard, title, loops, args.dln_steps, lambda v: {
        name: v["est"] / v[k] if v[k] > 0 else math.nan for k, name in (
            ("swap", "ratio"), ("functional_call", "ratio_fc"), ("prepared", "ratio_prepared"))}, lambda v: (
        f"estimate_llc {v['est'] * 1e6:.1f} us/step, hand loop {v['swap'] * 1e6:.1f} us/step (functional_call "
        f"{v['functional_call'] * 1e6:.1f}, prepared update {v['prepared'] * 1e6:.1f}), ratio {v['ratio']:.2f}x"),
        dict(est="estimate_llc (sampling loop)", swap="hand loop: vmap grad (swap) + update",
             functional_call="hand loop: vmap grad (functional_call) + update",
             prepared="hand loop: vmap grad (swap) + prepared update"), warm=3, chains=C)
    log(f"estimate_llc / hand loop: {fmt_spread(s['ratio'], unit='x')} within each round; / the functional_call loop: "
        f"{s['ratio_fc']['median']:.2f}x; / the prepared-update loop: {s['ratio_prepared']['median']:.2f}x"
        + ("" if run["clean"] else BUSY))
    line = (f"DLN 24 params x {C} chains: estimate_llc {s['est']['median'] * 1e6:.0f} us/step vs hand loop "
            f"{s['swap']['median'] * 1e6:.0f} us ({s['ratio']['median']:.2f}x), prepared-update loop "
            f"{s['prepared']['median'] * 1e6:.0f} us ({s['ratio_prepared']['median']:.2f}x)")
    return dict(part="dln", model=f"DLN {'-'.join(map(str, DLN_WIDTHS))} rank {DLN_RANK}", params=24, chains=C,
                batch_size=100, hyper=hyper, estimate_llc_s_per_step=s["est"], hand_loop_s_per_step=s["swap"],
                hand_loop_functional_call_s_per_step=s["functional_call"], ratio=s["ratio"],
                ratio_vs_functional_call=s["ratio_fc"], hand_loop_prepared_s_per_step=s["prepared"],
                ratio_vs_prepared=s["ratio_prepared"], summary=line, **run)


def part_mlp(args, guard) -> dict:
    device, C, backend, b = args.device, args.mlp_chains, args.backend, args.batch_size
    model = mlp(args.mlp_widths, device)
    x, y, _ = mlp_data(args.mlp_widths, args.samples)
    batches = [(x[i:i + b].to(device), y[i:i + b].to(device)) for i in range(0, args.samples - b + 1, b)]
    hyper = dict(lr=1e-4, nbeta=args.samples / math.log(args.samples), gamma=1000.0)
    fc = FlatChains(model, ce_loss, C, "swap")
    loops = dict(est=lambda s: run_estimate(args, model, batches, ce_loss, hyper, chains=C, steps=s),
                 fb=lambda s: wall(lambda: fwd_bwd_loop(fc, batches, s), device),
                 upd=lambda s: wall(lambda: hand_loop(fc, None, s, backend, **hyper), device))
    title = (f"## (b) MLP {'-'.join(map(str, args.mlp_widths))} ({fc.numel:,} parameters), {C} chains, batch {b}, "
             f"sgld lr={hyper['lr']:g} gamma={hyper['gamma']:g}")
    s, run = marginal_rounds(args, guard, title, loops, args.mlp_steps, lambda v: dict(
        ratio=v["est"] / v["fb"] if v["fb"] > 0 else math.nan, rest=v["est"] - v["fb"] - v["upd"],
        outside=1 - v["fb"] / v["est"] if v["est"] > 0 else math.nan,
        update_share=v["upd"] / v["est"] if v["est"] > 0 else math.nan), lambda v: (
        f"estimate_llc step {v['est'] * 1e3:.2f} ms, fwd+bwd {v['fb'] * 1e3:.2f} ms, update {v['upd'] * 1e3:.2f} ms; "
        f"step / fwd+bwd {v['ratio']:.3f}x"), dict(
        est="estimate_llc step (sampling loop)", fb="vmapped forward+backward alone",
        upd="fused update alone ([C, N] buffers)", rest="rest (step - fwd+bwd - update)"), warm=2)
    log(f"step / fwd+bwd: {fmt_spread(s['ratio'], spec='.3f', unit='x')} within each round; outside forward/backward: "
        f"{fmt_spread(s['outside'], 100, '.1f', '%')} of the step; the update alone is "
        f"{s['update_share']['median']:.1%} of the step" + ("" if run["clean"] else BUSY))
    line = (f"MLP {fmt_params(fc.numel)}{'' if fc.numel >= 100_000 else '-parameter'} x {C} chains: step/fwd+bwd "
            f"{s['ratio']['median']:.2f}x, {s['outside']['median']:.0%} outside fwd+bwd")
    return dict(part="mlp", model=f"MLP {'-'.join(map(str, args.mlp_widths))}", params=fc.numel, chains=C,
                batch_size=b, hyper=hyper, estimate_llc_s_per_step=s["est"], fwd_bwd_s_per_step=s["fb"],
                update_s_per_step=s["upd"], rest_s_per_step=s["rest"], step_over_fwd_bwd=s["ratio"],
                outside_share=s["outside"], update_share=s["update_share"], summary=line, **run)


def part_lm(args, guard) -> dict:
    """A >= 1B-parameter causal LM on one GPU: seconds per step (marginal over two calls after a warm-up), the
    forward+backward passes alone of the engine that ran, peak memory against ``plan_memory``."""
    from llc_fast.distributed import model_spec, plan_memory
    from llc_fast.distributed.planner import FIXED_OVERHEAD

    device, C, (n1, n2), cuda = args.device, args.lm_chains, args.lm_steps, args.device.type == "cuda"
    shape, dtype = LM_QUICK if args.quick else LM_ARCHS[args.arch], getattr(torch, args.lm_dtype)
    seq, bs, attn = 16 if args.quick else 512, 2 if args.quick else 4, "sdpa" if cuda else "eager"
    t0 = time.perf_counter()
    model = causal_lm(args.arch, shape, seq_len=seq, attn=attn, dtype=dtype, device=device)
    n = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, shape[5], (bs, seq), generator=gen).to(device) for _ in range(4)]
    plan = plan_memory(model_spec(model), world_size=1, shard_group_size=1, param_dtype=dtype, sampler="sgld",
                       batch_size=bs, seq_len=seq, batched_chains=C,
                       capacity=torch.cuda.mem_get_info(device)[0] if cuda else None)
    log(f"## (c) {type(model).__name__} ({args.arch}), {n:,} parameters ({args.lm_dtype}), shape {shape} (layers, "
        f"width, MLP, heads, KV heads, vocabulary), attention {attn}, built in {time.perf_counter() - t0:.1f} s; "
        f"sgld lr={LM_HYPER['lr']:g} nbeta={LM_HYPER['nbeta']:g} gamma={LM_HYPER['gamma']:g}, {C} chains batched, "
        f"shared batches of {bs} x {seq} tokens, chain_batching='auto'; steps S1={n1}, S2={n2} (2 burn-in)")
    log("# plan_memory(model_spec(model), world_size=1, shard_group_size=1, ...):\n#   "
        + plan.table().replace("\n", "\n#   "))
    kw = dict(chains=C, burnin=2, chain_batching="auto", max_batched_chains=C)
    estimate(args, model, batches, lm_loss, LM_HYPER, steps=4, **kw)  # warm-up: kernel builds, cuBLAS handles
    r1 = estimate(args, model, batches, lm_loss, LM_HYPER, steps=n1, **kw)
    if cuda:
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    r2 = estimate(args, model, batches, lm_loss, LM_HYPER, steps=n2, **kw)
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    s1, s2, engine = r1.timing["sampling_s"], r2.timing["sampling_s"], r2.config["engine"]
    step = (s2 - s1) / (n2 - n1)
    log(f"timed calls: {n1} steps in {s1:.3f} s, {n2} steps in {s2:.3f} s (sampling loop); engine {engine}, backend "
        f"{r2.config['backend']}; llc {r2.llc_mean:.4g}" + "".join(f"\n  warning: {w}" for w in r2.caught))
    reps = 3 if args.quick else 5
    if engine == "vmap":  # forward+backward alone, the same passes as the engine that ran
        fc, how = FlatChains(model, lm_loss, C, "swap"), f"vmapped grad_and_value over [{C}, N]"
        passes = lambda k: fwd_bwd_loop(fc, batches, k)  # noqa: E731
    else:
        how = f"{C} x module forward + loss.backward()"
        passes = lambda k: module_passes(model, lm_loss, batches, k * C)  # noqa: E731
    passes(1)
    fb = wall(lambda: passes(reps), device) / reps
    outside = 1 - fb / step if step > 0 else math.nan
    row = dict(part="lm", model=type(model).__name__, arch=args.arch, params=n, chains=C, engine=engine,
               backend=r2.config["backend"], steps=[n1, n2], sampling_s=[s1, s2], s_per_step=step, fwd_bwd_how=how,
               fwd_bwd_s_per_step=fb, outside_share=outside, step_over_fwd_bwd=step / fb if fb > 0 else math.nan,
               plan_total=plan.total, plan_parts=dict(plan.parts), peak_allocated=peak, llc_mean=r2.llc_mean,
               warnings=r2.caught, clean=True, dtype=args.lm_dtype)
    log(f"seconds per step ({C} chains): {step:.4f} s ({step / C:.4f} s per chain-step); forward+backward alone "
        f"({how}): {fb:.4f} s per step; step / fwd+bwd {step / fb:.3f}x; outside forward/backward: {outside:.1%}")
    mem = "peak memory: not measured on the CPU"
    if peak is not None:
        no_ctx = plan.total - FIXED_OVERHEAD
        mem = f"peak {peak / GiB:.1f} GiB vs plan {plan.total / GiB:.1f} GiB ({peak / plan.total:.2f})"
        row.update(peak_reserved=torch.cuda.max_memory_reserved(device), peak_over_plan=peak / plan.total,
                   peak_over_plan_without_context=peak / no_ctx)
        log(f"peak memory allocated: {peak / GiB:.2f} GiB; plan_memory predicted {plan.total / GiB:.2f} GiB "
            f"({no_ctx / GiB:.2f} GiB without its 1 GiB for the CUDA context): measured / predicted = "
            f"{peak / plan.total:.2f} ({peak / no_ctx:.2f})")
    slow = sorted({m.group(1) for w in r2.caught for m in [re.search(r"batching rule for (aten::\w+)", w)] if m})
    size = f"{n / 1e9:.2f}B" if n >= 1e8 else fmt_params(n) + ("" if n >= 100_000 else "-parameter")
    return dict(row, vmap_fallbacks=slow, summary=f"{size} {args.arch} {args.lm_dtype}, {C} chains, engine {engine}: "
                f"{step:.3f} s/step, {outside:.0%} outside fwd+bwd, {mem}"  # vmap_fallbacks: ops run chain by chain
                + (f"; vmap fell back to a loop for {', '.join(slow)}" if slow else ""))


PARTS = {"dln": part_dln, "mlp": part_mlp, "lm": part_lm}


def bench(args, argv) -> int:
    args.backend = select_backend(args.backend, args.device)  # resolve "auto" once: both sides use this one
    guard = guard_for(args)
    header = begin("bench_overhead", args.device, argv, ("torch", "triton", "llc_fast") + (
        ("transformers",) if "lm" in args.parts else ()), backend=args.backend.name, parts=args.parts,
        rounds=args.rounds, quick=args.quick, dln_steps=list(args.dln_steps), mlp_steps=list(args.mlp_steps))
    log("# per step = (t(S2) - t(S1)) / (S2 - S1) within one round; estimate_llc: result.timing['sampling_s'] "
        "(shared batches, chain_batching='vmap'); hand loop / fwd+bwd / update: wall time, synchronized")
    log()
    rows = run_grid([dict(part=p) for p in args.parts], lambda p: (PARTS[p["part"]](args, guard), log())[0])
    return finish(args, header, rows, "; ".join(r["summary"] + ("" if r["clean"] else " (busy)") for r in rows))


def _steps(text: str) -> tuple[int, int]:
    a, b = (int(v) for v in text.split(","))
    if not 0 < a < b:
        raise argparse.ArgumentTypeError(f"need S1,S2 with 0 < S1 < S2, got {text!r}")
    return a, b


def options(ap) -> None:
    ap.add_argument("--parts", default="dln,mlp", help="comma-separated subset of dln,mlp,lm (default dln,mlp)")
    ap.add_argument("--backend", default="auto", help="the update backend of both sides (default: auto, i.e. cpu on "
                    "the CPU and cuda on a GPU)")
    ap.add_argument("--chains", type=int, default=8, help="chains of the DLN part")
    ap.add_argument("--dln-steps", type=_steps, metavar="S1,S2", help="step counts of the DLN part (default 100,500; "
                    "50,250 with --quick)")
    ap.add_argument("--mlp-widths", type=lambda s: tuple(int(v) for v in s.split(",")), default=MLP_WIDTHS)
    ap.add_argument("--mlp-chains", type=int, default=8)
    ap.add_argument("--samples", type=int, default=4096, help="samples of the MLP part")
    ap.add_argument("--batch-size", type=int, default=256, help="batch of the MLP part")
    ap.add_argument("--mlp-steps", type=_steps, metavar="S1,S2", help="step counts of the MLP part (default 5,25; 2,5 "
                    "with --quick)")
    ap.add_argument("--arch", default="llama", choices=sorted(LM_ARCHS), help="the LM part's shape: llama "
                    "(TinyLlama-1.1B) or gpt-neox (Pythia-1B)")
    ap.add_argument("--lm-chains", type=int, default=2, help="chains of the LM part, batched in one group")
    ap.add_argument("--lm-steps", type=_steps, metavar="S1,S2", help="step counts of the LM part, 2 of them burn-in "
                    "(default 5,13; 5,11 with --quick)")
    ap.add_argument("--lm-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--rounds", type=int, help="rounds per part (default 5; 1 with --quick)")
    ap.add_argument("--compile", action="store_true",
                    help="estimate_llc with compile_step=True (torch.compile of the batched forward/backward; the "
                         "compile, at the first step of each run, cancels in the marginal per-step time)")


def check(args, ap) -> None:
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if bad := [p for p in args.parts if p not in PARTS]:
        ap.error(f"unknown part {bad[0]!r}; choose from dln, mlp, lm")


main = cli(__doc__, options, bench, check=check, each="round", quick=dict(
    dln_steps=((100, 500), (50, 250)), mlp_steps=((5, 25), (2, 5)), lm_steps=((5, 13), (5, 11)), rounds=(5, 1),
    retry_busy=(2, 0)))

if __name__ == "__main__":
    raise SystemExit(main())
