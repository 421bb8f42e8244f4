"""ShardedChainState: one chain's sampler state on one rank of an FSDP2 shard group.

The chain's weights **are** FSDP's local shards (``p.to_local()``, a view of the storage FSDP
all-gathers from): the update writes them in place, nothing is copied per step. The gradients are
FSDP's reduce-scattered local shards. w*, the RMSProp statistic and the mask are flat buffers of this
rank's local elements, one contiguous segment per parameter.

Global offsets: the unsharded flat vector is ``FlatLayout``'s (parameters in ``named_parameters``
order, tied weights once), so parameter k starts at ``slot.offset``. FSDP2 gives shard rank s of S
rows [s*ceil(d0/S), min(d0, (s+1)*ceil(d0/S))) of a parameter with d0 rows (``torch.chunk``), so the
local shard is the global range starting at ``slot.offset + first_row * row_numel``. That is checked
against the local tensor's shape and passed as the segment's global offset: every element gets the
noise (and bf16 rounding bits) it gets unsharded, so a chain is the same for any S.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..kernels.reference import compute_dtype
from .flat import FlatLayout, isolated_buffers


def is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(t, DTensor)


class ShardSegment:
    """One parameter's local shard: where it sits in the global flat vector and in this rank's buffers."""

    __slots__ = ("param", "name", "global_offset", "numel", "local_offset", "first_row", "rows")

    def __init__(self, param, name, global_offset, numel, local_offset, first_row, rows):
        self.param, self.name, self.global_offset, self.numel = param, name, global_offset, numel
        self.local_offset, self.first_row, self.rows = local_offset, first_row, rows

    def weights(self) -> torch.Tensor:
        """[1, n] view of FSDP's local shard (the storage FSDP all-gathers from)."""
        return self.param.to_local().view(1, -1)

    def grad(self) -> torch.Tensor | None:
        g = self.param.grad
        return None if g is None else g.to_local().view(1, -1)


def local_segments(model: nn.Module, layout: FlatLayout) -> list[ShardSegment]:
    """Each sampled parameter's local FSDP shard with its global flat offset (empty shards left out)."""
    from torch.distributed.tensor import Shard

    named = dict(model.named_parameters())
    out, local_offset = [], 0
    for slot in layout.slots:
        p = named.get(slot.name)
        if p is None or not is_dtensor(p):
            raise ValueError(f"parameter {slot.name!r} is not sharded by FSDP; shard the whole model")
        if tuple(p.placements) != (Shard(0),) or p.device_mesh.ndim != 1:
            raise ValueError(f"parameter {slot.name!r} is sharded as {p.placements} over a "
                             f"{p.device_mesh.ndim}-D mesh; llc_fast needs fully_shard's default Shard(0) over a 1-D "
                             "mesh")
        local = p.to_local()
        shape = tuple(slot.shape)
        if not shape:
            raise ValueError(f"parameter {slot.name!r} is 0-dimensional; FSDP cannot shard it on dim 0")
        size, s = p.device_mesh.size(), p.device_mesh.get_local_rank()
        chunk = -(-shape[0] // size)
        first = min(s * chunk, shape[0])
        rows = max(0, min(shape[0], first + chunk) - first)
        if tuple(local.shape) != (rows, *shape[1:]) or not local.is_contiguous():
            raise RuntimeError(
                f"FSDP's local shard of {slot.name!r} on shard rank {s}/{size} has shape {tuple(local.shape)}; "
                f"expected rows [{first}, {first + rows}) of {shape}, contiguous (an FSDP version with another "
                "layout?)"
            )
        row_numel = math.prod(shape[1:])
        if rows:
            out.append(ShardSegment(p, slot.name, slot.offset + first * row_numel, rows * row_numel, local_offset,
                                    first, rows))
            local_offset += rows * row_numel
    return out


class ShardedChainState:
    """This rank's part of one chain (see module docstring); ``state.protocol.ChainState`` for one row."""

    num_rows = 1
    supports_mala = False

    def __init__(self, model: nn.Module, layout: FlatLayout, *, device: torch.device, preconditioned: bool,
                 initial_statistic: float = 0.0, mask: dict | None = None, shard_group=None):
        """shard_group: the shard group's process group (None: this process alone)."""
        self.model, self.initial_statistic, self.shard_group = model, initial_statistic, shard_group
        self.segments_ = local_segments(model, layout)
        self.all_params = [p for p in model.parameters() if p.requires_grad]
        self.numel = sum(s.numel for s in self.segments_)
        dtype = layout.dtype
        self.w_star = torch.empty(self.numel, dtype=dtype, device=device)
        with torch.no_grad():
            for seg in self.segments_:
                self._local(self.w_star, seg).copy_(seg.weights()[0])
        self.stat = (torch.empty(1, self.numel, dtype=compute_dtype(dtype), device=device)
                     if preconditioned else None)
        self.flat_mask = None  # [numel] 0/1 of all segments (0 for a parameter the restriction does not name)
        masks = layout.checked_mask(mask) if mask else {}
        if masks:
            self.flat_mask = torch.zeros(self.numel, dtype=torch.float32, device=device)
            for seg in self.segments_:
                if seg.name in masks:
                    part = masks[seg.name][seg.first_row: seg.first_row + seg.rows].reshape(-1)
                    self._local(self.flat_mask, seg).copy_(part)
        self._zeros = torch.zeros(max((s.numel for s in self.segments_), default=0), dtype=dtype, device=device)

    @staticmethod
    def _local(flat: torch.Tensor, seg: ShardSegment) -> torch.Tensor:
        return flat[seg.local_offset: seg.local_offset + seg.numel]

    @torch.no_grad()
    def reset(self) -> None:
        """Every local shard back at w*, the statistic at its start value, no gradients."""
        for seg in self.segments_:
            seg.weights()[0].copy_(self._local(self.w_star, seg))
        if self.stat is not None:
            self.stat.fill_(self.initial_statistic)
        self.zero_grad()

    restore = reset  # after sampling, the model's parameters hold w* again, bitwise

    def zero_grad(self) -> None:
        for p in self.all_params:
            p.grad = None

    def segments(self, num_rows: int, grad=None) -> list[tuple]:
        """The update's segments: each local shard's weights and gradient (zero for a parameter the loss
        did not use, as unsharded), its local start and its global offset."""
        out = []
        for seg in self.segments_:
            g = seg.grad()
            if g is None:
                g = self._zeros[: seg.numel].view(1, -1)
            out.append((seg.weights(), g, seg.local_offset, seg.global_offset))
        return out

    def row_masks(self, component: torch.Tensor | None) -> torch.Tensor | None:
        """The update's mask: ``flat_mask`` (a sharded run samples no components)."""
        return self.flat_mask

    def stat_rows(self, num_rows: int) -> torch.Tensor | None:
        return self.stat

    def save_rows(self, num_rows: int = 1) -> dict:
        """A copy (on the CPU) of this rank's shards of the chain and its statistic."""
        return dict(shards=[seg.weights()[0].cpu().clone() for seg in self.segments_],
                    stat=None if self.stat is None else self.stat.cpu().clone())

    @torch.no_grad()
    def load_rows(self, num_rows: int, rows: dict) -> None:
        for seg, saved in zip(self.segments_, rows["shards"]):
            seg.weights()[0].copy_(saved)
        if self.stat is not None:
            self.stat.copy_(rows["stat"])

    def unmoved_rows(self, num_rows: int) -> list[int]:
        """[0] if no local shard of any rank of the shard group moved from w*, else []."""
        moved = torch.tensor([float(any(bool((seg.weights()[0] != self._local(self.w_star, seg)).any())
                                        for seg in self.segments_))], device=self.w_star.device)
        if self.shard_group is not None:
            torch.distributed.all_reduce(moved, op=torch.distributed.ReduceOp.MAX, group=self.shard_group)
        return [] if moved.item() else [0]

    def isolation(self):
        """While sampling: private copies of the module's buffers (FSDP manages the parameters)."""
        return isolated_buffers(self.model, None)
