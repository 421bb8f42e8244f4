"""The engine of sparse chain rows (``state.sparse.SparseRowState``): a restricted run's losses and gradients
with each row holding only its component's coordinates.

Components whose coordinates lie in the same parameter tensors form one group (all heads of one attention
layer, say). A group runs as one nested vmap: chains outer (chain j reads its batch, the one chain j of every
component reads), components inner. Inside, ``loss_fn(model, batch)`` sees the module with every sampled
parameter bound to w* (shared, unbatched), except the group's touched tensors, which are w* with the row's
coordinates scattered in (batched over components). The gradient is taken with respect to the row's
coordinates only (autograd gathers the touched tensors' gradients at them). Whatever does not depend on the
touched tensors (the layers below the component's lowest layer) is unbatched over components: vmap computes it
once per chain batch. A group's components may be split into several such calls (``per_call``: the memory plan
and the measured choice of ``sparse_setup``); no row depends on the others in its call. Rows of "full" components run today's batched engine (``engines.VmapEngine``) on their
[C, N] rows.

``sparse_rows_refusal`` says why a model or a run cannot use sparse rows (None when it can); the set-up is
``sparse_setup.run_sparse``.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.func import grad_and_value, vmap

from ..state.flat import swapped_parameters
from ..state.sparse import SparseRowState
from .engines import Unstackable, VmapEngine, stack_batches


def tensor_in_dims(batch, dim):
    """vmap's in_dims for a batch: ``dim`` for every tensor leaf, None elsewhere."""
    if isinstance(batch, torch.Tensor):
        return dim
    if isinstance(batch, Mapping):
        return type(batch)((k, tensor_in_dims(v, dim)) for k, v in batch.items())
    if isinstance(batch, (list, tuple)):
        items = [tensor_in_dims(v, dim) for v in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
    return None


def model_refusal(model: nn.Module) -> str | None:
    """Why the model's forward cannot run on sparse rows (None when it can): dropout or BatchNorm in train mode.

    Dropout draws its masks per vmapped row: the nested vmap would give component k's chain j other masks than
    ``estimate_llc(mask=k)`` draws, so sparse rows need the model in eval mode. BatchNorm in train mode writes
    its running statistics from batched activations, which vmap cannot do in place."""
    for name, m in model.named_modules():
        if m.training and isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return (f"dropout is active (train mode) in {name or type(m).__name__}: sparse rows draw dropout masks "
                    "per component, so call model.eval() first")
        if m.training and isinstance(m, nn.modules.batchnorm._BatchNorm):
            return (f"BatchNorm {name or type(m).__name__} is in train mode (it writes its running statistics "
                    "every forward pass): call model.eval() first")
    return None


class ComponentGroup:
    """Components whose coordinates lie in the same parameter tensors (``touched``, slot indices)."""

    def __init__(self, state: SparseRowState, ks: list[int], touched: list[int]):
        layout = state.layout
        self.ks, self.touched = ks, touched
        self.sizes = [layout.slots[t].numel for t in touched]
        base, starts = 0, {}
        for t, size in zip(touched, self.sizes):
            starts[t], base = base, base + size
        self.numel = base  # M, the touched tensors' elements
        self.lengths = [state.components[k].numel for k in ks]
        self.width = max(self.lengths)
        pos = torch.empty((len(ks), self.width), dtype=torch.int64)
        offsets = torch.tensor([s.offset for s in layout.slots], dtype=torch.int64)
        local = torch.tensor([starts.get(t, 0) for t in range(len(layout.slots))], dtype=torch.int64)
        for i, k in enumerate(ks):
            index = state.components[k].index.cpu()
            slot = torch.searchsorted(offsets, index, right=True) - 1
            pos[i, :index.numel()] = index - offsets[slot] + local[slot]
            pos[i, index.numel():] = pos[i, 0]  # padding: the component's first coordinate again (``stacked``)
        self.positions = pos.to(state.device)
        views = layout.views(state.w_star)
        self.base = torch.cat([views[t].reshape(-1) for t in touched])

    def stacked(self, state: SparseRowState, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """[C, hi - lo, width] the rows of the group's components lo..hi-1, a shorter one padded with its first
        coordinate's value: written again to that coordinate, it leaves the touched tensors as they are, and the
        padding's gradient is dropped (no scratch element after the M: slicing it off cost a zeroed [M] copy
        per row in the backward pass)."""
        hi = len(self.ks) if hi is None else hi
        x = torch.empty(state.chains, hi - lo, self.width, dtype=state.w_star.dtype, device=state.device)
        for i in range(lo, hi):
            n = self.lengths[i]
            x[:, i - lo, :n] = state.packed(self.ks[i])
            if n < self.width:
                x[:, i - lo, n:] = x[:, i - lo, :1]
        return x

    def call_bytes_per_row(self) -> int:
        """Bytes one row adds to a call of the group beyond activations: the touched tensors with its coordinates
        scattered in, and their gradient."""
        return 2 * self.numel * self.base.element_size()


def touched_slots(state: SparseRowState, k: int) -> list[int]:
    """The slot indices of the parameter tensors component k's coordinates lie in."""
    offsets = torch.tensor([s.offset for s in state.layout.slots], dtype=torch.int64)
    slot = torch.searchsorted(offsets, state.components[k].index.cpu(), right=True) - 1
    return sorted(set(slot.tolist()))


class SparseVmapEngine:
    """Losses [K·C] and per-component gradients of a ``SparseRowState``'s rows (module docstring)."""

    name = "vmap"
    batched = True

    def __init__(self, model: nn.Module, state: SparseRowState, loss_fn: Callable):
        self.model, self.state, self.loss_fn = model, state, loss_fn
        by_touched: dict[tuple, list[int]] = {}
        for k, c in enumerate(state.components):
            if c is not None:
                by_touched.setdefault(tuple(touched_slots(state, k)), []).append(k)
        self.groups = [ComponentGroup(state, ks, list(t)) for t, ks in by_touched.items()]
        self.full = VmapEngine(model, state.full, loss_fn) if state.full is not None else None
        self.memory_note = ""
        self.per_call: list[int] | None = None  # components per call of each group (None: all of them at once)

    def _group_fn(self, group: ComponentGroup, batch_dim):
        layout, model, loss_fn = self.state.layout, self.model, self.loss_fn
        shared = layout.views(self.state.w_star)
        shapes = [layout.slots[t].shape for t in group.touched]

        def component_loss(x, pos, batch):
            flat = group.base.scatter(0, pos, x)
            pieces = list(shared)
            for t, piece, shape in zip(group.touched, flat.split(group.sizes), shapes):
                pieces[t] = piece.view(shape)
            with swapped_parameters(layout, pieces):
                return loss_fn(model, batch).reshape(())

        inner = vmap(grad_and_value(component_loss), in_dims=(0, 0, None), randomness="error")
        return vmap(inner, in_dims=(0, None, batch_dim), randomness="error")

    def _call(self, group: ComponentGroup, lo: int, hi: int, batch, dims, batches: list, losses: list,
              grads: list) -> None:
        """One vmapped call of the group's components lo..hi-1 (x C chains): their losses and gradients."""
        state, pos = self.state, group.positions[lo:hi]
        x = group.stacked(state, lo, hi)
        if batch is None:  # batches of unequal shapes: one chain at a time
            parts = [self._group_fn(group, None)(x[j:j + 1], pos, batches[j]) for j in range(state.chains)]
            g, loss = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        else:
            g, loss = self._group_fn(group, dims)(x, pos, batch)
        for i in range(lo, hi):
            losses[group.ks[i]] = loss[:, i - lo].detach()
            grads[group.ks[i]] = g[:, i - lo, :group.lengths[i]].detach()

    def _chain_batch(self, batches: list):
        """(the C chains' batches as one, its in_dims): shared batches unstacked."""
        C = self.state.chains
        chains = batches[:C]
        if all(b is chains[0] for b in chains):
            return chains[0], None
        stacked = stack_batches(chains)
        return stacked, tensor_in_dims(stacked, 0)

    def loss_and_grad(self, num_rows: int, batches: list, first_only: bool = False) -> tuple[torch.Tensor, list]:
        """Losses [K·C] (row k·C + j: component k, chain j) and one gradient per component ([C, n_k] in its
        coordinate order; [C, N] for a full component). Rows of every component share chain j's batch.
        first_only: one call per component group, of its first component only (the trial pass of
        ``sparse_setup.probe``: every group's code path at a fraction of a step); the others' entries are None."""
        state, C = self.state, self.state.chains
        if num_rows != state.num_rows:
            raise ValueError(f"the sparse engine runs all {state.num_rows} rows at once, got {num_rows}")
        losses: list = [None] * len(state.components)
        grads: list = [None] * len(state.components)
        try:
            batch, dims = self._chain_batch(batches)
        except Unstackable:
            batch, dims = None, None
        for n, group in enumerate(self.groups):
            m = len(group.ks)
            per = m if self.per_call is None else max(1, min(m, self.per_call[n]))
            for lo in range(0, 1 if first_only else m, per):  # calls of ``per`` components (C rows each)
                self._call(group, lo, min(m, lo + (1 if first_only else per)), batch, dims, batches, losses, grads)
        if self.full is not None:
            full_rows = [batches[j] for _ in state.full_components for j in range(C)]
            loss, g = self.full.loss_and_grad(len(full_rows), full_rows)
            g = state.full.grad if g is None else g
            for f, k in enumerate(state.full_components):
                losses[k], grads[k] = loss[f * C:(f + 1) * C], g[f * C:(f + 1) * C]
        if first_only:
            return torch.cat([x for x in losses if x is not None]), grads
        return torch.cat(losses), grads
