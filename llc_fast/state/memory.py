"""The memory model of the sampler state: bytes per chain row, and how many rows fit a budget.

One chain row holds its weights, its gradient and (RMSProp samplers) its statistic V, which is
float32 (float64 for float64 weights). ``rows_within`` and ``plan_rows`` size the single-process row
batches (``plan_rows`` from the free memory of the device, CPU or GPU, unless a budget is given);
``llc_fast.distributed.planner`` builds its per-rank plan on the same ``row_bytes``.
"""
from __future__ import annotations

import torch


def bytes_per(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def statistic_bytes_per(dtype: torch.dtype) -> int:
    """The RMSProp statistic's bytes per element: float32, float64 for float64 weights."""
    return 8 if dtype == torch.float64 else 4


def row_bytes(numel: int, dtype: torch.dtype, preconditioned: bool) -> dict[str, int]:
    """Bytes of one chain row of ``numel`` elements: weights, gradients, statistic."""
    e = bytes_per(dtype)
    return {"weights": numel * e, "gradients": numel * e,
            "statistic": numel * statistic_bytes_per(dtype) if preconditioned else 0}


def sparse_rows_bytes(numels, full_numel: int, dtype: torch.dtype, preconditioned: bool) -> dict[str, int]:
    """Bytes of sparse rows: row i holds only its component's ``numels[i]`` coordinates (weights, gradients,
    statistic), and w* of all ``full_numel`` elements is stored once for every row."""
    out = row_bytes(sum(int(n) for n in numels), dtype, preconditioned)
    out["w*"] = full_numel * bytes_per(dtype)
    return out


def rows_within(budget: int | None, numel: int, dtype: torch.dtype, preconditioned: bool, wanted: int) -> int:
    """How many of ``wanted`` rows fit ``budget`` bytes (None: all); at least one."""
    if budget is None:
        return wanted
    per_row = max(1, sum(row_bytes(numel, dtype, preconditioned).values()))
    return max(1, min(wanted, budget // per_row))


#: The share of the free memory (GPU: torch.cuda.mem_get_info; CPU: MemAvailable) that the chain rows'
#: buffers may take when ``batch_memory_bytes`` is not given: the rest is for activations and everything else.
AVAILABLE_FRACTION = 0.5


def _cpu_available_bytes() -> int | None:
    """The memory the OS can give this process without swapping: psutil's ``available`` if psutil is
    installed, else /proc/meminfo's MemAvailable, capped by a cgroup memory limit (containers); None if unknown."""
    try:
        import psutil

        free = int(psutil.virtual_memory().available)
    except Exception:  # no psutil: Linux's own count
        free = None
        try:
            with open("/proc/meminfo") as f:
                free = next((int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable:")), None)
        except (OSError, ValueError):
            pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as f, open(usage_file) as g:
                left = int(f.read().strip()) - int(g.read().strip())  # "max" (no limit) raises ValueError
        except (OSError, ValueError):
            continue
        free = left if free is None else min(free, left)
    return free


def available_bytes(device: torch.device) -> tuple[int | None, str]:
    """(free bytes on ``device`` or None if unknown, what they are) for planning the chain rows."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0]), f"free memory of {device}"
    if device.type == "cpu":
        return _cpu_available_bytes(), "available CPU memory"
    return None, f"free memory of {device} (unknown)"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def plan_rows(wanted: int, numel: int, dtype: torch.dtype, preconditioned: bool, device: torch.device,
              budget: int | None = None) -> tuple[int, str]:
    """(chain rows per row batch, why): at most ``wanted`` rows whose buffers (``row_bytes``) fit ``budget``
    bytes (``batch_memory_bytes``), else ``AVAILABLE_FRACTION`` of the device's free memory (``available_bytes``),
    on the CPU as on a GPU. Activations come on top: a batched pass that runs out of memory anyway is split
    (``chains.engines.VmapEngine``)."""
    parts = row_bytes(numel, dtype, preconditioned)
    per_row = max(1, sum(parts.values()))
    what = "+".join(k for k, v in parts.items() if v)
    if budget is not None:
        source = f"batch_memory_bytes={budget}"
    else:
        free, name = available_bytes(device)
        if free is None:
            return wanted, f"{wanted} of {wanted} rows: the {name} cannot be read here (pass batch_memory_bytes)"
        budget = int(free * AVAILABLE_FRACTION)
        source = f"{AVAILABLE_FRACTION:.0%} of the {name} ({_size(free)})"
    rows = rows_within(budget, numel, dtype, preconditioned, wanted)
    fits = "fit" if rows == wanted else "is all that fits"
    return rows, f"{rows} of {wanted} rows of {_size(per_row)} ({what}) {fits} in {source}"
