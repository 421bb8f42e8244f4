"""bench_restricted.py's cases beyond its default model: part (f), one full-model ``estimate_llc`` of C chains
beside (a), with the state bytes per row and peak memory of each; the ``gpt2-4l`` preset (issue 21's
must-show); and ``gpt2-small-shape``, which plans and starts the all-heads study of a GPT-2 small shape.
"""
from __future__ import annotations

import time

import torch

from harness import log, summary, write_results

import llc_fast  # noqa: E402
from llc_fast.chains.row_timing import peak_memory  # noqa: E402

#: option values each case sets where the command line left the bench's default
CASES = {
    "default": {},
    "gpt2-4l": dict(layers=4, heads=4, embd=128, vocab=512, seq_len=64, batch_size=8, chains=4),
    # 2 x 32 tokens (a step of the 576 rows: ~3e12 flop); calls of 4 heads x 4 chains (bench/README.md)
    "gpt2-small-shape": dict(layers=12, heads=12, embd=768, vocab=2048, seq_len=32, batch_size=2, chains=4,
                             sequences=4, init_batches=1, rows_per_call=16),
}
GiB = 2**30


def apply_case(args, ap) -> None:
    """Set the case's options that are still at the parser's defaults."""
    for name, value in CASES[args.case].items():
        if getattr(args, name) == ap.get_default(name):
            setattr(args, name, value)


def full_model(runs, draws=None) -> dict:
    """(f): ONE ``estimate_llc`` of the whole model with C chains, the options (and draws) of (a)."""
    from models import lm_loss

    r, wall, warned = runs.timed(lambda: llc_fast.estimate_llc(runs.model, runs.batches, lm_loss,
                                                               **runs.options(draws)))
    c = r.config
    return dict(sampling_s=r.timing["sampling_s"], wall_s=wall, engine=c.get("engine"), backend=c.get("backend"),
                rows=runs.args.chains, llc=float(r.llc_mean), warnings=warned,
                state_bytes_per_row=row_bytes(c["num_params"], runs.model, c["sampler"]),
                rows_per_call=c.get("rows_per_call", c.get("rows_per_group")), row_plan=c.get("row_plan"),
                peak_rss_bytes=peak_memory().get("peak_rss_bytes"))


def row_bytes(numel: int, model, sampler: str) -> int:
    item = next(model.parameters()).element_size()
    return numel * (2 * item + (0 if sampler == "sgld" else 4))


def restricted_facts(r) -> dict:
    """(a)'s rows: state bytes per row (mean over the components), the full row's, rows per call, peak RSS."""
    f = r.facts
    per_row = f.get("state_bytes_per_row") or []
    return dict(state_bytes_per_row=sum(per_row) / max(1, len(per_row)), full_row_bytes=f.get("full_row_bytes"),
                row_storage=f.get("row_storage"), rows_per_call=f.get("rows_per_call"), row_plan=f.get("row_plan"),
                row_times_s=f.get("row_times_s"), peak_rss_bytes=f.get("peak_rss_bytes"))


def memory_report(first: dict) -> dict:
    """State bytes per row of (a) against (f) (goal: >= 10x less) and each part's peak RSS, logged."""
    a, f = first["a"], first.get("f")
    out = dict(sparse_row_bytes=a.get("state_bytes_per_row"), sparse_rows_per_call=a.get("rows_per_call"),
               a_peak_rss_bytes=a.get("peak_rss_bytes"), a_row_plan=a.get("row_plan"))
    full = f["state_bytes_per_row"] if f else a.get("full_row_bytes")
    out.update(full_row_bytes=full, full_over_sparse_row_bytes=full / a["state_bytes_per_row"]
               if a.get("state_bytes_per_row") else None)
    if f:
        out.update(f_peak_rss_bytes=f["peak_rss_bytes"], f_rows_per_call=f["rows_per_call"])
    log(f"# state bytes per row: (a) sparse rows {out['sparse_row_bytes']:,.0f} B, full rows {full:,} B: "
        f"{out['full_over_sparse_row_bytes'] or float('nan'):.1f}x less (goal >= 10x); rows per call (a) "
        f"{out['sparse_rows_per_call']}" + (f", (f) {f['rows_per_call']}" if f else ""))
    log(f"# peak RSS of the process after (a): {_gib(out['a_peak_rss_bytes'])}" + (
        f", after (f): {_gib(f['peak_rss_bytes'])} (getrusage's maximum: monotone over the run, parts in order "
        "a, f, ...)" if f else ""))
    log(f"# (a)'s row plan: {out['a_row_plan']}")
    return out


def _gib(n) -> str:
    return "?" if n is None else f"{n / GiB:.2f} GiB"


def small_shape(args, argv, header) -> int:
    """Plan the all-heads study of a GPT-2 small shape (random weights, the case's vocabulary), print the plan,
    then run ``estimate_restricted_llcs`` over every head for ``--steps`` steps and print the time per step."""
    from llc_fast.distributed.restricted_plan import component_sizes
    from llc_fast.distributed.planner import model_spec, plan_memory
    from models import gpt2, lm_loss

    model = gpt2(args.layers, args.heads, args.embd, args.seq_len, args.vocab, args.device)
    capacity = int(args.memory_gib * GiB)
    plan = plan_memory(model_spec(model, f"GPT-2 {args.layers}L x {args.heads}H d{args.embd} V{args.vocab}"),
                       world_size=1, components=component_sizes(model, "heads"), chains=args.chains,
                       param_dtype=torch.float32, sampler="sgld", batch_size=args.batch_size, seq_len=args.seq_len,
                       activation_checkpointing=False, capacity=capacity)
    log(plan.table())
    most = max(args.chains, plan.most_rows[0] // args.chains * args.chains) if plan.most_rows[0] else args.chains
    cap = min(most, max(args.chains, args.rows_per_call // args.chains * args.chains)) if args.rows_per_call else most
    log(f"# the run: calls of at most {cap} rows (whole components; the plan allows {most} from block 0"
        + (f", --rows-per-call {args.rows_per_call}" if args.rows_per_call else "") + f"), {args.steps} steps, no "
        f"burn-in, batch {args.batch_size} x {args.seq_len} tokens, {torch.get_num_threads()} torch threads")
    ids = torch.randint(0, args.vocab, (args.batch_size * 2, args.seq_len), generator=torch.Generator().manual_seed(1))
    batches = [ids[i:i + args.batch_size].to(args.device) for i in range(0, len(ids), args.batch_size)]
    t0 = time.perf_counter()
    r = llc_fast.estimate_restricted_llcs(model, batches, lm_loss, "heads", sampler="sgld", lr=args.lr,
                                          nbeta=args.nbeta, gamma=args.gamma, num_chains=args.chains,
                                          num_draws=args.steps, num_burnin_steps=0, num_init_loss_batches=1,
                                          shared_batches=True, seed=0, progress=False, max_batched_chains=cap,
                                          batch_memory_bytes=capacity // 2)
    wall = time.perf_counter() - t0
    facts = restricted_facts(r)
    per_step = r.timing["sampling_s"] / args.steps
    setup_s = wall - r.timing["sampling_s"] - r.timing["init_loss_s"]
    log(f"# wall {wall:.1f} s = set-up {setup_s:.1f} s (sparse rows, one trial call per layer's heads) + L(w*) "
        f"{r.timing['init_loss_s']:.1f} s + sampling {r.timing['sampling_s']:.1f} s ({args.steps} steps)")
    log(f"# {len(r)} heads x {args.chains} chains = {len(r) * args.chains} rows ({facts['row_storage']} rows, "
        f"{facts['state_bytes_per_row']:,.0f} B per row against {facts['full_row_bytes']:,} B full): "
        f"{per_step:.2f} s per step (sampling_s / steps), wall {wall:.1f} s; peak RSS {_gib(facts['peak_rss_bytes'])}"
        f" (goal <= 24 GiB); row plan: {facts['row_plan']}")
    summary(f"{args.case}: {len(r) * args.chains} rows, {per_step:.2f} s/step, peak RSS "
            f"{_gib(facts['peak_rss_bytes'])}", args.quick)
    write_results(args.output, header, [dict(case=args.case, plan=plan.table(), calls_planned=plan.calls,
                                             max_batched_chains=cap, plan_most_rows=list(plan.most_rows),
                                             steps=args.steps, seconds_per_step=per_step, wall_s=wall,
                                             setup_s=setup_s, init_loss_s=r.timing["init_loss_s"],
                                             sampling_s=r.timing["sampling_s"], batch_size=args.batch_size,
                                             seq_len=args.seq_len, threads=torch.get_num_threads(),
                                             components=len(r), chains=args.chains, **facts)])
    return 0
