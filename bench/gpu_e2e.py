"""Stage e of gpu_suite.sh: ``llc_fast.estimate_llc`` against devinterp 2.0.1 on a GPU, MLPs of ~1M and
~10M parameters with 16 and 64 chains, chain-steps per second of each and their ratio, in one run.

    python bench/gpu_e2e.py [--device cuda] [--models 784,1024,256,10 784,4096,1664,10] [--chains 16 64]
                            [--burnin 10] [--draws 40] [--batch-size 256] [--samples 4096] [--repeats 1]
                            [--quick] [--threads N] [--output e2e.json] [--log e2e.txt]

What is compared is ``bench_e2e.py``'s MLP case, on the device: the same model (trained a few Adam
steps on random labels, so that w* is not the initialisation), the same batches in the same order
(devinterp's first epoch, cycled; checked against the batch ids devinterp records), the same lr, nbeta,
gamma, chains, burn-in and draws, plain SGLD (devinterp's ``sgmcmc_sgld`` with ``localization=gamma``;
llc_fast with ``shared_batches=True``, as devinterp gives every chain the same batches). Both libraries
hold the model and its data on the device; llc_fast gets the batches as a list of device tensors,
devinterp its dataset of sample indices (its DataLoader and the copy of each index batch to the device
are part of its step, as for any devinterp user). Timing: wall seconds of each whole estimator call,
the device synchronized at the end, after an untimed warm-up call of each; the fastest of ``--repeats``.
Also reported: forward+backward passes per second of the model alone (one chain: the floor of a
sampler that runs chains one at a time, like devinterp) and of the vmapped forward+backward over all
chains (``bench_overhead.FlatChains``: the floor of a batched sampler), and both estimates with their
standard errors (ddof = 1, burn-in left out; devinterp's recomputed from its own trace and init loss).
``--quick``: toy sizes (a smoke run; its figures are not results). Exits 1 if devinterp is missing
(the llc_fast figures are still printed) or a call failed.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import shutil
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from harness import environment, loadavg, print_environment, set_threads, synchronize, transcript, write_results

import llc_fast  # noqa: E402  (harness puts the repository on sys.path)
from bench_e2e import (INIT_SEED, IdsDataset, _ce_loss, _ce_per_sample, _fmt_pm, _indexed, build_mlp,  # noqa: E402
                       _mean_se, _silence_devinterp_progress, devinterp_epoch)
from bench_overhead import FlatChains, fwd_bwd_loop, wall  # noqa: E402

MODELS = ("784,1024,256,10", "784,4096,1664,10")  # 1,068,810 and 10,049,418 parameters


def _size(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 100_000 else f"{n:,}"


def run_llc_fast(model, batches, *, chains, draws, burnin, hyper, init_batches, device) -> dict:
    synchronize(device)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = llc_fast.estimate_llc(model, batches, _ce_loss, sampler="sgld", **hyper, num_chains=chains,
                                  num_draws=draws, num_burnin_steps=burnin, num_init_loss_batches=init_batches,
                                  shared_batches=True, seed=0, progress=False)
    synchronize(device)
    seconds = time.perf_counter() - t0
    return dict(seconds=seconds, per_chain=np.asarray(r.llc_per_chain, dtype=np.float64), init_loss=r.init_loss,
                engine=r.config["engine"], backend=r.config["backend"], timing=r.timing, diverged=r.diverged_chains,
                warnings=sorted({str(w.message)[:200] for w in caught}))


def run_devinterp(model, ds, per_token_loss, *, chains, draws, burnin, hyper, batch_size, init_batches,
                  device) -> dict:
    from devinterp.slt.llc import compute_llc
    from devinterp.slt.sampling import sample

    tmp = Path(tempfile.mkdtemp(prefix="gpu_e2e_devinterp_"))
    try:
        synchronize(device)
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            samples = sample(model, ds, {}, lr=hyper["lr"], n_beta=hyper["nbeta"], loss_fn=per_token_loss,
                             num_chains=chains, num_draws=draws, batch_size=batch_size, num_burnin_steps=burnin,
                             num_steps_bw_draws=1, num_init_loss_batches=init_batches, init_seed=INIT_SEED,
                             localization=hyper["gamma"], sampling_method="sgmcmc_sgld", device=str(device),
                             output_path=tmp / "samples.zarr")
            res = compute_llc(samples).load()
        synchronize(device)
        seconds = time.perf_counter() - t0
        ids = np.asarray(samples.dataset.sampling_input_ids_micro.values)  # (chain, step, batch, L)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    trace = np.asarray(res.loss_trace.values, dtype=np.float64)
    init = float(res.init_loss)
    return dict(seconds=seconds, per_chain=hyper["nbeta"] * (trace[:, burnin:].mean(axis=1) - init), init_loss=init,
                input_ids=ids, warnings=sorted({str(w.message)[:200] for w in caught
                                                if not issubclass(w.category, DeprecationWarning)}))


def fwd_bwd_rate(model, batches, device, seconds: float) -> float:
    """Forward+backward passes per second of the model alone (one chain, no update), synchronized."""
    params = list(model.parameters())
    for k in range(3):
        _ce_loss(model, batches[k % len(batches)]).backward()
    synchronize(device)
    k, t0 = 0, time.perf_counter()
    while k < 5 or time.perf_counter() - t0 < seconds:
        _ce_loss(model, batches[k % len(batches)]).backward()
        k += 1
        if k % 10 == 0:
            synchronize(device)
    synchronize(device)
    rate = k / (time.perf_counter() - t0)
    for p in params:
        p.grad = None
    return rate


def vmap_fwd_bwd_rate(model, batches, chains: int, device, seconds: float) -> float:
    """Chain-steps per second of the vmapped forward+backward over ``chains`` rows alone."""
    fc = FlatChains(model, _ce_loss, chains, "swap")
    fwd_bwd_loop(fc, batches, 2)
    steps, total = 5, 0.0
    while True:
        total = wall(lambda: fwd_bwd_loop(fc, batches, steps), device)
        if total >= seconds or steps >= 4096:
            break
        steps *= 2
    del fc
    return chains * steps / total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if there is a GPU")
    ap.add_argument("--models", nargs="+", default=None, metavar="W0,W1,...",
                    help=f"MLP layer widths (default {' '.join(MODELS)}: ~1M and ~10M parameters)")
    ap.add_argument("--chains", nargs="+", type=int, default=None, help="chain counts (default 16 64)")
    ap.add_argument("--burnin", type=int, default=None, help="burn-in steps (default 10)")
    ap.add_argument("--draws", type=int, default=None, help="draws per chain (default 40)")
    ap.add_argument("--samples", type=int, default=None, help="data set size (default 4096)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 256")
    ap.add_argument("--train-steps", type=int, default=None, help="Adam steps before sampling (default 100)")
    ap.add_argument("--repeats", type=int, default=1, help="timed calls per library and case, the fastest reported")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no further case once this many seconds have passed (those left are reported as not "
                         "run); the results so far are written after every case")
    ap.add_argument("--quick", action="store_true", help="toy sizes: a smoke run (the suite's --dry-run)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads on the CPU; default: all cores")
    ap.add_argument("--output", type=Path, help="write the results as JSON")
    ap.add_argument("--log", type=Path, metavar="FILE.txt", help="also write everything printed to FILE.txt")
    args = ap.parse_args(argv)
    q = args.quick
    defaults = dict(models=["16,32,4"] if q else list(MODELS), chains=[2, 4] if q else [16, 64],
                    burnin=1 if q else 10, draws=3 if q else 40, samples=256 if q else 4096,
                    batch_size=32 if q else 256, train_steps=5 if q else 100)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: this torch has no CUDA device")
    with transcript(args.log, argv):
        return bench(args, argv)


def bench(args, argv) -> int:
    set_threads(args.threads)
    device = torch.device(args.device)

    def log(line=""):
        print(line, flush=True)

    t_import = time.perf_counter()
    devinterp_error = None
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            import devinterp  # noqa: F401
            import devinterp.slt.sampling  # noqa: F401
        _silence_devinterp_progress()
    except Exception as e:
        devinterp_error = f"{type(e).__name__}: {e}"
    t_import = time.perf_counter() - t_import
    packages = ("torch", "llc_fast", "devinterp")
    header = environment(device, argv, packages, quick=args.quick, repeats=args.repeats, chains=args.chains,
                         burnin=args.burnin, draws=args.draws, batch_size=args.batch_size, samples=args.samples)
    print_environment("gpu_e2e", header, packages, log=log)
    if devinterp_error:
        log(f"# devinterp cannot be imported ({devinterp_error}): only llc_fast is timed; carry its wheels "
            "(bench/README.md, GPU suite)")
    else:
        log(f"# devinterp import {t_import:.1f} s (not timed)")
    log()

    rows, failures = [], []
    t_all = time.perf_counter()
    for spec in args.models:
        widths = tuple(int(v) for v in spec.split(","))
        t0 = time.perf_counter()
        model, x, y, train_loss = build_mlp(widths, args.samples, args.batch_size, args.train_steps, device)
        params = sum(p.numel() for p in model.parameters())
        rows_ids, to_batch, per_token = _indexed(x, y, _ce_per_sample)
        ds = IdsDataset(rows_ids)
        epoch_ids = devinterp_epoch(ds, args.batch_size, INIT_SEED)
        batches = [to_batch(ids) for ids in epoch_ids]
        init_batches = min(16, len(batches))
        hyper = dict(lr=1e-4, nbeta=args.samples / math.log(args.samples), gamma=1000.0)
        log(f"## MLP {spec}: {params:,} parameters on {device}, trained {args.train_steps} Adam steps (loss "
            f"{train_loss:.4f}); {args.samples} samples, batch {args.batch_size}; lr={hyper['lr']:g}, "
            f"nbeta={hyper['nbeta']:.4g}, gamma={hyper['gamma']:g}; {args.burnin} burn-in + {args.draws} draws")
        one = fwd_bwd_rate(model, batches, device, 0.5 if args.quick else 1.0)
        log(f"  fwd+bwd alone, one chain: {one:.1f} passes/s")
        for chains in args.chains:
            steps = args.burnin + args.draws
            if args.budget_s is not None and time.perf_counter() - t_all > args.budget_s:
                log(f"  {chains} chains: not run (--budget-s {args.budget_s:g} spent)")
                failures.append(f"{spec} x{chains} not run (time budget)")
                continue
            kw = dict(chains=chains, draws=args.draws, burnin=args.burnin, hyper=hyper, init_batches=init_batches,
                      device=device)
            row = dict(model=f"MLP {spec}", params=params, chains=chains, steps=steps, fwd_bwd_one_chain_per_s=one)
            try:
                row["vmap_fwd_bwd_chain_steps_per_s"] = vmap_fwd_bwd_rate(model, batches, chains, device,
                                                                          0.3 if args.quick else 1.0)
                run_llc_fast(model, batches, **dict(kw, draws=2, burnin=0))  # warm-up
                fast = min((run_llc_fast(model, batches, **kw) for _ in range(args.repeats)),
                           key=lambda o: o["seconds"])
            except Exception as e:
                traceback.print_exc()
                failures.append(f"llc_fast {spec} x{chains}: {type(e).__name__}: {e}")
                rows.append(row)
                continue
            f_mean, f_se = _mean_se(fast["per_chain"])
            row["llc_fast"] = dict(seconds=fast["seconds"], chain_steps_per_s=chains * steps / fast["seconds"],
                                   sampling_chain_steps_per_s=fast["timing"]["steps_per_s"], llc_mean=f_mean,
                                   llc_se=f_se, engine=fast["engine"], backend=fast["backend"],
                                   init_loss=fast["init_loss"], diverged=fast["diverged"], warnings=fast["warnings"])
            line = (f"  {chains} chains: llc_fast {fast['seconds']:.2f} s ({row['llc_fast']['chain_steps_per_s']:.0f} "
                    f"chain-steps/s, engine {fast['engine']}, backend {fast['backend']}; vmapped fwd+bwd alone "
                    f"{row['vmap_fwd_bwd_chain_steps_per_s']:.0f}/s)")
            if devinterp_error is None:
                try:
                    if not args.quick:  # warm-up (the quick run's devinterp calls are all cold)
                        run_devinterp(model, ds, per_token, **dict(kw, chains=1, draws=2, burnin=0),
                                      batch_size=args.batch_size)
                    dev = min((run_devinterp(model, ds, per_token, **kw, batch_size=args.batch_size)
                               for _ in range(args.repeats)), key=lambda o: o["seconds"])
                except Exception as e:
                    traceback.print_exc()
                    failures.append(f"devinterp {spec} x{chains}: {type(e).__name__}: {e}")
                    log(line)
                    rows.append(row)
                    continue
                expect = torch.stack([epoch_ids[t % len(epoch_ids)] for t in range(steps)]).numpy()
                same = bool(all(np.array_equal(dev["input_ids"][c], expect) for c in range(chains)))
                d_mean, d_se = _mean_se(dev["per_chain"])
                d_rate = chains * steps / dev["seconds"]
                agree = abs(f_mean - d_mean) / math.sqrt(f_se ** 2 + d_se ** 2) if (f_se > 0 or d_se > 0) else math.nan
                row["devinterp"] = dict(seconds=dev["seconds"], chain_steps_per_s=d_rate, llc_mean=d_mean, llc_se=d_se,
                                        init_loss=dev["init_loss"], warnings=dev["warnings"])
                row.update(speedup=row["llc_fast"]["chain_steps_per_s"] / d_rate, agreement_sigma=agree,
                           same_batches=same, bound_one_chain=one / d_rate)
                line += (f", devinterp {dev['seconds']:.2f} s ({d_rate:.0f} chain-steps/s): {row['speedup']:.2f}x; "
                         f"llc {_fmt_pm(f_mean, f_se)} vs {_fmt_pm(d_mean, d_se)} ({agree:.2f} sigma), same batches: "
                         f"{'yes' if same else 'NO'}")
            log(line)
            rows.append(row)
            if args.output:  # so far: a stage stopped at its time cap still leaves these
                write_results(args.output, dict(header, partial=True), rows)
        log(f"  ({time.perf_counter() - t0:.0f} s for this model)")
        del model, x, y, batches
        if device.type == "cuda":
            torch.cuda.empty_cache()
    header["loadavg_end"] = loadavg()
    header["total_s"] = time.perf_counter() - t_all

    log()
    log("# chain-steps/s = chains x (burn-in + draws) / wall seconds of the whole estimator call (L(w*), set-up and "
        "result included);")
    log("# speedup = llc_fast / devinterp; fwd+bwd 1-chain = passes/s of the model alone; vmap fwd+bwd = chain-steps/s "
        "of the batched pass alone")
    head = (f"{'model':<22} {'params':>11} {'chains':>6} {'steps':>5} {'llc_fast/s':>10} {'devinterp/s':>11} "
            f"{'speedup':>8} {'fwd+bwd 1ch/s':>13} {'vmap fwd+bwd/s':>14} {'λ̂ llc_fast':>16} {'λ̂ devinterp':>16} "
            f"{'agree':>6}")
    log(head)
    log("-" * len(head))
    for r in rows:
        f, d = r.get("llc_fast"), r.get("devinterp")
        fast = f"{f['chain_steps_per_s']:.0f}" if f else "failed"
        dev = f"{d['chain_steps_per_s']:.0f}" if d else "-"
        speed = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        agree = f"{r['agreement_sigma']:.2f}σ" if "speedup" in r else "-"
        llc_f = _fmt_pm(f["llc_mean"], f["llc_se"]) if f else "-"
        llc_d = _fmt_pm(d["llc_mean"], d["llc_se"]) if d else "-"
        log(f"{r['model']:<22} {r['params']:>11,} {r['chains']:>6} {r['steps']:>5} {fast:>10} {dev:>11} {speed:>8} "
            f"{r['fwd_bwd_one_chain_per_s']:>13.0f} {r.get('vmap_fwd_bwd_chain_steps_per_s', math.nan):>14.0f} "
            f"{llc_f:>16} {llc_d:>16} {agree:>6}")
    log(f"# load average at end: {header['loadavg_end']}; total {header['total_s']:.0f} s")
    if args.output:
        write_results(args.output, header, rows)
    parts = [f"{_size(r['params'])} x{r['chains']}: " + (f"{r['speedup']:.2f}x" if "speedup" in r else "no ratio")
             for r in rows]
    quick = "[quick: not a result] " if args.quick else ""
    if devinterp_error:
        failures.append(f"devinterp not importable ({devinterp_error})")
    if failures:
        print("SUMMARY: FAILED: " + quick + "; ".join(failures)[:400] + "; " + ", ".join(parts))
        return 1
    print("SUMMARY: " + quick + "llc_fast / devinterp chain-steps/s: " + ", ".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
