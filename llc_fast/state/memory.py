"""The memory model of the sampler state: bytes per chain row, and how many rows fit a budget.

One chain row holds its weights, its gradient and (RMSProp samplers) its statistic V, which is
float32 (float64 for float64 weights). ``rows_within`` sizes the single-process batched groups;
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


def rows_within(budget: int | None, numel: int, dtype: torch.dtype, preconditioned: bool, wanted: int) -> int:
    """How many of ``wanted`` rows fit ``budget`` bytes (None: all); at least one."""
    if budget is None:
        return wanted
    per_row = max(1, sum(row_bytes(numel, dtype, preconditioned).values()))
    return max(1, min(wanted, budget // per_row))
