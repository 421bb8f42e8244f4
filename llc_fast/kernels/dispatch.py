"""Backends of the fused update, what each can run on, and the choice among them.

Every backend implements ``reference.reference_update``'s signature and math. ``backends()``
lists them with the reason a backend cannot run here; ``select_backend`` picks one.

Each backend's update function also carries its multi-segment form as the attribute
``update_segments`` (``reference.reference_update_segments``'s signature and math: several
separately allocated [C, n_k] weight/gradient segments, one flat w*/statistic/mask buffer, in one
call or launch); ``segments_update(update)`` returns it, or a per-segment loop for a function
without one.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .reference import reference_update, segments_by_loop

UpdateFn = Callable[..., None]


@dataclass(frozen=True)
class BackendInfo:
    name: str
    available: bool
    reason: str  # why it cannot run here ("" when available)
    devices: tuple[str, ...]  # device types it updates tensors on


@dataclass(frozen=True)
class _Backend:
    name: str
    devices: tuple[str, ...]
    load: Callable[[], UpdateFn]  # raises ImportError/RuntimeError with a reason if unavailable
    priority: int  # higher is preferred by "auto"


def _triton_devices() -> tuple[str, ...]:
    import os

    return ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)


def _load_triton() -> UpdateFn:
    from .triton_update import triton_update

    return triton_update


def _load_cpu() -> UpdateFn:
    from .cpp_update import load_cpu_update

    return load_cpu_update()


def _load_cuda() -> UpdateFn:
    from .cuda_update import load_cuda_update

    return load_cuda_update()


# "auto" walks this list in order of priority and takes the first backend that runs on the device.
_REGISTRY: list[_Backend] = [
    _Backend("cuda", ("cuda",), _load_cuda, priority=30),
    _Backend("triton", _triton_devices(), _load_triton, priority=20),
    _Backend("cpu", ("cpu",), _load_cpu, priority=10),
    _Backend("torch", ("cpu", "cuda"), lambda: reference_update, priority=0),
]
_LOADED: dict[str, UpdateFn | Exception] = {}


def _load(backend: _Backend) -> UpdateFn | Exception:
    if backend.name not in _LOADED:
        try:
            _LOADED[backend.name] = backend.load()
        except Exception as e:  # an unavailable backend must never break the package
            _LOADED[backend.name] = e
    return _LOADED[backend.name]


def backends() -> list[BackendInfo]:
    """Each backend, whether it can run on this machine, and if not, why."""
    out = []
    for b in _REGISTRY:
        loaded = _load(b)
        ok = not isinstance(loaded, Exception)
        out.append(BackendInfo(b.name, ok, "" if ok else f"{type(loaded).__name__}: {loaded}", b.devices))
    return out


def backend_names() -> tuple[str, ...]:
    return ("auto",) + tuple(b.name for b in _REGISTRY)


@dataclass(frozen=True)
class Backend:
    """A loaded backend: ``update`` (``reference_update``'s signature) and ``update_segments``
    (``reference_update_segments``'s: one call or launch over several segments)."""

    name: str
    update: UpdateFn

    @property
    def update_segments(self) -> UpdateFn:
        return segments_update(self.update)


def select_backend(name: str, device: torch.device) -> Backend:
    """The backend for ``name`` ("auto" = the fastest that runs on ``device``)."""
    if name not in backend_names():
        raise ValueError(f"backend must be one of {backend_names()}, got {name!r}")
    candidates = [b for b in _REGISTRY if name in ("auto", b.name)]
    if name == "auto" and device.type == "cpu":  # the Triton interpreter is for tests, never fast
        candidates = [b for b in candidates if b.name != "triton"]
    reasons = []
    for b in candidates:
        if device.type not in b.devices:
            reasons.append(f"{b.name}: does not run on {device.type}")
            continue
        loaded = _load(b)
        if isinstance(loaded, Exception):
            reasons.append(f"{b.name}: {loaded}")
            continue
        return Backend(b.name, loaded)
    raise RuntimeError(
        f"backend {name!r} cannot update tensors on {device}: " + "; ".join(reasons)
        + ". Pass backend='torch' (the reference) or see llc_fast.backends()."
    )


def segments_update(update: UpdateFn) -> UpdateFn:
    """The multi-segment form of a single-buffer update function: its ``update_segments`` attribute
    (one kernel call or launch for all segments), else one call of ``update`` per segment."""
    fn = getattr(update, "update_segments", None)
    return fn if fn is not None else segments_by_loop(update)


def has_fused_segments(update: UpdateFn) -> bool:
    """Whether ``update`` has a multi-segment entry of its own (not the per-segment loop fallback)."""
    return getattr(update, "update_segments", None) is not None
