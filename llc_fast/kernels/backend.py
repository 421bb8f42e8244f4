"""The base class of the update's backends, and the one place where an update's arguments are checked.

A backend (the reference in ``reference.py``, the C++, CUDA and Triton kernels beside it) is one
object with ``name``, ``devices``, ``load()``, ``not_supported_reasons(call)`` and ``launch(call)``.
Its public entry points are defined here, once:

    update(w, grad, w_star, stat, *, lr, nbeta, gamma, settings, counters, seed, chain_ids,
           mask=None, index_offset=0)                      # one buffer: w, grad [C, N]
    update_segments(segments, w_star, stat, *, lr, nbeta, gamma, settings, counters, seed,
                    chain_ids, mask=None)                  # segments (w_k, grad_k, local_start_k, global_offset_k)

Both check the arguments and pack them into one ``UpdateCall`` (a ValueError names a wrong
argument), raise ``NotSupportedError`` listing the backend's ``not_supported_reasons`` if it has
any, and then ``launch`` the call. The single buffer is the one-segment case: segment
(w, grad, 0, index_offset) of w* [N] and stat [C, N]. A backend object is also callable as
``update``.

A sampling loop whose arguments change only in the step counters (and the gradient tensors) from
one step to the next checks and packs them once:

    prepared = backend.prepare_segments(segments, w_star, stat, lr=..., nbeta=..., gamma=...,
                                        settings=..., seed=..., chain_ids=..., mask=None)
    prepared.launch(counters)                # each step; grads=[...]: this step's gradient tensors

``launch`` gives bit for bit what ``update_segments`` gives with the same arguments and counters
(``update_segments`` is prepare and launch, through the same code). A backend implements
``prepare_call(call)`` (returning a ``PreparedUpdate`` that keeps what it converted: per-chain
values, chain indices, mask, pointers, tables, launch arguments) or only ``launch(call)``.
"""
from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from . import philox
from .update_spec import SUPPORTED_PARAM_DTYPES, RowMasks, SamplerSettings, StepCounters, compute_dtype, per_chain

#: Global element indices (offset + n) must stay inside int64, with room for a group of four.
MAX_INDEX = 2**63 - 1 - 8


class NotSupportedError(ValueError):
    """A backend cannot run this call (device, dtype, sizes); the message lists the reasons."""


class Segment(NamedTuple):
    """One separately allocated piece of an update: ``w``, ``grad`` [C, n] are columns
    [local_start, local_start + n) of w*, stat and mask; element j draws the noise of global
    element index ``global_offset + j``."""

    w: torch.Tensor
    grad: torch.Tensor
    local_start: int
    global_offset: int

    @property
    def n(self) -> int:
        return self.w.shape[1]

    @property
    def local(self) -> slice:
        """Its columns of the flat buffers (w*, stat, mask)."""
        return slice(self.local_start, self.local_start + self.n)


@dataclass(frozen=True, eq=False)
class UpdateCall:
    """One checked update: what every backend's ``launch`` gets.

    segments: the non-empty segments (n > 0), in the order given; their local ranges do not overlap.
    w_star: [N_local]. stat: [C, N_local] of the compute dtype, None for SGLD. mask: [N_local] of
    0/1 (any dtype) or None. lr, nbeta, gamma: each a Python number or a 0-d / [C] tensor, as given
    (``per_chain_values`` converts them). chain_ids: int64 [C] on the device it came on (range-checked
    there if that is the host; chain indices on an accelerator are trusted, checking would sync).
    seed: in [0, 2**64); step: counters.step, in [0, 2**32). All tensors but lr/nbeta/gamma/chain_ids are
    contiguous and on one device.
    """

    segments: tuple[Segment, ...]
    w_star: torch.Tensor
    stat: torch.Tensor | None
    mask: "torch.Tensor | RowMasks | None"
    lr: float | torch.Tensor
    nbeta: float | torch.Tensor
    gamma: float | torch.Tensor
    settings: SamplerSettings
    counters: StepCounters
    seed: int
    step: int
    chain_ids: torch.Tensor
    num_chains: int

    @property
    def device(self) -> torch.device:
        return self.w_star.device

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype."""
        return self.w_star.dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        return compute_dtype(self.dtype)

    @property
    def n_local(self) -> int:
        return self.w_star.shape[0]

    @property
    def numel(self) -> int:
        """Weights updated: C times the elements of all segments."""
        return self.num_chains * sum(s.n for s in self.segments)

    @property
    def single(self) -> bool:
        """Whether the call is one buffer: one segment covering all of w*, stat and mask."""
        return len(self.segments) == 1 and self.segments[0].local_start == 0 and self.segments[0].n == self.n_local

    def per_chain_values(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(lr, nbeta, gamma), each a contiguous [C] tensor of the compute dtype on the call's device."""
        return tuple(per_chain(v, self.num_chains, self.device, self.compute_dtype).contiguous()
                     for v in (self.lr, self.nbeta, self.gamma))


# --- the checks ----------------------------------------------------------------------------------


def _index(name: str, value, lo: int, hi: int) -> int:
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {type(value).__name__}") from None
    if not lo <= value <= hi:
        raise ValueError(f"{name} must lie in [{lo}, {hi}], got {value}")
    return value


def _shape(t) -> tuple | None:
    return None if t is None else tuple(t.shape)


def _check_row_masks(rm: RowMasks, num_chains: int, n_local: int) -> None:
    """ValueError naming what is wrong with a RowMasks for ``num_chains`` rows of ``n_local`` local elements."""
    windows, buffer, comp = rm.windows, rm.buffer, rm.row_component
    if not isinstance(windows, torch.Tensor) or windows.dtype != torch.int64 or windows.ndim != 2 or windows.shape[1] != 3:
        raise ValueError(f"RowMasks.windows must be an int64 [K, 3] tensor of (lo, hi, offset), got "
                         f"{_shape(windows) if isinstance(windows, torch.Tensor) else type(windows).__name__}"
                         f"{'' if not isinstance(windows, torch.Tensor) else f' of {windows.dtype}'}")
    if not isinstance(buffer, torch.Tensor) or buffer.dtype != torch.uint8 or buffer.ndim != 1 or not buffer.is_contiguous():
        raise ValueError(f"RowMasks.buffer must be a contiguous uint8 [B] tensor of 0/1, got "
                         f"{_shape(buffer) if isinstance(buffer, torch.Tensor) else type(buffer).__name__}"
                         f"{'' if not isinstance(buffer, torch.Tensor) else f' of {buffer.dtype}'}")
    if not isinstance(comp, torch.Tensor) or comp.dtype != torch.int64 or comp.ndim != 1:
        raise ValueError(f"RowMasks.row_component must be an int64 [C] tensor, got "
                         f"{_shape(comp) if isinstance(comp, torch.Tensor) else type(comp).__name__}"
                         f"{'' if not isinstance(comp, torch.Tensor) else f' of {comp.dtype}'}")
    if comp.shape[0] != num_chains:
        raise ValueError(f"RowMasks.row_component has {comp.shape[0]} rows but the update has {num_chains} chain rows")
    k_count, size = windows.shape[0], buffer.shape[0]
    for k, (lo, hi, off) in enumerate(windows.cpu().tolist()):
        if not 0 <= lo <= hi <= n_local:
            raise ValueError(f"RowMasks.windows[{k}] = ({lo}, {hi}, {off}): the window [lo, hi) must lie in "
                             f"[0, N_local = {n_local}]")
        if not (0 <= off and off + (hi - lo) <= size):
            raise ValueError(f"RowMasks.windows[{k}] = ({lo}, {hi}, {off}): offset {off} with {hi - lo} values is "
                             f"outside the buffer's [0, {size})")
    for c, k in enumerate(comp.cpu().tolist()):
        if not -1 <= k < k_count:
            raise ValueError(f"RowMasks.row_component[{c}] = {k} must be -1 (unrestricted) or a component in "
                             f"[0, {k_count})")


def pack_call(segments: Sequence, w_star: torch.Tensor, stat: torch.Tensor | None, *, lr, nbeta, gamma,
              settings: SamplerSettings, counters: StepCounters, seed: int, chain_ids, mask: "torch.Tensor | RowMasks | None",
              single: bool = False) -> UpdateCall:
    """Check the arguments of an update (see the module docstring) and pack them; ValueError naming
    what is wrong. ``single``: the arguments came through ``update`` (messages name w, index_offset)."""
    if not isinstance(settings, SamplerSettings):
        raise ValueError(f"settings must be a SamplerSettings, got {type(settings).__name__}")
    if not isinstance(counters, StepCounters):
        raise ValueError(f"counters must be a StepCounters, got {type(counters).__name__}")
    if not isinstance(w_star, torch.Tensor) or w_star.ndim != 1:
        raise ValueError(f"w_star must be the flat [N_local] buffer, got shape {_shape(w_star)}")
    n_local, dtype = w_star.shape[0], w_star.dtype
    segs: list[Segment] = []
    for k, seg in enumerate(segments):
        where = "" if single else f"segment {k}: "
        try:
            w, grad, start, offset = seg
        except (TypeError, ValueError):
            raise ValueError(f"segment {k} must be (w, grad, local_start, global_offset)") from None
        chains = segs[0].w.shape[0] if segs else None
        if not isinstance(w, torch.Tensor) or w.ndim != 2 or (chains is not None and w.shape[0] != chains):
            raise ValueError(f"{where}w must be [chains, elements]{'' if chains is None else f' with {chains} chains'}"
                             f", got shape {_shape(w)}")
        if w.dtype not in SUPPORTED_PARAM_DTYPES:
            raise ValueError(f"parameters must be float32, float64 or bfloat16, got {w.dtype}")
        if w.dtype != dtype:
            raise ValueError(f"{where}w is {w.dtype} but w_star is {dtype}")
        if not isinstance(grad, torch.Tensor) or grad.shape != w.shape or grad.dtype != w.dtype:
            raise ValueError(f"{where}grad must match w ({tuple(w.shape)}, {w.dtype}), got "
                             f"{_shape(grad)}, {getattr(grad, 'dtype', None)}")
        if not w.is_contiguous():
            raise ValueError(f"{where}w must be contiguous")
        if not grad.is_contiguous():
            raise ValueError(f"{where}grad must be contiguous")
        n = w.shape[1]
        start = _index(f"{where}local_start", start, 0, n_local)
        if start + n > n_local:
            raise ValueError(f"{where}local range [{start}, {start + n}) is outside w_star's [0, {n_local})")
        offset = _index("index_offset" if single else f"segment {k}: global_offset", offset, 0, MAX_INDEX - n)
        segs.append(Segment(w, grad, start, offset))
    ranges = sorted((s.local_start, s.local_start + s.n, k) for k, s in enumerate(segs) if s.n)
    for (_, e0, k0), (s1, _, k1) in zip(ranges, ranges[1:]):
        if s1 < e0:
            raise ValueError(f"segments {k0} and {k1} overlap in the local buffers")
    if not w_star.is_contiguous():
        raise ValueError("w_star must be contiguous")

    if not isinstance(chain_ids, torch.Tensor):
        chain_ids = torch.as_tensor(chain_ids)
    num_chains = segs[0].w.shape[0] if segs else (chain_ids.shape[0] if chain_ids.ndim == 1 else 0)
    if settings.preconditioned:
        cdt = compute_dtype(dtype)
        if (not isinstance(stat, torch.Tensor) or stat.shape != (num_chains, n_local) or stat.dtype != cdt
                or not stat.is_contiguous()):
            raise ValueError(f"the RMSProp statistic stat must be a contiguous [{num_chains}, {n_local}] tensor of "
                             f"{cdt}, got {None if stat is None else (_shape(stat), stat.dtype)}")
    else:
        stat = None
    if isinstance(mask, RowMasks):
        _check_row_masks(mask, num_chains, n_local)
    elif mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != (n_local,)
                               or not mask.is_contiguous()):
        raise ValueError(f"mask must be a contiguous [{n_local}] tensor or a RowMasks, got "
                         f"{_shape(mask) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    tensors = [w_star, stat, mask.buffer if isinstance(mask, RowMasks) else mask] + [t for s in segs for t in (s.w, s.grad)]
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")

    seed = _index("seed", seed, 0, philox.MAX_SEED)
    step = _index("counters.step", counters.step, 0, philox.MAX_STEP)
    if chain_ids.is_floating_point() or chain_ids.is_complex() or chain_ids.dtype == torch.bool:
        raise ValueError(f"chain_ids must be an integer tensor, got {chain_ids.dtype}")
    if chain_ids.shape != (num_chains,):
        raise ValueError(f"chain_ids must have shape ({num_chains},), got {tuple(chain_ids.shape)}")
    chain_ids = chain_ids.to(torch.int64)
    if chain_ids.device.type == "cpu" and num_chains:
        if not (0 <= int(chain_ids.min()) and int(chain_ids.max()) <= philox.MAX_CHAIN):
            raise ValueError(f"chain indices must lie in [0, 2**31), got {chain_ids.tolist()}")
    hyper = {}
    for name, v in (("lr", lr), ("nbeta", nbeta), ("gamma", gamma)):
        if not isinstance(v, (int, float)):
            v = torch.as_tensor(v)
            if v.ndim != 0 and v.shape != (num_chains,):
                raise ValueError(f"per-chain hyperparameter {name} must be a scalar or have shape ({num_chains},), "
                                 f"got {tuple(v.shape)}")
        hyper[name] = v
    return UpdateCall(tuple(s for s in segs if s.n), w_star, stat, mask, **hyper, settings=settings,
                      counters=counters, seed=seed, step=step, chain_ids=chain_ids, num_chains=num_chains)


# --- the prepared update ------------------------------------------------------------------------

#: The counters an update is packed with before its steps are known (``prepare_segments``).
PREPARE_COUNTERS = StepCounters(step=0)


class PreparedUpdate:
    """An update checked and packed once (``Backend.prepare_segments``), launched at many steps.

    ``launch(counters, grads=None)`` applies the step of ``counters`` in place, bit for bit as
    ``update_segments`` with the prepared arguments and these counters would. ``grads``: this
    step's gradients, one tensor per segment given to ``prepare_segments`` (a bare tensor for a
    single segment), each of its segment's shape, dtype and device and contiguous (checked on the
    host, no synchronisation); they replace the prepared ones from then on. Everything else is
    bound at prepare: the segments' weights, w*, stat (read and written at each launch, in place)
    and the hyperparameters, chain indices and mask (read once: prepare again to change them). Only
    the current gradients are referenced (a replaced one can be freed). Launches on CUDA go to the
    current stream: use the stream that was current at prepare (or synchronise first).

    A backend's subclass implements ``_launch(counters, step)`` with ``self.call`` (the packed call;
    its counters are ``PREPARE_COUNTERS``, never this step's) and ``self.grads`` (the current
    gradient of each of ``call.segments``); it is only built for a supported call with elements and
    chains. This base class launches the backend's ``launch`` on the call with the step's counters
    and gradients.
    """

    def __init__(self, backend: "Backend", call: UpdateCall):
        self.backend, self.call = backend, call
        self.grads = [s.grad for s in call.segments]
        self._expect: tuple = ()  # per given segment: (shape, dtype, index into call.segments or None)
        self._device = call.device

    def launch(self, counters: StepCounters, grads: Sequence[torch.Tensor] | torch.Tensor | None = None) -> None:
        """One step with ``counters`` (and this step's ``grads``), in place."""
        if not isinstance(counters, StepCounters):
            raise ValueError(f"counters must be a StepCounters, got {type(counters).__name__}")
        step = counters.step
        if type(step) is not int or not 0 <= step <= philox.MAX_STEP:
            step = _index("counters.step", step, 0, philox.MAX_STEP)
        if grads is not None:
            self._replace_grads(grads)
        if self.grads:
            self._launch(counters, step)

    def _replace_grads(self, grads) -> None:
        expect = self._expect
        if isinstance(grads, torch.Tensor):
            if len(expect) != 1:
                raise ValueError(f"grads must be a sequence of {len(expect)} tensors, one per segment, got one tensor")
            grads = (grads,)
        elif not isinstance(grads, (list, tuple)):
            grads = tuple(grads)
        if len(grads) != len(expect):
            raise ValueError(f"grads must hold one tensor per segment ({len(expect)}), got {len(grads)}")
        device = self._device
        for k, (g, (shape, dtype, at)) in enumerate(zip(grads, expect)):
            if (not isinstance(g, torch.Tensor) or g.shape != shape or g.dtype != dtype or g.device != device
                    or not g.is_contiguous()):
                got = (f"a {type(g).__name__}" if not isinstance(g, torch.Tensor) else
                       f"{tuple(g.shape)} {g.dtype} on {g.device}{'' if g.is_contiguous() else ', not contiguous'}")
                raise ValueError(f"grads[{k}] must be a contiguous {tuple(shape)} tensor of {dtype} on {device} "
                                 f"(segment {k}'s w), got {got}")
        for g, (_, _, at) in zip(grads, expect):
            if at is not None:
                self.grads[at] = g

    def _launch(self, counters: StepCounters, step: int) -> None:
        call = self.call
        segments = tuple(s._replace(grad=g) for s, g in zip(call.segments, self.grads))
        self.backend.launch(replace(call, segments=segments, counters=counters, step=step))

    def __repr__(self) -> str:
        c = self.call
        return (f"<prepared {self.backend.name} update: {len(c.segments)} segment(s), {c.num_chains} chain(s), "
                f"{c.dtype}, {c.settings.sampler}>")


class _NoOp(PreparedUpdate):
    """A prepared update without elements or chains: its launches check their arguments and do nothing."""


# --- the base class ------------------------------------------------------------------------------


class Backend:
    """One implementation of the update. A subclass sets ``name`` and ``devices`` (device types it
    updates tensors on) and implements ``prepare_call`` or ``launch``; it may extend ``load`` and
    ``not_supported_reasons``."""

    name: str = "?"
    devices: tuple[str, ...] = ()

    def load(self) -> None:
        """Build or import what ``launch`` needs; raise (RuntimeError, ImportError) saying why it cannot run here."""

    def not_supported_reasons(self, call: UpdateCall) -> list[str]:
        """Why this backend cannot run ``call`` (device, dtype, sizes); empty if it can."""
        if call.device.type not in self.devices:
            where = " or ".join(self.devices) or "no device"
            return [f"the tensors are on {call.device}; it updates tensors on {where}"]
        return []

    def prepare_call(self, call: UpdateCall) -> PreparedUpdate:
        """The ``PreparedUpdate`` of ``call`` (supported, with elements and chains; see that class).
        This one relaunches ``launch`` with each step's counters."""
        return PreparedUpdate(self, call)

    def launch(self, call: UpdateCall) -> None:
        """Apply the update of ``call`` in place (its segments' w and its stat). Never sees an empty call.
        This one prepares ``call`` and launches it at ``call.counters``."""
        if type(self).prepare_call is Backend.prepare_call:
            raise NotImplementedError(f"the {self.name} backend implements neither launch nor prepare_call")
        self.prepare_call(call)._launch(call.counters, call.step)

    def update(
        self,
        w: torch.Tensor,
        grad: torch.Tensor,
        w_star: torch.Tensor,
        stat: torch.Tensor | None,
        *,
        lr: float | torch.Tensor,
        nbeta: float | torch.Tensor,
        gamma: float | torch.Tensor,
        settings: SamplerSettings,
        counters: StepCounters,
        seed: int,
        chain_ids: torch.Tensor,
        mask: "torch.Tensor | RowMasks | None" = None,
        index_offset: int = 0,
    ) -> None:
        """One sampler step in place on ``w`` [C, N] (and ``stat`` [C, N]).

        grad: [C, N], w's dtype (gradient of the mean minibatch loss). w_star: [N]. stat: the
        RMSProp statistic V (float32; float64 for float64 weights), None for SGLD. lr, nbeta,
        gamma: scalars or [C]. chain_ids: [C] integers in [0, 2**31). mask: [N] of 0/1 (shared by
        every row), a ``RowMasks`` (one mask per chain row, ``update_spec.RowMasks``) or None.
        index_offset: global index of element 0 (a shard's offset; keys the noise).
        """
        if not isinstance(w, torch.Tensor) or w.ndim != 2:
            raise ValueError(f"w must be [chains, elements], got shape {_shape(w)}")
        if not isinstance(w_star, torch.Tensor) or w_star.shape != w.shape[1:] or w_star.dtype != w.dtype:
            raise ValueError(f"w_star must be [{w.shape[1]}] of {w.dtype}, got {_shape(w_star)}, "
                             f"{getattr(w_star, 'dtype', None)}")
        self.run(pack_call([(w, grad, 0, index_offset)], w_star, stat, lr=lr, nbeta=nbeta, gamma=gamma,
                           settings=settings, counters=counters, seed=seed, chain_ids=chain_ids, mask=mask,
                           single=True))

    def update_segments(
        self,
        segments: Sequence[tuple[torch.Tensor, torch.Tensor, int, int]],
        w_star: torch.Tensor,
        stat: torch.Tensor | None,
        *,
        lr: float | torch.Tensor,
        nbeta: float | torch.Tensor,
        gamma: float | torch.Tensor,
        settings: SamplerSettings,
        counters: StepCounters,
        seed: int,
        chain_ids: torch.Tensor,
        mask: "torch.Tensor | RowMasks | None" = None,
    ) -> None:
        """One sampler step over several separately allocated segments, in one call or launch.

        segments: (w_k [C, n_k], grad_k [C, n_k], local_start_k, global_offset_k); segment k is
        columns [local_start_k, local_start_k + n_k) of w_star [N_local], stat [C, N_local] and mask
        [N_local] (the ranges must not overlap), and its element j draws the noise of global index
        global_offset_k + j. Equal to ``update`` once per segment on those columns. A ``RowMasks``
        mask indexes the local flat elements (local_start_k + j), as the shared mask does.
        """
        self.run(pack_call(segments, w_star, stat, lr=lr, nbeta=nbeta, gamma=gamma, settings=settings,
                           counters=counters, seed=seed, chain_ids=chain_ids, mask=mask))

    def prepare_segments(
        self,
        segments: Sequence[tuple[torch.Tensor, torch.Tensor, int, int]],
        w_star: torch.Tensor,
        stat: torch.Tensor | None,
        *,
        lr: float | torch.Tensor,
        nbeta: float | torch.Tensor,
        gamma: float | torch.Tensor,
        settings: SamplerSettings,
        seed: int,
        chain_ids: torch.Tensor,
        mask: "torch.Tensor | RowMasks | None" = None,
    ) -> PreparedUpdate:
        """``update_segments``'s arguments but the counters, checked (ValueError, NotSupportedError) and
        packed once: ``prepared.launch(counters, grads=None)`` is ``update_segments`` at ``counters``
        (see ``PreparedUpdate``)."""
        segments = list(segments)
        call = pack_call(segments, w_star, stat, lr=lr, nbeta=nbeta, gamma=gamma, settings=settings,
                         counters=PREPARE_COUNTERS, seed=seed, chain_ids=chain_ids, mask=mask)
        self._check_supported(call)
        if call.segments and call.num_chains:
            prepared, at = self.prepare_call(call), iter(range(len(call.segments)))
            # The gradients live in prepared.grads only: a replaced one is not kept alive by the call.
            prepared.call = replace(call, segments=tuple(s._replace(grad=None) for s in call.segments))
        else:
            prepared, at = _NoOp(self, replace(call, segments=())), None
        prepared._expect = tuple((seg[0].shape, seg[0].dtype, next(at) if at is not None and seg[0].shape[1] else None)
                                 for seg in segments)
        return prepared

    __call__ = update

    def _check_supported(self, call: UpdateCall) -> None:
        reasons = self.not_supported_reasons(call)
        if reasons:
            raise NotSupportedError(f"the {self.name} backend cannot run this update: " + "; ".join(reasons))

    def run(self, call: UpdateCall) -> None:
        """Launch a packed call, after ``not_supported_reasons`` (NotSupportedError listing them)."""
        self._check_supported(call)
        if call.segments and call.num_chains:
            self.launch(call)

    def __repr__(self) -> str:
        return f"<llc_fast update backend {self.name!r}>"
