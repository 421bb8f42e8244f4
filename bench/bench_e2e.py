"""End to end against devinterp 2.0.1: the same LLC estimate, timed in both libraries, on the CPU or a GPU.

    .venv/bin/python bench/bench_e2e.py [--device cpu|cuda] [--quick] [--cases dln,mlp,...|gpu] [...: --help]

The grid: case (``CASES``; ``--cases gpu``, the default on CUDA: gpu_suite.sh's stage e, ``GPU``) x chains. Each
point runs ``llc_fast.estimate_llc`` and devinterp's estimator (``models.run_devinterp``) on the same model, batches
and hyperparameters, beside the floors (forward+backward alone): bench/README.md, "End to end against devinterp".
Exits 1 if devinterp is missing or a call failed.
"""
from __future__ import annotations

import math
import time
import traceback
from types import SimpleNamespace

import numpy as np
import torch

from harness import (Table, begin, cli, fill_defaults, finish, guard_for, log, recorded_warnings, synchronize,
                     write_results)

import llc_fast  # noqa: E402  (harness puts the repository on sys.path)
from llc_fast.oracles import (dln_dataset, dln_learning_coefficient, make_dln, make_regression_example,  # noqa: E402
                              mse_loss, quadratic_sgld_expectation)
from models import (IdsDataset, FlatChains, ce_loss, ce_per_sample, devinterp_epoch, fmt_pm, fmt_params,  # noqa
                    fwd_bwd_loop, gpt2, hf_dataset, import_devinterp, indexed, lm_loss, loader_seconds_per_batch,
                    mean_se, module_passes, mse_per_sample, passes_per_second, run_devinterp, trained_mlp, MLP_WIDTHS)

DLN_WIDTHS, DLN_RANK = (8, 4, 8), 2
GPU_MLPS = ("784,1024,256,10", "784,4096,1664,10")  # 1,068,810 and 10,049,418 parameters
# {option: (default, default with --quick)}: the GPU campaign's grid (--cases gpu), then every run's
GPU = dict(mlp_widths=(list(GPU_MLPS), ["16,32,4"]), chains=([16, 64], [2, 4]), burnin=(10, 1), draws=(40, 3),
           train_steps=(100, 5), repeats=(1, 1), samples=(4096, 256), batch_size=(256, 32))
DEFAULTS = dict(mlp_widths=([",".join(map(str, MLP_WIDTHS))],) * 2, samples=(4096, 4096), batch_size=(256, 256),
                repeats=(2, 1), retries=(4, 0), train_steps=(300, 20))


class Case(SimpleNamespace):
    """One model, its data and the hyperparameters both libraries get: key, title, model; rows: devinterp's
    ``input_ids`` rows ([N, L] int64: sample indices [i, i], or token ids); to_batch: an ``input_ids`` batch ->
    the batch llc_fast's loss_fn takes; per_token_loss: devinterp's loss_fn(model, input_ids) -> (batch, L - 1),
    None = its default LM loss; batch_size, lr, nbeta, gamma, chains, init_batches; draws, burnin: (default, default
    with --quick), unless --draws, --burnin; reference."""

    def __init__(self, key, title, model, rows, to_batch, loss_fn, per_token_loss, **kw):
        super().__init__(key=key, title=title, model=model, rows=rows, to_batch=to_batch, loss_fn=loss_fn,
                         per_token_loss=per_token_loss, **dict(dict(init_batches=16, reference=None, reference_note="",
                                                                    notes=[]), **kw))
        self.num_params = sum(p.numel() for p in model.parameters())


def case_regression(args, spec=None) -> Case:
    model, data = make_regression_example()
    x, y = data.tensors
    rows, to_batch, per_token = indexed(x.to(args.device), y.to(args.device), mse_per_sample)
    n, lr, gamma = x.shape[0], 0.002, 1.0
    nbeta = n / math.log(n)
    # K(w) = mse(w) - mse(w*) = 1/2 (w - w*)^T H (w - w*), H = 2 [[E x^2, E x], [E x, 1]]
    xs = x.double().squeeze(1)
    hess = 2 * torch.tensor([[float((xs ** 2).mean()), float(xs.mean())], [float(xs.mean()), 1.0]], dtype=torch.float64)
    ref = quadratic_sgld_expectation(torch.linalg.eigvalsh(hess).numpy(), nbeta, gamma, lr)
    return Case("regression", "y=3x+2 regression", model.to(args.device), rows, to_batch, mse_loss, per_token,
                batch_size=n, lr=lr, nbeta=nbeta, gamma=gamma, chains=4, draws=(2000, 200), burnin=(500, 100),
                init_batches=1, reference=ref, reference_note="stationary E[nbeta K] of the discretised chain (exact)")


def case_dln(args, spec=None) -> Case:
    model = make_dln(DLN_WIDTHS, DLN_RANK, seed=1).to(args.device)
    n = 10_000
    x, y = dln_dataset(model, n, seed=2, input_range=1.0).tensors
    rows, to_batch, per_token = indexed(x.to(args.device), y.to(args.device), mse_per_sample)
    return Case("dln", f"DLN {'-'.join(map(str, DLN_WIDTHS))} rank {DLN_RANK}", model, rows, to_batch, mse_loss,
                per_token, batch_size=500, lr=3e-4, nbeta=n / math.log(n), gamma=1.0, chains=4, draws=(2000, 200),
                burnin=(1000, 100), reference=float(dln_learning_coefficient(DLN_WIDTHS, DLN_RANK).llc),
                reference_note="Aoyagi's learning coefficient (n -> infinity)")


def case_mlp(args, spec: str) -> Case:
    widths = tuple(int(v) for v in spec.split(","))
    n, batch = args.samples, args.batch_size
    model, x, y, train_loss = trained_mlp(widths, n, batch, args.train_steps, args.device)
    rows, to_batch, per_token = indexed(x, y, ce_per_sample)
    title = "MLP " + ("-".join(map(str, widths)) if args.device.type == "cpu" else spec)
    return Case("mlp", title, model, rows, to_batch, ce_loss, per_token, batch_size=batch, lr=1e-4,
                nbeta=n / math.log(n), gamma=1000.0, chains=8, draws=(200, 10), burnin=(50, 2),
                notes=[f"MLP trained {args.train_steps} Adam steps on random labels: full-data loss {train_loss:.4f}"])


def case_gpt2(args, spec=None) -> Case:
    vocab, seq, n_seq = 512, 33, 512
    model = gpt2(2, 4, 128, 64, vocab, args.device).train()
    rows = torch.randint(0, vocab, (n_seq, seq), generator=torch.Generator().manual_seed(1))
    return Case("gpt2", f"GPT-2 2L d128 V{vocab}", model, rows, lambda ids: ids.to(args.device), lm_loss, None,
                batch_size=16, lr=1e-3, nbeta=30.0, gamma=300.0, chains=4, draws=(200, 10), burnin=(20, 2))


CASES = {"regression": case_regression, "dln": case_dln, "mlp": case_mlp, "gpt2": case_gpt2}


def run_llc_fast(case: Case, batches: list, *, chains: int, draws: int, burnin: int, device) -> dict:
    synchronize(device)
    t0 = time.perf_counter()
    with recorded_warnings() as caught:
        r = llc_fast.estimate_llc(case.model, batches, case.loss_fn, sampler="sgld", lr=case.lr, nbeta=case.nbeta,
                                  gamma=case.gamma, num_chains=chains, num_draws=draws, num_burnin_steps=burnin,
                                  num_init_loss_batches=case.init_batches, shared_batches=True, seed=0,
                                  progress=False)
    synchronize(device)
    return dict(seconds=time.perf_counter() - t0, per_chain=np.asarray(r.llc_per_chain, dtype=np.float64),
                init_loss=r.init_loss, engine=r.config["engine"], backend=r.config["backend"], timing=r.timing,
                diverged=r.diverged_chains, warnings=caught)


def best_of(args, guard, fn, cost):
    """``--repeats`` calls other processes left alone (up to ``--retries`` more), the cheapest; if none was left
    alone, the cheapest of all, marked not clean. Returns (it, every call)."""
    runs = guard.run(fn, want=args.repeats)
    outs = [dict(a.value, other_cores=a.other, waited_s=a.waited) for a in runs]
    clean = [o for o, a in zip(outs, runs) if guard.clean(a)]
    return dict(min(clean or outs, key=cost), clean=bool(clean)), outs


def timed(args, guard, fn, chain_steps: int, keep) -> dict:
    """The fastest clean call of ``fn`` (``best_of``): its seconds, chain-steps/s, λ̂ ± se, every call's
    seconds, other cores and λ̂, and the ``keep`` entries of its result."""
    best, outs = best_of(args, guard, fn, lambda o: o["seconds"])
    mean, se = mean_se(best["per_chain"])
    return dict(seconds=best["seconds"], steps_per_s=chain_steps / best["seconds"], llc_mean=mean, llc_se=se,
                llc_per_chain=best["per_chain"].tolist(), all_seconds=[o["seconds"] for o in outs],
                all_other_cores=[o["other_cores"] for o in outs],
                llc_mean_per_repeat=[mean_se(o["per_chain"])[0] for o in outs],
                calls=", ".join(f"{o['seconds']:.2f}" for o in outs),
                **{k: best[k] for k in (*keep, "clean", "warnings", "other_cores", "waited_s")})


def start_case(args, guard, key: str, spec) -> Case:
    """Case ``key`` (``spec``: the MLP's widths) with the batches devinterp reads, the model's forward+backward
    passes per second alone (one chain, no update: either library's floor) and the DataLoaders' cost per batch."""
    case = CASES[key](args, spec)
    case.draws = args.draws if args.draws is not None else case.draws[args.quick]
    case.burnin = args.burnin if args.burnin is not None else case.burnin[args.quick]
    log(f"## {case.title}: {case.num_params:,} parameters on {args.device.type}, {case.rows.shape[0]} samples, "
        f"batch {case.batch_size}, lr={case.lr:g}, nbeta={case.nbeta:.4g}, gamma={case.gamma:g}, "
        f"{case.burnin} burn-in + {case.draws} draws")
    for note in case.notes:
        log(f"  {note}")
    case.ds = IdsDataset(case.rows)
    case.epoch_ids = devinterp_epoch(case.ds, case.batch_size)
    case.batches = [case.to_batch(ids) for ids in case.epoch_ids]
    case.init_batches = min(case.init_batches, len(case.batches))
    case.floor = best_of(args, guard, lambda: dict(rate=passes_per_second(lambda k: module_passes(
        case.model, case.loss_fn, case.batches, k), args.device, 0.5 if args.quick else 1.0)), lambda o: -o["rate"])[0]
    log(f"  fwd+bwd alone, one chain: {case.floor['rate']:.1f} passes/s")
    nb = min(64, 4 * len(case.epoch_ids))
    case.loader_s = min(loader_seconds_per_batch(case.ds, case.batch_size, nb) for _ in range(3))
    try:
        hf = hf_dataset(case.rows)
        case.hf_loader_s = min(loader_seconds_per_batch(hf, case.batch_size, nb) for _ in range(3))
    except Exception:  # datasets missing: devinterp is missing too, and says so
        case.hf_loader_s = math.nan
    return case


def measure(args, guard, case: Case, chains: int, dev_ok: bool) -> dict:
    """One point: both libraries timed, the batches checked, the floors beside them."""
    draws, burnin, device = case.draws, case.burnin, args.device
    steps = burnin + draws  # forward passes per chain, in both libraries
    fc = FlatChains(case.model, case.loss_fn, chains, "swap")  # the vmapped forward+backward alone
    vmap_rate = chains * passes_per_second(lambda k: fwd_bwd_loop(fc, case.batches, k), device,
                                           0.3 if args.quick else 1.0)
    dkw = dict(lr=case.lr, nbeta=case.nbeta, gamma=case.gamma, batch_size=case.batch_size,
               init_batches=case.init_batches, device=device)
    # warm-up (untimed): the C++/CUDA kernel, the vmapped pass, devinterp's code paths
    run_llc_fast(case, case.batches, chains=chains, draws=2, burnin=0, device=device)
    if dev_ok:
        run_devinterp(case.model, case.ds, case.per_token_loss, chains=1, draws=2, burnin=0, **dkw)
    # the estimates do not change between calls: both libraries seed their chains
    fast = timed(args, guard, lambda: run_llc_fast(case, case.batches, chains=chains, draws=draws, burnin=burnin,
                                                   device=device), chains * steps,
                 ("init_loss", "engine", "backend", "timing", "diverged"))
    row = dict(case=case.key, model=case.title, params=case.num_params, chains=chains, burnin=burnin, draws=draws,
               steps=steps, batch_size=case.batch_size, num_batches_per_epoch=len(case.batches), lr=case.lr,
               nbeta=case.nbeta, gamma=case.gamma, init_loss_batches=case.init_batches, llc_fast=fast,
               fwd_bwd=dict(steps_per_s=case.floor["rate"], other_cores=case.floor["other_cores"],
                            clean=case.floor["clean"]), vmap_fwd_bwd_steps_per_s=vmap_rate,
               reference=case.reference, reference_note=case.reference_note, notes=case.notes)
    line = (f"  {chains} chains: llc_fast {fast['seconds']:.2f} s ({fast['steps_per_s']:.1f} steps/s, engine "
            f"{fast['engine']}, backend {fast['backend']}; calls {fast['calls']} s)")
    if dev_ok:
        dev = timed(args, guard, lambda: run_devinterp(case.model, case.ds, case.per_token_loss, chains=chains,
                                                       draws=draws, burnin=burnin, **dkw), chains * steps,
                    ("init_loss", "own_llc_mean", "own_llc_std", "input_ids"))
        # devinterp read exactly the batches llc_fast was given (cycled first epoch, same for every chain)
        expect = torch.stack([case.epoch_ids[t % len(case.epoch_ids)] for t in range(steps)]).numpy()
        ids = dev.pop("input_ids")
        same = bool(all(np.array_equal(ids[c], expect) for c in range(chains)))
        row["devinterp"] = dict(dev, own_llc_mean_with_burnin=dev.pop("own_llc_mean"),
                                own_llc_std_ddof0=dev.pop("own_llc_std"), loader_s_per_batch=case.loader_s,
                                hf_loader_s_per_batch=case.hf_loader_s)
        f_se, d_se = fast["llc_se"], dev["llc_se"]
        agree = abs(fast["llc_mean"] - dev["llc_mean"]) / math.sqrt(f_se ** 2 + d_se ** 2) \
            if f_se > 0 or d_se > 0 else math.nan
        row.update(speedup=fast["steps_per_s"] / dev["steps_per_s"], agreement_sigma=agree, same_batches=same)
        line += (f", devinterp {dev['seconds']:.2f} s ({dev['steps_per_s']:.1f} steps/s; calls {dev['calls']} s); "
                 f"speedup {row['speedup']:.2f}x; llc {fast['llc_mean']:.4g} vs {dev['llc_mean']:.4g}")
    log(line)
    return row


def table_row(r: dict) -> dict:
    """A result row flattened for the table."""
    f, d, fb = r["llc_fast"], r.get("devinterp"), r["fwd_bwd"]["steps_per_s"]
    oth = "/".join(("-" if o["other_cores"] is None else f"{o['other_cores']:.2f}") + ("" if o["clean"] else "!")
                   for o in (r["fwd_bwd"], f, d or r["fwd_bwd"]))
    return dict(r, fast=f["steps_per_s"], dev=d and d["steps_per_s"], llc_f=fmt_pm(f["llc_mean"], f["llc_se"]),
                llc_d=d and fmt_pm(d["llc_mean"], d["llc_se"]), fb=fb, bound=d and fb / d["steps_per_s"], other=oth)


TABLE = (("model", 0, lambda v: f"{v:<22}", f"{'model':<22}"), ("params", 11, ","), ("chains", 6, "d"),
         ("steps", 6, "d"), ("fast", 13, ".1f", "llc_fast st/s"), ("dev", 14, ".1f", "devinterp st/s"),
         ("speedup", 8, lambda v: f"{v:.2f}x"), ("llc_f", 18, "s", "λ̂ llc_fast ± se"),
         ("llc_d", 19, "s", "λ̂ devinterp ± se"), ("agreement_sigma", 6, lambda v: f"{v:.2f}σ", "agree"),
         ("fb", 12, ".1f", "fwd+bwd st/s"), ("bound", 7, lambda v: f"{v:.2f}x"),
         ("vmap_fwd_bwd_steps_per_s", 14, ".0f", "vmap fwd+bwd/s"), ("other", 15, "s"))


def report(rows: list[dict], args) -> None:
    log("\n# st/s = chains x (burn-in + draws) / wall seconds of the whole estimator call (fastest of "
        f"{args.repeats} uncontended call{'s' if args.repeats > 1 else ''}, up to {args.retries} retries); speedup = "
        "llc_fast / devinterp\n# λ̂ ± se: mean over chains ± std (ddof=1) / sqrt(chains), burn-in excluded in both; "
        "agree = |diff| / sqrt(se1² + se2²)\n# fwd+bwd st/s = forward+backward passes per second of the model alone "
        "(no update, one chain); bound = fwd+bwd st/s / devinterp st/s,\n#   the speedup a sampler that cost nothing "
        "but the forward and backward passes would reach; vmap fwd+bwd/s = chain-steps/s of the vmapped pass over "
        "all chains alone\n# other = cores other processes kept busy during the reported fwd+bwd / llc_fast / "
        f"devinterp measurement; ! = every try had >= {args.busy} (contended: that figure is unreliable)")
    Table(*TABLE).print([table_row(r) for r in rows])
    log()
    for r in rows:
        f, d = r["llc_fast"], r.get("devinterp")
        tail = (f"; llc_fast warnings: {'; '.join(sorted(set(f['warnings'])))}" if f["warnings"] else "") \
            + (f"; diverged chains {f['diverged']}" if f["diverged"] else "")
        if d is None:
            log(f"# {r['case']} x{r['chains']}: llc_fast engine {f['engine']}, backend {f['backend']}{tail}")
            continue
        ref = "" if r["reference"] is None else f"; reference {r['reference']:.4g} ({r['reference_note']})"
        log(f"# {r['case']} x{r['chains']}: same batches in both: {'yes' if r['same_batches'] else 'NO'}; init loss "
            f"{f['init_loss']:.6g} (llc_fast) / {d['init_loss']:.6g} (devinterp); devinterp's own llc_mean "
            f"{d['own_llc_mean_with_burnin']:.4g} (burn-in averaged in), llc_std {d['own_llc_std_ddof0']:.3g} "
            f"(ddof 0){ref}")
        log(f"#   llc_fast engine {f['engine']}, backend {f['backend']}, sampling {f['timing']['steps_per_s']:.1f} st/s "
            f"without init loss; devinterp's DataLoader costs {d['loader_s_per_batch'] * 1e3:.2f} ms per batch "
            f"({d['loader_s_per_batch'] * d['steps_per_s']:.0%} of its step; over a HuggingFace Dataset of the same "
            f"rows it would be {d['hf_loader_s_per_batch'] * 1e3:.2f} ms)" + tail
            + (f"; devinterp warnings: {'; '.join(d['warnings'])}" if d["warnings"] else ""))


def bench(args, argv) -> int:
    t_import, dev_error = import_devinterp()
    header = begin("bench_e2e", args.device, argv, ("torch", "llc_fast", "devinterp"), quick=args.quick,
                   repeats=args.repeats, retries=args.retries, busy_threshold=args.busy, cases=args.cases,
                   chains=args.chains, burnin=args.burnin, draws=args.draws)
    log(f"# torch threads are the same for both libraries (torch.set_num_threads); devinterp import {t_import:.1f} s "
        "(not timed)" if dev_error is None else f"# devinterp cannot be imported ({dev_error}): only llc_fast is "
        "timed; carry its wheels (bench/README.md, GPU suite)")
    log()
    guard, rows, failures = guard_for(args), [], []
    guard.retries, guard.busy, guard.log = args.retries if args.device.type == "cpu" else 0, args.busy, None
    args.t_start = time.perf_counter()  # the time budget's start, after devinterp's import
    for key, spec in [(k, s) for k in args.cases for s in (args.mlp_widths if k == "mlp" else [None])]:
        case = start_case(args, guard, key, spec)
        for chains in args.chains or [case.chains]:  # the grid: case x chains
            if args.budget_s is not None and time.perf_counter() - args.t_start > args.budget_s:
                log(f"  {chains} chains: not run (--budget-s {args.budget_s:g} spent)")
                failures.append(f"{case.title} x{chains} not run (time budget)")
                continue
            try:
                rows.append(measure(args, guard, case, chains, dev_error is None))
            except Exception as e:
                traceback.print_exc()
                failures.append(f"{case.title} x{chains}: {type(e).__name__}: {str(e)[:200]}")
                continue
            write_results(args.output, dict(header, partial=True), rows)  # a run stopped at its cap still leaves these
    report(rows, args)
    parts = ", ".join(f"{fmt_params(r['params'])} x{r['chains']}: " + (f"{r['speedup']:.2f}x" if "speedup" in r
                                                                        else "no ratio") for r in rows)
    failures += [f"devinterp not importable ({dev_error})"] if dev_error else []
    line = (f"FAILED: {'; '.join(failures)[:400]}; " if failures else "llc_fast / devinterp chain-steps/s: ") + parts
    return finish(args, header, rows, line, wall_key="total_s", code=1 if failures else 0)


def options(ap) -> None:
    ap.add_argument("--cases", help=f"comma-separated subset of {','.join(CASES)}, or 'gpu': the GPU campaign's grid "
                    "(the MLP at ~1M and ~10M parameters x 16 and 64 chains; toy sizes with --quick); default: every "
                    "case on the CPU, gpu on CUDA")
    ap.add_argument("--mlp-widths", nargs="+", metavar="W0,W1,...", help="the MLP case's layer widths, one case each "
                    f"(default {','.join(map(str, MLP_WIDTHS))}; on CUDA {' '.join(GPU_MLPS)})")
    ap.add_argument("--chains", nargs="+", type=int, help="chain counts, each a point of the grid (default: each "
                    "case's own; 16 64 on CUDA)")
    ap.add_argument("--burnin", type=int, help="burn-in steps (default: each case's own; 10 on CUDA)")
    ap.add_argument("--draws", type=int, help="draws per chain (default: each case's own; 40 on CUDA)")
    ap.add_argument("--samples", type=int, help="samples of the MLP case (default 4096)")
    ap.add_argument("--batch-size", type=int, help="batch of the MLP case (default 256)")
    ap.add_argument("--train-steps", type=int, help="Adam steps of the MLP before sampling (default 300, 20 with "
                    "--quick; 100 on CUDA)")
    ap.add_argument("--repeats", type=int, help="timed calls per library and point, the fastest reported (default: 2, "
                    "1 with --quick or on CUDA)")
    ap.add_argument("--retries", type=int, help="extra calls allowed when other processes kept >= --busy cores busy "
                    "during a call (default: 4, 0 with --quick)")
    ap.add_argument("--busy", type=float, default=0.3, metavar="CORES",
                    help="a timed call during which other processes kept this many cores busy is retried")
    ap.add_argument("--budget-s", type=float, help="start no further point once this many seconds have passed (those "
                    "left are reported as not run); the results so far are written after every point")


def check(args, ap) -> None:
    if args.cases == "gpu" or (args.cases is None and args.device.type == "cuda"):
        args.cases = "mlp"
        fill_defaults(args, GPU)
    args.cases = [k.strip() for k in (args.cases or ",".join(CASES)).split(",") if k.strip()]
    fill_defaults(args, DEFAULTS)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if bad := [k for k in args.cases if k not in CASES]:
        ap.error(f"unknown case {bad[0]!r}; choose from {', '.join(CASES)}, or gpu")


main = cli(__doc__, options, bench, check=check, each="timed call", retry_busy=False)

if __name__ == "__main__":
    raise SystemExit(main())
