"""Achieved bandwidth of one SGLD update: llc_fast's backends against a devinterp-style eager loop.

    .venv/bin/python bench/bench_update.py [--device cpu|cuda] [--sizes 2^16 2^20 ...] [--quick]
                                            [--threads N] [--output results.csv|results.json]

For each size N (elements of one chain, C = 1), sampler (sgld, rmsprop_sgld) and dtype (float32,
bfloat16), times one update of

* every backend of ``llc_fast.backends()`` that runs on the device (CPU: "cpu" = the C++ kernel,
  "torch" = the reference update; the Triton interpreter is never timed. CUDA: "cuda", "triton",
  "torch");
* "eager": the update a devinterp user runs today, one torch op at a time in a Python loop over
  the model's parameter tensors (``eager_sgld_step`` / ``eager_rmsprop_sgld_step`` below), on a
  flat buffer split into the tensors of a small transformer (``transformer_split``). It is a lean
  version of devinterp's loop: 6 kernels per tensor for SGLD with localization (devinterp: 14) and
  14 for RMSProp-SGLD (devinterp: 21), no metrics and no host syncs, so speedups over it understate
  the speedup over devinterp itself. For bfloat16 it computes in bfloat16 and keeps V in bfloat16,
  as devinterp does with a bfloat16 model (the fused update computes in float32 and rounds
  stochastically: not the same numerics, the same job).

Bytes are those an ideal fused update must move: SGLD reads w, grad, w* and writes w (4 tensors
of the weights' dtype); RMSProp-SGLD also reads and writes V (float32). The eager loop is charged
the same bytes, so its GB/s is useful bytes per second and directly comparable. The device's copy
bandwidth (``dst.copy_(src)``, bytes read + written) is measured in the same run and each result
is reported as a fraction of it (each point times a few copies between its updates and uses its own
figure: on a shared machine copy bandwidth drifts by 2x within minutes). The copy is counted as
2 bytes moved per byte copied; on a CPU its stores into dst also cost a read (write-allocate),
which an in-place update of w does not pay, so a fused update may exceed 100%. On the CPU the
update's arithmetic (a Philox-4x32-10 block and log/sin/cos per group of four elements, and for
bfloat16 a second Philox block for stochastic rounding) can make it compute-bound, so elements per
second are reported as well.

Timing: warm-up call(s), then the median of several repeats (CUDA events on a GPU,
``time.perf_counter`` on the CPU), the backends' calls interleaved round by round. On the CPU a
(backend, sampler, dtype) is not run at sizes where one call is projected to take more than
``--max-call-s`` seconds, nor above ``--cap`` (default: the reference above 2^24); the table says so.
On a shared CPU, other processes wreck multi-threaded timings (an OpenMP or ATen parallel region
waits for its slowest thread); each point records how many cores other processes kept busy
('other'), ``--wait-quiet S`` waits for a quiet machine before each point and ``--retry-busy K``
times a busy point again; rows still busy are marked.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a fresh clone without installing

import llc_fast  # noqa: E402
from llc_fast.kernels.dispatch import select_backend  # noqa: E402
from llc_fast.kernels.update_spec import SamplerSettings, StepCounters  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
SAMPLERS = ("sgld", "rmsprop_sgld")
COPY_SAMPLES_PER_POINT = 7  # copies timed within each point, interleaved with the updates
BUSY_CORES = 0.25  # other processes using more CPU than this while a point is timed: "machine busy"
# Hyperparameters of the timed step (typical of published LLC runs; the values do not change the work done).
LR, NBETA, GAMMA = 1e-4, 30.0, 300.0


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

    ``layers`` blocks of width d (LayerNorm weight+bias, qkv weight+bias, output projection,
    LayerNorm, 4d MLP up and down, each with its bias: 12 tensors, 12 d^2 + 13 d elements), d the
    largest multiple of 16 that lets the blocks fill most of ``n``; a final LayerNorm; the rest is
    the token embedding. 8 blocks + 3 = 99 tensors at every size (fewer if n is tiny).
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
# Timing
# ------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device: torch.device, *, warmup: int, min_repeats: int, max_repeats: int, target_s: float):
    """Median seconds per call: ``warmup`` calls, then repeats until ``target_s`` has passed
    (at least ``min_repeats``, at most ``max_repeats``). Returns (median, all times)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_repeats and (len(times) < min_repeats or time.perf_counter() - start < target_s):
        times.append(_time_one(fn, device))
    return statistics.median(times), times


def copy_bandwidth(device: torch.device, numel: int, *, repeats: int) -> tuple[float, float, int]:
    """Bytes read + written per second by ``dst.copy_(src)`` on float32 tensors of ``numel`` elements:
    (from the median call, from the fastest call, bytes per call)."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    med, times = time_calls(lambda: dst.copy_(src), device, warmup=2, min_repeats=repeats,
                            max_repeats=max(repeats, 50), target_s=1.0)
    nbytes = 2 * src.numel() * src.element_size()
    return nbytes / med, nbytes / min(times), nbytes


def measure_copy(device: torch.device, numel: int, args, *, repeats: int) -> dict:
    """``copy_bandwidth`` after waiting for a quiet machine, again (up to --retry-busy times) if other
    processes were busy meanwhile; the attempt with the highest median is kept."""
    best = None
    for attempt in range(1 + (args.retry_busy if device.type == "cpu" else 0)):
        if device.type == "cpu" and args.wait_quiet > 0:
            wait_quiet(args.wait_quiet)
        cpu0 = _cpu_busy()
        med, fastest, nbytes = copy_bandwidth(device, numel, repeats=repeats)
        other = _other_cores(cpu0) if device.type == "cpu" else None
        res = dict(median_Bps=med, best_call_Bps=fastest, bytes=nbytes, numel=numel, other_cores=other)
        if best is None or med > best["median_Bps"]:
            best = res
        if other is None or other <= BUSY_CORES:
            break
    return best


def _copy_text(c: dict) -> str:
    other = "" if c["other_cores"] is None else f"; other processes kept {c['other_cores']:.2f} cores busy meanwhile"
    return (f"{c['median_Bps'] / 1e9:.2f} GB/s median, {c['best_call_Bps'] / 1e9:.2f} GB/s best call (dst.copy_(src), "
            f"float32, {fmt_size(c['numel'])} elements, {c['bytes'] / 2**20:.0f} MiB read + written per call{other})")


def ideal_bytes(n: int, dtype: torch.dtype, sampler: str) -> int:
    """Bytes a fused update must move: w, grad, w* read and w written; V read and written (RMSProp)."""
    elem = torch.empty((), dtype=dtype).element_size()
    stat_elem = 8 if dtype == torch.float64 else 4
    return n * (4 * elem + (2 * stat_elem if sampler != "sgld" else 0))


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def needed_memory(n: int, dtype: torch.dtype, sampler: str, backends: list[str], shapes) -> int:
    """Rough peak bytes of one (size, dtype, sampler): grad and w* shared, w and V per backend, temporaries."""
    elem = torch.empty((), dtype=dtype).element_size()
    stat = (8 if dtype == torch.float64 else 4) if sampler != "sgld" else 0
    total = 2 * n * elem + n * 4  # grad, w*, and the float32 start point while the copies are made
    for name in backends:
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
    ap.add_argument("--backends", nargs="+", help="subset of backends to time; 'eager' is the devinterp-style loop")
    ap.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    ap.add_argument("--threads", type=int, default=None, help="torch (and C++ kernel) threads; default: all cores")
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
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="on the CPU, before each point wait up to S seconds until other processes keep less than "
                         "0.25 cores busy (a shared machine distorts multi-threaded timings badly)")
    ap.add_argument("--retry-busy", type=int, default=2, metavar="K",
                    help="on the CPU, time a point up to K more times while other processes kept > 0.25 cores busy")
    ap.add_argument("--quick", action="store_true", help="sizes 2^16, 2^20, 2^24 and fewer repeats: a smoke run")
    ap.add_argument("--output", type=Path, help="write the rows as .csv or .json (with the header information)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: this torch has no CUDA device (torch.cuda.is_available() is False)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    else:
        torch.set_num_threads(os.cpu_count() or 1)
    threads = torch.get_num_threads()
    repeats = args.repeats or 3
    if args.cap is None:
        args.cap = ["torch=2^24"] if device.type == "cpu" else []
    try:
        caps = {k: parse_size(v) for k, v in (c.split("=", 1) for c in args.cap)}
    except ValueError:
        ap.error(f"--cap takes BACKEND=SIZE, e.g. torch=2^24; got {args.cap}")
    target_s = args.target_s if args.target_s is not None else (0.2 if args.quick else 0.5)
    if args.sizes:
        sizes = sorted(set(args.sizes))
    elif args.quick:
        sizes = [s for s in (1 << 16, 1 << 20, 1 << 24) if args.min_size <= s <= args.max_size]
    else:
        lo, hi = int(math.log2(args.min_size)), int(math.log2(args.max_size))
        sizes = [1 << k for k in range(lo, hi + 1, args.step)]

    # --- which update functions run here ----------------------------------------------------
    infos = llc_fast.backends()
    updates: dict[str, object] = {}  # eager first, so that each backend's row can show its speedup over it
    if not args.backends or "eager" in args.backends:
        updates["eager"] = None
    skipped: list[str] = []
    for info in infos:
        if args.backends and info.name not in args.backends:
            continue
        if device.type == "cpu" and info.name == "triton":
            skipped.append("triton (on the CPU it would run in Triton's interpreter, which is for tests)")
            continue
        if device.type not in info.devices:
            skipped.append(f"{info.name} (does not run on {device.type})")
            continue
        if not info.available:
            skipped.append(f"{info.name} ({info.reason})")
            continue
        updates[info.name] = select_backend(info.name, device).update

    # --- header -------------------------------------------------------------------------------
    header = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name] + sys.argv) if argv is None else " ".join(argv),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else (_cpu_name() or platform.processor()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "llc_fast": llc_fast.__version__,
        "torch_threads": threads,
        "cpu_count": os.cpu_count(),
        "loadavg_start": _loadavg(),
        "backends_timed": list(updates),
        "backends_skipped": skipped,
        "hyper": dict(lr=LR, nbeta=NBETA, gamma=GAMMA, chains=1),
        **provenance(),
    }
    print(f"# bench_update  {header['date']}")
    print(f"# command: {header['command']}")
    print(f"# device: {header['device']} ({device.type}); {header['platform']}; python {header['python']}")
    print(f"# torch {header['torch']}, triton {header['triton']}, llc_fast {header['llc_fast']}")
    print(f"# code: git {header['git_commit']}" + (" + uncommitted changes in csrc/ or llc_fast/kernels/"
          if header["kernels_dirty"] else "") + f"; csrc sha256 {header['csrc_sha256']}, llc_fast/kernels sha256 "
          f"{header['kernels_py_sha256']}; C++ flags: {header.get('cpp_flags')}")
    print(f"# torch threads: {threads} (os.cpu_count() = {header['cpu_count']}); load average at start: {header['loadavg_start']}")
    print(f"# timed: {', '.join(updates)}; skipped: {'; '.join(skipped) or 'none'}")
    print(f"# step: C = 1 chain, lr={LR}, nbeta={NBETA}, gamma={GAMMA}; eager = devinterp-style per-tensor loop over "
          f"{args.eager_layers} transformer blocks + embedding + final LayerNorm")
    print("# bytes = ideal fused traffic: SGLD 4 tensors (w, grad, w* read; w written), RMSProp +V read and written "
          "(float32); bf16 weights 2 bytes; the eager loop is charged the same bytes")

    copy_numel = args.copy_size or (1 << 28 if device.type == "cuda" else 1 << 26)
    copy = measure_copy(device, copy_numel, args, repeats=max(repeats, 10))
    header["copy_start"] = copy
    print(f"# copy bandwidth: {_copy_text(copy)}")
    print(f"# each point also times {COPY_SAMPLES_PER_POINT} such copies between its updates; its 'of copy' is relative "
          "to that point's own copy bandwidth ('copy' column)")
    copy_buf = {"src": torch.randn(copy_numel, device=device)}
    copy_buf["dst"] = torch.empty_like(copy_buf["src"])
    copy_bytes = 2 * copy_buf["src"].numel() * copy_buf["src"].element_size()

    def copy_call():
        copy_buf["dst"].copy_(copy_buf["src"])
    if device.type == "cpu":
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
                rows += run_point(n, dtype_name, sampler, shapes, updates, device, args, repeats=repeats,
                                  target_s=target_s, copy_call=copy_call, copy_bytes=copy_bytes,
                                  sec_per_elem=sec_per_elem, capped=capped)

    header["loadavg_end"] = _loadavg()
    header["wall_s"] = time.perf_counter() - t_start
    print()
    print(f"# done in {header['wall_s']:.0f} s; load average at end: {header['loadavg_end']}")
    copy_buf.clear()
    copy_end = measure_copy(device, copy_numel, args, repeats=max(repeats, 10))
    header["copy_end"] = copy_end
    print(f"# copy bandwidth again at the end: {_copy_text(copy_end)}")
    point_copies = [r.copy_gbps for r in rows if r.copy_gbps is not None and math.isfinite(r.copy_gbps)]
    if point_copies:
        print(f"# copy bandwidth within the points: median {statistics.median(point_copies):.1f} GB/s, range "
              f"{min(point_copies):.1f} .. {max(point_copies):.1f} GB/s")
    _print_summary(rows)
    if args.output:
        _write(args.output, header, rows)
        print(f"# wrote {args.output}")
    return 0


def run_point(n, dtype_name, sampler, shapes, updates, device, args, *, repeats, target_s, copy_call, copy_bytes,
              sec_per_elem, capped) -> list[Row]:
    """Time every update at one (size, dtype, sampler), side by side: the repeats of the backends are
    interleaved (one call of each per round), so that a burst of load from other processes hits all
    of them alike. Each backend updates its own copy of w (and V) from the same start. Each round
    also times one large copy (``copy_call``): the fractions of copy bandwidth are relative to the
    copy bandwidth measured within the same point (a shared machine's varies by 2x over minutes)."""
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

    nbytes = ideal_bytes(n, dtype, sampler)
    gen = torch.Generator(device=device).manual_seed(n)
    w_star = torch.randn(n, device=device, generator=gen).to(dtype)
    w0 = (w_star.float() + 0.01 * torch.randn(n, device=device, generator=gen)).to(dtype)
    grad = torch.randn(1, n, device=device, generator=gen).to(dtype)
    calls, states, errors = {}, {}, {}
    for name in active:
        w = w0.view(1, n).clone()
        stat = torch.zeros(1, n, device=device) if settings.preconditioned and name != "eager" else None
        states[name] = (w, stat)
        calls[name] = _make_call(name, updates[name], w, grad, w_star, stat, settings, shapes)
    del w0

    times: dict[str, list[float]] = {}
    warmup = 1 if n >= 1 << 24 else 3
    for attempt in range(1 + (args.retry_busy if device.type == "cpu" else 0)):
        if device.type == "cpu" and args.wait_quiet > 0:
            waited, quiet = wait_quiet(args.wait_quiet)
            if waited >= 1:
                print(f"# waited {waited:.0f} s for other processes to go quiet" + ("" if quiet else " (they did not)"))
        times = {name: [] for name in active}
        copy_times: list[float] = []
        cpu0 = _cpu_busy()
        for name in active:
            if name in errors:
                continue
            try:
                for _ in range(warmup):
                    calls[name]()
                synchronize(device)
            except Exception as e:  # a backend that cannot do this dtype/sampler is reported, not fatal
                errors[name] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
        running = [name for name in active if name not in errors]
        while running:
            if len(copy_times) < COPY_SAMPLES_PER_POINT:
                copy_times.append(_time_one(copy_call, device))
            for name in list(running):
                times[name].append(_time_one(calls[name], device))
                t = times[name]
                if len(t) >= args.max_repeats or (len(t) >= repeats and sum(t) >= target_s):
                    running.remove(name)
        other = _other_cores(cpu0)
        if other is None or other <= BUSY_CORES or attempt == args.retry_busy:
            break
        print(f"# {fmt_size(n)} {sampler} {dtype_name}: other processes kept {other:.2f} cores busy; timing it again")

    eager = statistics.median(times["eager"]) if times.get("eager") else None
    copy_bps = copy_bytes / statistics.median(copy_times) if copy_times else math.nan
    for name in active:
        if name in errors:
            skip(name, errors[name])
            continue
        med = statistics.median(times[name])
        sec_per_elem[(name, sampler, dtype_name)] = min(times[name]) / n  # the fastest call: robust to load
        w = states[name][0]
        note = "" if torch.isfinite(w.float()).all() else "WARNING: non-finite weights after the timed steps"
        if other is not None and other > BUSY_CORES:
            note = (note + "; " if note else "") + "machine busy with other processes"
        rows.append(Row(n, name, sampler, dtype_name, med * 1e3, min(times[name]) * 1e3, nbytes / med / 1e9,
                        nbytes / med / copy_bps, copy_bps / 1e9, n / med, eager / med if eager else None,
                        len(times[name]), other, note))
        _print_row(rows[-1])
    del calls, states, w_star, grad
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _make_call(name, fn, w, grad, w_star, stat, settings: SamplerSettings, shapes, *, lr=LR, nbeta=NBETA, gamma=GAMMA):
    """A zero-argument callable doing one update of ``w`` with ``name``; each call takes the next step."""
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


def _time_one(fn, device: torch.device) -> float:
    if device.type == "cuda":
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        fn()
        t1.record()
        t1.synchronize()
        return t0.elapsed_time(t1) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _cpu_busy():
    """(busy CPU seconds of the whole machine, CPU seconds of this process, wall time) now."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    except (OSError, ValueError):
        busy = math.nan
    t = os.times()
    return busy, t.user + t.system, time.perf_counter()


def wait_quiet(max_wait: float, threshold: float = BUSY_CORES, window: float = 0.5) -> tuple[float, bool]:
    """Wait up to ``max_wait`` s until other processes use < ``threshold`` cores over ``window`` s."""
    t0 = time.perf_counter()
    while True:
        start = _cpu_busy()
        time.sleep(window)
        other = _other_cores(start)
        if other is None or other < threshold:
            return time.perf_counter() - t0, True
        if time.perf_counter() - t0 >= max_wait:
            return time.perf_counter() - t0, False


def _other_cores(start) -> float | None:
    """Average cores that other processes kept busy since ``start`` (from /proc/stat); None if unknown."""
    busy1, own1, wall1 = _cpu_busy()
    busy0, own0, wall0 = start
    if math.isnan(busy1) or wall1 - wall0 < 0.05:
        return None
    return max(0.0, ((busy1 - busy0) - (own1 - own0)) / (wall1 - wall0))


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
    """The table again, grouped by sampler and dtype."""
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


def _write(path: Path, header: dict, rows: list[Row]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            for k, v in header.items():
                f.write(f"# {k}: {v}\n")
            writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0]).keys()) if rows else ["size"])
            writer.writeheader()
            for r in rows:
                writer.writerow(asdict(r))
    else:
        with open(path, "w") as f:
            json.dump({"header": header, "rows": [asdict(r) for r in rows]}, f, indent=1)


def provenance() -> dict:
    """What exactly was timed: the git commit, whether the kernels' sources differ from it, a hash of
    the C++/CUDA sources and of llc_fast/kernels, and the C++ build flags (the kernels change often)."""
    import hashlib
    import subprocess

    root = Path(__file__).resolve().parents[1]
    out: dict = {}

    def git(*a):
        try:
            r = subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True, timeout=20)
            return r.stdout.strip() if r.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None

    out["git_commit"] = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "csrc", "llc_fast/kernels")
    out["kernels_dirty"] = None if dirty is None else bool(dirty)
    for label, pattern in (("csrc_sha256", "csrc/*"), ("kernels_py_sha256", "llc_fast/kernels/*.py")):
        h = hashlib.sha256()
        for f in sorted(root.glob(pattern)):
            if f.is_file():
                h.update(f.name.encode() + b"\0" + f.read_bytes())
        out[label] = h.hexdigest()[:12]
    try:
        from llc_fast.kernels import cpp_update

        if hasattr(cpp_update, "cpu_build_config"):
            out["cpp_extension"], flags = cpp_update.cpu_build_config()
        else:
            out["cpp_extension"], flags = cpp_update.EXTENSION_NAME, cpp_update.CPU_CFLAGS
        out["cpp_flags"] = " ".join(flags)
    except Exception as e:  # pragma: no cover
        out["cpp_flags"] = f"unknown ({type(e).__name__})"
    return out


def _version(mod: str) -> str:
    try:
        return __import__(mod).__version__
    except Exception:
        return "not installed"


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def _cpu_name() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


if __name__ == "__main__":
    raise SystemExit(main())
