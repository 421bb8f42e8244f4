"""The flat buffers behind compat's optimizers: the sampled parameters of all param groups, by (device, dtype),
each bucket one ``FlatState`` (one chain row, w*, statistic, mask) whose views the parameters' .data and .grad
become (``optim.SGMCMC``)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...kernels.reference import SUPPORTED_PARAM_DTYPES
from ...state.flat import FlatLayout, FlatState


@dataclass
class Bucket:
    """The sampled parameters of one (device, dtype) and their flat state (one chain row)."""

    device: torch.device
    dtype: torch.dtype
    base: int  # index of element 0 in the optimizer's flat order (keys the noise)
    params: list = field(default_factory=list)
    masks: list = field(default_factory=list)  # the mask of each param, or None
    groups: list = field(default_factory=list)  # param-group index of each param
    segments: list = field(default_factory=list)  # (group index, start, end), consecutive params of one group
    state: FlatState | None = None
    views: list = field(default_factory=list)  # (data view, grad view) of each param

    @property
    def offsets(self) -> list[int]:
        return [slot.offset for slot in self.state.layout.slots]


def build_buckets(param_groups: list, state, *, preconditioned: bool) -> list[Bucket]:
    """The sampled parameters of ``param_groups`` by (device, dtype), each bucket one flat state (one chain row);
    each parameter's .data and .grad become views of its flat buffers and ``state[p]`` holds devinterp's state
    names (initial_param, square_avg) as views."""
    by_key: dict[tuple, Bucket] = {}
    for gi, group in enumerate(param_groups):
        masks = group.get("mask")
        plist = list(group["params"])
        if masks is not None and isinstance(masks, torch.Tensor):
            masks = [masks] * len(plist) if len(plist) == 1 else [masks]
        if masks is not None and len(masks) != len(plist):
            raise ValueError(f"param group {gi}: {len(masks)} masks for {len(plist)} parameters")
        for k, p in enumerate(plist):
            if not (p.requires_grad and p.is_floating_point()):
                continue
            if p.dtype not in SUPPORTED_PARAM_DTYPES:
                raise ValueError(f"parameters must be float32, float64 or bfloat16, got {p.dtype}")
            key = (p.device, p.dtype)
            b = by_key.setdefault(key, Bucket(device=p.device, dtype=p.dtype, base=0))
            b.params.append((p, None if masks is None else masks[k]))
            b.groups.append(gi)
    base = 0
    buckets = list(by_key.values())
    for b in buckets:
        b.base = base
        layout = FlatLayout(None, [(str(k), p) for k, (p, _) in enumerate(b.params)])
        masks = {str(k): checked_mask(m, p) for k, (p, m) in enumerate(b.params) if m is not None}
        if masks:  # devinterp: a parameter without a mask is free (a FlatState mask freezes unnamed ones)
            masks = {str(k): masks[str(k)] if str(k) in masks else torch.ones(p.shape, dtype=torch.bool)
                     for k, (p, _) in enumerate(b.params)}
        b.state = FlatState(layout, 1, device=b.device, preconditioned=preconditioned, mask=masks)
        base += layout.numel
        plain = []
        for (p, _), gi, slot, data, grad in zip(b.params, b.groups, layout.slots, layout.views(b.state.w[0]),
                                                layout.views(b.state.grad[0])):
            if p.grad is not None:
                grad.copy_(p.grad)
            p.data, p.grad = data, grad
            b.views.append((data, grad))
            start, end = slot.offset, slot.offset + slot.numel
            if b.segments and b.segments[-1][0] == gi and b.segments[-1][2] == start:
                b.segments[-1] = (gi, b.segments[-1][1], end)
            else:
                b.segments.append((gi, start, end))
            plain.append(p)
            # devinterp's state names, as views of the flat buffers
            state[p]["initial_param"] = b.state.w_star[start:end].view_as(p)
            if b.state.stat is not None:
                state[p]["square_avg"] = b.state.stat[0, start:end].view_as(p)
        b.params = plain
    return buckets

def checked_mask(mask, p) -> torch.Tensor:
    """The mask, broadcast to the parameter's shape as devinterp's multiplication broadcasts it (a mask of
    shape (1,) or a scalar switches the whole parameter on or off)."""
    mask = torch.as_tensor(mask)
    if mask.shape != p.shape:
        try:
            mask = torch.broadcast_to(mask, p.shape).contiguous()
        except RuntimeError:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match (or broadcast to) parameter shape "
                             f"{tuple(p.shape)}") from None
    return mask
