"""The registry of the update's backends, what each can run on here, and the choice among them.

Every backend is a ``backend.Backend`` object (``prepare`` and ``update``, with the reference's
math), in the module named after it. ``backends()`` lists them with the reason a backend cannot run here;
``select_backend`` picks one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .backend import Backend
from .cpu_update import cpu_update
from .cuda_update import cuda_update
from .torch_update import torch_update
from .triton_update import triton_update


@dataclass(frozen=True)
class BackendInfo:
    name: str
    available: bool
    reason: str  # why it cannot run here ("" when available)
    devices: tuple[str, ...]  # device types it updates tensors on


#: "auto" takes the first backend in this order that runs on the device.
_REGISTRY: tuple[Backend, ...] = (cuda_update, triton_update, cpu_update, torch_update)
_LOAD_ERRORS: dict[str, Exception | None] = {}  # name -> why load() failed (None: it loaded)


def _load_error(backend: Backend) -> Exception | None:
    if backend.name not in _LOAD_ERRORS:
        try:
            backend.load()
            _LOAD_ERRORS[backend.name] = None
        except Exception as e:  # an unavailable backend must never break the package
            _LOAD_ERRORS[backend.name] = e
    return _LOAD_ERRORS[backend.name]


def backends() -> list[BackendInfo]:
    """Each backend, whether it can run on this machine, and if not, why."""
    out = []
    for b in _REGISTRY:
        err = _load_error(b)
        out.append(BackendInfo(b.name, err is None, "" if err is None else f"{type(err).__name__}: {err}", b.devices))
    return out


def backend_names() -> tuple[str, ...]:
    return ("auto",) + tuple(b.name for b in _REGISTRY)


def select_backend(name: str, device: torch.device, sampler: str = "sgld", noise_scheme: str = "euler") -> Backend:
    """The backend for ``name`` ("auto": the first in the registry that runs ``sampler`` with ``noise_scheme`` on
    ``device``)."""
    if name not in backend_names():
        raise ValueError(f"backend must be one of {backend_names()}, got {name!r}")
    candidates = [b for b in _REGISTRY if name in ("auto", b.name)]
    if name == "auto" and device.type == "cpu":  # the Triton interpreter is for tests, never fast
        candidates = [b for b in candidates if b.name != "triton"]
    reasons = []
    for b in candidates:
        if sampler not in b.samplers:
            reasons.append(f"{b.name}: does not run sampler={sampler!r}")
            continue
        if noise_scheme not in b.noise_schemes:
            reasons.append(f"{b.name}: does not run noise_scheme={noise_scheme!r}")
            continue
        if device.type not in b.devices:
            reasons.append(f"{b.name}: does not run on {device.type}")
            continue
        err = _load_error(b)
        if err is not None:
            reasons.append(f"{b.name}: {err}")
            continue
        return b
    raise RuntimeError(
        f"backend {name!r} cannot update tensors on {device}: " + "; ".join(reasons)
        + ". Pass backend='torch' (the reference) or see llc_fast.backends()."
    )

