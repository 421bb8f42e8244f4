"""Checks of estimate_llc's inputs, run before any sampling work. Each error says what was
wrong and what to pass instead."""
from __future__ import annotations

import math
import numbers

import torch

from ..state.flat import FlatLayout


def _values(x) -> list:
    if isinstance(x, torch.Tensor):
        return x.detach().reshape(-1).tolist()
    if isinstance(x, (list, tuple)):
        return list(x)
    return [x]


def check_positive(name: str, value, *, allow_zero: bool = False, hint: str = "") -> None:
    """A scalar or per-chain sequence of real numbers, all finite and > 0 (>= 0 with allow_zero)."""
    for v in _values(value):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
            need = ">= 0" if allow_zero else "> 0"
            raise ValueError(f"{name} must be a finite number {need}, got {v!r}. {hint}".rstrip())


def check_count(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_per_chain_length(name: str, value, num_chains: int) -> None:
    n = len(_values(value))
    if n not in (1, num_chains):
        raise ValueError(f"{name} must be a scalar or have one value per chain ({num_chains}), got {n} values")


def check_model(model, device: torch.device | None) -> FlatLayout:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layout = FlatLayout(model)
    if not layout.params:
        raise ValueError(
            "model has no trainable floating-point parameters to sample: set requires_grad=True on the "
            "parameters whose LLC you want (and make sure they are float32, float64 or bfloat16)"
        )
    devices = {t.device for t in list(model.parameters()) + list(model.buffers())}
    if len(devices) > 1:
        raise ValueError(
            f"model's parameters and buffers are on several devices {sorted(map(str, devices))}; move the model "
            "to one device first (model.to(device)); sharded models use the distributed path"
        )
    dtypes = {p.dtype for p in layout.params}
    if len(dtypes) > 1:
        raise ValueError(
            f"sampled parameters have mixed dtypes {sorted(map(str, dtypes))}; cast the model to one dtype "
            "(model.float() or model.to(torch.bfloat16))"
        )
    if layout.dtype not in (torch.float32, torch.float64, torch.bfloat16):
        raise ValueError(f"sampled parameters are {layout.dtype}; cast the model to float32, float64 or bfloat16")
    return layout


def checked_loss(loss, where: str) -> torch.Tensor:
    """The loss_fn's return value, checked to be a finite real scalar tensor."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss_fn must return a scalar torch.Tensor, got {type(loss).__name__} {where}")
    if loss.numel() != 1:
        raise ValueError(
            f"loss_fn must return the scalar mean loss of the batch, got a tensor of shape {tuple(loss.shape)} "
            f"{where}; reduce it (e.g. loss.mean())"
        )
    if not bool(torch.isfinite(loss)):
        raise ValueError(f"loss_fn returned a non-finite value ({loss.item()}) {where}: check the model and data")
    return loss.reshape(())
