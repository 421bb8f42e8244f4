"""The checks of single option values, shared by ``LLCConfig`` and the studies: each error says what was wrong and
what to pass instead. ``count(minimum)``, ``positive(...)`` and ``one_of(choices)`` make the ``check`` of an option
(``LLCConfig``'s field metadata, run on construction and by the command line's argument types)."""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping

import numpy as np
import torch


def values(x) -> list:
    """A scalar or a per-chain sequence (list, tuple, numpy array, tensor) as a flat list."""
    if isinstance(x, torch.Tensor):
        return x.detach().reshape(-1).tolist()
    if isinstance(x, np.ndarray):
        return x.reshape(-1).tolist()
    if isinstance(x, (list, tuple)):
        return list(x)
    return [x]


def check_positive(name: str, value, *, allow_zero: bool = False, hint: str = "") -> None:
    """A scalar or per-chain sequence of real numbers, all finite and > 0 (>= 0 with allow_zero)."""
    for v in values(value):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
            need = ">= 0" if allow_zero else "> 0"
            raise ValueError(f"{name} must be a finite number {need}, got {v!r}. {hint}".rstrip())


def check_count(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def per_chain(name: str, value, num_chains: int) -> tuple[float, ...]:
    """``value`` (a scalar or one value per chain) as one float per chain."""
    given = values(value)
    if len(given) not in (1, num_chains):
        raise ValueError(f"{name} must be a scalar or have one value per chain ({num_chains}), got {len(given)} "
                         "values")
    return tuple(float(v) for v in given) * (num_chains if len(given) == 1 else 1)


def check_device(name: str, device) -> None:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{name} must be a torch device such as 'cpu' or 'cuda:0', got {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name}={device!r} but no CUDA GPU is visible (torch.cuda.is_available() is False; torch "
                         f"{torch.__version__}, built with CUDA {torch.version.cuda}); pass {name}='cpu'")


def check_seed(name: str, seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**63:
        raise ValueError(f"{name} must be an integer in [0, 2**63), got {seed!r}")


def check_mask(name: str, mask) -> None:
    if not isinstance(mask, Mapping):
        raise TypeError(f"{name} must be a dict {{parameter name: 0/1 tensor or None}}, got {type(mask).__name__}"
                        "; e.g. mask={'layer.weight': torch.ones_like(layer.weight)}")


def check_path(name: str, value) -> None:
    if not isinstance(value, (str, bytes)) and not hasattr(value, "__fspath__"):
        raise TypeError(f"{name} must be a file path, got {type(value).__name__}")


def count(minimum: int) -> Callable:
    """The check of an integer option that is at least ``minimum``."""
    def check(name: str, value) -> None:
        check_count(name, value, minimum)

    check.minimum = minimum
    return check


def positive(*, allow_zero: bool = False, hint: str = "") -> Callable:
    """The check of a real option (or one value per chain) that is finite and > 0 (>= 0 with allow_zero)."""
    def check(name: str, value) -> None:
        check_positive(name, value, allow_zero=allow_zero, hint=hint)

    return check


def one_of(choices: tuple | Callable[[], tuple]) -> Callable:
    """The check of an option that is one of ``choices`` (a tuple, or a function giving it when checked)."""
    def check(name: str, value) -> None:
        allowed = choices() if callable(choices) else choices
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")

    return check
