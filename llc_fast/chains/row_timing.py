"""Rows per vmapped call chosen by measured speed (``row_batching="measured"``, the default) or by memory alone
("fit").

The memory plan (``state.memory.plan_rows``; for sparse rows ``sparse_call_plan``) gives the most rows one call
may take. With "measured", before sampling, a few trial ``loss_and_grad`` passes at up to three candidate sizes
within that plan (the most, half, a quarter) are timed on the chains' first batches, with no chain state advanced,
and the size with the least seconds per row is kept (ties: the larger). Runs of fewer than ``MIN_STEPS`` steps per
chain keep the plan's most (trials costing about 3-6 steps would not pay back), as do compiled passes. A chain's loss, gradient and noise do not
depend on the rows it shares a call with (noise is keyed by seed, chain, step and global index), so the choice
changes the speed, never a chain (beyond float rounding where a kernel rounds by batch size). The choice and the
measured seconds per row are in the result's facts (``rows_per_call``, ``row_times_s``, ``row_plan``).
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable

import torch

ROW_BATCHING = ("measured", "fit")
#: timed trial calls per candidate; the least is kept
REPEATS = 2
#: the fewest steps per chain for which "measured" times its candidates
MIN_STEPS = 100


def worth_measuring(settings) -> bool:
    """Whether a run of ``settings`` (``SetupSettings``) times its candidate sizes (module docstring)."""
    return (settings.row_batching == "measured" and not settings.compile_step
            and settings.loop.schedule.num_steps >= MIN_STEPS)


def candidates(most: int) -> list[int]:
    """The sizes tried for a plan of at most ``most`` rows per call: the most, half, a quarter (distinct, >= 1)."""
    return sorted({most, max(1, math.ceil(most / 2)), max(1, math.ceil(most / 4))}, reverse=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fastest(sizes: list[int], time_call: Callable[[int], float], rows_timed: Callable[[int], int] | None = None,
            repeats: int = REPEATS) -> tuple[int, dict]:
    """(the size of least seconds per row, {size: seconds per row}). time_call(size): seconds of one trial at that
    size; rows_timed(size): the rows that trial ran (default: size). A size whose trial runs out of memory is left
    out; if every one does: (the first size, {}), and the engine's own halving takes over."""
    from .engines import is_out_of_memory

    per_row = {}
    for size in sizes:
        try:
            seconds = min(time_call(size) for _ in range(repeats))
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            continue
        per_row[size] = seconds / max(1, (rows_timed or (lambda s: s))(size))
    if not per_row:
        return sizes[0], {}
    best = min(per_row, key=lambda s: (per_row[s], -s))
    return best, per_row


def timed(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def describe(choice: int, per_row: dict, unit: str = "rows") -> str:
    """The plan's sentence of a measured choice."""
    times = ", ".join(f"{s} {unit}: {per_row[s] * 1e3:.3g} ms/row" for s in sorted(per_row, reverse=True))
    return f"measured: {choice} {unit} per call is fastest ({times})"


def timing_facts(choice_rows: int, per_row: dict) -> dict:
    """The result's facts of a measured choice: rows_per_call and row_times_s (seconds per row of each size)."""
    return dict(rows_per_call=int(choice_rows), row_times_s={str(s): float(t) for s, t in sorted(per_row.items())})


def measure_full(engine, batches: list, device: torch.device, rows: int) -> tuple[int, dict]:
    """The fastest rows per vmapped call of a batched full-row ``engine`` (``engines.VmapEngine``) holding ``rows``
    rows, from trial passes on ``batches`` (no state written); sets ``engine.rows_per_pass`` to it when it is
    fewer than the rows. Returns (the choice, {size: seconds per row})."""
    most = min(rows, engine.rows_per_pass or rows)
    sizes = candidates(most)
    if len(sizes) == 1:
        return most, {}
    choice, per_row = fastest(sizes, lambda s: timed(lambda: engine._pass(0, s, batches), device))
    if per_row and choice < rows:
        engine.rows_per_pass = choice
    return choice, per_row


def peak_memory(device: torch.device | None = None) -> dict:
    """The process's peak resident memory so far (``peak_rss_bytes``, from getrusage; None where unknown) and, on
    a GPU, the peak of torch's allocations on it (``peak_gpu_bytes``, torch.cuda.max_memory_allocated)."""
    out: dict = {}
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["peak_rss_bytes"] = int(rss if sys.platform == "darwin" else rss * 1024)
    except (ImportError, OSError):
        out["peak_rss_bytes"] = None
    if device is not None and device.type == "cuda":
        out["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return out
