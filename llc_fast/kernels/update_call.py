"""One update's arguments, checked once for every backend: ``Segment`` (a piece of the weights),
``UpdateCall`` (what a backend's ``prepare_call`` gets) and ``pack_call``, which checks the
arguments of ``Backend.prepare`` and packs them (a ValueError names a wrong argument)."""
from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import philox
from .update_spec import SUPPORTED_PARAM_DTYPES, RowMasks, SamplerSettings, StepCounters, compute_dtype, per_chain

#: Global element indices (offset + n) must stay inside int64, with room for a quad of four.
MAX_INDEX = 2**63 - 1 - 8


class Segment(NamedTuple):
    """One separately allocated piece of an update: ``w``, ``grad`` [C, n] are columns
    [local_start, local_start + n) of w*, stat and mask; element j draws the noise of global
    element index ``global_offset + j``. A single buffer w [C, N] is ``Segment(w, grad, 0, index_offset)``."""

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
    """One checked update: what every backend's ``prepare_call`` gets.

    segments: the non-empty segments (n > 0), in the order given; their local ranges do not overlap.
    w_star: [N_local]. stat: [C, N_local] of the compute dtype, None for SGLD. mask: [N_local] of
    0/1 (any dtype), a ``RowMasks`` or None. lr, nbeta, gamma: each a Python number or a 0-d / [C]
    tensor, as given (``per_row_values`` converts them). chain_ids: int64 [C] on the device it came on
    (range-checked there if that is the host; chain indices on an accelerator are trusted, checking
    would sync). seed: in [0, 2**64). num_rows: C, the chain rows. All tensors but lr/nbeta/gamma/chain_ids
    are contiguous and on one device. thermostat: SGNHT's thermostat per row, [C] of the compute dtype (read and
    written at each launch, in place), None for the other samplers. The step's counters are not part of it:
    ``PreparedUpdate.launch`` takes them.
    """

    segments: tuple[Segment, ...]
    w_star: torch.Tensor
    stat: torch.Tensor | None
    mask: "torch.Tensor | RowMasks | None"
    lr: float | torch.Tensor
    nbeta: float | torch.Tensor
    gamma: float | torch.Tensor
    settings: SamplerSettings
    seed: int
    chain_ids: torch.Tensor
    num_rows: int
    thermostat: torch.Tensor | None = None

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
        return self.num_rows * sum(s.n for s in self.segments)

    @property
    def single(self) -> bool:
        """Whether the call is one buffer: one segment covering all of w*, stat and mask."""
        return len(self.segments) == 1 and self.segments[0].local_start == 0 and self.segments[0].n == self.n_local

    def per_row_values(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(lr, nbeta, gamma), each a contiguous [C] tensor of the compute dtype on the call's device."""
        return tuple(per_chain(v, self.num_rows, self.device, self.compute_dtype).contiguous()
                     for v in (self.lr, self.nbeta, self.gamma))


# --- the checks ----------------------------------------------------------------------------------


def check_index(name: str, value, lo: int, hi: int) -> int:
    """``value`` as an int in [lo, hi]; ValueError naming ``name`` otherwise."""
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {type(value).__name__}") from None
    if not lo <= value <= hi:
        raise ValueError(f"{name} must lie in [{lo}, {hi}], got {value}")
    return value


def step_of(counters: StepCounters) -> int:
    """``counters.step``, checked: ValueError unless ``counters`` is a StepCounters with a step in [0, 2**32)."""
    if not isinstance(counters, StepCounters):
        raise ValueError(f"counters must be a StepCounters, got {type(counters).__name__}")
    step = counters.step
    if type(step) is not int or not 0 <= step <= philox.MAX_STEP:
        step = check_index("counters.step", step, 0, philox.MAX_STEP)
    return step


def shape_of(t) -> tuple | None:
    """A tensor's shape as a tuple, None for None (for messages)."""
    return None if t is None else tuple(t.shape)


def _described(t) -> str:
    """A tensor's shape and dtype, or the type of what is not a tensor (for messages)."""
    return f"{shape_of(t)} of {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__


def _check_row_masks(rm: RowMasks, num_rows: int, n_local: int) -> None:
    """ValueError naming what is wrong with a RowMasks for ``num_rows`` rows of ``n_local`` local elements."""
    windows, buffer, comp = rm.windows, rm.buffer, rm.row_component
    if not isinstance(windows, torch.Tensor) or windows.dtype != torch.int64 or windows.ndim != 2 or windows.shape[1] != 3:
        raise ValueError(f"RowMasks.windows must be an int64 [K, 3] tensor of (lo, hi, offset), got {_described(windows)}")
    if not isinstance(buffer, torch.Tensor) or buffer.dtype != torch.uint8 or buffer.ndim != 1 or not buffer.is_contiguous():
        raise ValueError(f"RowMasks.buffer must be a contiguous uint8 [B] tensor of 0/1, got {_described(buffer)}")
    if not isinstance(comp, torch.Tensor) or comp.dtype != torch.int64 or comp.ndim != 1:
        raise ValueError(f"RowMasks.row_component must be an int64 [C] tensor, got {_described(comp)}")
    if comp.shape[0] != num_rows:
        raise ValueError(f"RowMasks.row_component has {comp.shape[0]} rows but the update has {num_rows} chain rows")
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


def _check_segment(k: int, seg, rows: int | None, w_star: torch.Tensor, single: bool) -> Segment:
    """Segment ``k`` (a ``Segment`` or a (w, grad, local_start, global_offset) sequence), checked against
    w* and the rows of the segments before it (``rows``, None for the first)."""
    where = "" if single else f"segment {k}: "
    try:
        w, grad, start, offset = seg
    except (TypeError, ValueError):
        raise ValueError(f"segment {k} must be a Segment(w, grad, local_start, global_offset)") from None
    if not isinstance(w, torch.Tensor) or w.ndim != 2 or (rows is not None and w.shape[0] != rows):
        raise ValueError(f"{where}w must be [chains, elements]{'' if rows is None else f' with {rows} chains'}"
                         f", got shape {shape_of(w)}")
    if w.dtype not in SUPPORTED_PARAM_DTYPES:
        raise ValueError(f"parameters must be float32, float64 or bfloat16, got {w.dtype}")
    if w.dtype != w_star.dtype:
        raise ValueError(f"{where}w is {w.dtype} but w_star is {w_star.dtype}")
    if not isinstance(grad, torch.Tensor) or grad.shape != w.shape or grad.dtype != w.dtype:
        raise ValueError(f"{where}grad must match w ({tuple(w.shape)}, {w.dtype}), got "
                         f"{shape_of(grad)}, {getattr(grad, 'dtype', None)}")
    if not w.is_contiguous():
        raise ValueError(f"{where}w must be contiguous")
    if not grad.is_contiguous():
        raise ValueError(f"{where}grad must be contiguous")
    n, n_local = w.shape[1], w_star.shape[0]
    start = check_index(f"{where}local_start", start, 0, n_local)
    if start + n > n_local:
        raise ValueError(f"{where}local range [{start}, {start + n}) is outside w_star's [0, {n_local})")
    offset = check_index("index_offset" if single else f"segment {k}: global_offset", offset, 0, MAX_INDEX - n)
    return Segment(w, grad, start, offset)


def check_segments(segments: Sequence, w_star: torch.Tensor, single: bool = False) -> list[Segment]:
    """The segments as ``Segment`` objects, each checked, their local ranges disjoint; w* [N_local] too."""
    if not isinstance(w_star, torch.Tensor) or w_star.ndim != 1:
        raise ValueError(f"w_star must be the flat [N_local] buffer, got shape {shape_of(w_star)}")
    segs: list[Segment] = []
    for k, seg in enumerate(segments):
        segs.append(_check_segment(k, seg, segs[0].w.shape[0] if segs else None, w_star, single))
    ranges = sorted((s.local_start, s.local_start + s.n, k) for k, s in enumerate(segs) if s.n)
    for (_, e0, k0), (s1, _, k1) in zip(ranges, ranges[1:]):
        if s1 < e0:
            raise ValueError(f"segments {k0} and {k1} overlap in the local buffers")
    if not w_star.is_contiguous():
        raise ValueError("w_star must be contiguous")
    return segs


def _check_buffers(segs: list[Segment], w_star: torch.Tensor, stat, mask, settings: SamplerSettings,
                   num_rows: int) -> torch.Tensor | None:
    """The statistic (None for SGLD) and the mask checked against the rows and w*; all on one device."""
    n_local = w_star.shape[0]
    if settings.has_statistic:
        cdt = compute_dtype(w_star.dtype)
        if (not isinstance(stat, torch.Tensor) or stat.shape != (num_rows, n_local) or stat.dtype != cdt
                or not stat.is_contiguous()):
            what = "the SGNHT momentum" if settings.thermostat else "the RMSProp statistic"
            raise ValueError(f"{what} stat must be a contiguous [{num_rows}, {n_local}] tensor of "
                             f"{cdt}, got {None if stat is None else (shape_of(stat), stat.dtype)}")
    else:
        stat = None
    if isinstance(mask, RowMasks):
        _check_row_masks(mask, num_rows, n_local)
    elif mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != (n_local,)
                               or not mask.is_contiguous()):
        raise ValueError(f"mask must be a contiguous [{n_local}] tensor or a RowMasks, got "
                         f"{shape_of(mask) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    tensors = [w_star, stat, mask.buffer if isinstance(mask, RowMasks) else mask] + [t for s in segs for t in (s.w, s.grad)]
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    return stat


def _check_chain_ids(chain_ids, num_rows: int) -> torch.Tensor:
    """The chain indices as int64 [C] (range-checked when on the host)."""
    if not isinstance(chain_ids, torch.Tensor):
        chain_ids = torch.as_tensor(chain_ids)
    if chain_ids.is_floating_point() or chain_ids.is_complex() or chain_ids.dtype == torch.bool:
        raise ValueError(f"chain_ids must be an integer tensor, got {chain_ids.dtype}")
    if chain_ids.shape != (num_rows,):
        raise ValueError(f"chain_ids must have shape ({num_rows},), got {tuple(chain_ids.shape)}")
    chain_ids = chain_ids.to(torch.int64)
    if chain_ids.device.type == "cpu" and num_rows:
        if not (0 <= int(chain_ids.min()) and int(chain_ids.max()) <= philox.MAX_CHAIN):
            raise ValueError(f"chain indices must lie in [0, 2**31), got {chain_ids.tolist()}")
    return chain_ids


def _check_hyper(num_rows: int, **values) -> dict:
    """lr, nbeta, gamma: Python numbers as they are, anything else a 0-d or [C] tensor."""
    out = {}
    for name, v in values.items():
        if not isinstance(v, (int, float)):
            v = torch.as_tensor(v)
            if v.ndim != 0 and v.shape != (num_rows,):
                raise ValueError(f"per-chain hyperparameter {name} must be a scalar or have shape ({num_rows},), "
                                 f"got {tuple(v.shape)}")
        out[name] = v
    return out


def _check_thermostat(thermostat, settings: SamplerSettings, num_rows: int, w_star: torch.Tensor):
    """SGNHT's thermostat [C] (of the compute dtype, on w*'s device, contiguous); None for the other samplers."""
    if not settings.thermostat:
        if thermostat is not None:
            raise ValueError(f"thermostat applies to sampler='sgnht', not {settings.sampler!r}")
        return None
    cdt = compute_dtype(w_star.dtype)
    if (not isinstance(thermostat, torch.Tensor) or thermostat.shape != (num_rows,) or thermostat.dtype != cdt
            or thermostat.device != w_star.device or not thermostat.is_contiguous()):
        raise ValueError(f"sampler='sgnht' needs thermostat, a contiguous [{num_rows}] tensor of {cdt} on "
                         f"{w_star.device} (one per chain row), got {_described(thermostat)}")
    return thermostat


def pack_call(segments: Sequence, w_star: torch.Tensor, stat: torch.Tensor | None, *, lr, nbeta, gamma,
              settings: SamplerSettings, seed: int, chain_ids, mask: "torch.Tensor | RowMasks | None",
              single: bool = False, thermostat: torch.Tensor | None = None) -> UpdateCall:
    """Check the arguments of an update (``Backend.prepare``'s) and pack them; ValueError naming what
    is wrong. ``single``: the arguments came through ``Backend.update`` (messages name w, index_offset)."""
    if not isinstance(settings, SamplerSettings):
        raise ValueError(f"settings must be a SamplerSettings, got {type(settings).__name__}")
    segs = check_segments(segments, w_star, single)
    if segs:
        num_rows = segs[0].w.shape[0]
    else:
        ids = chain_ids if isinstance(chain_ids, torch.Tensor) else torch.as_tensor(chain_ids)
        num_rows = ids.shape[0] if ids.ndim == 1 else 0
    stat = _check_buffers(segs, w_star, stat, mask, settings, num_rows)
    seed = check_index("seed", seed, 0, philox.MAX_SEED)
    chain_ids = _check_chain_ids(chain_ids, num_rows)
    hyper = _check_hyper(num_rows, lr=lr, nbeta=nbeta, gamma=gamma)
    thermostat = _check_thermostat(thermostat, settings, num_rows, w_star)
    return UpdateCall(tuple(s for s in segs if s.n), w_star, stat, mask, **hyper, settings=settings, seed=seed,
                      chain_ids=chain_ids, num_rows=num_rows, thermostat=thermostat)
