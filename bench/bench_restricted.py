"""Restricted LLCs of many components in one batched run (``llc_fast.estimate_restricted_llcs``) against
one component, against one ``estimate_llc(mask=...)`` call per component, and against devinterp 2.0.1's
per-component loop.

    .venv/bin/python bench/bench_restricted.py [--device cpu|cuda] [--parts a,b,c,d] [--quick] [...: --help]

The K attention heads of a small random GPT-2 (``models.gpt2``), each round, side by side: (a) ONE
``estimate_restricted_llcs`` over them; (b) ONE ``estimate_llc(mask=<one head>)``; (c) K sequential
``estimate_llc(mask=...)`` calls; (d) devinterp 2.0.1's ``llc(param_masks=...)`` once per head; (f) ONE
``estimate_llc`` of the full model with the same chains and draws. Ratios within each round (a/b, c/a, d/a, a/f,
also wall over wall), median and range over rounds; (a)'s estimates checked against (b)'s and (c)'s; state bytes
per row (sparse against full) and peak RSS. ``--case gpt2-4l`` is issue 21's model; ``--case gpt2-small-shape
--steps 3`` plans and starts the all-heads study of a GPT-2 small shape (``restricted_cases.py``).
bench/README.md has the settings and details.
"""
from __future__ import annotations

import math
import time
import traceback
import warnings

import torch

from harness import (BUSY, Table, begin, cli, error_line, fmt_spread, guard_for, loadavg, log, spread, summary,
                     synchronize, write_results)

import llc_fast  # noqa: E402  (harness puts the repository on sys.path)
from llc_fast.integrations.components import heads as head_components  # noqa: E402
from models import IdsDataset, devinterp_quiet, gpt2, hf_dataset, import_devinterp, lm_loss, run_devinterp  # noqa
from restricted_cases import CASES, apply_case, full_model, memory_report, restricted_facts, small_shape  # noqa

PARTS = {"a": "estimate_restricted_llcs, K components in one run", "b": "estimate_llc(mask=one head): one component",
         "c": "K sequential estimate_llc(mask=...) calls", "d": "devinterp 2.0.1: llc(param_masks=...) per head",
         "f": "estimate_llc of the full model, C chains"}
RATIOS = {  # key: (numerator, denominator, time key: None = devinterp's wall over llc_fast's sampling_s, meaning)
    "a_over_b": ("a", "b", "sampling_s", "a/b: K components in one run / one component (goal <= 1.5 on CPU)"),
    "c_over_a": ("c", "a", "sampling_s", "c/a: speed-up over K sequential estimate_llc(mask=...) calls"),
    "d_over_a": ("d", "a", None, "d/a: speed-up over devinterp's per-head loop (its wall / sampling_s)"),
    "a_over_b_wall": ("a", "b", "wall_s", "a/b, wall time over wall time"),
    "c_over_a_wall": ("c", "a", "wall_s", "c/a, wall time over wall time"),
    "d_over_a_wall": ("d", "a", "wall_s", "d/a, wall time over wall time (both with their set-up)"),
    "a_over_f": ("a", "f", "sampling_s", "a/f: K components in one run / one full-model run (goal <= 10)"),
    "a_over_f_wall": ("a", "f", "wall_s", "a/f, wall time over wall time"),
}


class Runs:
    """The four measurements on one model, batches and set of components."""

    def __init__(self, args, model, batches, components):
        self.args, self.model, self.batches, self.components = args, model, batches, components
        self.dev = None  # (dataset, masks) once devinterp is set up

    def options(self, draws=None) -> dict:
        a = self.args
        return dict(sampler="sgld", lr=a.lr, nbeta=a.nbeta, gamma=a.gamma, num_chains=a.chains,
                    num_draws=draws or a.draws, num_burnin_steps=0, num_init_loss_batches=a.init_batches,
                    shared_batches=True, seed=0, progress=False)

    def timed(self, fn):
        synchronize(self.args.device)
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            r = fn()
        synchronize(self.args.device)
        return r, time.perf_counter() - t0, sorted({str(w.message).splitlines()[0][:160] for w in caught
                                                    if not issubclass(w.category, DeprecationWarning)})

    def restricted(self, draws=None) -> dict:
        r, wall, warned = self.timed(lambda: llc_fast.estimate_restricted_llcs(
            self.model, self.batches, lm_loss, self.components, **self.options(draws)))
        return dict(sampling_s=r.timing["sampling_s"], wall_s=wall, engine=r.facts.get("engine"),
                    backend=r.facts.get("backend"), components=r.names, rows=len(r) * self.args.chains,
                    steps=r.timing.get("steps"), llc={n: float(r[n].llc_mean) for n in r.names},
                    diverged={n: len(r[n].diverged_chains) for n in r.names if r[n].diverged_chains}, warnings=warned,
                    **restricted_facts(r))

    def single(self, name, draws=None) -> dict:
        r, wall, warned = self.timed(lambda: llc_fast.estimate_llc(
            self.model, self.batches, lm_loss, mask=self.components[name], **self.options(draws)))
        return dict(sampling_s=r.timing["sampling_s"], wall_s=wall, engine=r.config.get("engine"),
                    backend=r.config.get("backend"), rows=self.args.chains, llc=float(r.llc_mean), warnings=warned)

    def loop(self, one, **extra) -> dict:
        """``one(name)`` for every component, one after the other: the summed times, each estimate."""
        calls = {name: one(name) for name in self.components}
        first = next(iter(calls.values()))
        total = {k: sum(c[k] for c in calls.values()) for k in ("sampling_s", "wall_s") if k in first}
        return dict(total, rows=self.args.chains * len(calls), llc={n: c["llc"] for n, c in calls.items()},
                    warnings=sorted({w for c in calls.values() for w in c["warnings"]}),
                    **{k: f(calls) for k, f in extra.items()})

    def sequential(self) -> dict:
        return self.loop(self.single, engines=lambda calls: sorted({c["engine"] for c in calls.values()}))

    def setup_devinterp(self, rows) -> None:
        from devinterp.slt.weight_restrictions import create_param_masks

        data = hf_dataset(rows) if self.args.devinterp_dataset == "hf" else IdsDataset(rows)
        self.dev = data, {name: create_param_masks(self.model, name) for name in self.components}

    def devinterp_one(self, name, draws=None) -> dict:
        a, (data, masks) = self.args, self.dev
        out = run_devinterp(self.model, data, None, lr=a.lr, nbeta=a.nbeta, gamma=a.gamma, chains=a.chains,
                            draws=draws or a.draws, burnin=0, batch_size=a.batch_size, init_batches=a.init_batches,
                            device=a.device, param_masks=masks[name])
        # devinterp 2.0.1's llc_mean averages burn-in in; there is none here
        return dict(wall_s=out["seconds"], llc=out["own_llc_mean"], warnings=out["warnings"])

    def devinterp(self) -> dict:
        return self.loop(self.devinterp_one, per_call_s=lambda calls: {n: c["wall_s"] for n, c in calls.items()})


MAIN_RATIOS = ("a_over_b", "c_over_a", "d_over_a", "a_over_f")


def round_ratios(v: dict) -> dict:
    out = {}
    for key, (num, den, tkey, _) in RATIOS.items():
        if num in v and den in v:
            n, d = v[num]["wall_s" if num == "d" else tkey], v[den]["sampling_s" if tkey is None else tkey]
            out[key] = n / d if d > 0 else math.nan
    return out


def set_up(args):
    model = gpt2(args.layers, args.heads, args.embd, args.seq_len, args.vocab, args.device)
    rows = torch.randint(0, args.vocab, (args.sequences, args.seq_len), generator=torch.Generator().manual_seed(1))
    b = args.batch_size
    batches = [rows[i:i + b].to(args.device) for i in range(0, args.sequences - b + 1, b)]
    args.init_batches = min(args.init_batches, len(batches))
    components = head_components(model)
    single = args.single if args.single in components else next(iter(components))
    head_numel = sum(int(m.sum()) if m is not None else model.get_parameter(n).numel()
                     for n, m in components[single].items())
    log(f"# GPT-2 {args.layers} layers x {args.heads} heads, n_embd {args.embd}, vocab {args.vocab}, {args.seq_len} "
        f"positions, random init, eager attention, eval(): {sum(p.numel() for p in model.parameters()):,} "
        f"parameters; K = {len(components)} head components of {head_numel:,} weights each")
    log(f"# data: {args.sequences} random sequences x {args.seq_len} tokens, batches of {b} ({len(batches)} batches), "
        f"next-token cross-entropy; sgld lr={args.lr:g} nbeta={args.nbeta:g} gamma={args.gamma:g}, {args.chains} "
        f"chains x {args.draws} draws, no burn-in, {args.init_batches} batches for L(w*), every chain on the same "
        "batches")
    log("# times: llc_fast = result.timing['sampling_s'] (the sampling loop only); devinterp = wall time of its "
        "whole llc() call, its own set-up included (zarr store, init loss, a deep copy per chain)")
    log("# parts: " + "; ".join(f"({p}) {PARTS[p]}" for p in args.parts) + f"; (b) is head {single}")
    log()
    return Runs(args, model, batches, components), rows, single, head_numel


def warm_up(args, runs: Runs, rows, single) -> str | None:
    """Untimed calls of every part (the C++ kernel, the vmapped pass, devinterp's paths); devinterp's error."""
    try:
        runs.restricted(draws=2)
        runs.single(single, draws=2)
        if "f" in args.parts:
            full_model(runs, draws=2)
    except Exception as e:
        raise SystemExit(f"bench_restricted: the llc_fast warm-up failed: {error_line(e)}")
    if "d" not in args.parts:
        return None
    t0 = time.perf_counter()
    try:
        if err := import_devinterp()[1]:
            raise ImportError(err)
        runs.setup_devinterp(rows)
        log(f"# devinterp: import and dataset {time.perf_counter() - t0:.1f} s (not timed); input: "
            f"{'HuggingFace Dataset' if args.devinterp_dataset == 'hf' else 'IdsDataset'}")
        with devinterp_quiet():
            runs.devinterp_one(single, draws=2)
        return None
    except Exception as e:
        log(f"# devinterp FAILED at set-up or in its warm-up call: {error_line(e)}")
        log("#   " + traceback.format_exc().strip().replace("\n", "\n#   "))
        args.parts.remove("d")
        return f"set-up or warm-up call failed: {error_line(e)}"


def bench(args, argv) -> int:
    guard = guard_for(args)
    header = begin("bench_restricted", args.device, argv, ("torch", "llc_fast", "transformers", "devinterp"),
                   parts=args.parts, rounds=args.rounds, quick=args.quick, draws=args.draws, chains=args.chains,
                   case=args.case)
    if args.case == "gpt2-small-shape":  # the plan and a few steps of the all-heads study (restricted_cases.py)
        return small_shape(args, argv, header)
    runs, rows, single, head_numel = set_up(args)
    K, parts = len(runs.components), args.parts
    t_start = time.perf_counter()
    dev_error = warm_up(args, runs, rows, single)

    def one_round():
        v = {"a": runs.restricted()}
        if "b" in parts:
            v["b"] = runs.single(single)
        if "c" in parts:
            v["c"] = runs.sequential()
        if "f" in parts:
            v["f"] = full_model(runs)
        if "d" in parts:
            try:
                with devinterp_quiet():
                    v["d"] = runs.devinterp()
            except Exception as e:
                v["d_error"], v["d_traceback"] = error_line(e), traceback.format_exc()
        return dict(v, ratios=round_ratios(v))

    def describe(v):
        times = [f"({p}) {v[p]['wall_s' if p == 'd' else 'sampling_s']:.2f} s" for p in PARTS if p in v]
        r = v["ratios"]
        ratios = [f"{k.replace('_over_', '/')} {r[k]:.2f}" for k in MAIN_RATIOS if k in r]
        return f"{', '.join(times)}; {', '.join(ratios)}" + (f"; devinterp FAILED: {v['d_error']}" if "d_error" in v
                                                               else "")

    used, clean, attempts = guard.rounds(one_round, args.rounds, describe)
    header.update(loadavg_end=loadavg(), wall_s=time.perf_counter() - t_start)
    n_busy, busy = sum(not guard.clean(a) for a in attempts), "" if clean else BUSY
    if dev_error is None and (failed := [a.value for a in attempts if "d_error" in a.value]):
        dev_error = "; ".join(sorted({v["d_error"] for v in failed}))
        log("# devinterp FAILED in a round:\n#   " + failed[0]["d_traceback"].strip().replace("\n", "\n#   "))
    first = used[0]
    a0 = first["a"]
    timed, ratios = tables(args, used, first, K, busy, dev_error)
    checks = check_estimates(args, runs, first, single, K)
    warned = sorted({w for v in used for p in PARTS if p in v for w in v[p]["warnings"]})
    if warned:
        log(f"# warnings: {'; '.join(warned)}")
    log(f"# rounds: {len(attempts)} timed, {n_busy} busy (other processes kept >= {guard.busy} cores busy), "
        f"{len(used)} used; done in {header['wall_s']:.0f} s; load average at end: {header['loadavg_end']}")
    line = [f"{k.replace('_over_', '/')} {fmt_spread(ratios[k], unit='x')}" for k in MAIN_RATIOS if k in ratios]
    summary(f"K={K} heads x {args.chains} chains x {args.draws} draws: " + ", ".join(
        line + ([f"devinterp FAILED ({dev_error})"] if dev_error else [])) + ("" if clean else " (busy)"), args.quick)
    write_results(args.output, header, [dict(
        model=f"GPT-2 {args.layers}L x {args.heads}H d{args.embd} V{args.vocab}",
        params=sum(p.numel() for p in runs.model.parameters()), components=list(runs.components), K=K,
        single=single, head_weights=head_numel, chains=args.chains, draws=args.draws, batch_size=args.batch_size,
        sequences=args.sequences, seq_len=args.seq_len,
        hyper=dict(lr=args.lr, nbeta=args.nbeta, gamma=args.gamma, init_batches=args.init_batches),
        chain_rows=a0["rows"], engine=a0["engine"], batched=a0["engine"] == "vmap", backend=a0["backend"],
        parts={p: {k: v for k, v in t.items() if k != "label"} for p, t in timed.items()}, ratios=ratios,
        checks=checks, clean=clean, busy_rounds=n_busy, devinterp_error=dev_error, case=args.case,
        memory=memory_report(first),
        rounds=[dict({k: v for k, v in a.value.items() if k != "d_traceback"}, other_cores=a.other, waited_s=a.waited,
                     clean=guard.clean(a)) for a in attempts])])
    return 0


def tables(args, used: list[dict], first: dict, K: int, busy: str, dev_error) -> tuple[dict, dict]:
    """The table of the parts and the ratios (median and range over the rounds used)."""
    a0 = first["a"]
    facts = {"a": (1, a0["rows"], a0["engine"]), "b": (1, args.chains, first.get("b", {}).get("engine")),
             "c": (K, args.chains * K, ",".join(first.get("c", {}).get("engines", []))),
             "d": (K, args.chains * K, "one chain at a time"), "f": (1, args.chains, first.get("f", {}).get("engine"))}
    timed = {}
    for p in (p for p in args.parts if any(p in v for v in used)):
        calls, chain_rows, engine = facts[p]
        timed[p] = dict(timed_s=spread(v[p]["wall_s" if p == "d" else "sampling_s"] for v in used if p in v),
                        wall_s=spread(v[p]["wall_s"] for v in used if p in v), calls=calls, chain_rows=chain_rows,
                        engine=engine, time="wall of the call, its set-up included" if p == "d"
                        else "result.timing['sampling_s']", label=f"({p}) {PARTS[p]}")
    log()
    Table(("label", 0, lambda v: f"{v:<54}", f"{'':<54}"), ("calls", 5, "d"), ("chain_rows", 10, "d", "chain rows"),
          ("engine", 19, "s"), ("timed_s", 26, fmt_spread, "timed s median (range)"),
          ("wall_s", 13, lambda v: f"{v['median']:13.2f}" + busy, "wall s median")).print(timed.values())
    ratios = {key: dict(spread(v["ratios"][key] for v in used if key in v["ratios"]), meaning=meaning)
              for key, (_, _, _, meaning) in RATIOS.items() if any(key in v["ratios"] for v in used)}
    log()
    log("ratios within each round, median (range):")
    for r in ratios.values():
        log(f"  {r['meaning']:<70} {fmt_spread(r, unit='x'):>22}{busy}")
    if dev_error:
        log(f"  d/a: not measured: devinterp FAILED: {dev_error}")
    return timed, ratios


def check_estimates(args, runs: Runs, first: dict, single: str, K: int) -> dict:
    """The batched run gives each component the estimate estimate_llc(mask=component) gives (same seed)."""
    a0, checks = first["a"], {}
    if "b" in first:
        checks["b_same_as_a"] = abs(first["b"]["llc"] - a0["llc"][single])
    if "c" in first:
        checks["c_same_as_a_max_abs_diff"] = max(abs(first["c"]["llc"][n] - a0["llc"][n]) for n in runs.components)
    if "d" in first:
        checks["devinterp_llc"] = first["d"]["llc"]
    log()
    log(f"# chain rows: (a) {a0['rows']} = {K} components x {args.chains} chains in one call, engine {a0['engine']} "
        f"({'batched: vmapped forward/backward over the rows' if a0['engine'] == 'vmap' else 'NOT batched'}), "
        f"backend {a0['backend']}, {a0['steps']} chain-steps")
    if "b_same_as_a" in checks:
        log(f"# (a)'s estimate of {single} {a0['llc'][single]:.5g} vs (b)'s {first['b']['llc']:.5g} (|diff| "
            f"{checks['b_same_as_a']:.2g})" + (f"; max |diff| over the K heads against (c): "
                                               f"{checks['c_same_as_a_max_abs_diff']:.2g}" if "c" in first else ""))
    if "d" in first:
        log("# devinterp's estimates (llc_mean, no burn-in): " + ", ".join(f"{n} {x:.4g}" for n, x in
                                                                           checks["devinterp_llc"].items())
            + "; llc_fast's (a): " + ", ".join(f"{n} {a0['llc'][n]:.4g}" for n in runs.components)
            + " (different noise and batch order: statistically, not bitwise, comparable)")
    return checks


def options(ap) -> None:
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of a,b,c,d,f (d: devinterp's "
                    "loop; f: the full model; a is always run: the ratios are over it)")
    ap.add_argument("--case", choices=sorted(CASES), default="default", help="gpt2-4l: 4 layers x 4 heads, n_embd 128, "
                    "vocab 512, 64 tokens, batches of 8; gpt2-small-shape: plan and start the all-heads study of a "
                    "GPT-2 small shape (vocab 2048, batches of 2 x 32 tokens) for --steps steps (options left at "
                    "their defaults)")
    ap.add_argument("--steps", type=int, default=3, help="gpt2-small-shape: steps to run")
    ap.add_argument("--memory-gib", type=float, default=12.0, help="gpt2-small-shape: the memory to plan for "
                    "(default 12: half of a 24 GiB machine; the planner counts about 40 %% of eager GPT-2's "
                    "activations under vmap)")
    ap.add_argument("--rows-per-call", type=int, default=0, help="gpt2-small-shape: rows per vmapped call (default "
                    "0: the plan's most; the case sets 16, 4 heads' chains; bench/README.md)")
    ap.add_argument("--rounds", type=int, help="rounds (default 3; 1 with --quick)")
    ap.add_argument("--draws", type=int, help="draws per chain, no burn-in (default 100; 4 with --quick)")
    for name, default, text in (("chains", 4, ""), ("layers", 2, ""), ("heads", 4, "attention heads per layer (K = "
                                "layers x heads)"), ("embd", 64, ""), ("vocab", 256, ""), ("seq-len", 32, "tokens per "
                                "sequence (also n_positions)"), ("sequences", 64, "random token sequences in the data "
                                "set"), ("batch-size", 8, ""), ("init-batches", 4, "batches for L(w*) in both "
                                "libraries")):
        ap.add_argument(f"--{name}", type=int, default=default, help=text or None)
    for name, default in (("lr", 1e-3), ("nbeta", 30.0), ("gamma", 300.0)):
        ap.add_argument(f"--{name}", type=float, default=default)
    ap.add_argument("--single", default="l0h1", help="the head of (b) (default l0h1, else the first head)")
    ap.add_argument("--devinterp-dataset", choices=["hf", "ids"], default="hf",
                    help="devinterp's input: a HuggingFace Dataset of the tokens (default, its documented input) "
                         "or bench_e2e.py's map-style IdsDataset")


def check(args, ap) -> None:
    apply_case(args, ap)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()} | {"a"}
    if bad := sorted(parts - set(PARTS)):
        ap.error(f"unknown part {bad[0]!r}; choose from {', '.join(PARTS)}")
    args.parts = [p for p in PARTS if p in parts]
    if args.sequences < args.batch_size:
        ap.error("--sequences must be at least --batch-size")


main = cli(__doc__, options, bench, check=check, each="round",
           quick=dict(rounds=(3, 1), draws=(100, 4), retry_busy=(2, 0)))

if __name__ == "__main__":
    raise SystemExit(main())
