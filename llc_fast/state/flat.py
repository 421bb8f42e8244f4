"""Sampled parameters of a module as slices of one flat vector per chain.

``FlatLayout`` records where each sampled parameter lives in the flat vector;
``FlatState`` owns the buffers the sampler updates in one call per step:

    w      [C, N]  current weights of each chain (param dtype)
    grad   [C, N]  gradient of the mean minibatch loss (param dtype)
    w_star [N]     the trained weights, shared by all chains
    stat   [C, N]  RMSProp statistic or SGNHT momentum (float32; float64 for float64 weights), or None
    thermostat [C] SGNHT's thermostat per row (the compute dtype), or None

``install`` swaps the module's parameters for leaf tensors that are views into one chain's
row of ``w``, with ``.grad`` set to views into the same row of ``grad``: autograd then
accumulates every parameter's gradient straight into the flat gradient buffer. The module's
own parameters are put back on exit; nothing is copied per chain.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..kernels.reference import SUPPORTED_PARAM_DTYPES, compute_dtype
from ..kernels.update_spec import RowMasks


@dataclass(frozen=True)
class ParamSlot:
    name: str
    offset: int
    shape: torch.Size

    @property
    def numel(self) -> int:
        return self.shape.numel()


class FlatLayout:
    """Which parameters of ``model`` are sampled and where each sits in the flat vector.

    Sampled: floating-point parameters with ``requires_grad``. Tied parameters (one tensor
    registered under several names) occupy one slot, named by the first name; ``aliases`` maps each
    other name to it, and every method taking a parameter name accepts either.
    """

    def __init__(self, model: nn.Module | None, named_parameters=None):
        """named_parameters: (name, tensor) pairs to lay out instead of ``model``'s (model None: a plain
        list of tensors, e.g. an optimizer's, with no module to bind)."""
        self.model = model
        self.slots: list[ParamSlot] = []
        self.params: list[nn.Parameter] = []
        self._index_of: dict[int, int] = {}
        offset = 0
        named = model.named_parameters() if named_parameters is None else named_parameters
        for name, p in named:  # unique tensors, first name of each
            if not (p.requires_grad and p.is_floating_point()) or id(p) in self._index_of:
                continue
            self._index_of[id(p)] = len(self.params)
            self.params.append(p)
            self.slots.append(ParamSlot(name, offset, p.shape))
            offset += p.numel()
        self.numel = offset
        first = {id(p): s.name for p, s in zip(self.params, self.slots)}
        self.aliases = {n: first[id(p)] for n, p in (model.named_parameters(remove_duplicate=False)
                                                     if model is not None and named_parameters is None else ())
                        if id(p) in first and first[id(p)] != n}  # tied name -> the slot's name
        # every (module, attribute) that refers to a sampled parameter, tied names included
        self.owners = [
            (module, attr, self._index_of[id(p)])
            for module in (model.modules() if model is not None else ())
            for attr, p in module._parameters.items()
            if p is not None and id(p) in self._index_of
        ]
        self.dtype = self.params[0].dtype if self.params else None
        self.device = self.params[0].device if self.params else None

    @classmethod
    def for_sampling(cls, model) -> "FlatLayout":
        """The layout of ``model``'s sampled parameters, checked: a module with trainable parameters of one
        supported dtype, on one device. Every error says what to change."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        layout = cls(model)
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
        if layout.dtype not in SUPPORTED_PARAM_DTYPES:
            raise ValueError(f"sampled parameters are {layout.dtype}; cast the model to float32, float64 or bfloat16")
        return layout

    def slot(self, name: str) -> ParamSlot:
        """The slot of a sampled parameter, by its name or a tied alias of it."""
        name = self.aliases.get(name, name)
        for s in self.slots:
            if s.name == name:
                return s
        raise ValueError(f"{name!r} is not a sampled parameter; sampled: {[s.name for s in self.slots]}")

    def flatten(self, tensors: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The concatenation of the sampled parameters' values (a copy), [N]."""
        tensors = self.params if tensors is None else tensors
        return torch.cat([t.detach().reshape(-1) for t in tensors]) if tensors else torch.empty(0)

    def views(self, row: torch.Tensor) -> list[torch.Tensor]:
        """Views of a flat [N] tensor shaped like each sampled parameter."""
        return [row[s.offset : s.offset + s.numel].view(s.shape) for s in self.slots]

    def checked_mask(self, mask: dict) -> dict[str, torch.Tensor]:
        """A restriction {param name: 0/1 tensor, or None for the whole parameter}, each checked and broadcast
        to its parameter's shape (None becomes ones), keyed by slot name (a tied alias becomes the name of the
        tensor it is tied to). Raises if it samples nothing or names one tensor twice."""
        out = {}
        for name, m in mask.items():
            s = self.slot(name)
            if s.name in out:
                twice = [n for n in mask if self.aliases.get(n, n) == s.name]
                raise ValueError(f"the mask names one tied tensor twice ({twice}): give it once, under {s.name!r}")
            m = torch.ones(s.shape) if m is None else torch.as_tensor(m)
            try:
                full = torch.broadcast_to(m, s.shape)
            except RuntimeError as e:
                raise ValueError(f"mask for {name!r} has shape {tuple(m.shape)}, not broadcastable to "
                                 f"{tuple(s.shape)}") from e
            if m.dtype != torch.bool and not torch.all((m == 0) | (m == 1)):  # a bool mask is 0/1
                raise ValueError(f"mask for {name!r} must hold only 0 and 1")
            out[s.name] = full
        if not any(bool(m.any()) for m in out.values()):
            raise ValueError("the mask samples nothing: every weight it names is 0 and the parameters it does not "
                             "name are frozen. Give 1 to the weights to sample (None samples a whole parameter)")
        return out

    def mask_record(self, mask: dict) -> dict:
        """What a restriction samples, to be saved with a result: {slot name: None (the whole parameter) or
        ``packed_mask`` of its 0/1 mask broadcast to the parameter's shape}."""
        full = self.checked_mask(mask)
        return {self.slot(n).name: None if m is None else packed_mask(full[self.slot(n).name]) for n, m in mask.items()}

    def flat_mask(self, mask: dict[str, torch.Tensor], device: torch.device, dtype=torch.float32) -> torch.Tensor:
        """A restriction as one [N] 0/1 mask (float32 unless ``dtype``): the named parameters' masks, 0 for every
        parameter not named."""
        out = torch.zeros(self.numel, device=device, dtype=dtype)
        for name, m in self.checked_mask(mask).items():
            s = self.slot(name)
            out[s.offset : s.offset + s.numel] = m.reshape(-1).to(device=device, dtype=out.dtype)
        return out


MASK_BITS_LIMIT = 1 << 20  # base64 characters of one parameter's mask kept by packed_mask; beyond it the digest only


def packed_mask(mask: torch.Tensor) -> dict:
    """A 0/1 mask as JSON: shape, ones (its count of 1s), sha256 (of its bits, row-major, packed 8 to a byte by
    np.packbits) and bits (those bytes zlib-compressed, as base64; None when longer than MASK_BITS_LIMIT)."""
    import base64
    import hashlib
    import zlib

    packed = np.packbits(mask.detach().reshape(-1).ne(0).cpu().numpy()).tobytes()
    bits = base64.b64encode(zlib.compress(packed)).decode("ascii")
    return dict(shape=list(mask.shape), ones=int(mask.count_nonzero()), sha256=hashlib.sha256(packed).hexdigest(),
                bits=bits if len(bits) <= MASK_BITS_LIMIT else None)


def unpacked_mask(record: dict) -> np.ndarray:
    """The bool array of a ``packed_mask`` record, checked against its sha256 (ValueError when its bits were not
    kept or do not match)."""
    import base64
    import hashlib
    import zlib

    if record.get("bits") is None:
        raise ValueError(f"this mask ({record['ones']} ones in shape {record['shape']}) was too large to keep; only "
                         f"its sha256 {record['sha256']} was saved")
    packed = zlib.decompress(base64.b64decode(record["bits"]))
    if hashlib.sha256(packed).hexdigest() != record["sha256"]:
        raise ValueError("the saved mask's bits do not match its sha256: the file was changed")
    size = int(np.prod(record["shape"], dtype=np.int64))
    return np.unpackbits(np.frombuffer(packed, dtype=np.uint8), count=size).astype(bool).reshape(record["shape"])


class FlatState:
    """The flat buffers of ``num_rows`` chain rows, all starting at w* (see module docstring); the
    single-process implementation of ``state.protocol.ChainState``.

    mask: {param name: 0/1 tensor} or None; masked weights never move (``flat_mask`` [N] float or None).
    components: restrictions (each like ``mask``, or None for the whole layout) that chain rows sample
        one each, by the rows' ``ChainHyper.component`` (``row_masks``); kept as one ``RowMasks``
        buffer of the components' windows, not a mask per row. Not combined with ``mask``.
    """

    supports_mala = True

    def __init__(self, layout: FlatLayout, num_rows: int, *, device: torch.device, preconditioned: bool,
                 initial_statistic: float | torch.Tensor = 0.0, mask: dict | None = None,
                 components: list | None = None, thermostat: float | None = None):
        """initial_statistic: V's start value, a number or an [N] tensor (the same for every row; e.g. the
        curvature preconditioner's fixed statistic, ``chains.curvature``). preconditioned: keep ``stat`` (V, or
        SGNHT's momentum). thermostat: SGNHT's thermostat start value A: ``thermostat`` [R] of the compute dtype,
        one per row (None: no thermostat)."""
        if layout.dtype not in SUPPORTED_PARAM_DTYPES:
            raise ValueError(f"sampled parameters are {layout.dtype}; cast the model to float32, float64 or bfloat16")
        if mask and components:
            raise ValueError("pass mask= or components=, not both (a component is itself a restriction)")
        if isinstance(initial_statistic, torch.Tensor):
            if tuple(initial_statistic.shape) != (layout.numel,):
                raise ValueError(f"initial_statistic must be a number or a [{layout.numel}] tensor (one value per "
                                 f"sampled element), got shape {tuple(initial_statistic.shape)}")
            initial_statistic = initial_statistic.to(device=device, dtype=compute_dtype(layout.dtype))
        self.layout, self.device, self.initial_statistic = layout, torch.device(device), initial_statistic
        self.flat_mask = layout.flat_mask(mask, device) if mask else None
        self.components = components_as_row_masks(layout, components, device) if components else None
        self.w_star = layout.flatten().to(device)
        self.w = self.w_star.expand(num_rows, -1).clone()
        self._grad = None
        self.stat = torch.empty(self.w.shape, dtype=compute_dtype(layout.dtype), device=device) \
            if preconditioned else None
        self.initial_thermostat = thermostat
        self.thermostat = None if thermostat is None else torch.empty(num_rows, dtype=compute_dtype(layout.dtype),
                                                                      device=device)
        self._reset_statistic()

    def _reset_statistic(self) -> None:
        if self.thermostat is not None:
            self.thermostat.fill_(self.initial_thermostat)
        if self.stat is None:
            return
        if isinstance(self.initial_statistic, torch.Tensor):
            self.stat.copy_(self.initial_statistic.expand_as(self.stat))
        else:
            self.stat.fill_(self.initial_statistic)

    @property
    def num_rows(self) -> int:
        """R, the chain rows held ([R, N] weights)."""
        return self.w.shape[0]

    @property
    def grad(self) -> torch.Tensor:
        """[C, N] gradient buffer, allocated on first use (the batched engine returns its own gradients)."""
        if self._grad is None:
            self._grad = torch.zeros_like(self.w)
        return self._grad

    def reset(self) -> None:
        """Put every chain back at w* (and the statistic at its start value)."""
        self.w.copy_(self.w_star.expand_as(self.w))
        self._reset_statistic()

    def segments(self, num_rows: int, grad: torch.Tensor | None) -> list[tuple]:
        """The update's segments for rows 0..num_rows-1: one, the whole flat vector (``grad`` None:
        the gradients in ``self.grad``)."""
        return [(self.w[:num_rows], self.grad[:num_rows] if grad is None else grad, 0, 0)]

    def row_masks(self, component: torch.Tensor | None):
        """The update's mask for rows of these components (int64 [G], ``ChainHyper.component``): a
        ``RowMasks`` on the run's components, or the shared ``flat_mask`` when the run has none."""
        if self.components is None or component is None:
            return self.flat_mask
        return self.components.for_rows(component)

    def stat_rows(self, num_rows: int) -> torch.Tensor | None:
        return None if self.stat is None else self.stat[:num_rows]

    def thermostat_rows(self, num_rows: int) -> torch.Tensor | None:
        return None if self.thermostat is None else self.thermostat[:num_rows]

    def save_rows(self, num_rows: int) -> dict:
        """A copy (on the CPU) of rows 0..G-1: weights and statistic (and SGNHT's thermostats)."""
        rows = dict(w=self.w[:num_rows].cpu().clone(),
                    stat=None if self.stat is None else self.stat[:num_rows].cpu().clone())
        if self.thermostat is not None:
            rows["thermostat"] = self.thermostat[:num_rows].cpu().clone()
        return rows

    def load_rows(self, num_rows: int, rows: dict) -> None:
        """Rows 0..G-1 as ``save_rows`` saved them."""
        self.w[:num_rows].copy_(rows["w"])
        if self.stat is not None:
            self.stat[:num_rows].copy_(rows["stat"])
        if self.thermostat is not None:
            self.thermostat[:num_rows].copy_(rows["thermostat"])

    def unmoved_rows(self, num_rows: int) -> list[int]:
        """Rows whose weights are still bitwise w*."""
        return torch.nonzero(~(self.w[:num_rows] != self.w_star).any(dim=1)).flatten().tolist()

    def isolation(self):
        """While sampling: private copies of the module's buffers and unsampled parameters."""
        return isolated_buffers(self.layout.model, self.device, sampled=self.layout.params)

    def restore(self) -> None:
        """Nothing to do: the module's own parameters are never written."""

    @contextlib.contextmanager
    def install(self, chain: int):
        """Make the module's sampled parameters views of chain ``chain``'s row of ``w``."""
        leaves = []
        for value, grad in zip(self.layout.views(self.w[chain]), self.layout.views(self.grad[chain])):
            leaf = nn.Parameter(value, requires_grad=True)
            leaf.grad = grad
            leaves.append(leaf)
        with swapped_parameters(self.layout, leaves):
            yield


def components_as_row_masks(layout: FlatLayout, components: list, device) -> RowMasks:
    """The components' windows and 0/1 bytes as a ``RowMasks`` with row k = component k. Each component is a
    restriction {param name: 0/1 tensor or None} (checked as ``checked_mask``) or None (every sampled weight);
    their dense [N] masks are built one at a time."""
    dense = (None if m is None else layout.flat_mask(m, device, dtype=torch.uint8) for m in components)
    return RowMasks.from_dense(dense, range(len(components)))


@contextlib.contextmanager
def swapped_parameters(layout: FlatLayout, replacements: list[torch.Tensor]):
    """Temporarily register ``replacements[k]`` wherever sampled parameter k is registered."""
    originals = [(module, attr, module._parameters[attr]) for module, attr, _ in layout.owners]
    try:
        for module, attr, k in layout.owners:
            module._parameters[attr] = replacements[k]
        yield
    finally:
        for module, attr, p in originals:
            module._parameters[attr] = p


@contextlib.contextmanager
def isolated_buffers(model: nn.Module, device: torch.device | None, *, sampled=None):
    """Give the module private copies (on ``device``; None: where each is) of its buffers and, unless
    ``sampled`` is None, of its parameters other than the ``sampled`` ones.

    Sampling may run the module in train mode (BatchNorm updates its running statistics) or
    on another device; the user's own buffers and frozen parameters stay untouched.
    """
    tables = ("_buffers",) if sampled is None else ("_buffers", "_parameters")
    sampled = {id(p) for p in sampled or ()}
    swaps = []
    for module in model.modules():
        for table in (getattr(module, t) for t in tables):
            for name, t in table.items():
                if t is None or id(t) in sampled:
                    continue
                copy = t.detach().to(t.device if device is None else device, copy=True)
                if isinstance(t, nn.Parameter):
                    copy = nn.Parameter(copy, requires_grad=False)
                swaps.append((table, name, t, copy))
    try:
        for table, name, _, copy in swaps:
            table[name] = copy
        yield
    finally:
        for table, name, original, _ in swaps:
            table[name] = original
