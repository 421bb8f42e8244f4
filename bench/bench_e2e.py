"""End to end against devinterp 2.0.1: the same LLC estimate, timed in both libraries.

    .venv/bin/python bench/bench_e2e.py [--quick] [--threads N] [--cases regression,dln,mlp,gpt2]
                                        [--repeats R] [--retries K] [--busy CORES] [--wait-quiet S]
                                        [--output FILE.json] [--log FILE.txt]

For four models (regression y = 3x + 2, a deep linear network, a 1.07M-parameter MLP, a small
GPT-2) it runs ``llc_fast.estimate_llc`` and devinterp 2.0.1's estimator (``sample`` then
``compute_llc``, what ``devinterp.slt.llc.llc`` does; sampler ``sgmcmc_sgld`` with
``localization=gamma``) on the same model, the same batches in the same order (devinterp's first
epoch, cycled, checked against the batch ids it records) and the same lr, nbeta, gamma, chains,
burn-in and draws, and reports chains x steps per second of each whole call, their ratio, and both
estimates with standard errors (ddof = 1; devinterp's recomputed from its own trace and init loss
with burn-in left out, since 2.0.1 averages burn-in into ``llc_mean``, printed too; chains sharing
batches are correlated, so both standard errors are optimistic).

devinterp gets the cheapest dataset its API takes (``IdsDataset``: sample-index or token-id rows,
with a per-token loss view of the same data); its DataLoader cost per batch, and over a
HuggingFace ``Dataset`` (its documented input), is printed. Timing: wall seconds of each whole
call after an untimed warm-up of both, the fastest of ``--repeats`` calls that other processes
left alone (``harness.LoadGuard``: calls during which they kept ``--busy`` cores busy are retried
up to ``--retries`` times; figures whose every try was contended are marked ``!``). "fwd+bwd" is
the rate of the model's forward+backward passes alone; "bound" = that / devinterp's rate.
``--quick`` (under a minute) takes so few steps that devinterp's fixed costs dominate.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from harness import (LoadGuard, add_common_options, environment, loadavg, print_environment, set_threads,
                     transcript, write_results)

import llc_fast  # noqa: E402  (harness puts the repository on sys.path)
from llc_fast.oracles import (  # noqa: E402
    dln_dataset, dln_learning_coefficient, make_dln, make_regression_example, mse_loss,
    quadratic_sgld_expectation)


# --- the cases -----------------------------------------------------------------------------------

@dataclass
class Case:
    """One model, its data and the hyperparameters both libraries get.

    rows: the devinterp ``input_ids`` rows ([N, L] int64): sample indices [i, i], or token ids.
    to_batch: an ``input_ids`` batch -> the batch llc_fast's loss_fn takes.
    loss_fn: llc_fast's loss_fn(model, batch) -> scalar mean loss.
    per_token_loss: devinterp's loss_fn(model, input_ids) -> (batch, L - 1); None = its default LM loss.
    """

    key: str
    title: str
    model: nn.Module
    rows: torch.Tensor
    to_batch: Callable
    loss_fn: Callable
    per_token_loss: Callable | None
    batch_size: int
    lr: float
    nbeta: float
    gamma: float
    chains: int
    draws: int
    burnin: int
    init_batches: int = 16
    reference: float | None = None
    reference_note: str = ""
    notes: list = field(default_factory=list)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def _indexed(x: torch.Tensor, y: torch.Tensor, per_sample: Callable) -> tuple[torch.Tensor, Callable, Callable]:
    """Sample-index rows for devinterp, and the two loss views of the same data."""
    n = x.shape[0]
    rows = torch.arange(n, dtype=torch.int64).unsqueeze(1).repeat(1, 2)

    def to_batch(ids: torch.Tensor):
        idx = ids[:, 0]
        return x[idx], y[idx]

    def per_token_loss(model, ids: torch.Tensor) -> torch.Tensor:
        return per_sample(model, *to_batch(ids)).unsqueeze(1)  # (batch, 1)

    return rows, to_batch, per_token_loss


def _mse_per_sample(model, x, y):
    return ((model(x) - y) ** 2).mean(dim=1)


def _ce_loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _ce_per_sample(model, x, y):
    return nn.functional.cross_entropy(model(x), y, reduction="none")


def case_regression(quick: bool) -> Case:
    model, data = make_regression_example()
    x, y = data.tensors
    rows, to_batch, per_token = _indexed(x, y, _mse_per_sample)
    n, lr, gamma = x.shape[0], 0.002, 1.0
    nbeta = n / math.log(n)
    # K(w) = mse(w) - mse(w*) = 1/2 (w - w*)^T H (w - w*), H = 2 [[E x^2, E x], [E x, 1]]
    xs = x.double().squeeze(1)
    hess = 2 * torch.tensor([[float((xs ** 2).mean()), float(xs.mean())], [float(xs.mean()), 1.0]], dtype=torch.float64)
    h = torch.linalg.eigvalsh(hess).numpy()
    ref = quadratic_sgld_expectation(h, nbeta, gamma, lr)
    return Case("regression", "y=3x+2 regression", model, rows, to_batch, mse_loss, per_token, batch_size=n, lr=lr,
                nbeta=nbeta, gamma=gamma, chains=4, draws=200 if quick else 2000, burnin=100 if quick else 500,
                init_batches=1, reference=ref, reference_note="stationary E[nbeta K] of the discretised chain (exact)")


DLN_WIDTHS, DLN_RANK = (8, 4, 8), 2


def case_dln(quick: bool) -> Case:
    model = make_dln(DLN_WIDTHS, DLN_RANK, seed=1)
    n = 10_000
    x, y = dln_dataset(model, n, seed=2, input_range=1.0).tensors
    rows, to_batch, per_token = _indexed(x, y, _mse_per_sample)
    exact = float(dln_learning_coefficient(DLN_WIDTHS, DLN_RANK).llc)
    return Case("dln", f"DLN {'-'.join(map(str, DLN_WIDTHS))} rank {DLN_RANK}", model, rows, to_batch, mse_loss,
                per_token, batch_size=500, lr=3e-4, nbeta=n / math.log(n), gamma=1.0, chains=4,
                draws=200 if quick else 2000, burnin=100 if quick else 1000, init_batches=16, reference=exact,
                reference_note="Aoyagi's learning coefficient (n -> infinity)")


MLP_WIDTHS = (784, 1024, 256, 10)


def build_mlp(widths, samples: int, batch: int, train_steps: int, device: torch.device):
    """A ReLU MLP trained ``train_steps`` Adam steps on random labels, its data and its full-data loss, on
    ``device`` (also gpu_e2e.py's models)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(samples, widths[0], generator=gen).to(device)
    y = torch.randint(0, widths[-1], (samples,), generator=gen).to(device)
    torch.manual_seed(0)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(widths) - 2 else [])
    model = nn.Sequential(*layers).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(train_steps):
        idx = torch.randint(0, samples, (batch,), generator=gen).to(device)
        opt.zero_grad()
        _ce_loss(model, (x[idx], y[idx])).backward()
        opt.step()
    for p in model.parameters():
        p.grad = None
    with torch.no_grad():
        loss = float(_ce_loss(model, (x, y)))
    return model, x, y, loss


def case_mlp(quick: bool) -> Case:
    n, batch = 4096, 256
    train_steps = 20 if quick else 300
    model, x, y, train_loss = build_mlp(MLP_WIDTHS, n, batch, train_steps, torch.device("cpu"))
    rows, to_batch, per_token = _indexed(x, y, _ce_per_sample)
    c = Case("mlp", "MLP 784-1024-256-10", model, rows, to_batch, _ce_loss, per_token, batch_size=batch, lr=1e-4,
             nbeta=n / math.log(n), gamma=1000.0, chains=8, draws=10 if quick else 200, burnin=2 if quick else 50,
             init_batches=16)
    c.notes.append(f"MLP trained {train_steps} Adam steps on random labels: full-data loss {train_loss:.4f}")
    return c


def case_gpt2(quick: bool) -> Case:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    vocab, seq, n_seq = 512, 33, 512
    cfg = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=128, n_layer=2, n_head=4, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "eager"  # plain matmuls in both libraries (SDPA has no CPU vmap rule)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg)
    rows = torch.randint(0, vocab, (n_seq, seq), generator=torch.Generator().manual_seed(1))

    def lm_loss(model, ids):
        logits = model(ids, use_cache=False, return_dict=False)[0]
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    return Case("gpt2", f"GPT-2 {cfg.n_layer}L d{cfg.n_embd} V{vocab}", model, rows, lambda ids: ids, lm_loss, None,
                batch_size=16, lr=1e-3, nbeta=30.0, gamma=300.0, chains=4, draws=10 if quick else 200,
                burnin=2 if quick else 20, init_batches=16)


CASES = {"regression": case_regression, "dln": case_dln, "mlp": case_mlp, "gpt2": case_gpt2}


# --- the two libraries ---------------------------------------------------------------------------

class IdsDataset(torch.utils.data.Dataset):
    """The lightest dataset devinterp 2.0.1's ``sample`` accepts: item i is {"input_ids": rows[i]}.

    devinterp documents a HuggingFace ``Dataset``; it only indexes it and wraps it in a DataLoader, so a
    map-style torch dataset works and is much cheaper per batch (both costs are printed)."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.rows[i]}


def hf_dataset(rows: torch.Tensor):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": rows.numpy()}).with_format("torch")


def devinterp_epoch(ds, batch_size: int, seed: int) -> list[torch.Tensor]:
    """The input_ids batches devinterp 2.0.1's sample_single_chain reads (it cycles this first epoch):
    its DataLoader(dataset, batch_size, shuffle=True, generator seeded with init_seed, drop_last=True)."""
    from torch.utils.data import DataLoader

    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, generator=gen, drop_last=True)
    return [b["input_ids"] for b in loader]


def devinterp_loader_seconds_per_batch(ds, batch_size: int, seed: int, batches: int) -> float:
    from torch.utils.data import DataLoader

    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, generator=gen, drop_last=True)
    t0, k = time.perf_counter(), 0
    while k < batches:
        for _ in loader:
            k += 1
            if k >= batches:
                break
    return (time.perf_counter() - t0) / batches


def _silence_devinterp_progress() -> None:
    """devinterp 2.0.1's sample_single_chain always shows a tqdm bar per chain: hand it a disabled one."""
    import devinterp.slt.sampler as dsampler
    from tqdm.auto import trange

    def quiet_trange(*args, **kwargs):
        kwargs["disable"] = True
        return trange(*args, **kwargs)

    dsampler.trange = quiet_trange


INIT_SEED = 100  # devinterp's default init_seed


def run_devinterp(case: Case, ds, *, chains: int, draws: int, burnin: int) -> dict:
    from devinterp.slt.llc import compute_llc
    from devinterp.slt.sampling import sample

    tmp = Path(tempfile.mkdtemp(prefix="bench_e2e_devinterp_"))
    try:
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            samples = sample(case.model, ds, {}, lr=case.lr, n_beta=case.nbeta, loss_fn=case.per_token_loss,
                             num_chains=chains, num_draws=draws, batch_size=case.batch_size, num_burnin_steps=burnin,
                             num_steps_bw_draws=1, num_init_loss_batches=case.init_batches, init_seed=INIT_SEED,
                             localization=case.gamma, sampling_method="sgmcmc_sgld", device="cpu",
                             output_path=tmp / "samples.zarr")
            res = compute_llc(samples).load()
        seconds = time.perf_counter() - t0
        ids = np.asarray(samples.dataset.sampling_input_ids_micro.values)  # (chain, step, batch, L)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    trace = np.asarray(res.loss_trace.values, dtype=np.float64)  # (chain, step), burn-in included
    init = float(res.init_loss)
    per_chain = case.nbeta * (trace[:, burnin:].mean(axis=1) - init)
    return dict(seconds=seconds, per_chain=per_chain, init_loss=init, own_llc_mean=float(res.llc_mean),
                own_llc_std_ddof0=float(res.llc_std), input_ids=ids, trace=trace,
                warnings=sorted({str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)}))


def run_llc_fast(case: Case, batches: list, *, chains: int, draws: int, burnin: int) -> dict:
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = llc_fast.estimate_llc(case.model, batches, case.loss_fn, sampler="sgld", lr=case.lr, nbeta=case.nbeta,
                                  gamma=case.gamma, num_chains=chains, num_draws=draws, num_burnin_steps=burnin,
                                  num_init_loss_batches=case.init_batches, shared_batches=True, seed=0,
                                  progress=False)
    seconds = time.perf_counter() - t0
    return dict(seconds=seconds, per_chain=np.asarray(r.llc_per_chain, dtype=np.float64), init_loss=r.init_loss,
                llc_mean=r.llc_mean, llc_stderr=r.llc_stderr, engine=r.config["engine"], backend=r.config["backend"],
                timing=r.timing, diverged=r.diverged_chains, warnings=[str(w.message) for w in caught])


def fwd_bwd_steps_per_s(case: Case, batches: list, seconds: float) -> float:
    """Forward and backward passes per second of the model alone (its own parameters, no update, one chain):
    the floor either library pays per chain-step."""
    model = case.model
    params = [p for p in model.parameters() if p.requires_grad]
    for k in range(2):  # untimed: the first passes after another code path are slow (allocations)
        case.loss_fn(model, batches[k % len(batches)]).backward()
    k, t0 = 0, time.perf_counter()
    while k < 3 or time.perf_counter() - t0 < seconds:
        case.loss_fn(model, batches[k % len(batches)]).backward()
        k += 1
    rate = k / (time.perf_counter() - t0)
    for p in params:
        p.grad = None
    return rate


def _mean_se(per_chain: np.ndarray) -> tuple[float, float]:
    ok = per_chain[np.isfinite(per_chain)]
    if ok.size == 0:
        return math.nan, math.nan
    se = float(ok.std(ddof=1) / math.sqrt(ok.size)) if ok.size > 1 else math.nan
    return float(ok.mean()), se


# --- main ----------------------------------------------------------------------------------------

def run_case(case: Case, args, log) -> dict:
    ds = IdsDataset(case.rows)
    epoch_ids = devinterp_epoch(ds, case.batch_size, INIT_SEED)
    batches = [case.to_batch(ids) for ids in epoch_ids]
    case.init_batches = min(case.init_batches, len(batches))
    chains, draws, burnin = case.chains, case.draws, case.burnin
    steps = burnin + draws  # forward passes per chain, in both libraries

    # warm-up (untimed): builds/loads llc_fast's C++ kernel, traces the vmapped pass, touches devinterp's paths
    run_llc_fast(case, batches, chains=chains, draws=2, burnin=0)
    run_devinterp(case, ds, chains=1, draws=2, burnin=0)

    guard = LoadGuard(args.wait_quiet, args.retries, busy=args.busy, log=None)

    def best_of(fn, cost):
        """args.repeats calls that other processes left alone (retrying up to args.retries more), the
        cheapest reported; if none was left alone, the cheapest of all, marked not clean."""
        runs = guard.run(fn, want=args.repeats)
        outs = [dict(a.value, other_cores=a.other, waited_s=a.waited) for a in runs]
        clean = [o for o, a in zip(outs, runs) if guard.clean(a)]
        best = min(clean or outs, key=cost)
        best["clean"] = bool(clean)
        return best, outs

    floor, _ = best_of(lambda: dict(rate=fwd_bwd_steps_per_s(case, batches, 0.5 if args.quick else 1.0)),
                       lambda o: -o["rate"])
    # the estimates do not change between calls: both libraries seed their chains
    fast, fasts = best_of(lambda: run_llc_fast(case, batches, chains=chains, draws=draws, burnin=burnin),
                          lambda o: o["seconds"])
    dev, devs = best_of(lambda: run_devinterp(case, ds, chains=chains, draws=draws, burnin=burnin),
                        lambda o: o["seconds"])

    # devinterp read exactly the batches llc_fast was given (cycled first epoch, same for every chain)
    expect = torch.stack([epoch_ids[t % len(epoch_ids)] for t in range(steps)]).numpy()
    same_batches = bool(all(np.array_equal(dev["input_ids"][c], expect) for c in range(chains)))
    nb = min(64, 4 * len(epoch_ids))
    loader_s = min(devinterp_loader_seconds_per_batch(ds, case.batch_size, INIT_SEED, nb) for _ in range(3))
    hf = hf_dataset(case.rows)
    hf_loader_s = min(devinterp_loader_seconds_per_batch(hf, case.batch_size, INIT_SEED, nb) for _ in range(3))

    f_mean, f_se = _mean_se(fast["per_chain"])
    d_mean, d_se = _mean_se(dev["per_chain"])
    f_rate = chains * steps / fast["seconds"]
    d_rate = chains * steps / dev["seconds"]
    agree = abs(f_mean - d_mean) / math.sqrt(f_se ** 2 + d_se ** 2) if f_se > 0 or d_se > 0 else math.nan
    row = dict(
        case=case.key, model=case.title, params=case.num_params, chains=chains, burnin=burnin, draws=draws,
        steps=steps, batch_size=case.batch_size, num_batches_per_epoch=len(batches), lr=case.lr, nbeta=case.nbeta,
        gamma=case.gamma, init_loss_batches=case.init_batches,
        llc_fast=dict(seconds=fast["seconds"], steps_per_s=f_rate, llc_mean=f_mean, llc_se=f_se,
                      llc_per_chain=fast["per_chain"].tolist(), init_loss=fast["init_loss"], engine=fast["engine"],
                      backend=fast["backend"], timing=fast["timing"], diverged=fast["diverged"],
                      clean=fast["clean"], all_seconds=[o["seconds"] for o in fasts], all_other_cores=[o["other_cores"] for o in fasts],
                      llc_mean_per_repeat=[_mean_se(o["per_chain"])[0] for o in fasts],
                      warnings=fast["warnings"], other_cores=fast["other_cores"], waited_s=fast["waited_s"]),
        devinterp=dict(seconds=dev["seconds"], steps_per_s=d_rate, llc_mean=d_mean, llc_se=d_se,
                       llc_per_chain=dev["per_chain"].tolist(), init_loss=dev["init_loss"],
                       own_llc_mean_with_burnin=dev["own_llc_mean"], own_llc_std_ddof0=dev["own_llc_std_ddof0"],
                       clean=dev["clean"], all_seconds=[o["seconds"] for o in devs], all_other_cores=[o["other_cores"] for o in devs],
                       llc_mean_per_repeat=[_mean_se(o["per_chain"])[0] for o in devs],
                       warnings=dev["warnings"], loader_s_per_batch=loader_s, hf_loader_s_per_batch=hf_loader_s, other_cores=dev["other_cores"], waited_s=dev["waited_s"]),
        fwd_bwd=dict(steps_per_s=floor["rate"], other_cores=floor["other_cores"], clean=floor["clean"]),
        speedup=f_rate / d_rate, agreement_sigma=agree, same_batches=same_batches,
        reference=case.reference, reference_note=case.reference_note, notes=case.notes,
    )
    calls = lambda outs: ", ".join(f"{o['seconds']:.2f}" for o in outs)  # noqa: E731
    log(f"  {case.key}: llc_fast {fast['seconds']:.2f} s ({f_rate:.1f} steps/s, engine {fast['engine']}, "
        f"backend {fast['backend']}; calls {calls(fasts)} s), devinterp {dev['seconds']:.2f} s ({d_rate:.1f} steps/s; "
        f"calls {calls(devs)} s); "
        f"speedup {f_rate / d_rate:.2f}x; llc {f_mean:.4g} vs {d_mean:.4g}")
    return row


def _fmt_pm(mean: float, se: float) -> str:
    def g(v):
        return "nan" if not math.isfinite(v) else (f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}")
    return f"{g(mean)} ± {g(se)}"


def print_table(rows: list[dict], log) -> None:
    head = (f"{'model':<22} {'params':>9} {'chains':>6} {'steps':>6} {'llc_fast st/s':>13} {'devinterp st/s':>14} "
            f"{'speedup':>8} {'λ̂ llc_fast ± se':>18} {'λ̂ devinterp ± se':>19} {'agree':>6} {'fwd+bwd st/s':>12} "
            f"{'bound':>7} {'other':>15}")
    log(head)
    log("-" * len(head))
    for r in rows:
        f, d = r["llc_fast"], r["devinterp"]
        fb = r["fwd_bwd"]["steps_per_s"]
        oth = "/".join(("-" if o["other_cores"] is None else f"{o['other_cores']:.2f}") + ("" if o["clean"] else "!")
                       for o in (r["fwd_bwd"], f, d))
        log(f"{r['model']:<22} {r['params']:>9,} {r['chains']:>6} {r['steps']:>6} {f['steps_per_s']:>13.1f} "
            f"{d['steps_per_s']:>14.1f} {r['speedup']:>7.2f}x {_fmt_pm(f['llc_mean'], f['llc_se']):>18} "
            f"{_fmt_pm(d['llc_mean'], d['llc_se']):>19} {r['agreement_sigma']:>5.2f}σ {fb:>12.1f} "
            f"{fb / d['steps_per_s']:>6.2f}x {oth:>15}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run (few draws; under a minute)")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed calls per library and case, the fastest reported (default: 2, 1 with --quick)")
    ap.add_argument("--retries", type=int, default=None,
                    help="extra calls allowed when other processes kept >= --busy cores busy during a call "
                         "(default: 4, 0 with --quick)")
    ap.add_argument("--busy", type=float, default=0.3, metavar="CORES",
                    help="a timed call during which other processes kept this many cores busy is retried")
    add_common_options(ap, each="timed call", retry_busy=False)
    args = ap.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 2
    if args.retries is None:
        args.retries = 0 if args.quick else 4
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    keys = [k.strip() for k in args.cases.split(",") if k.strip()]
    for k in keys:
        if k not in CASES:
            ap.error(f"unknown case {k!r}; choose from {', '.join(CASES)}")

    with transcript(args.log, argv):
        return bench(args, argv, keys)


def bench(args, argv, keys) -> int:
    set_threads(args.threads)

    def log(line=""):
        print(line, flush=True)

    t_import = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):
        import devinterp  # noqa: F401  (~6 s: transformers, datasets, xarray, zarr)
        import devinterp.slt.sampling  # noqa: F401
    _silence_devinterp_progress()
    t_import = time.perf_counter() - t_import
    packages = ("torch", "llc_fast", "devinterp")
    header = environment(torch.device("cpu"), argv, packages, quick=args.quick, repeats=args.repeats,
                         retries=args.retries, busy_threshold=args.busy)
    print_environment("bench_e2e", header, packages, log=log)
    log(f"# torch threads are the same for both libraries (torch.set_num_threads); devinterp import {t_import:.1f} s "
        "(not timed)")
    log()

    rows = []
    t_all = time.perf_counter()
    for k in keys:
        t0 = time.perf_counter()
        case = CASES[k](args.quick)
        log(f"## {case.title}: {case.num_params:,} parameters, {case.rows.shape[0]} samples, batch {case.batch_size}, "
            f"lr={case.lr:g}, nbeta={case.nbeta:.4g}, gamma={case.gamma:g}, {case.chains} chains x "
            f"({case.burnin} burn-in + {case.draws} draws)")
        for note in case.notes:
            log(f"  {note}")
        row = run_case(case, args, log)
        rows.append(row)
        log(f"  ({time.perf_counter() - t0:.0f} s for this case, warm-ups and set-up included)")
    header["loadavg_end"] = loadavg()
    header["total_s"] = time.perf_counter() - t_all

    log()
    log("# st/s = chains x (burn-in + draws) / wall seconds of the whole estimator call (fastest of "
        f"{args.repeats} uncontended call{'s' if args.repeats > 1 else ''}, up to {args.retries} retries); "
        "speedup = llc_fast / devinterp")
    log("# λ̂ ± se: mean over chains ± std (ddof=1) / sqrt(chains), burn-in excluded in both; "
        "agree = |diff| / sqrt(se1² + se2²)")
    log("# fwd+bwd st/s = forward+backward passes per second of the model alone (no update, one chain); "
        "bound = fwd+bwd st/s / devinterp st/s,")
    log("#   the speedup a sampler that cost nothing but the forward and backward passes would reach")
    log("# other = cores other processes kept busy during the reported fwd+bwd / llc_fast / devinterp measurement; "
        f"! = every try had >= {args.busy} (contended: that figure is unreliable)")
    print_table(rows, log)
    log()
    for r in rows:
        f, d = r["llc_fast"], r["devinterp"]
        ref = "" if r["reference"] is None else f"; reference {r['reference']:.4g} ({r['reference_note']})"
        log(f"# {r['case']}: same batches in both: {'yes' if r['same_batches'] else 'NO'}; init loss "
            f"{f['init_loss']:.6g} (llc_fast) / {d['init_loss']:.6g} (devinterp); devinterp's own llc_mean "
            f"{d['own_llc_mean_with_burnin']:.4g} (burn-in averaged in), llc_std {d['own_llc_std_ddof0']:.3g} "
            f"(ddof 0){ref}")
        log(f"#   llc_fast engine {f['engine']}, backend {f['backend']}, sampling {f['timing']['steps_per_s']:.1f} st/s "
            f"without init loss; devinterp's DataLoader costs {d['loader_s_per_batch'] * 1e3:.2f} ms per batch "
            f"({d['loader_s_per_batch'] * d['steps_per_s']:.0%} of its step; over a HuggingFace Dataset of the same "
            f"rows it would be {d['hf_loader_s_per_batch'] * 1e3:.2f} ms)"
            + (f"; llc_fast warnings: {'; '.join(sorted(set(f['warnings'])))}" if f["warnings"] else "")
            + (f"; diverged chains {f['diverged']}" if f["diverged"] else "")
            + (f"; devinterp warnings: {'; '.join(d['warnings'])}" if d["warnings"] else ""))
    log(f"# load average at end: {header['loadavg_end']}; total {header['total_s']:.0f} s")
    if args.output:
        write_results(args.output, header, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
