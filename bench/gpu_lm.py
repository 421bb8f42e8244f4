"""Stage f of gpu_suite.sh: a >= 1B-parameter causal LM built from a config (random weights, bf16, no
downloads) sampled on one GPU with ``llc_fast.estimate_llc``: seconds per step, the share of the step
outside the forward and backward passes, and peak memory against ``llc_fast.distributed.plan_memory``.

    python bench/gpu_lm.py [--device cuda] [--arch llama|gpt-neox] [--layers L] [--hidden H] [--intermediate I]
                           [--heads A] [--kv-heads K] [--vocab V] [--seq-len 512] [--batch-size 4] [--chains 2]
                           [--draws 8] [--dtype bfloat16] [--attn sdpa|eager] [--chain-batching auto]
                           [--quick] [--output lm.json] [--log lm.txt]

The model: ``LlamaForCausalLM`` from a ``LlamaConfig`` of TinyLlama-1.1B's shape (22 layers, width
2048, MLP 5632, 32 heads, 4 KV heads, vocabulary 32000: 1,100,048,384 parameters), or with
``--arch gpt-neox`` ``GPTNeoXForCausalLM`` of Pythia-1B's shape (16 layers, width 2048, 8 heads,
vocabulary 50304), weights drawn by transformers' initialiser under a fixed seed and cast to
``--dtype``; random token ids; next-token cross-entropy in float32. Sampling: plain SGLD, lr 1e-6,
nbeta 30, gamma 300 (lr * gamma = 3e-4: stable), ``--chains`` chains batched (``max_batched_chains``),
shared batches, ``chain_batching`` as given (``auto``: vmapped if the model allows, else one chain at
a time; the engine used is printed).

* Seconds per step (every chain's forward, backward and update): marginal, (t2 - t1) / (n2 - n1) of
  two timed calls of n1 = burn-in + 3 and n2 = n1 + ``--draws`` steps per chain, t =
  ``result.timing["sampling_s"]``, after an untimed warm-up call (kernel builds, cuBLAS handles).
* Forward+backward alone, beside it: the same passes without llc_fast: the vmapped
  ``grad_and_value`` over the [C, N] flat weights (``bench_overhead.FlatChains``) if estimate_llc ran
  the vmap engine, else C plain ``loss.backward()`` passes of the module; per step, synchronized.
  Share outside = 1 - fwd+bwd / step (the fused update and llc_fast's loop).
* Peak memory: ``torch.cuda.max_memory_allocated`` over the second timed call (peak statistics
  reset before it; the model and everything else already allocated count), against
  ``plan_memory(model_spec(model), world_size=1, shard_group_size=1, param_dtype, sampler="sgld",
  batch_size, seq_len, batched_chains=C)``; its total includes a fixed 1 GiB for the CUDA context,
  which the allocator does not see, so it is also compared without that term.

``--quick``: a toy model on the CPU-sized config (2 layers, width 64; a smoke run, not a result).
"""
from __future__ import annotations

import argparse
import math
import re
import time
import traceback
import warnings
from pathlib import Path

import torch
from torch import nn

from harness import environment, loadavg, print_environment, set_threads, synchronize, transcript, write_results

import llc_fast  # noqa: E402  (harness puts the repository on sys.path)
from bench_overhead import FlatChains, fwd_bwd_loop, wall  # noqa: E402
from llc_fast.distributed import model_spec, plan_memory  # noqa: E402
from llc_fast.distributed.planner import FIXED_OVERHEAD  # noqa: E402

GiB = 1 << 30
ARCHS = {  # (layers, hidden, intermediate, heads, kv heads, vocabulary)
    "llama": (22, 2048, 5632, 32, 4, 32000),  # TinyLlama-1.1B's shape
    "gpt-neox": (16, 2048, 8192, 8, 8, 50304),  # Pythia-1B's shape
}
QUICK = (2, 64, 128, 4, 2, 128)
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
HYPER = dict(lr=1e-6, nbeta=30.0, gamma=300.0)


def build_model(args, device: torch.device) -> nn.Module:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    layers, hidden, inter, heads, kv, vocab = args.layers, args.hidden, args.intermediate, args.heads, args.kv_heads, \
        args.vocab
    if args.arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=max(
                              2048, args.seq_len), tie_word_embeddings=False, use_cache=False)
        cls = LlamaForCausalLM
    else:
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        cfg = GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                            num_attention_heads=heads, max_position_embeddings=max(2048, args.seq_len),
                            tie_word_embeddings=False, use_cache=False, hidden_dropout=0.0, attention_dropout=0.0)
        cls = GPTNeoXForCausalLM
    cfg._attn_implementation = args.attn
    torch.manual_seed(0)
    with torch.device(device):
        model = cls(cfg)
    model = model.to(DTYPES[args.dtype]).eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids, use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def run(model, batches, args, *, draws: int, burnin: int):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = llc_fast.estimate_llc(model, batches, lm_loss, sampler="sgld", **HYPER, num_chains=args.chains,
                                  num_draws=draws, num_burnin_steps=burnin, num_init_loss_batches=1,
                                  shared_batches=True, chain_batching=args.chain_batching,
                                  max_batched_chains=args.chains, progress=False, seed=0)
    return r, sorted({str(w.message)[:300] for w in caught})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if there is a GPU")
    ap.add_argument("--arch", default="llama", choices=sorted(ARCHS))
    for name in ("layers", "hidden", "intermediate", "heads", "kv-heads", "vocab"):
        ap.add_argument(f"--{name}", type=int, default=None, help="default: the --arch's (or --quick's) shape")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 512; 16 with --quick)")
    ap.add_argument("--batch-size", type=int, default=None, help="sequences per batch (default 4; 2 with --quick)")
    ap.add_argument("--chains", type=int, default=2, help="chains, batched in one group")
    ap.add_argument("--burnin", type=int, default=2)
    ap.add_argument("--draws", type=int, default=None,
                    help="extra steps of the second timed call over the first (default 8; 6 with --quick)")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--attn", default=None, choices=["sdpa", "eager"],
                    help="attention implementation (default sdpa on a GPU, eager on the CPU, where SDPA has no vmap "
                         "rule)")
    ap.add_argument("--chain-batching", default="auto", choices=["auto", "vmap", "sequential"])
    ap.add_argument("--quick", action="store_true", help="a toy config: a smoke run (the suite's --dry-run)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads on the CPU; default: all cores")
    ap.add_argument("--output", type=Path, help="write the results as JSON")
    ap.add_argument("--log", type=Path, metavar="FILE.txt", help="also write everything printed to FILE.txt")
    args = ap.parse_args(argv)
    shape = QUICK if args.quick else ARCHS[args.arch]
    for name, v in zip(("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab"), shape):
        if getattr(args, name) is None:
            setattr(args, name, v)
    args.seq_len = args.seq_len or (16 if args.quick else 512)
    args.batch_size = args.batch_size or (2 if args.quick else 4)
    args.draws = args.draws or (6 if args.quick else 8)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: this torch has no CUDA device")
    args.attn = args.attn or ("sdpa" if args.device == "cuda" else "eager")
    with transcript(args.log, argv):
        return bench(args, argv)


def bench(args, argv) -> int:
    set_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype]
    packages = ("torch", "triton", "llc_fast", "transformers")
    header = environment(device, argv, packages, arch=args.arch, layers=args.layers, hidden=args.hidden,
                         intermediate=args.intermediate, heads=args.heads, kv_heads=args.kv_heads, vocab=args.vocab,
                         seq_len=args.seq_len, batch_size=args.batch_size, chains=args.chains, dtype=args.dtype,
                         attn=args.attn, chain_batching=args.chain_batching, hyper=HYPER, quick=args.quick)
    print_environment("gpu_lm", header, packages)

    def log(line=""):
        print(line, flush=True)

    t0 = time.perf_counter()
    model = build_model(args, device)
    n = sum(p.numel() for p in model.parameters())
    synchronize(device)
    log(f"# model: {type(model).__name__}, {n:,} parameters ({args.dtype}), {args.layers} layers, width {args.hidden}, "
        f"MLP {args.intermediate}, {args.heads} heads ({args.kv_heads} KV), vocabulary {args.vocab}, attention "
        f"{args.attn}; built in {time.perf_counter() - t0:.1f} s")
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, args.vocab, (args.batch_size, args.seq_len), generator=gen).to(device)
               for _ in range(4)]
    C = args.chains
    capacity = torch.cuda.mem_get_info(device)[0] if cuda else None
    plan = plan_memory(model_spec(model), world_size=1, shard_group_size=1, param_dtype=dtype, sampler="sgld",
                       batch_size=args.batch_size, seq_len=args.seq_len, batched_chains=C, capacity=capacity)
    log("# plan_memory(model_spec(model), world_size=1, shard_group_size=1, ...):")
    for line in plan.table().splitlines():
        log("#   " + line)
    log(f"# estimate_llc: sgld lr={HYPER['lr']:g} nbeta={HYPER['nbeta']:g} gamma={HYPER['gamma']:g}, {C} chains "
        f"(max_batched_chains={C}), shared batches of {args.batch_size} x {args.seq_len} tokens, chain_batching="
        f"{args.chain_batching!r}")
    log()

    row: dict = dict(model=type(model).__name__, params=n, plan_total=plan.total, plan_parts=dict(plan.parts))
    try:
        t = time.perf_counter()
        run(model, batches, args, draws=2, burnin=0)
        synchronize(device)
        log(f"warm-up call (2 steps): {time.perf_counter() - t:.1f} s")
        n1 = args.burnin + 3
        r1, _ = run(model, batches, args, draws=3, burnin=args.burnin)
        if cuda:
            synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        r2, warns = run(model, batches, args, draws=3 + args.draws, burnin=args.burnin)
        peak = torch.cuda.max_memory_allocated(device) if cuda else None
        reserved = torch.cuda.max_memory_reserved(device) if cuda else None
        n2 = n1 + args.draws
        s1, s2 = r1.timing["sampling_s"], r2.timing["sampling_s"]
        step = (s2 - s1) / (n2 - n1)
        engine = r2.config["engine"]
        log(f"timed calls: {n1} steps in {s1:.3f} s, {n2} steps in {s2:.3f} s (sampling loop); engine {engine}, "
            f"backend {r2.config['backend']}; llc {r2.llc_mean:.4g}")
        for w in warns:
            log(f"  warning: {w}")
    except Exception as e:
        traceback.print_exc()
        print(f"SUMMARY: FAILED: estimate_llc on the {n / 1e9:.2f}B model: {type(e).__name__}: {str(e)[:300]}")
        if args.output:
            write_results(args.output, header, [dict(row, error=f"{type(e).__name__}: {e}")])
        return 1

    # forward+backward alone, the same passes as the engine that ran
    reps = 3 if args.quick else 5
    if engine == "vmap":
        fc = FlatChains(model, lm_loss, C, "swap")
        fwd_bwd_loop(fc, batches, 1)
        fb = wall(lambda: fwd_bwd_loop(fc, batches, reps), device) / reps
        del fc
        how = f"vmapped grad_and_value over [{C}, N]"
    else:
        params = list(model.parameters())

        def passes(k):
            for i in range(k):
                for _ in range(C):
                    lm_loss(model, batches[i % len(batches)]).backward()
                for p in params:
                    p.grad = None

        passes(1)
        fb = wall(lambda: passes(reps), device) / reps
        how = f"{C} x module forward + loss.backward()"
    if cuda:
        torch.cuda.empty_cache()
    outside = 1 - fb / step if step > 0 else math.nan
    row.update(engine=engine, backend=r2.config["backend"], steps=[n1, n2], sampling_s=[s1, s2], s_per_step=step,
               s_per_chain_step=step / C, fwd_bwd_s_per_step=fb, fwd_bwd_how=how, outside_share=outside,
               step_over_fwd_bwd=step / fb if fb > 0 else math.nan, peak_allocated=peak, peak_reserved=reserved,
               llc_mean=r2.llc_mean, warnings=warns)
    log(f"seconds per step ({C} chains): {step:.4f} s ({step / C:.4f} s per chain-step)")
    log(f"forward+backward alone ({how}): {fb:.4f} s per step; step / fwd+bwd {step / fb:.3f}x; outside "
        f"forward/backward: {outside:.1%} of the step")
    if peak is not None:
        no_ctx = plan.total - FIXED_OVERHEAD
        row.update(peak_over_plan=peak / plan.total, peak_over_plan_without_context=peak / no_ctx)
        log(f"peak memory allocated: {peak / GiB:.2f} GiB (reserved {reserved / GiB:.2f} GiB); plan_memory predicted "
            f"{plan.total / GiB:.2f} GiB ({no_ctx / GiB:.2f} GiB without its 1 GiB for the CUDA context): measured / "
            f"predicted = {peak / plan.total:.2f} ({peak / no_ctx:.2f})")
        mem = f"peak {peak / GiB:.1f} GiB vs plan {plan.total / GiB:.1f} GiB ({peak / plan.total:.2f})"
    else:
        mem = "peak memory: not measured on the CPU"
    header["loadavg_end"] = loadavg()
    header["total_s"] = time.perf_counter() - t0
    log(f"# total {header['total_s']:.0f} s")
    if args.output:
        write_results(args.output, header, [row])
    size = f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n:,}-parameter"
    slow = sorted({m.group(1) for w in warns for m in [re.search(r"batching rule for (aten::\w+)", w)] if m})
    if slow:  # vmap ran these one chain at a time: the step is slower than a batched pass would be
        mem += f"; vmap fell back to a loop for {', '.join(slow)}"
    print("SUMMARY: " + ("[quick: not a result] " if args.quick else "")
          + f"{size} {args.arch} {args.dtype}, {C} chains, engine {engine}: {step:.3f} s/step, "
          f"{outside:.0%} outside fwd+bwd, {mem}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
