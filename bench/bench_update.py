"""Achieved bandwidth of one SGLD update: llc_fast's backends against a devinterp-style eager loop
and, as an anchor, torch's fused AdamW.

    .venv/bin/python bench/bench_update.py [--device cpu|cuda] [--sizes 2^16 2^20 ...] [--quick] [...: --help]

The grid: size x dtype x sampler, every update timed side by side at each point (``Point``), against the copy
bandwidth timed within it; bytes, timing and caps: bench/README.md. SUMMARY (gpu_suite.sh's stage d): ``report``.
"""
from __future__ import annotations

import gc
import itertools
import math
import statistics

import torch

from harness import (Table, available_memory, begin, cli, finish, grid, guard_for, log, run_grid, spread,
                     time_interleaved, validate)

import llc_fast  # noqa: E402  (harness puts the repository on sys.path)
from llc_fast.kernels.dispatch import select_backend  # noqa: E402
from llc_fast.kernels.update_spec import SamplerSettings, StepCounters  # noqa: E402
from models import eager_step, split_views, transformer_split  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
SAMPLERS = ("sgld", "rmsprop_sgld")
COPY_SAMPLES_PER_POINT = 7  # copies timed within each point, interleaved with the updates
# Hyperparameters of the timed step (typical of published LLC runs; the values do not change the work done).
LR, NBETA, GAMMA = 1e-4, 30.0, 300.0
ADAMW = dict(lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=1e-2, eps=1e-8)  # torch.optim.AdamW's defaults


def fmt_size(n: int) -> str:
    k = int(math.log2(n)) if n > 0 else 0
    return f"2^{k}" if 1 << k == n else str(n)


def parse_size(text: str) -> int:
    t = text.strip().lower().replace("**", "^")
    if t.startswith("2^"):
        return 1 << int(t[2:])
    if "<<" in t:
        a, b = t.split("<<")
        return int(a) << int(b)
    return int(float(t))


def measure_copy(device, numel: int, guard, *, repeats: int, when: str) -> dict:
    """Bytes read + written per second by ``dst.copy_(src)`` on float32 tensors of ``numel`` elements, from the
    median and from the fastest call, under the load guard (of its attempts, the fastest median is kept)."""
    src = torch.randn(numel, device=device)
    dst, nbytes = torch.empty_like(src), 8 * numel
    best = min(guard.run(lambda: time_interleaved({0: lambda: dst.copy_(src)}, device, warmup=2, min_repeats=repeats,
                                                  max_repeats=max(repeats, 50), target_s=1.0)[0][0]),
               key=lambda a: statistics.median(a.value))
    med, fastest, other = nbytes / statistics.median(best.value), nbytes / min(best.value), best.other
    log(f"# copy bandwidth{when}: {med / 1e9:.2f} GB/s median, {fastest / 1e9:.2f} GB/s best call (dst.copy_(src), "
        f"float32, {fmt_size(numel)} elements, {nbytes / 2**20:.0f} MiB read + written per call"
        + ("" if other is None else f"; other processes kept {other:.2f} cores busy meanwhile") + ")")
    return dict(median_Bps=med, best_call_Bps=fastest, bytes=nbytes, numel=numel, other_cores=other)


def ideal_bytes(n: int, dtype: torch.dtype, sampler: str, backend: str = "") -> int:
    """Bytes an update must move: SGLD w, grad, w* read and w written, RMSProp V read and written;
    AdamW param, exp_avg, exp_avg_sq read and written and grad read."""
    elem = torch.empty((), dtype=dtype).element_size()
    stat = (8 if dtype == torch.float64 else 4) if sampler != "sgld" else 0  # RMSProp's V
    return n * 7 * elem if backend == "adamw" else n * (4 * elem + 2 * stat)


def needed_memory(n: int, dtype: torch.dtype, sampler: str, backends: list[str], shapes) -> int:
    """Rough peak bytes of one point: grad and w* shared, w and V per backend, temporaries."""
    elem = torch.empty((), dtype=dtype).element_size()
    stat = (8 if dtype == torch.float64 else 4) if sampler != "sgld" else 0
    total = 2 * n * elem + n * 4  # grad, w*, and the float32 start point while the copies are made
    for name in backends:
        total += 3 * n * elem if name == "adamw" else n * elem + (n * (elem if name == "eager" else stat) if stat else 0)
    extra = 6 * max(math.prod(s) for s in shapes) * 4 if "eager" in backends else 0  # the largest tensor's temporaries
    if "torch" in backends:  # the reference works in chunks of 2^20 elements, with int64 noise temporaries
        extra = max(extra, 64 * (1 << 20) * 8)
    return total + extra


def make_call(name, fn, w, grad, w_star, settings: SamplerSettings, shapes, *, lr=LR, nbeta=NBETA, gamma=GAMMA):
    """A zero-argument callable doing one update of ``w`` with ``name`` (``fn``, with its own V if the sampler is
    preconditioned); each call takes the next step."""
    if name == "adamw":  # one AdamW(fused=True) step: the float32 step counter, then torch._fused_adamw_
        param, g = w[0], grad[0]
        exp_avg, exp_avg_sq = torch.zeros_like(param), torch.zeros_like(param)
        count = torch.zeros((), dtype=torch.float32, device=param.device)

        def adamw():
            torch._foreach_add_([count], 1)
            torch._fused_adamw_([param], [g], [exp_avg], [exp_avg_sq], [], [count], amsgrad=False, maximize=False,
                                **ADAMW)
        return adamw
    if name == "eager":
        params, grads, inits = split_views(w[0], shapes), split_views(grad[0], shapes), split_views(w_star, shapes)
        vs = split_views(torch.zeros(w.shape[1], device=w.device, dtype=w.dtype), shapes)  # devinterp: zeros_like(p)
        return lambda: eager_step(settings.sampler, params, grads, inits, vs, lr=lr, nbeta=nbeta, gamma=gamma,
                                  settings=settings)
    chain_ids, steps = torch.zeros(1, dtype=torch.int64, device=w.device), itertools.count()
    stat = torch.zeros(w.shape, device=w.device) if settings.preconditioned else None

    def call():
        t = next(steps)
        fn(w, grad, w_star, stat, lr=lr, nbeta=nbeta, gamma=gamma, settings=settings,
           counters=StepCounters(step=t, update_statistic=True, stat_step=t), seed=0, chain_ids=chain_ids)
    return call


class Point:
    """One (size, dtype, sampler) of the grid: every update timed side by side (``time_interleaved``), each on its
    own copy of w (and V) from the same start, with copies in the same rounds: the point's own copy bandwidth."""

    def __init__(self, args, updates: dict, caps: dict, guard, copy_call, copy_bytes):
        self.args, self.updates, self.caps, self.guard = args, updates, caps, guard
        self.copy_call, self.copy_bytes = copy_call, copy_bytes
        self.sec_per_elem: dict[tuple, float] = {}  # fastest seconds per element so far, for the CPU size cap
        self.capped: dict[tuple, str] = {}

    def skip_note(self, n: int, key: tuple) -> str | None:
        """Why ``key`` (backend, sampler, dtype) is not run at size ``n``, if it is not."""
        name, a = key[0], self.args
        if key not in self.capped and name in self.caps and n > self.caps[name]:
            self.capped[key] = f"capped: --cap {name}={fmt_size(self.caps[name])}"
        elif key not in self.capped and a.device.type == "cpu" and key in self.sec_per_elem:
            projected = self.sec_per_elem[key] * n
            if projected > a.max_call_s:
                self.capped[key] = f"capped: ~{projected:.0f} s per call projected (> --max-call-s {a.max_call_s:g})"
        return self.capped.get(key)

    def __call__(self, p: dict) -> list[dict]:
        n, dtype_name, sampler, a = p["size"], p["dtype"], p["sampler"], self.args
        dtype, device, settings = DTYPES[dtype_name], a.device, SamplerSettings(sampler=sampler)
        gc.collect()  # the last point's tensors, before the memory check
        if device.type == "cuda":
            torch.cuda.empty_cache()
        shapes = transformer_split(n, a.eager_layers)
        rows, active = [], []
        for name in self.updates:
            note = self.skip_note(n, (name, sampler, dtype_name))
            (rows.append(dict(backend=name, repeats=0, note=note)) if note else active.append(name))
        need, avail = needed_memory(n, dtype, sampler, active, shapes) if active else 0, available_memory(device)
        if need > 0.8 * avail:
            note = f"skipped: needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available"
            return rows + [dict(backend=name, repeats=0, note=note) for name in active]
        if not active:
            return rows
        gen = torch.Generator(device=device).manual_seed(n)
        w_star = torch.randn(n, device=device, generator=gen).to(dtype)
        w0 = (w_star.float() + 0.01 * torch.randn(n, device=device, generator=gen)).to(dtype)
        grad = torch.randn(1, n, device=device, generator=gen).to(dtype)
        calls, ws, errors = {}, {}, {}
        for name in active:
            ws[name] = w0.view(1, n).clone()
            calls[name] = make_call(name, self.updates[name], ws[name], grad, w_star, settings, shapes)
        del w0
        warmup = 1 if n >= 1 << 24 else 3

        def attempt():
            for name in active:
                if name not in errors and (err := validate(calls[name], warmup=warmup, device=device)):
                    errors[name] = err
            ok = {name: calls[name] for name in active if name not in errors}
            return time_interleaved(ok, device, min_repeats=a.repeats, max_repeats=a.max_repeats, target_s=a.target_s,
                                    extra=self.copy_call, extra_samples=COPY_SAMPLES_PER_POINT)

        def report(at, again):
            if again:
                log(f"# {fmt_size(n)} {sampler} {dtype_name}: other processes kept {at.other:.2f} cores busy; "
                    "timing it again")

        last = self.guard.run(attempt, report=report)[-1]
        (times, copy_times), other = last.value, last.other
        eager = statistics.median(times["eager"]) if times.get("eager") else None
        copy_bps = self.copy_bytes / statistics.median(copy_times) if copy_times else math.nan
        for name in active:
            if name in errors:
                rows.append(dict(backend=name, repeats=0, note=errors[name]))
                continue
            med, fastest = statistics.median(times[name]), min(times[name])
            nbytes = ideal_bytes(n, dtype, sampler, name)
            self.sec_per_elem[(name, sampler, dtype_name)] = fastest / n  # the fastest call: robust to load
            notes = [] if torch.isfinite(ws[name].float()).all() else ["WARNING: non-finite weights after the steps"]
            notes += [] if self.guard.clean(last) else ["machine busy with other processes"]
            rows.append(dict(backend=name, ms=med * 1e3, min_ms=fastest * 1e3, gbps=nbytes / med / 1e9,
                             frac_copy=nbytes / med / copy_bps, copy_gbps=copy_bps / 1e9, elems_per_s=n / med,
                             speedup_vs_eager=eager / med if eager and name != "adamw" else None,
                             repeats=len(times[name]), other_cores=other, note="; ".join(notes)))
        return rows


TABLE = (("size", 6, fmt_size), ("backend", 7, "s"), ("sampler", 12, "s"), ("dtype", 8, "s"),
         ("ms", 10, ".3f", "ms(med)"), ("min_ms", 10, ".3f", "ms(min)"), ("gbps", 7, ".2f", "GB/s"),
         ("frac_copy", 7, ".1%", "of copy"), ("copy_gbps", 5, ".1f", "copy"),
         ("elems_per_s", 8, lambda v: f"{v / 1e9:.4f}", "Gelem/s"), ("speedup_vs_eager", 8, ".2f", "vs eager"),
         ("repeats", 4, "d", "reps"), ("other_cores", 5, ".2f", "other"), ("note", 0, "s", " note"))


def select_updates(args) -> tuple[dict, list[str]]:
    """The update functions that run on the device ('eager' first: the speedups' base; 'adamw' last)."""
    cpu, wanted = args.device.type == "cpu", (lambda name: not args.backends or name in args.backends)
    updates, skipped = ({"eager": None} if wanted("eager") else {}), []
    for info in llc_fast.backends():
        if not wanted(info.name):
            continue
        if cpu and info.name == "triton":
            skipped.append("triton (on the CPU it would run in Triton's interpreter, which is for tests)")
        elif args.device.type not in info.devices:
            skipped.append(f"{info.name} (does not run on {args.device.type})")
        elif not info.available:
            skipped.append(f"{info.name} ({info.reason})")
        else:
            updates[info.name] = select_backend(info.name, args.device).update
    if wanted("adamw"):
        updates["adamw"] = None
    return updates, skipped


def bench(args, argv) -> int:
    device, cpu, caps = args.device, args.device.type == "cpu", args.caps
    if args.sizes:
        sizes = sorted(set(args.sizes))
    elif args.quick:
        sizes = [s for s in (1 << 16, 1 << 20, 1 << 24) if args.min_size <= s <= args.max_size]
    else:
        sizes = [1 << k for k in range(int(math.log2(args.min_size)), int(math.log2(args.max_size)) + 1, args.step)]
    guard = guard_for(args)
    updates, skipped = select_updates(args)
    header = begin("bench_update", device, argv, backends_timed=list(updates), backends_skipped=skipped,
                   hyper=dict(lr=LR, nbeta=NBETA, gamma=GAMMA, chains=1, adamw=ADAMW))
    log(f"# timed: {', '.join(updates)}; skipped: {'; '.join(skipped) or 'none'}\n# step: C = 1 chain, lr={LR}, "
        f"nbeta={NBETA}, gamma={GAMMA}; eager = devinterp-style per-tensor loop over {args.eager_layers} transformer "
        "blocks + embedding + final LayerNorm\n# bytes = ideal fused traffic: SGLD 4 tensors (w, grad, w* read; w "
        "written), RMSProp +V read and written (float32); bf16 weights 2 bytes; the eager loop is charged the same "
        "bytes" + ("\n# adamw = torch._fused_adamw_ (AdamW(fused=True)'s kernel) on the same N and dtype: 7 tensors "
                  "of the dtype (param, exp_avg, exp_avg_sq read and written, grad read); not an SGLD step, no 'vs "
                  "eager'" if "adamw" in updates else ""))
    copy_numel = args.copy_size or (1 << 28 if device.type == "cuda" else 1 << 26)
    header["copy_start"] = measure_copy(device, copy_numel, guard, repeats=max(args.repeats, 10), when="")
    log(f"# each point also times {COPY_SAMPLES_PER_POINT} such copies between its updates; its 'of copy' is relative "
        "to that point's own copy bandwidth ('copy' column)")
    src, dst = torch.randn(copy_numel, device=device), torch.empty(copy_numel, device=device)
    if cpu:
        log("# on the CPU the update also computes a Philox-4x32-10 block and log/sin/cos per 4 elements (bf16: a "
            "second Philox block for stochastic rounding), so it can be compute-bound: read Gelem/s next to the "
            "fraction of copy bandwidth")
    if caps:
        log(f"# size caps: {', '.join(f'{k} <= {fmt_size(v)}' for k, v in caps.items())}")
    log(f"# timing: warm-up, then median of >= {args.repeats} repeats (until {args.target_s} s, at most "
        f"{args.max_repeats}); " + ("CUDA events" if device.type == "cuda" else "time.perf_counter") + "\n\n# "
        "columns: ms(med)/ms(min) = median/fastest call; GB/s and 'of copy' from the median; copy = GB/s of the "
        "copies timed within the point; 'other' = CPU cores busy with other processes meanwhile")
    table = Table(*TABLE)
    table.header()
    point = Point(args, updates, caps, guard, lambda: dst.copy_(src), 8 * copy_numel)
    rows = run_grid(grid(size=sizes, dtype=args.dtypes, sampler=args.samplers), point, table=table)
    rows = [{c[0]: r.get(c[0]) for c in TABLE} for r in rows]  # a result row: the table's columns, in its order
    log()
    src = dst = None  # the points' copy buffers freed before the last copy measurement
    header["copy_end"] = measure_copy(device, copy_numel, guard, repeats=max(args.repeats, 10), when=" again at the end")
    if (copies := spread(r["copy_gbps"] for r in rows))["n"]:
        log(f"# copy bandwidth within the points: median {copies['median']:.1f} GB/s, range {copies['min']:.1f} .. "
            f"{copies['max']:.1f} GB/s")
    return finish(args, header, rows, report(rows, table))


def report(rows: list[dict], table: Table) -> str:
    """The table again, grouped by sampler and dtype, then each backend's GB/s over fused AdamW's; returns the
    SUMMARY line: per backend, the median fraction of copy bandwidth (and speedup over eager) over the sizes from
    2^24 up (all if none is), for sgld/float32 (all rows if none); busy rows left out of both."""
    log("\n# summary by sampler and dtype (vs eager = eager's median time / this backend's, same size, sampler, "
        "dtype;\n# of copy = GB/s / copy, the copy bandwidth measured within the same point;\n# other = CPU cores "
        "that other processes kept busy while the point was timed)")
    table.print(sorted(rows, key=lambda r: (r["sampler"], r["dtype"], r["size"])), group=lambda r: (r["sampler"],
                                                                                                   r["dtype"]))
    ok = [r for r in rows if r["gbps"] and "busy" not in (r["note"] or "")]
    adamw = {(r["size"], r["sampler"], r["dtype"]): r["gbps"] for r in ok if r["backend"] == "adamw"}
    ratios: dict[tuple, list[float]] = {}
    for r in ok:
        if r["backend"] != "adamw" and (ref := adamw.get((r["size"], r["sampler"], r["dtype"]))):
            ratios.setdefault((r["sampler"], r["dtype"], r["backend"]), []).append(r["gbps"] / ref)
    if ratios:
        log("\n# GB/s / fused AdamW's GB/s at the same point (each charged its own bytes): median (range) over the "
            "sizes not marked busy")
        for (sampler, dtype, backend), v in sorted(ratios.items()):
            log(f"#   {sampler:>12} {dtype:>8} {backend:>7}: {statistics.median(v):.2f}x ({min(v):.2f}-{max(v):.2f}, "
                f"{len(v)} sizes)")
    pick = [r for r in ok if r["sampler"] == "sgld" and r["dtype"] == "float32"] or ok
    big = [r for r in pick if r["size"] >= 1 << 24] or pick
    if not big:
        return "no row was timed"
    parts = []
    for backend in dict.fromkeys(r["backend"] for r in big):
        mine = [r for r in big if r["backend"] == backend]
        sp = [r["speedup_vs_eager"] for r in mine if r["speedup_vs_eager"]]
        parts.append(f"{backend} {statistics.median(r['frac_copy'] for r in mine):.0%} of copy"
                     + (f", {statistics.median(sp):.1f}x eager" if sp and backend != "eager" else ""))
    sizes = sorted({r["size"] for r in big})
    what = "sgld float32" if big[0]["sampler"] == "sgld" and big[0]["dtype"] == "float32" else "all rows"
    copy = statistics.median(r["copy_gbps"] for r in big if r["copy_gbps"])
    return f"{what}, sizes {fmt_size(sizes[0])}..{fmt_size(sizes[-1])} (copy {copy:.0f} GB/s): " + "; ".join(parts)


def options(ap) -> None:
    ap.add_argument("--sizes", nargs="+", type=parse_size, help="elements per chain, e.g. 2^16 2^20 65536 (default: "
                    "every power of two from --min-size to --max-size; 2^16, 2^20, 2^24 with --quick)")
    ap.add_argument("--min-size", type=parse_size, default=1 << 16)
    ap.add_argument("--max-size", type=parse_size, default=1 << 28)
    ap.add_argument("--step", type=int, default=1, help="exponent step of the default sizes (2: 2^16, 2^18, ...)")
    ap.add_argument("--backends", nargs="+", help="subset of backends to time; 'eager' is the devinterp-style loop, "
                    "'adamw' torch's fused AdamW")
    ap.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    ap.add_argument("--repeats", type=int, default=3, help="minimum timed repeats per point")
    ap.add_argument("--max-repeats", type=int, default=50)
    ap.add_argument("--target-s", type=float, help="keep repeating until this many seconds have passed (default 0.5; "
                    "0.2 with --quick)")
    ap.add_argument("--max-call-s", type=float, default=10.0,
                    help="on the CPU, skip a backend at sizes where one call is projected to take longer than this")
    ap.add_argument("--cap", nargs="*", default=None, metavar="BACKEND=SIZE",
                    help="largest size to time a backend at (default on the CPU: torch=2^24, the reference update "
                         "being a readable spec, ~20x slower than the C++ kernel; pass --cap with nothing to lift it)")
    ap.add_argument("--copy-size", type=parse_size, default=None,
                    help="elements (float32) of the copy-bandwidth test (default 2^26 on CPU, 2^28 on CUDA)")
    ap.add_argument("--eager-layers", type=int, default=8, help="transformer blocks the eager loop's tensors come from")


def check(args, ap) -> None:
    cap = (["torch=2^24"] if args.device.type == "cpu" else []) if args.cap is None else args.cap
    try:
        args.caps = {k: parse_size(v) for k, v in (c.split("=", 1) for c in cap)}
    except ValueError:
        ap.error(f"--cap takes BACKEND=SIZE, e.g. torch=2^24; got {args.cap}")


main = cli(__doc__, options, bench, check=check, each="point", quick=dict(target_s=(0.5, 0.2)),
           output="write the rows as .csv or .json (with the header information)")

if __name__ == "__main__":
    raise SystemExit(main())
