"""Shared harness of the bench/ scripts: timing, the CPU-load guard, validate-then-time, the
environment header, the command line (``cli``), the grid runner (``run_grid``), the one table writer
(``Table``) and the result files (.json/.csv, and a .txt transcript), written atomically."""
from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import datetime
import hashlib
import importlib.metadata
import io
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a fresh clone without installing

BUSY_CORES = 0.25  # other processes keeping this many cores busy make a CPU timing "busy"
BUSY = "  <- machine busy in every round: ignore"  # the mark of a figure whose every round was contended


# --- timing ------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_one(fn, device: torch.device) -> float:
    """Seconds of one call: CUDA events on a GPU, ``time.perf_counter`` on the CPU."""
    if device.type == "cuda":
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        fn()
        t1.record()
        t1.synchronize()
        return t0.elapsed_time(t1) / 1e3
    return wall(fn, device)


def time_interleaved(calls: dict, device: torch.device, *, min_repeats: int, max_repeats: int, target_s: float,
                     warmup: int = 0, extra=None, extra_samples: int = 0):
    """Side-by-side timing: ``warmup`` untimed calls of each of ``calls``, then one call of each per round (so a
    burst of outside load hits all alike), each until it has ``min_repeats`` calls summing to ``target_s`` (or
    ``max_repeats``); each round first times ``extra`` until it has ``extra_samples``. Returns ({name: times},
    extra times)."""
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    synchronize(device)
    times, extra_times, running = {name: [] for name in calls}, [], list(calls)
    while running:
        if extra is not None and len(extra_times) < extra_samples:
            extra_times.append(time_one(extra, device))
        for name in list(running):
            t = times[name]
            t.append(time_one(calls[name], device))
            if len(t) >= max_repeats or (len(t) >= min_repeats and sum(t) >= target_s):
                running.remove(name)
    return times, extra_times


def wall(fn, device: torch.device) -> float:
    """Wall seconds of ``fn()``, the device synchronized before and after."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def validate(fn, *, warmup: int = 1, device: torch.device | None = None) -> str | None:
    """Validate-then-time: ``warmup`` untimed calls; None if they ran, else a one-line error note
    (a backend that cannot do a dtype or sampler is reported, not fatal)."""
    try:
        for _ in range(warmup):
            fn()
        if device is not None:
            synchronize(device)
    except Exception as e:
        return "error: " + error_line(e, 80)
    return None


def error_line(e: BaseException, width: int = 300) -> str:
    """'Type: the first line of the message', cut to ``width`` characters."""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:width] if str(e) else ''}"


# --- the CPU-load guard ------------------------------------------------------------------------

def cpu_times() -> tuple[float, float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process, wall time) now."""
    try:
        fields = [int(x) for x in _proc("stat").split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    except (AttributeError, ValueError):
        busy = math.nan
    t = os.times()
    return busy, t.user + t.system, time.perf_counter()


def other_cores(start) -> float | None:
    """Average cores that other processes kept busy since ``start`` (``cpu_times()``); None if unknown."""
    busy1, own1, wall1 = cpu_times()
    busy0, own0, wall0 = start
    if math.isnan(busy1) or wall1 - wall0 < 0.05:
        return None
    return max(0.0, ((busy1 - busy0) - (own1 - own0)) / (wall1 - wall0))


def wait_quiet(max_wait: float, threshold: float = BUSY_CORES, window: float = 0.5) -> tuple[float, bool]:
    """Wait up to ``max_wait`` s until other processes use < ``threshold`` cores over ``window`` s.
    Returns (seconds waited, whether it went quiet)."""
    t0 = time.perf_counter()
    while True:
        start = cpu_times()
        time.sleep(window)
        other = other_cores(start)
        if other is None or other < threshold:
            return time.perf_counter() - t0, True
        if time.perf_counter() - t0 >= max_wait:
            return time.perf_counter() - t0, False


# One try of a measurement: what it returned, the cores other processes kept busy meanwhile (None: unknown) and
# the seconds it waited for a quiet machine first.
Attempt = collections.namedtuple("Attempt", "value other waited")


class LoadGuard:
    """Runs a measurement after waiting up to ``wait_s`` for a quiet machine, and again (up to
    ``retries`` more times) while other processes kept ``busy`` cores or more busy during it."""

    def __init__(self, wait_s: float = 0.0, retries: int = 0, busy: float = BUSY_CORES, log=print):
        self.wait_s, self.retries, self.busy, self.log = wait_s, retries, busy, log

    def clean(self, a: Attempt) -> bool:
        return a.other is None or a.other < self.busy

    def once(self, fn) -> Attempt:
        waited = 0.0
        if self.wait_s > 0:
            waited, quiet = wait_quiet(self.wait_s)
            if self.log and waited >= 1:
                self.log(f"# waited {waited:.0f} s for other processes to go quiet" + ("" if quiet else " (they did not)"))
        start = cpu_times()
        value = fn()
        return Attempt(value, other_cores(start), waited)

    def run(self, fn, *, want: int = 1, report: Callable[[Attempt, bool], None] | None = None) -> list[Attempt]:
        """Attempts until ``want`` were clean or ``want + retries`` were made; ``report(attempt, again)``
        after each (``again``: another follows)."""
        runs: list[Attempt] = []
        while True:
            runs.append(self.once(fn))
            again = len(runs) < want + self.retries and sum(map(self.clean, runs)) < want
            if report:
                report(runs[-1], again)
            if not again:
                return runs

    def rounds(self, fn, want: int, describe: Callable[[Any], str], label: str = "round") -> tuple[list, bool, list]:
        """``run`` with each attempt logged as '  ``label``: ``describe(value)``' (its other cores; busy: whether it
        is timed again). Returns (the values of the clean attempts, else of all; whether any was clean; all)."""
        def said(a: Attempt, again: bool) -> None:
            log(f"  {label}: {describe(a.value)}" + ("" if a.other is None else f"; other processes kept {a.other:.2f} "
                "cores busy") + ("" if self.clean(a) else "; busy" + ("; timing it again" if again else "")))

        attempts = self.run(fn, want=want, report=said)
        clean = [a for a in attempts if self.clean(a)]
        return [a.value for a in (clean or attempts)], bool(clean), attempts


def guard_for(args) -> LoadGuard:
    """The load guard of a run: ``--wait-quiet`` and ``--retry-busy`` on the CPU, nothing on a GPU."""
    cpu = args.device.type == "cpu"
    return LoadGuard(args.wait_quiet if cpu else 0.0, getattr(args, "retry_busy", 0) if cpu else 0)


# --- the environment ---------------------------------------------------------------------------

def command_line(argv=None) -> str:
    """``main``'s ``argv``, else the command as typed from the repository root (the interpreter as
    .venv/bin/python, else its full path)."""
    if argv is not None:
        return " ".join(argv)
    rel = os.path.relpath(sys.executable, Path.cwd())
    return " ".join([sys.executable if rel.startswith("..") else rel] + sys.argv)


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _proc(path: str, prefix: str = ""):
    """The first line of /proc/``path`` starting with ``prefix`` (None if unreadable)."""
    try:
        with open(f"/proc/{path}") as f:
            return next((line for line in f if line.startswith(prefix)), None)
    except OSError:
        return None


def loadavg() -> str:
    line = _proc("loadavg")
    return " ".join(line.split()[:3]) if line else "n/a"


def cpu_name() -> str:
    line = _proc("cpuinfo", "model name")
    return line.split(":", 1)[1].strip() if line else platform.processor() or "unknown CPU"


def version(mod: str) -> str:
    """``mod.__version__``, else the version of its installed distribution, else 'not installed'."""
    for get in (lambda: __import__(mod).__version__, lambda: importlib.metadata.version(mod)):
        try:
            return get()
        except Exception:
            pass
    return "not installed"


def available_memory(device: torch.device) -> int:
    """Bytes free on the GPU, or MemAvailable on the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    line = _proc("meminfo", "MemAvailable:")
    return int(line.split()[1]) * 1024 if line else 1 << 62


def provenance() -> dict:
    """What exactly was timed: the git commit, whether csrc/ or llc_fast/kernels differ from it,
    hashes of both, and the C++ build flags."""
    def git(*a):
        try:
            r = subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True, timeout=20)
            return r.stdout.strip() if r.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None

    out: dict = {"git_commit": git("rev-parse", "--short", "HEAD") or "unknown"}
    dirty = git("status", "--porcelain", "--", "csrc", "llc_fast/kernels")
    out["kernels_dirty"] = None if dirty is None else bool(dirty)
    for label, pattern in (("csrc_sha256", "csrc/*"), ("kernels_py_sha256", "llc_fast/kernels/*.py")):
        h = hashlib.sha256()
        for f in sorted(ROOT.glob(pattern)):
            if f.is_file():
                h.update(f.name.encode() + b"\0" + f.read_bytes())
        out[label] = h.hexdigest()[:12]
    try:
        from llc_fast.kernels.cpu_update import cpu_build_config

        out["cpp_extension"], flags = cpu_build_config()
        out["cpp_flags"] = " ".join(flags)
    except Exception as e:  # pragma: no cover
        out["cpp_flags"] = f"unknown ({type(e).__name__})"
    return out


def begin(name: str, device: torch.device, argv, packages=("torch", "triton", "llc_fast"), **extra) -> dict:
    """The start of a run: the header of its result file (date, command, device, versions, threads, load, code
    provenance, ``extra``), printed as the '# ' lines every output starts with."""
    env = dict(date=now(), command=command_line(argv),
               device=torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
               device_type=device.type, platform=platform.platform(), python=platform.python_version(),
               **{p: version(p) for p in packages}, torch_threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
               loadavg_start=loadavg(), **provenance(), **extra)
    log(f"# {name}  {env['date']}")
    log(f"# command: {env['command']}")
    log(f"# device: {env['device']} ({env['device_type']}, {env['cpu_count']} cores); {env['platform']}; "
        f"python {env['python']}")
    log("# " + ", ".join(f"{p} {env[p]}" for p in packages))
    log(f"# code: git {env['git_commit']}" + (" + uncommitted changes in csrc/ or llc_fast/kernels/"
        if env["kernels_dirty"] else "") + f"; csrc sha256 {env['csrc_sha256']}, llc_fast/kernels sha256 "
        f"{env['kernels_py_sha256']}; C++ flags: {env.get('cpp_flags')}")
    log(f"# torch threads: {env['torch_threads']} (os.cpu_count() = {env['cpu_count']}); load average at start: "
        f"{env['loadavg_start']}")
    return env


# --- the grid, the table -------------------------------------------------------------------------

def log(line: str = "") -> None:
    print(line, flush=True)


def grid(**axes) -> list[dict]:
    """Every combination of the axes' values, the first axis outermost: ``grid(size=[..], dtype=[..])``."""
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def run_grid(points, measure, *, providers=None, table: "Table | None" = None) -> list[dict]:
    """Liger-Kernel's ``run_benchmarks``: for each point of the grid (a dict), ``measure(point)`` (or
    ``measure(point, provider)`` for each of ``providers``) returns a row or a list of rows; each row,
    the point's keys first, is printed by ``table`` as it comes. Returns every row."""
    rows: list[dict] = []
    for point in points:
        got = measure(point) if providers is None else [measure(point, p) for p in providers]
        for r in (got if isinstance(got, list) else [got]):
            if r is None:
                continue
            rows.append(dict(point, **r))
            if table is not None:
                table.row(rows[-1])
    return rows


def _cell(value, fmt) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt(value) if callable(fmt) else format(value, fmt)


class Table:
    """One fixed-width table: columns ``(key, width, format[, title])`` (format: a format spec or a function;
    width 0: left-aligned, last); a missing or None value prints '-'. ``print(rows)``: header and rows."""

    def __init__(self, *cols):
        self.cols = [c if len(c) == 4 else (*c, c[0]) for c in cols]

    def header(self) -> None:
        line = " ".join(f"{t:>{w}}" if w else t for _, w, _, t in self.cols)
        log(line)
        log("-" * len(line))

    def row(self, r: dict) -> None:
        log(" ".join(f"{_cell(r.get(k), f):>{w}}" if w else _cell(r.get(k), f) for k, w, f, _ in self.cols))

    def print(self, rows, *, group=None) -> None:
        """The header, then the rows (a blank line between groups: rows whose ``group(row)`` differs)."""
        self.header()
        rows = list(rows)
        for i, r in enumerate(rows):
            if i and group is not None and group(r) != group(rows[i - 1]):
                log()
            self.row(r)


def spread(values) -> dict:
    """Median, min, max and count of the finite values (NaN if none)."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return dict(median=math.nan, min=math.nan, max=math.nan, n=0)
    return dict(median=statistics.median(vals), min=min(vals), max=max(vals), n=len(vals))


def fmt_spread(v: dict, scale: float = 1.0, spec: str = ".2f", unit: str = "") -> str:
    """'median (min-max)' of a ``spread``, times ``scale``."""
    m, lo, hi = (v[k] * scale for k in ("median", "min", "max"))
    return f"{m:{spec}}{unit} ({lo:{spec}}-{hi:{spec}}{unit})"


def summary(text: str, quick: bool = False) -> None:
    """The one-line result gpu_suite.sh puts in its table."""
    print("SUMMARY: " + ("[quick: not a result] " if quick else "") + text, flush=True)


# --- command line and result files ------------------------------------------------------------

def cli(doc: str, options, run, *, each: str, quick: dict | None = None, device: str | None = "cpu",
        check=lambda args, ap: None, retry_busy: bool = True, output: str = "write the results as JSON"):
    """A script's ``main(argv=None)``: its ``options(ap)``, then [--device], --quick and the common options
    (--threads, --wait-quiet, [--retry-busy], --output, --log; ``each``: what is guarded: 'point', 'run');
    each option of ``quick`` ({dest: (default, default with --quick)}) left unset takes its default; the options
    are checked (``check(args, ap)``); then, under ``--log``'s transcript with ``--threads`` set,
    ``run(args, argv)``. ``args.device`` is a torch.device (the CPU without --device), ``args.t_start`` the start."""
    def main(argv=None) -> int:
        ap = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
        if device is not None:
            ap.add_argument("--device", default=device, choices=["cpu", "cuda"])
        ap.add_argument("--quick", action="store_true", help="a smoke run (seconds): its figures are not results")
        options(ap)
        ap.add_argument("--threads", type=int, default=None, help="torch (and C++ kernel) threads; default: all cores")
        ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                        help=f"on the CPU, before each {each} wait up to S seconds until other processes keep less "
                             f"than {BUSY_CORES} cores busy (a shared machine distorts multi-threaded timings badly)")
        if retry_busy:
            ap.add_argument("--retry-busy", type=int, default=2, metavar="K",
                            help=f"on the CPU, time a {each} up to K more times while other processes kept >= "
                                 f"{BUSY_CORES} cores busy")
        ap.add_argument("--output", type=Path, help=output)
        ap.add_argument("--log", type=Path, metavar="FILE.txt",
                        help="also write everything printed to FILE.txt, after the command line and date (the format "
                             "of bench/results/*.txt); written atomically when the run ends")
        ap.set_defaults(**{k: None for k in quick or {}})
        args = ap.parse_args(argv)
        fill_defaults(args, quick or {})
        args.device = torch.device(getattr(args, "device", "cpu"))
        if args.device.type == "cuda" and not torch.cuda.is_available():
            ap.error("--device cuda: this torch has no CUDA device (torch.cuda.is_available() is False)")
        check(args, ap)
        with transcript(args.log, argv):
            torch.set_num_threads(args.threads or os.cpu_count() or 1)  # torch (and C++ kernel) threads
            args.t_start = time.perf_counter()
            return run(args, argv)

    return main


def fill_defaults(args, table: dict) -> None:
    """Each option of ``table`` ({dest: (default, default with --quick)}) left unset (None) takes its default."""
    for k, (full, short) in table.items():
        if getattr(args, k) is None:
            setattr(args, k, short if args.quick else full)


def finish(args, header: dict, rows: list, line: str | None, *, key: str = "rows", wall_key: str = "wall_s",
           code: int = 0) -> int:
    """The common end of a run: the load average and wall seconds since ``args.t_start`` into ``header`` (and
    printed), the SUMMARY ``line`` (if any), the results written (``--output``); returns ``code``."""
    header.update({"loadavg_end": loadavg(), wall_key: time.perf_counter() - args.t_start})
    log(f"# done in {header[wall_key]:.0f} s; load average at end: {header['loadavg_end']}")
    if line is not None:
        summary(line, args.quick)
    write_results(args.output, header, rows, key)
    return code


@contextlib.contextmanager
def recorded_warnings(width: int = 200):
    """Warnings raised inside, kept rather than shown: the list it yields gets, on exit, their distinct first lines
    (cut to ``width``; deprecations left out), sorted."""
    got: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield got
    got += sorted({str(w.message).partition("\n")[0][:width] for w in caught
                   if not issubclass(w.category, DeprecationWarning)})


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file next to ``path``, then rename it: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _jsonable(o):
    if hasattr(o, "tolist"):  # numpy scalars and arrays, tensors
        return o.tolist()
    try:
        return float(o)
    except (TypeError, ValueError):
        return str(o)


def write_results(path: Path | None, header: dict, rows: list[dict], key: str = "rows") -> None:
    """``{"header": header, key: rows}`` as JSON, or (a .csv path) '# k: v' header lines and a CSV table;
    nothing if ``path`` is None (no ``--output``)."""
    if path is None:
        return
    path = Path(path)
    if path.suffix == ".csv":
        buf = io.StringIO()
        buf.writelines(f"# {k}: {v}\n" for k, v in header.items())
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["size"], lineterminator="\r\n")
        writer.writeheader()
        writer.writerows(rows)
        write_atomic(path, buf.getvalue())
    else:
        write_atomic(path, json.dumps({"header": header, key: rows}, indent=1, default=_jsonable))
    print(f"# wrote {path}")


class _Tee(io.StringIO):
    """Kept text that is also written to ``out``."""

    def __init__(self, out, text: str):
        super().__init__(text)
        self.seek(0, io.SEEK_END)
        self.out = out

    def write(self, s):
        self.out.write(s)
        return super().write(s)

    def flush(self):
        self.out.flush()


@contextlib.contextmanager
def transcript(path: Path | None, argv=None):
    """While active, stdout is also kept and written atomically to ``path`` (if given) at the end,
    after a '$ command' and a '# date:' line."""
    if path is None:
        yield
        return
    buf = _Tee(sys.stdout, f"$ {command_line(argv)}\n# date: {now()}\n\n")
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        write_atomic(path, buf.getvalue())
        print(f"# wrote {path}")
