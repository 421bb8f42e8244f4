"""The base class of the update's backends and its one entry point, ``prepare``.

A backend (the reference "torch" in ``torch_update.py``, the C++, CUDA and Triton kernels beside
it) is one object with ``name``, ``devices``, ``load()``, ``not_supported_reasons(call)`` and
``prepare_call(call)``. Its public entry point is defined here, once:

    prepared = backend.prepare(segments, w_star, stat, lr=..., nbeta=..., gamma=..., settings=...,
                               seed=..., chain_ids=..., mask=None)
    prepared.launch(counters)          # each step, in place; grads=[...]: this step's gradient tensors

segments: ``Segment(w_k [C, n_k], grad_k [C, n_k], local_start_k, global_offset_k)`` (update_call.py);
segment k is columns [local_start_k, local_start_k + n_k) of w_star [N_local], stat [C, N_local]
and mask [N_local] (the ranges must not overlap), and its element j draws the noise of global index
global_offset_k + j. A single buffer w [C, N] is the one-segment case ``Segment(w, grad, 0,
index_offset)``. ``prepare`` checks the arguments and packs them once into an ``UpdateCall`` (a
ValueError names a wrong argument), raises ``NotSupportedError`` listing the backend's
``not_supported_reasons`` if it has any, and returns the backend's ``PreparedUpdate``.

``update(w, grad, w_star, stat, *, ..., counters, index_offset=0)`` is one step on one buffer:
``prepare`` of that one segment, launched once (a thin helper for tests and one-off steps; a
backend object is also callable as ``update``).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from .update_call import Segment, UpdateCall, pack_call, shape_of, step_of
from .update_spec import KERNEL_SAMPLERS, RowMasks, SamplerSettings, StepCounters


class NotSupportedError(ValueError):
    """A backend cannot run this call (device, dtype, sizes); the message lists the reasons."""


class PreparedUpdate:
    """An update checked and packed once (``Backend.prepare``), launched at many steps.

    ``launch(counters, grads=None)`` applies the step of ``counters`` in place. ``grads``: this
    step's gradients, one tensor per segment given to ``prepare`` (a bare tensor for a single
    segment), each of its segment's shape, dtype and device and contiguous (checked on the host, no
    synchronisation); they replace the prepared ones from then on. Everything else is bound at
    prepare: the segments' weights, w*, stat (read and written at each launch, in place) and the
    hyperparameters, chain indices and mask (read once: prepare again to change them). Only the
    current gradients are referenced (a replaced one can be freed). Launches on CUDA go to the
    current stream: use the stream that was current at prepare (or synchronise first).

    A backend's subclass implements ``launch_step(counters, step)`` with ``self.call`` (the packed
    call; its segments' grad is None)
    and ``self.grads`` (the current gradient of each of ``call.segments``); it is only built for a
    supported call with elements and rows. This base class launches nothing (an update without
    elements or rows).
    """

    def __init__(self, backend: "Backend", call: UpdateCall):
        self.backend, self.call = backend, call
        self.grads = [s.grad for s in call.segments]
        self.expect: tuple = ()  # per given segment: (shape, dtype, index into call.segments or None)
        self.device = call.device

    def launch(self, counters: StepCounters, grads: Sequence[torch.Tensor] | torch.Tensor | None = None) -> None:
        """One step with ``counters`` (and this step's ``grads``), in place."""
        step = step_of(counters)
        if grads is not None:
            self.replace_grads(grads)
        if self.grads:
            self.launch_step(counters, step)

    def replace_grads(self, grads) -> None:
        """Check this step's gradients (one per given segment) and use them from now on."""
        expect = self.expect
        if isinstance(grads, torch.Tensor):
            if len(expect) != 1:
                raise ValueError(f"grads must be a sequence of {len(expect)} tensors, one per segment, got one tensor")
            grads = (grads,)
        elif not isinstance(grads, (list, tuple)):
            grads = tuple(grads)
        if len(grads) != len(expect):
            raise ValueError(f"grads must hold one tensor per segment ({len(expect)}), got {len(grads)}")
        device = self.device
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

    def launch_step(self, counters: StepCounters, step: int) -> None:
        """The step itself (``step``: counters.step, checked), on ``self.call`` with ``self.grads``."""

    def __repr__(self) -> str:
        c = self.call
        return (f"<prepared {self.backend.name} update: {len(c.segments)} segment(s), {c.num_rows} row(s), "
                f"{c.dtype}, {c.settings.sampler}>")


class Backend:
    """One implementation of the update. A subclass sets ``name`` and ``devices`` (device types it
    updates tensors on) and implements ``prepare_call``; it may extend ``load`` and
    ``not_supported_reasons``."""

    name: str = "?"
    devices: tuple[str, ...] = ()
    samplers: tuple[str, ...] = KERNEL_SAMPLERS  # the samplers it runs
    noise_schemes: tuple[str, ...] = ("euler",)  # the noise schemes it runs

    def load(self) -> None:
        """Build or import what ``prepare_call`` needs; raise (RuntimeError, ImportError) saying why it cannot run here."""

    def not_supported_reasons(self, call: UpdateCall) -> list[str]:
        """Why this backend cannot run ``call`` (device, dtype, sizes); empty if it can."""
        if call.settings.sampler not in self.samplers:
            return [f"it does not run sampler={call.settings.sampler!r} (it runs {', '.join(self.samplers)}); "
                    "backend='torch' (the reference) runs every sampler"]
        if call.settings.noise_scheme not in self.noise_schemes:
            return [f"it does not run noise_scheme={call.settings.noise_scheme!r} (it runs "
                    f"{', '.join(self.noise_schemes)}); backend='torch' (the reference) runs every noise scheme"]
        if call.device.type not in self.devices:
            where = " or ".join(self.devices) or "no device"
            return [f"the tensors are on {call.device}; it updates tensors on {where}"]
        return []

    def prepare_call(self, call: UpdateCall) -> PreparedUpdate:
        """The backend's ``PreparedUpdate`` of ``call`` (supported, with elements and rows; see that class)."""
        raise NotImplementedError(f"the {self.name} backend does not implement prepare_call")

    def prepare(
        self,
        segments: Sequence[Segment],
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
        single: bool = False,
        thermostat: torch.Tensor | None = None,
    ) -> PreparedUpdate:
        """The update of ``segments`` (see the module docstring), checked (ValueError, NotSupportedError) and
        packed once: ``prepared.launch(counters, grads=None)`` applies one step (see ``PreparedUpdate``).

        stat: the RMSProp statistic V [C, N_local] (float32; float64 for float64 weights), None for
        SGLD. lr, nbeta, gamma: scalars or [C]. chain_ids: [C] integers in [0, 2**31). mask: [N_local]
        of 0/1 (shared by every row), a ``RowMasks`` (one mask per chain row, indexed by the local flat
        element) or None. ``single``: messages name ``update``'s w and index_offset. sampler="sgnht": stat is the
        momentum and ``thermostat`` [C] the rows' thermostats (both read and written at each launch)."""
        segments = list(segments)
        call = pack_call(segments, w_star, stat, lr=lr, nbeta=nbeta, gamma=gamma, settings=settings, seed=seed,
                         chain_ids=chain_ids, mask=mask, single=single, thermostat=thermostat)
        reasons = self.not_supported_reasons(call)
        if reasons:
            raise NotSupportedError(f"the {self.name} backend cannot run this update: " + "; ".join(reasons))
        if call.segments and call.num_rows:
            prepared, at = self.prepare_call(call), iter(range(len(call.segments)))
            # The gradients live in prepared.grads only: a replaced one is not kept alive by the call.
            prepared.call = replace(call, segments=tuple(s._replace(grad=None) for s in call.segments))
        else:
            prepared, at = PreparedUpdate(self, replace(call, segments=())), None
        prepared.expect = tuple((seg[0].shape, seg[0].dtype, next(at) if at is not None and seg[0].shape[1] else None)
                                for seg in segments)
        return prepared

    def update(
        self,
        w: torch.Tensor,
        grad: torch.Tensor,
        w_star: torch.Tensor,
        stat: torch.Tensor | None,
        *,
        counters: StepCounters,
        index_offset: int = 0,
        **kwargs,
    ) -> None:
        """One sampler step in place on one buffer ``w`` [C, N] (and ``stat`` [C, N]): ``prepare`` of
        ``Segment(w, grad, 0, index_offset)``, launched at ``counters``.

        grad: [C, N], w's dtype (gradient of the mean minibatch loss). w_star: [N]. index_offset:
        global index of element 0 (a shard's offset; keys the noise). kwargs: ``prepare``'s (lr,
        nbeta, gamma, settings, seed, chain_ids, mask)."""
        step_of(counters)
        if not isinstance(w, torch.Tensor) or w.ndim != 2:
            raise ValueError(f"w must be [chains, elements], got shape {shape_of(w)}")
        if not isinstance(w_star, torch.Tensor) or w_star.shape != w.shape[1:] or w_star.dtype != w.dtype:
            raise ValueError(f"w_star must be [{w.shape[1]}] of {w.dtype}, got {shape_of(w_star)}, "
                             f"{getattr(w_star, 'dtype', None)}")
        self.prepare([Segment(w, grad, 0, index_offset)], w_star, stat, single=True, **kwargs).launch(counters)

    __call__ = update

    def __repr__(self) -> str:
        return f"<llc_fast update backend {self.name!r}>"
