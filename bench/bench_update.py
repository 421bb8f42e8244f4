"""Achieved bandwidth of one SGLD update: llc_fast's backends against a devinterp-style eager loop
and, as an anchor, torch's fused AdamW.

    .venv/bin/python bench/bench_update.py [--device cpu|cuda] [--sizes 2^16 2^20 ...] [--quick]
                                            [--threads N] [--output results.csv|results.json] [--log FILE.txt]

For each size N (elements of one chain, C = 1), sampler and dtype it times, side by side, one call of:

* every backend of ``llc_fast.backends()`` that runs on the device (never the Triton interpreter);
* "eager": devinterp's update, one torch op at a time over the tensors of a small transformer
  (``transformer_split``); leaner than devinterp's own loop (no metrics, no host syncs);
* "adamw": ``torch._fused_adamw_`` (what ``torch.optim.AdamW(fused=True).step()`` runs, with its
  step-counter increment) on a flat buffer of the same N and dtype, as a trusted fused kernel.

Bytes are what each update must move at the least, counted per element:
SGLD reads w, grad, w* and writes w (4 x the weights' dtype: 16 B in float32, 8 in bfloat16);
RMSProp-SGLD also reads and writes V (float32, +8 B); the eager loop and the reference are
charged the same. AdamW reads param, grad, exp_avg, exp_avg_sq and writes param, exp_avg,
exp_avg_sq (7 x the param dtype, its state having the param's dtype: 28 B float32, 14 B bfloat16;
the 4-byte step counter is not counted). Copy bandwidth (``dst.copy_(src)``, read + written) is
timed within each point; a CPU copy's stores also pay a write-allocate read, so an in-place update
may exceed 100% of it. The CPU update also computes Philox noise, so Gelem/s is reported too.
Timing, load guard and result files: ``harness.py``; bench/README.md has the details.
"""
from __future__ import annotations

import argparse
import gc
import math
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from harness import (LoadGuard, add_common_options, available_memory, checked_device, environment, loadavg,
                     print_environment, set_threads, time_calls, time_interleaved, transcript, validate,
                     write_results)

import llc_fast  # noqa: E402  (harness puts the repository on sys.path)
from llc_fast.kernels.dispatch import select_backend  # noqa: E402
from llc_fast.kernels.update_spec import SamplerSettings, StepCounters  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
SAMPLERS = ("sgld", "rmsprop_sgld")
COPY_SAMPLES_PER_POINT = 7  # copies timed within each point, interleaved with the updates
# Hyperparameters of the timed step (typical of published LLC runs; the values do not change the work done).
LR, NBETA, GAMMA = 1e-4, 30.0, 300.0
ADAMW = dict(lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=1e-2, eps=1e-8)  # torch.optim.AdamW's defaults


# ------------------------------------------------------------------------------------------------
# The devinterp-style eager update: one small torch op after another, per parameter tensor.
# ------------------------------------------------------------------------------------------------


def eager_sgld_step(params, grads, inits, *, lr, nbeta, localization, weight_decay=0.0, noise_level=1.0):
    """One SGLD step the way devinterp's optimizer loop does it: separate kernels per tensor."""
    for p, g, p0 in zip(params, grads, inits):
        dw = g * nbeta
        if localization != 0:
            dw.add_(p - p0, alpha=localization)
        if weight_decay != 0:
            dw.add_(p, alpha=weight_decay)
        p.add_(dw, alpha=-0.5 * lr)
        noise = torch.normal(mean=0.0, std=noise_level, size=p.shape, device=p.device, dtype=p.dtype)
        p.add_(noise, alpha=math.sqrt(lr))


def eager_rmsprop_sgld_step(params, grads, inits, square_avgs, *, lr, nbeta, localization, alpha=0.99, eps=0.1,
                            weight_decay=0.0, noise_level=1.0):
    """One RMSProp-SGLD step in devinterp's style: V update, preconditioner, scaled drift and noise."""
    for p, g, p0, v in zip(params, grads, inits, square_avgs):
        v.mul_(alpha).addcmul_(g, g, value=1 - alpha)
        precond = v.sqrt()
        precond.add_(eps)
        precond.reciprocal_()
        dw = g * nbeta
        if localization != 0:
            dw.add_(p - p0, alpha=localization)
        if weight_decay != 0:
            dw.add_(p, alpha=weight_decay)
        dw.mul_(precond)
        p.add_(dw, alpha=-0.5 * lr)
        noise = torch.normal(mean=0.0, std=noise_level, size=p.shape, device=p.device, dtype=p.dtype)
        noise.mul_(precond.sqrt())
        p.add_(noise, alpha=math.sqrt(lr))


def transformer_split(n: int, layers: int = 8) -> list[tuple[int, ...]]:
    """Shapes of the parameter tensors of a small transformer holding exactly ``n`` elements.

    ``layers`` blocks of width d (12 tensors, 12 d^2 + 13 d elements), d the largest multiple of 16
    that lets the blocks fill most of ``n``; a final LayerNorm; the rest is the token embedding.
    8 blocks + 3 = 99 tensors at every size (fewer if n is tiny).
    """
    d = 16 * max(1, int(math.sqrt(n / (12 * layers))) // 16)
    block = [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    per_block = sum(math.prod(s) for s in block)
    layers = min(layers, max(0, (n - 2 * d) // per_block))
    shapes = [s for _ in range(layers) for s in block]
    if n - layers * per_block >= 2 * d:
        shapes += [(d,), (d,)]  # final LayerNorm
    rest = n - sum(math.prod(s) for s in shapes)
    if rest:
        shapes.insert(0, (rest // d, d) if rest % d == 0 else (rest,))  # token embedding
    assert sum(math.prod(s) for s in shapes) == n
    return shapes


def split_views(flat: torch.Tensor, shapes) -> list[torch.Tensor]:
    out, off = [], 0
    for s in shapes:
        k = math.prod(s)
        out.append(flat[off : off + k].view(s))
        off += k
    return out


# ------------------------------------------------------------------------------------------------
# What one point measures
# ------------------------------------------------------------------------------------------------


def copy_bandwidth(device: torch.device, numel: int, *, repeats: int) -> tuple[float, float, int]:
    """Bytes read + written per second by ``dst.copy_(src)`` on float32 tensors of ``numel`` elements:
    (from the median call, from the fastest call, bytes per call)."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    med, times = time_calls(lambda: dst.copy_(src), device, warmup=2, min_repeats=repeats,
                            max_repeats=max(repeats, 50), target_s=1.0)
    nbytes = 2 * src.numel() * src.element_size()
    return nbytes / med, nbytes / min(times), nbytes


def measure_copy(device: torch.device, numel: int, guard: LoadGuard, *, repeats: int) -> dict:
    """``copy_bandwidth`` under the load guard; of the attempts, the one with the highest median is kept."""
    best = max(guard.run(lambda: copy_bandwidth(device, numel, repeats=repeats)), key=lambda a: a.value[0])
    med, fastest, nbytes = best.value
    return dict(median_Bps=med, best_call_Bps=fastest, bytes=nbytes, numel=numel, other_cores=best.other)


def _copy_text(c: dict) -> str:
    other = "" if c["other_cores"] is None else f"; other processes kept {c['other_cores']:.2f} cores busy meanwhile"
    return (f"{c['median_Bps'] / 1e9:.2f} GB/s median, {c['best_call_Bps'] / 1e9:.2f} GB/s best call (dst.copy_(src), "
            f"float32, {fmt_size(c['numel'])} elements, {c['bytes'] / 2**20:.0f} MiB read + written per call{other})")


def ideal_bytes(n: int, dtype: torch.dtype, sampler: str, backend: str = "") -> int:
    """Bytes an update must move (module docstring): SGLD w, grad, w* read and w written, RMSProp V
    read and written; AdamW param, exp_avg, exp_avg_sq read and written and grad read."""
    elem = torch.empty((), dtype=dtype).element_size()
    if backend == "adamw":
        return n * 7 * elem
    stat_elem = 8 if dtype == torch.float64 else 4
    return n * (4 * elem + (2 * stat_elem if sampler != "sgld" else 0))


def needed_memory(n: int, dtype: torch.dtype, sampler: str, backends: list[str], shapes) -> int:
    """Rough peak bytes of one (size, dtype, sampler): grad and w* shared, w and V per backend, temporaries."""
    elem = torch.empty((), dtype=dtype).element_size()
    stat = (8 if dtype == torch.float64 else 4) if sampler != "sgld" else 0
    total = 2 * n * elem + n * 4  # grad, w*, and the float32 start point while the copies are made
    for name in backends:
        if name == "adamw":  # param, exp_avg, exp_avg_sq
            total += 3 * n * elem
            continue
        total += n * elem + (n * (elem if name == "eager" else stat) if stat else 0)
    extra = 0
    if "eager" in backends:  # temporaries of the largest tensor
        extra = max(extra, 6 * max(math.prod(s) for s in shapes) * 4)
    if "torch" in backends:  # the reference works in chunks of 2^20 elements, with int64 noise temporaries
        extra = max(extra, 64 * (1 << 20) * 8)
    return total + extra


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


@dataclass
class Row:
    size: int
    backend: str
    sampler: str
    dtype: str
    ms: float | None  # median
    min_ms: float | None
    gbps: float | None
    frac_copy: float | None  # of copy_gbps
    copy_gbps: float | None  # copy bandwidth measured within the same point (median)
    elems_per_s: float | None
    speedup_vs_eager: float | None
    repeats: int
    other_cores: float | None  # CPU cores other processes kept busy while this point was timed
    note: str = ""


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--sizes", nargs="+", type=parse_size, help="elements per chain, e.g. 2^16 2^20 65536 (default: "
                    "every power of two from 2^16 to --max-size)")
    ap.add_argument("--min-size", type=parse_size, default=1 << 16)
    ap.add_argument("--max-size", type=parse_size, default=1 << 28)
    ap.add_argument("--step", type=int, default=1, help="exponent step of the default sizes (2: 2^16, 2^18, ...)")
    ap.add_argument("--backends", nargs="+", help="subset of backends to time; 'eager' is the devinterp-style loop, "
                    "'adamw' torch's fused AdamW")
    ap.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    ap.add_argument("--repeats", type=int, default=None, help="minimum timed repeats per point (default 3)")
    ap.add_argument("--max-repeats", type=int, default=50)
    ap.add_argument("--target-s", type=float, default=None,
                    help="keep repeating until this many seconds have passed (default 0.5; 0.2 with --quick)")
    ap.add_argument("--max-call-s", type=float, default=10.0,
                    help="on the CPU, skip a backend at sizes where one call is projected to take longer than this")
    ap.add_argument("--cap", nargs="*", default=None, metavar="BACKEND=SIZE",
                    help="largest size to time a backend at (default on the CPU: torch=2^24, the reference update "
                         "being a readable spec, ~20x slower than the C++ kernel; pass --cap with nothing to lift it)")
    ap.add_argument("--copy-size", type=parse_size, default=None,
                    help="elements (float32) of the copy-bandwidth test (default 2^26 on CPU, 2^28 on CUDA)")
    ap.add_argument("--eager-layers", type=int, default=8, help="transformer blocks the eager loop's tensors come from")
    ap.add_argument("--quick", action="store_true", help="sizes 2^16, 2^20, 2^24 and fewer repeats: a smoke run")
    add_common_options(ap, each="point", output="write the rows as .csv or .json (with the header information)")
    args = ap.parse_args(argv)

    device = checked_device(ap, args.device)
    if args.cap is None:
        args.cap = ["torch=2^24"] if device.type == "cpu" else []
    try:
        caps = {k: parse_size(v) for k, v in (c.split("=", 1) for c in args.cap)}
    except ValueError:
        ap.error(f"--cap takes BACKEND=SIZE, e.g. torch=2^24; got {args.cap}")
    with transcript(args.log, argv):
        return bench(args, argv, device, caps)


def bench(args, argv, device: torch.device, caps: dict) -> int:
    threads = set_threads(args.threads)
    repeats = args.repeats or 3
    target_s = args.target_s if args.target_s is not None else (0.2 if args.quick else 0.5)
    if args.sizes:
        sizes = sorted(set(args.sizes))
    elif args.quick:
        sizes = [s for s in (1 << 16, 1 << 20, 1 << 24) if args.min_size <= s <= args.max_size]
    else:
        lo, hi = int(math.log2(args.min_size)), int(math.log2(args.max_size))
        sizes = [1 << k for k in range(lo, hi + 1, args.step)]
    cpu = device.type == "cpu"
    guard = LoadGuard(args.wait_quiet if cpu else 0.0, args.retry_busy if cpu else 0)

    # --- which update functions run here ----------------------------------------------------
    wanted = lambda name: not args.backends or name in args.backends  # noqa: E731
    updates: dict[str, object] = {"eager": None} if wanted("eager") else {}  # eager first: the speedups' base
    skipped: list[str] = []
    for info in llc_fast.backends():
        if not wanted(info.name):
            continue
        if cpu and info.name == "triton":
            skipped.append("triton (on the CPU it would run in Triton's interpreter, which is for tests)")
        elif device.type not in info.devices:
            skipped.append(f"{info.name} (does not run on {device.type})")
        elif not info.available:
            skipped.append(f"{info.name} ({info.reason})")
        else:
            updates[info.name] = select_backend(info.name, device).update
    if wanted("adamw"):
        updates["adamw"] = None

    # --- header -------------------------------------------------------------------------------
    header = environment(device, argv, backends_timed=list(updates), backends_skipped=skipped,
                         hyper=dict(lr=LR, nbeta=NBETA, gamma=GAMMA, chains=1, adamw=ADAMW))
    print_environment("bench_update", header)
    print(f"# timed: {', '.join(updates)}; skipped: {'; '.join(skipped) or 'none'}")
    print(f"# step: C = 1 chain, lr={LR}, nbeta={NBETA}, gamma={GAMMA}; eager = devinterp-style per-tensor loop over "
          f"{args.eager_layers} transformer blocks + embedding + final LayerNorm")
    print("# bytes = ideal fused traffic: SGLD 4 tensors (w, grad, w* read; w written), RMSProp +V read and written "
          "(float32); bf16 weights 2 bytes; the eager loop is charged the same bytes")
    if "adamw" in updates:
        print("# adamw = torch._fused_adamw_ (AdamW(fused=True)'s kernel) on the same N and dtype: 7 tensors of the "
              "dtype (param, exp_avg, exp_avg_sq read and written, grad read); not an SGLD step, no 'vs eager'")

    copy_numel = args.copy_size or (1 << 28 if device.type == "cuda" else 1 << 26)
    copy = measure_copy(device, copy_numel, guard, repeats=max(repeats, 10))
    header["copy_start"] = copy
    print(f"# copy bandwidth: {_copy_text(copy)}")
    print(f"# each point also times {COPY_SAMPLES_PER_POINT} such copies between its updates; its 'of copy' is relative "
          "to that point's own copy bandwidth ('copy' column)")
    copy_buf = {"src": torch.randn(copy_numel, device=device)}
    copy_buf["dst"] = torch.empty_like(copy_buf["src"])
    copy_bytes = 2 * copy_buf["src"].numel() * copy_buf["src"].element_size()

    def copy_call():
        copy_buf["dst"].copy_(copy_buf["src"])
    if cpu:
        print("# on the CPU the update also computes a Philox-4x32-10 block and log/sin/cos per 4 elements (bf16: a "
              "second Philox block for stochastic rounding), so it can be compute-bound: read Gelem/s next to the "
              "fraction of copy bandwidth")
    if caps:
        print(f"# size caps: {', '.join(f'{k} <= {fmt_size(v)}' for k, v in caps.items())}")
    print(f"# timing: warm-up, then median of >= {repeats} repeats (until {target_s} s, at most {args.max_repeats}); "
          + ("CUDA events" if device.type == "cuda" else "time.perf_counter"))
    print()

    print("# columns: ms(med)/ms(min) = median/fastest call; GB/s and 'of copy' from the median; copy = GB/s of the "
          "copies timed within the point; 'other' = CPU cores busy with other processes meanwhile")
    _print_header()

    rows: list[Row] = []
    sec_per_elem: dict[tuple, float] = {}  # last measured seconds per element, for the CPU size cap
    capped: dict[tuple, str] = {}
    t_start = time.perf_counter()
    for n in sizes:
        shapes = transformer_split(n, args.eager_layers)
        for dtype_name in args.dtypes:
            for sampler in args.samplers:
                for name, cap in caps.items():
                    key = (name, sampler, dtype_name)
                    if name in updates and n > cap and key not in capped:
                        capped[key] = f"capped: --cap {name}={fmt_size(cap)}"
                        print(f"# {name}/{sampler}/{dtype_name}: not run above {fmt_size(cap)} (--cap {name}={fmt_size(cap)})")
                rows += run_point(n, dtype_name, sampler, shapes, updates, device, args, guard, repeats=repeats,
                                  target_s=target_s, copy_call=copy_call, copy_bytes=copy_bytes,
                                  sec_per_elem=sec_per_elem, capped=capped)

    header["loadavg_end"] = loadavg()
    header["wall_s"] = time.perf_counter() - t_start
    print()
    print(f"# done in {header['wall_s']:.0f} s; load average at end: {header['loadavg_end']}")
    copy_buf.clear()
    copy_end = measure_copy(device, copy_numel, guard, repeats=max(repeats, 10))
    header["copy_end"] = copy_end
    print(f"# copy bandwidth again at the end: {_copy_text(copy_end)}")
    point_copies = [r.copy_gbps for r in rows if r.copy_gbps is not None and math.isfinite(r.copy_gbps)]
    if point_copies:
        print(f"# copy bandwidth within the points: median {statistics.median(point_copies):.1f} GB/s, range "
              f"{min(point_copies):.1f} .. {max(point_copies):.1f} GB/s")
    _print_summary(rows)
    if args.output:
        write_results(args.output, header, [asdict(r) for r in rows])
    return 0


def run_point(n, dtype_name, sampler, shapes, updates, device, args, guard: LoadGuard, *, repeats, target_s,
              copy_call, copy_bytes, sec_per_elem, capped) -> list[Row]:
    """Time every update at one (size, dtype, sampler), side by side (``time_interleaved``), each on
    its own copy of w (and V) from the same start, with ``copy_call`` timed in the same rounds: the
    fractions of copy bandwidth are relative to this point's own copy figure."""
    dtype = DTYPES[dtype_name]
    settings = SamplerSettings(sampler=sampler)
    rows: list[Row] = []

    def skip(name, note):
        rows.append(Row(n, name, sampler, dtype_name, None, None, None, None, None, None, None, 0, None, note))
        _print_row(rows[-1])

    active = []
    for name in updates:
        key = (name, sampler, dtype_name)
        if key not in capped and device.type == "cpu" and key in sec_per_elem:
            projected = sec_per_elem[key] * n
            if projected > args.max_call_s:
                capped[key] = f"capped: ~{projected:.0f} s per call projected (> --max-call-s {args.max_call_s:g})"
                print(f"# {name}/{sampler}/{dtype_name}: not run from {fmt_size(n)} on: one call would take "
                      f"~{projected:.0f} s (> --max-call-s {args.max_call_s:g})")
        if key in capped:
            skip(name, capped[key])
        else:
            active.append(name)
    if not active:
        return rows
    need = needed_memory(n, dtype, sampler, active, shapes)
    avail = available_memory(device)
    if need > 0.8 * avail:
        for name in active:
            skip(name, f"skipped: needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available")
        return rows

    gen = torch.Generator(device=device).manual_seed(n)
    w_star = torch.randn(n, device=device, generator=gen).to(dtype)
    w0 = (w_star.float() + 0.01 * torch.randn(n, device=device, generator=gen)).to(dtype)
    grad = torch.randn(1, n, device=device, generator=gen).to(dtype)
    calls, states, errors = {}, {}, {}
    for name in active:
        w = w0.view(1, n).clone()
        stat = torch.zeros(1, n, device=device) if settings.preconditioned and name not in ("eager", "adamw") else None
        states[name] = (w, stat)
        calls[name] = _make_call(name, updates[name], w, grad, w_star, stat, settings, shapes)
    del w0

    warmup = 1 if n >= 1 << 24 else 3

    def attempt():
        """Validate then time: warm-up calls (a failing backend is reported), then the interleaved rounds."""
        for name in active:
            if name not in errors and (err := validate(calls[name], warmup=warmup, device=device)):
                errors[name] = err
        ok = {name: calls[name] for name in active if name not in errors}
        return time_interleaved(ok, device, min_repeats=repeats, max_repeats=args.max_repeats, target_s=target_s,
                                extra=copy_call, extra_samples=COPY_SAMPLES_PER_POINT)

    def report(a, again):
        if again:
            print(f"# {fmt_size(n)} {sampler} {dtype_name}: other processes kept {a.other:.2f} cores busy; timing it again")

    last = guard.run(attempt, report=report)[-1]
    (times, copy_times), other = last.value, last.other

    eager = statistics.median(times["eager"]) if times.get("eager") else None
    copy_bps = copy_bytes / statistics.median(copy_times) if copy_times else math.nan
    for name in active:
        if name in errors:
            skip(name, errors[name])
            continue
        med = statistics.median(times[name])
        nbytes = ideal_bytes(n, dtype, sampler, name)
        sec_per_elem[(name, sampler, dtype_name)] = min(times[name]) / n  # the fastest call: robust to load
        w = states[name][0]
        note = "" if torch.isfinite(w.float()).all() else "WARNING: non-finite weights after the timed steps"
        if not guard.clean(last):
            note = (note + "; " if note else "") + "machine busy with other processes"
        speedup = eager / med if eager and name != "adamw" else None
        rows.append(Row(n, name, sampler, dtype_name, med * 1e3, min(times[name]) * 1e3, nbytes / med / 1e9,
                        nbytes / med / copy_bps, copy_bps / 1e9, n / med, speedup, len(times[name]), other, note))
        _print_row(rows[-1])
    del calls, states, w_star, grad
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _make_call(name, fn, w, grad, w_star, stat, settings: SamplerSettings, shapes, *, lr=LR, nbeta=NBETA, gamma=GAMMA):
    """A zero-argument callable doing one update of ``w`` with ``name``; each call takes the next step."""
    if name == "adamw":
        return _adamw_call(w[0], grad[0])
    if name == "eager":
        n = w.shape[1]
        params, grads, inits = split_views(w[0], shapes), split_views(grad[0], shapes), split_views(w_star, shapes)
        if settings.preconditioned:
            vs = split_views(torch.zeros(n, device=w.device, dtype=w.dtype), shapes)  # devinterp: zeros_like(p)

            def call():
                eager_rmsprop_sgld_step(params, grads, inits, vs, lr=lr, nbeta=nbeta, localization=gamma,
                                        alpha=settings.rmsprop_alpha, eps=settings.rmsprop_eps)
        else:

            def call():
                eager_sgld_step(params, grads, inits, lr=lr, nbeta=nbeta, localization=gamma)

        return call
    chain_ids = torch.zeros(1, dtype=torch.int64, device=w.device)
    step = [0]

    def call():
        t = step[0]
        step[0] += 1
        fn(w, grad, w_star, stat, lr=lr, nbeta=nbeta, gamma=gamma, settings=settings,
           counters=StepCounters(step=t, update_statistic=True, stat_step=t), seed=0, chain_ids=chain_ids)

    return call


def _adamw_call(param: torch.Tensor, grad: torch.Tensor):
    """One ``torch.optim.AdamW(fused=True)`` step on one flat tensor, as its ``_fused_adamw`` does it:
    the float32 step counter incremented, then ``torch._fused_adamw_`` (state in the param's dtype)."""
    exp_avg, exp_avg_sq = torch.zeros_like(param), torch.zeros_like(param)
    step = torch.zeros((), dtype=torch.float32, device=param.device)

    def call():
        torch._foreach_add_([step], 1)
        torch._fused_adamw_([param], [grad], [exp_avg], [exp_avg_sq], [], [step], amsgrad=False, maximize=False,
                            **ADAMW)

    return call


COLUMNS = (f"{'size':>6} {'backend':>7} {'sampler':>12} {'dtype':>8} {'ms(med)':>10} {'ms(min)':>10} {'GB/s':>7} "
           f"{'of copy':>7} {'copy':>5} {'Gelem/s':>8} {'vs eager':>8} {'reps':>4} {'other':>5}  note")


def _print_header() -> None:
    print(COLUMNS)
    print("-" * len(COLUMNS))


def _print_row(r: Row) -> None:
    other = "" if r.other_cores is None else f"{r.other_cores:.2f}"
    if r.ms is None:
        print(f"{fmt_size(r.size):>6} {r.backend:>7} {r.sampler:>12} {r.dtype:>8} {'-':>10} {'-':>10} {'-':>7} {'-':>7} "
              f"{'-':>5} {'-':>8} {'-':>8} {r.repeats:>4} {other:>5}  {r.note}")
        return
    sp = "" if r.speedup_vs_eager is None else f"{r.speedup_vs_eager:.2f}x"
    print(f"{fmt_size(r.size):>6} {r.backend:>7} {r.sampler:>12} {r.dtype:>8} {r.ms:>10.3f} {r.min_ms:>10.3f} "
          f"{r.gbps:>7.2f} {r.frac_copy:>7.1%} {r.copy_gbps:>5.1f} {r.elems_per_s / 1e9:>8.4f} {sp:>8} {r.repeats:>4} "
          f"{other:>5}  {r.note}")


def _print_summary(rows: list[Row]) -> None:
    """The table again, grouped by sampler and dtype, then each backend's GB/s over fused AdamW's."""
    print()
    print("# summary by sampler and dtype (vs eager = eager's median time / this backend's, same size, sampler, dtype;")
    print("# of copy = GB/s / copy, the copy bandwidth measured within the same point;")
    print("# other = CPU cores that other processes kept busy while the point was timed)")
    _print_header()
    last = None
    for r in sorted(rows, key=lambda r: (r.sampler, r.dtype, r.size)):
        if last is not None and (r.sampler, r.dtype) != last:
            print()
        last = (r.sampler, r.dtype)
        _print_row(r)
    adamw = {(r.size, r.sampler, r.dtype): r.gbps for r in rows if r.backend == "adamw" and r.gbps}
    ratios: dict[tuple, list[float]] = {}
    for r in rows:
        ref = adamw.get((r.size, r.sampler, r.dtype))
        if ref and r.gbps and r.backend != "adamw" and "busy" not in r.note:
            ratios.setdefault((r.sampler, r.dtype, r.backend), []).append(r.gbps / ref)
    if ratios:
        print()
        print("# GB/s / fused AdamW's GB/s at the same point (each charged its own bytes): median (range) over the "
              "sizes not marked busy")
        for (sampler, dtype, backend), v in sorted(ratios.items()):
            print(f"#   {sampler:>12} {dtype:>8} {backend:>7}: {statistics.median(v):.2f}x ({min(v):.2f}-{max(v):.2f}, "
                  f"{len(v)} sizes)")


if __name__ == "__main__":
    raise SystemExit(main())
