"""Restricted LLCs of many components in one batched run (``llc_fast.estimate_restricted_llcs``) against
one component, against one ``estimate_llc(mask=...)`` call per component, and against devinterp 2.0.1's
per-component loop.

    .venv/bin/python bench/bench_restricted.py [--device cpu|cuda] [--parts a,b,c,d] [--rounds R] [--quick]
                                               [--draws D] [--chains C] [--layers L] [--heads H] [--embd E]
                                               [--threads N] [--wait-quiet S] [--retry-busy K]
                                               [--output FILE.json] [--log FILE.txt]

The model: a GPT-2 built from a transformers ``GPT2Config`` with random weights (default 2 layers x 4 heads,
n_embd 64, n_positions 32, vocabulary 256, no dropout, ``attn_implementation="eager"`` so that
``torch.func.vmap`` batches the attention instead of falling back to one chain at a time; ``model.eval()``),
no download. Data: 64 random token sequences of 32 tokens in batches of 8, next-token cross-entropy. The
components: the K = layers x heads attention heads (``llc_fast.integrations.components.heads``: each head's
query, key, value and output weights), K = 8 by default. Every call samples plain SGLD with the same
settings: ``--chains`` (4) chains, ``--draws`` (100) draws and no burn-in, lr 1e-3, nbeta 30, localization
gamma 300, batch 8, 4 batches for L(w*), every chain reading the same batches.

Measured in each round, side by side:

(a) ONE ``estimate_restricted_llcs(model, batches, loss, heads(model), **options)``: K x C chain rows in one
    batched run;
(b) ONE ``estimate_llc(..., mask=<one head's restriction>)`` with the same options: the cost of one component;
(c) K sequential ``estimate_llc(mask=...)`` calls, one per head: what a user without the batched run does;
(d) devinterp 2.0.1's loop: ``devinterp.slt.llc.llc(model, dataset, {}, param_masks=create_param_masks(model,
    "l<i>h<j>"), ...)`` once per head (``sample`` + ``compute_llc``; ``sgmcmc_sgld`` with ``localization=gamma``,
    the same chains, draws, lr, n_beta, batch size and init-loss batches), over a HuggingFace ``Dataset``
    of the same tokens (its documented input; ``--devinterp-dataset ids``: the cheaper map-style dataset of
    bench_e2e.py).

Times: llc_fast's is ``result.timing["sampling_s"]`` (the sampling loop; L(w*) and set-up excluded), the wall
time of each call is kept too; devinterp's is the wall time of its call, which includes its own set-up
(zarr store, init loss, a deep copy of the model per chain, ``gc.collect``). The ratios are taken within each
round: a/b (the cost of K components in one run over one component; the goal is <= 1.5 on the CPU), c/a
(the speed-up over K sequential llc_fast calls) and d/a (over devinterp's loop), also wall over wall.
The tables give the median over ``--rounds`` rounds (default 3) with the range. On the CPU a round during which
other processes kept >= 0.25 cores busy is timed again (``harness.LoadGuard``: ``--wait-quiet``,
``--retry-busy``, default 2); figures whose every round was contended are marked "busy" and are not results.
Also checked: the batched run's estimate of the head of (b) equals (b)'s (same seed: same chains), and so do
those of (c). ``--quick`` (a few draws, one round, no retries) is a smoke run; its figures are not results.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import shutil
import statistics
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
from torch import nn

from harness import (LoadGuard, add_common_options, checked_device, environment, loadavg, print_environment,
                     set_threads, synchronize, transcript, write_results)

import llc_fast  # noqa: E402  (harness puts the repository on sys.path)
from llc_fast.integrations.components import heads as head_components  # noqa: E402

PARTS = ("a", "b", "c", "d")
PART_NAMES = {"a": "estimate_restricted_llcs, K components in one run",
              "b": "estimate_llc(mask=one head): one component",
              "c": "K sequential estimate_llc(mask=...) calls",
              "d": "devinterp 2.0.1: llc(param_masks=...) per head"}


# --- the model and data ----------------------------------------------------------------------------

def build_gpt2(layers: int, heads: int, embd: int, positions: int, vocab: int, device: torch.device):
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    cfg = GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=embd, n_layer=layers, n_head=heads,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                     attn_implementation="eager")
    cfg._attn_implementation = "eager"  # plain matmuls: SDPA has no vmap rule on the CPU
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg).to(device).eval()


def lm_loss(model, ids):
    """Mean next-token cross-entropy of a batch of token ids [B, L]."""
    logits = model(ids, use_cache=False, return_dict=False)[0]
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


# --- the four measurements -------------------------------------------------------------------------

def llc_options(args) -> dict:
    return dict(sampler="sgld", lr=args.lr, nbeta=args.nbeta, gamma=args.gamma, num_chains=args.chains,
                num_draws=args.draws, num_burnin_steps=0, num_init_loss_batches=args.init_batches,
                shared_batches=True, seed=0, progress=False)


def _quietly(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, sorted({str(w.message).splitlines()[0][:160] for w in caught
                        if not issubclass(w.category, DeprecationWarning)})


def run_restricted(model, batches, components, args, device) -> dict:
    synchronize(device)
    t0 = time.perf_counter()
    r, warned = _quietly(lambda: llc_fast.estimate_restricted_llcs(model, batches, lm_loss, components,
                                                                    **llc_options(args)))
    synchronize(device)
    wall = time.perf_counter() - t0
    return dict(sampling_s=r.timing["sampling_s"], wall_s=wall, engine=r.facts.get("engine"),
                backend=r.facts.get("backend"), components=r.names, rows=len(r) * args.chains,
                steps=r.timing.get("steps"), llc={n: float(r[n].llc_mean) for n in r.names},
                diverged={n: len(r[n].diverged_chains) for n in r.names if r[n].diverged_chains}, warnings=warned)


def run_single(model, batches, mask, args, device) -> dict:
    synchronize(device)
    t0 = time.perf_counter()
    r, warned = _quietly(lambda: llc_fast.estimate_llc(model, batches, lm_loss, mask=mask, **llc_options(args)))
    synchronize(device)
    return dict(sampling_s=r.timing["sampling_s"], wall_s=time.perf_counter() - t0, engine=r.config.get("engine"),
                backend=r.config.get("backend"), rows=args.chains, llc=float(r.llc_mean), warnings=warned)


def run_sequential(model, batches, components, args, device) -> dict:
    calls = {name: run_single(model, batches, mask, args, device) for name, mask in components.items()}
    return dict(sampling_s=sum(c["sampling_s"] for c in calls.values()),
                wall_s=sum(c["wall_s"] for c in calls.values()),
                engines=sorted({c["engine"] for c in calls.values()}), rows=args.chains * len(calls),
                llc={n: c["llc"] for n, c in calls.items()},
                warnings=sorted({w for c in calls.values() for w in c["warnings"]}))


class DevinterpLoop:
    """devinterp 2.0.1's estimator, ``devinterp.slt.llc.llc``, called once per head with that head's
    ``param_masks`` (devinterp's own ``create_param_masks(model, "l<i>h<j>")``)."""

    def __init__(self, model, rows: torch.Tensor, names: list[str], args, device: torch.device):
        with contextlib.redirect_stderr(io.StringIO()):
            from devinterp.slt.llc import llc
            from devinterp.slt.weight_restrictions import create_param_masks
        self.llc, self.model, self.args, self.device = llc, model, args, device
        self.masks = {name: create_param_masks(model, name) for name in names}
        if args.devinterp_dataset == "hf":
            from bench_e2e import hf_dataset

            self.dataset = hf_dataset(rows)
        else:
            from bench_e2e import IdsDataset

            self.dataset = IdsDataset(rows)

    def one(self, name: str, draws: int | None = None) -> dict:
        a = self.args
        tmp = Path(tempfile.mkdtemp(prefix="bench_restricted_devinterp_"))
        try:
            synchronize(self.device)
            t0 = time.perf_counter()
            res, warned = _quietly(lambda: self.llc(
                self.model, self.dataset, {}, lr=a.lr, n_beta=a.nbeta, param_masks=self.masks[name],
                num_chains=a.chains, num_draws=a.draws if draws is None else draws, batch_size=a.batch_size,
                num_burnin_steps=0, num_steps_bw_draws=1, num_init_loss_batches=a.init_batches, init_seed=100,
                localization=a.gamma, sampling_method="sgmcmc_sgld", device=self.device.type,
                output_path=tmp / "samples.zarr").load())
            synchronize(self.device)
            seconds = time.perf_counter() - t0
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        # devinterp 2.0.1's llc_mean averages burn-in in; there is none here
        return dict(wall_s=seconds, llc=float(res.llc_mean), warnings=warned)

    def loop(self) -> dict:
        calls = {name: self.one(name) for name in self.masks}
        return dict(wall_s=sum(c["wall_s"] for c in calls.values()), rows=self.args.chains * len(calls),
                    per_call_s={n: c["wall_s"] for n, c in calls.items()}, llc={n: c["llc"] for n, c in calls.items()},
                    warnings=sorted({w for c in calls.values() for w in c["warnings"]}))


@contextlib.contextmanager
def devinterp_progress_silenced():
    """devinterp 2.0.1's sample_single_chain always shows a tqdm bar per chain: hand it a disabled one (and
    put its own back afterwards)."""
    import devinterp.slt.sampler as dsampler

    original = dsampler.trange

    def quiet_trange(*args, **kwargs):
        kwargs["disable"] = True
        return original(*args, **kwargs)

    dsampler.trange = quiet_trange
    try:
        yield
    finally:
        dsampler.trange = original


def _error(e: BaseException) -> str:
    msg = str(e).splitlines()[0][:300] if str(e) else ""
    return f"{type(e).__name__}: {msg}"


# --- reporting -------------------------------------------------------------------------------------

def _spread(values: list[float]) -> dict:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return dict(median=math.nan, min=math.nan, max=math.nan, n=0)
    return dict(median=statistics.median(vals), min=min(vals), max=max(vals), n=len(vals))


def _fmt_s(v: dict) -> str:
    return f"{v['median']:8.2f} ({v['min']:.2f}-{v['max']:.2f})"


def _fmt_x(v: dict) -> str:
    return f"{v['median']:.2f}x ({v['min']:.2f}-{v['max']:.2f}x)"


RATIOS = {  # key: (numerator, denominator, time key of each: None = devinterp's wall over llc_fast's sampling_s)
    "a_over_b": ("a", "b", "sampling_s", "a/b: K components in one run / one component (goal <= 1.5 on CPU)"),
    "c_over_a": ("c", "a", "sampling_s", "c/a: speed-up over K sequential estimate_llc(mask=...) calls"),
    "d_over_a": ("d", "a", None, "d/a: speed-up over devinterp's per-head loop (its wall / sampling_s)"),
    "a_over_b_wall": ("a", "b", "wall_s", "a/b, wall time over wall time"),
    "c_over_a_wall": ("c", "a", "wall_s", "c/a, wall time over wall time"),
    "d_over_a_wall": ("d", "a", "wall_s", "d/a, wall time over wall time (both with their set-up)"),
}


def round_ratios(v: dict) -> dict:
    out = {}
    for key, (num, den, tkey, _) in RATIOS.items():
        if num in v and den in v:
            n = v[num]["wall_s"] if num == "d" else v[num][tkey]
            d = v[den]["sampling_s" if tkey is None else tkey]
            out[key] = n / d if d > 0 else math.nan
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--parts", default=",".join(PARTS),
                    help="comma-separated subset of a,b,c,d (d: devinterp's loop; a is always run: the ratios "
                         "are over it)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default 3; 1 with --quick)")
    ap.add_argument("--quick", action="store_true", help="a few draws, one round, no busy retries: a smoke run")
    ap.add_argument("--draws", type=int, default=None, help="draws per chain, no burn-in (default 100; 4 with --quick)")
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4, help="attention heads per layer (K = layers x heads)")
    ap.add_argument("--embd", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=32, help="tokens per sequence (also n_positions)")
    ap.add_argument("--sequences", type=int, default=64, help="random token sequences in the data set")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--init-batches", type=int, default=4, help="batches for L(w*) in both libraries")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--nbeta", type=float, default=30.0)
    ap.add_argument("--gamma", type=float, default=300.0)
    ap.add_argument("--single", default="l0h1", help="the head of (b) (default l0h1, else the first head)")
    ap.add_argument("--devinterp-dataset", choices=["hf", "ids"], default="hf",
                    help="devinterp's input: a HuggingFace Dataset of the tokens (default, its documented input) "
                         "or bench_e2e.py's map-style IdsDataset")
    add_common_options(ap, each="round")
    ap.set_defaults(retry_busy=None)  # 2, or 0 with --quick
    args = ap.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.draws is None:
        args.draws = 4 if args.quick else 100
    if args.retry_busy is None:
        args.retry_busy = 0 if args.quick else 2
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    for p in parts:
        if p not in PARTS:
            ap.error(f"unknown part {p!r}; choose from {', '.join(PARTS)}")
    if "a" not in parts:
        parts.insert(0, "a")
    parts = [p for p in PARTS if p in parts]
    if args.sequences < args.batch_size:
        ap.error("--sequences must be at least --batch-size")
    device = checked_device(ap, args.device)
    with transcript(args.log, argv):
        return bench(args, argv, device, parts)


def bench(args, argv, device, parts) -> int:
    set_threads(args.threads)
    cpu = device.type == "cpu"
    guard = LoadGuard(args.wait_quiet if cpu else 0.0, args.retry_busy if cpu else 0)

    def log(line=""):
        print(line, flush=True)

    packages = ("torch", "llc_fast", "transformers", "devinterp")
    header = environment(device, argv, packages, parts=parts, rounds=args.rounds, quick=args.quick,
                         draws=args.draws, chains=args.chains)
    print_environment("bench_restricted", header, packages, log=log)

    model = build_gpt2(args.layers, args.heads, args.embd, args.seq_len, args.vocab, device)
    rows = torch.randint(0, args.vocab, (args.sequences, args.seq_len), generator=torch.Generator().manual_seed(1))
    batches = [rows[i:i + args.batch_size].to(device) for i in range(0, args.sequences - args.batch_size + 1,
                                                                     args.batch_size)]
    args.init_batches = min(args.init_batches, len(batches))
    components = head_components(model)
    K = len(components)
    single = args.single if args.single in components else next(iter(components))
    numel = sum(p.numel() for p in model.parameters())
    head_numel = sum(int(m.sum()) if m is not None else model.get_parameter(n).numel()
                     for n, m in components[single].items())
    log(f"# GPT-2 {args.layers} layers x {args.heads} heads, n_embd {args.embd}, vocab {args.vocab}, "
        f"{args.seq_len} positions, random init, eager attention, eval(): {numel:,} parameters; K = {K} head "
        f"components of {head_numel:,} weights each")
    log(f"# data: {args.sequences} random sequences x {args.seq_len} tokens, batches of {args.batch_size} "
        f"({len(batches)} batches), next-token cross-entropy; sgld lr={args.lr:g} nbeta={args.nbeta:g} "
        f"gamma={args.gamma:g}, {args.chains} chains x {args.draws} draws, no burn-in, {args.init_batches} batches "
        f"for L(w*), every chain on the same batches")
    log("# times: llc_fast = result.timing['sampling_s'] (the sampling loop only); devinterp = wall time of its "
        "whole llc() call, its own set-up included (zarr store, init loss, a deep copy per chain)")
    log("# parts: " + "; ".join(f"({p}) {PART_NAMES[p]}" for p in parts) + f"; (b) is head {single}")
    log()

    dev = None
    dev_error = None
    silence = contextlib.nullcontext()
    if "d" in parts:
        try:
            t_imp = time.perf_counter()
            dev = DevinterpLoop(model, rows, list(components), args, device)
            silence = devinterp_progress_silenced()
            log(f"# devinterp {header['devinterp']}: import and dataset {time.perf_counter() - t_imp:.1f} s (not "
                f"timed); input: {'HuggingFace Dataset' if args.devinterp_dataset == 'hf' else 'IdsDataset'}")
        except Exception as e:
            dev_error = f"set-up failed: {_error(e)}"
            log(f"# devinterp FAILED at set-up: {_error(e)}")
            log("#   " + traceback.format_exc().strip().replace("\n", "\n#   "))
            parts = [p for p in parts if p != "d"]

    t_start = time.perf_counter()
    with silence:
        # warm-up (untimed): the C++ kernel, the vmapped pass, devinterp's code paths
        warm = dict(args.__dict__)
        wargs = argparse.Namespace(**dict(warm, draws=2))
        try:
            run_restricted(model, batches, components, wargs, device)
            run_single(model, batches, components[single], wargs, device)
        except Exception as e:
            raise SystemExit(f"bench_restricted: the llc_fast warm-up failed: {_error(e)}")
        if dev is not None:
            try:
                dev.one(single, draws=2)
            except Exception as e:
                dev_error = f"warm-up call failed: {_error(e)}"
                log(f"# devinterp FAILED in its warm-up call: {_error(e)}")
                log("#   " + traceback.format_exc().strip().replace("\n", "\n#   "))
                dev, parts = None, [p for p in parts if p != "d"]

        def one_round():
            v = {}
            v["a"] = run_restricted(model, batches, components, args, device)
            if "b" in parts:
                v["b"] = run_single(model, batches, components[single], args, device)
            if "c" in parts:
                v["c"] = run_sequential(model, batches, components, args, device)
            if "d" in parts and dev is not None:
                try:
                    v["d"] = dev.loop()
                except Exception as e:
                    v["d_error"] = _error(e)
                    v["d_traceback"] = traceback.format_exc()
            v["ratios"] = round_ratios(v)
            return v

        def report(a, again):
            v = a.value
            times = [f"(a) {v['a']['sampling_s']:.2f} s"]
            times += [f"({p}) {v[p]['sampling_s']:.2f} s" for p in ("b", "c") if p in v]
            if "d" in v:
                times.append(f"(d) {v['d']['wall_s']:.2f} s")
            r = v["ratios"]
            ratios = [f"{k.replace('_over_', '/')} {r[k]:.2f}" for k in ("a_over_b", "c_over_a", "d_over_a") if k in r]
            other = "" if a.other is None else f"; other processes kept {a.other:.2f} cores busy"
            log(f"  round: {', '.join(times)}; {', '.join(ratios)}{other}"
                + (f"; devinterp FAILED: {v['d_error']}" if "d_error" in v else "")
                + ("" if guard.clean(a) else "; busy" + ("; timing it again" if again else "")))

        attempts = guard.run(one_round, want=args.rounds, report=report)
    header["loadavg_end"] = loadavg()
    header["wall_s"] = time.perf_counter() - t_start

    clean_attempts = [a for a in attempts if guard.clean(a)]
    used = clean_attempts or attempts
    clean = bool(clean_attempts)
    busy_rounds = len(attempts) - len(clean_attempts)
    busy = "" if clean else "  <- machine busy in every round: ignore"
    d_errors = sorted({a.value["d_error"] for a in attempts if "d_error" in a.value})
    if d_errors and dev_error is None:
        dev_error = "; ".join(d_errors)
        for a in attempts:
            if "d_traceback" in a.value:
                log("# devinterp FAILED in a round:\n#   " + a.value["d_traceback"].strip().replace("\n", "\n#   "))
                break

    first = used[0].value
    a0 = first["a"]
    rows_of = {"a": a0["rows"], "b": args.chains, "c": args.chains * K, "d": args.chains * K}
    engine_of = {"a": a0["engine"], "b": first["b"]["engine"] if "b" in first else None,
                 "c": ",".join(first["c"]["engines"]) if "c" in first else None, "d": "one chain at a time"}
    calls_of = {"a": 1, "b": 1, "c": K, "d": K}
    timed = {}
    log()
    log(f"{'':<54} {'calls':>5} {'chain rows':>10} {'engine':>19} {'timed s median (range)':>26} "
        f"{'wall s median':>13}")
    for p in parts:
        if not any(p in a.value for a in used):
            continue
        key = "wall_s" if p == "d" else "sampling_s"
        s = _spread([a.value[p][key] for a in used if p in a.value])
        w = _spread([a.value[p]["wall_s"] for a in used if p in a.value])
        timed[p] = dict(timed_s=s, wall_s=w, time=("wall of the call, its set-up included" if p == "d"
                                                   else "result.timing['sampling_s']"),
                        calls=calls_of[p], chain_rows=rows_of[p], engine=engine_of[p])
        log(f"({p}) {PART_NAMES[p]:<50} {calls_of[p]:>5} {rows_of[p]:>10} {str(engine_of[p]):>19} {_fmt_s(s):>26} "
            f"{w['median']:>13.2f}{busy}")
    ratios = {}
    for key, (num, den, _, meaning) in RATIOS.items():
        vals = [a.value["ratios"][key] for a in used if key in a.value["ratios"]]
        if vals:
            ratios[key] = dict(_spread(vals), meaning=meaning)
    log()
    log("ratios within each round, median (range):")
    for key, r in ratios.items():
        log(f"  {r['meaning']:<70} {_fmt_x(r):>22}{busy}")
    if dev_error:
        log(f"  d/a: not measured: devinterp FAILED: {dev_error}")

    # the batched run gives each component the estimate estimate_llc(mask=component) gives (same seed)
    checks = {}
    if "b" in first:
        checks["b_same_as_a"] = abs(first["b"]["llc"] - a0["llc"][single])
    if "c" in first:
        checks["c_same_as_a_max_abs_diff"] = max(abs(first["c"]["llc"][n] - a0["llc"][n]) for n in components)
    if "d" in first:
        dl = first["d"]["llc"]
        checks["devinterp_llc"] = dl
    log()
    log(f"# chain rows: (a) {a0['rows']} = {K} components x {args.chains} chains in one call, engine {a0['engine']} "
        f"({'batched: vmapped forward/backward over the rows' if a0['engine'] == 'vmap' else 'NOT batched'}), "
        f"backend {a0['backend']}, {a0['steps']} chain-steps")
    if "b_same_as_a" in checks:
        log(f"# (a)'s estimate of {single} {a0['llc'][single]:.5g} vs (b)'s {first['b']['llc']:.5g} "
            f"(|diff| {checks['b_same_as_a']:.2g})"
            + (f"; max |diff| over the K heads against (c): {checks['c_same_as_a_max_abs_diff']:.2g}"
               if "c_same_as_a_max_abs_diff" in checks else ""))
    if "d" in first:
        log(f"# devinterp's estimates (llc_mean, no burn-in): " + ", ".join(f"{n} {x:.4g}" for n, x in dl.items())
            + f"; llc_fast's (a): " + ", ".join(f"{n} {a0['llc'][n]:.4g}" for n in components)
            + " (different noise and batch order: statistically, not bitwise, comparable)")
    warned = sorted({w for a in attempts for p in ("a", "b", "c", "d") if p in a.value for w in a.value[p]["warnings"]})
    if warned:
        log(f"# warnings: {'; '.join(warned)}")
    log(f"# rounds: {len(attempts)} timed, {busy_rounds} busy (other processes kept >= {guard.busy} cores busy), "
        f"{len(used)} used; done in {header['wall_s']:.0f} s; load average at end: {header['loadavg_end']}")
    summary = []
    for key in ("a_over_b", "c_over_a", "d_over_a"):
        if key in ratios:
            summary.append(f"{key.replace('_over_', '/')} {ratios[key]['median']:.2f}x "
                           f"({ratios[key]['min']:.2f}-{ratios[key]['max']:.2f})")
    if dev_error:
        summary.append(f"devinterp FAILED ({dev_error})")
    log("SUMMARY: " + ("[quick: not a result] " if args.quick else "") + f"K={K} heads x {args.chains} chains x "
        f"{args.draws} draws: " + ", ".join(summary) + ("" if clean else " (busy)"))

    if args.output:
        row = dict(model=f"GPT-2 {args.layers}L x {args.heads}H d{args.embd} V{args.vocab}", params=numel,
                   components=list(components), K=K, single=single, head_weights=head_numel, chains=args.chains,
                   draws=args.draws, batch_size=args.batch_size, sequences=args.sequences, seq_len=args.seq_len,
                   hyper=dict(lr=args.lr, nbeta=args.nbeta, gamma=args.gamma, init_batches=args.init_batches),
                   chain_rows=a0["rows"], engine=a0["engine"], batched=a0["engine"] == "vmap", backend=a0["backend"],
                   parts=timed, ratios=ratios, checks=checks, clean=clean, busy_rounds=busy_rounds,
                   devinterp_error=dev_error,
                   rounds=[dict({k: v for k, v in a.value.items() if k != "d_traceback"}, other_cores=a.other,
                                waited_s=a.waited, clean=guard.clean(a)) for a in attempts])
        write_results(args.output, header, [row])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
