"""Sparse chain rows: each row of a run over components holds only its component's coordinates.

``SparseRowState`` is the ``state.protocol.ChainState`` of a restricted run (``estimate_restricted_llcs``) in one
process. Row k·C + j (component k, chain j) holds, for a restricted component, only the n_k coordinates its mask
selects: weights, gradient and RMSProp statistic of n_k elements, not N; w* is stored once ([N]). A component
of None ("full") keeps full [C, N] rows, as the full-row path does.

A component's coordinates are its mask's nonzeros in the global flat order (``FlatLayout``), cut into runs of
consecutive global indices; each run is one update ``Segment`` keyed by the global flat index of its first
element, so each element draws the noise (and bf16 rounding bits) it draws in a full-row run, and the RMSProp
statistic, weight decay and box are elementwise: the update of a component's coordinates is the one
``estimate_llc(mask=component)`` applies. A component's weights and gradients are kept run-major (run r of
length L at [C·s_r, C·(s_r + L)), s_r its first packed coordinate, a contiguous [C, L] block) so every segment
is a contiguous view updated in place; ``packed(k)`` gathers them as [C, n_k] in coordinate order for the
engine (``chains.sparse``), ``segments`` scatters the engine's packed gradients back.

The rows of one run are all held at once (one row batch of K·C rows); the fused update is one prepared call per
component (``prepare_update``), all launched every step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..kernels.reference import compute_dtype
from .flat import FlatLayout, FlatState, isolated_buffers


@dataclass
class ComponentRows:
    """The C rows of one restricted component: coordinates, runs and run-major buffers."""

    index: torch.Tensor        # int64 [n] global flat indices of its coordinates, ascending
    runs: list                 # [(local_start, length, global_start)] runs of consecutive global indices
    perm: torch.Tensor         # int64 [C·n] run-major position of packed element (j, i) (row-major [C, n])
    w_star: torch.Tensor       # [n] w* at its coordinates
    w: torch.Tensor            # [C·n] run-major weights
    grad: torch.Tensor         # [C·n] run-major gradients
    stat: torch.Tensor | None  # [C, n] RMSProp statistic, or None for SGLD
    cached: list | None = field(default=None, repr=False)  # ``segments``' list, built once

    @property
    def numel(self) -> int:
        return int(self.index.numel())

    def views(self, flat: torch.Tensor, chains: int) -> list[torch.Tensor]:
        """The contiguous [C, L] block of each run in a run-major buffer."""
        return [flat[chains * s: chains * (s + n)].view(chains, n) for s, n, _ in self.runs]

    def segments(self, chains: int) -> list[tuple]:
        """(weights block, gradient block, local start, global start) of each run. Built once: ``w`` and ``grad``
        are written in place, never replaced, so the views stay valid (a head of a large model has thousands of
        runs; building their views every step cost seconds)."""
        if self.cached is None:
            self.cached = [(w, g, s, glob) for w, g, (s, _, glob) in
                           zip(self.views(self.w, chains), self.views(self.grad, chains), self.runs)]
        return self.cached


def coordinate_runs(index: torch.Tensor) -> list[tuple[int, int, int]]:
    """[(local_start, length, global_start)] of the runs of consecutive values in ``index`` (ascending int64)."""
    if index.numel() == 0:
        return []
    cut = torch.nonzero(index[1:] - index[:-1] != 1).flatten() + 1
    starts = [0] + cut.tolist()
    ends = starts[1:] + [int(index.numel())]
    glob = index[torch.tensor(starts)].tolist()
    return [(s, e - s, g) for s, e, g in zip(starts, ends, glob)]


def mask_index(layout: FlatLayout, mask: dict) -> torch.Tensor:
    """int64 [n]: the global flat indices (ascending) a restriction samples, found parameter by parameter (no
    [N] dense mask: a component of a large model touches a few of its tensors)."""
    parts = sorted(((layout.slot(name).offset, m) for name, m in layout.checked_mask(mask).items()), key=lambda p: p[0])
    index = [torch.nonzero(m.reshape(-1)).flatten() + offset for offset, m in parts]
    return torch.cat(index) if index else torch.empty(0, dtype=torch.int64)


def run_major_permutation(runs: list, numel: int, chains: int) -> torch.Tensor:
    """int64 [C·n]: the run-major position of packed element (j, i), flattened row-major."""
    starts = torch.tensor([s for s, _, _ in runs], dtype=torch.int64)
    lengths = torch.tensor([n for _, n, _ in runs], dtype=torch.int64)
    start = torch.repeat_interleave(starts, lengths, output_size=numel)  # each element's run start and length
    length = torch.repeat_interleave(lengths, lengths, output_size=numel)
    i = torch.arange(numel, dtype=torch.int64)[None, :]
    j = torch.arange(chains, dtype=torch.int64)[:, None]
    return (chains * start[None, :] + j * length[None, :] + (i - start[None, :])).reshape(-1)


class SparseRowState:
    """K components x C chains rows, restricted rows holding only their coordinates (module docstring)."""

    supports_mala = False
    flat_mask = None

    def __init__(self, layout: FlatLayout, components: list, chains: int, *, device: torch.device,
                 preconditioned: bool, initial_statistic: float = 0.0):
        """components: one restriction per component ({param name: 0/1 tensor or None}, checked as
        ``FlatLayout.checked_mask``) or None (every sampled weight); chains: C, the chains of each."""
        if not isinstance(chains, int) or chains < 1:
            raise ValueError(f"chains must be a positive int, got {chains!r}")
        if not components:
            raise ValueError("SparseRowState needs at least one component")
        if not isinstance(initial_statistic, (int, float)):
            raise ValueError("SparseRowState takes a number as initial_statistic (a fixed per-element statistic "
                             "runs on the full-row path)")
        self.layout, self.device, self.chains = layout, torch.device(device), chains
        self.initial_statistic, self.preconditioned = float(initial_statistic), preconditioned
        self.w_star = layout.flatten().to(self.device)
        self.components: list[ComponentRows | None] = []
        full = [k for k, m in enumerate(components) if m is None]
        for m in components:
            self.components.append(None if m is None else self._component(m))
        self.full_components = full
        self.full = None  # the full rows of every None component, [F·C, N], sharing w*
        if full:
            self.full = FlatState(layout, len(full) * chains, device=self.device, preconditioned=preconditioned,
                                  initial_statistic=initial_statistic)
            self.full.w_star = self.w_star
        self.reset()

    def _component(self, mask: dict) -> ComponentRows:
        index = mask_index(self.layout, mask)
        runs = coordinate_runs(index)
        n, C, dev = int(index.numel()), self.chains, self.device
        dtype = self.layout.dtype
        stat = torch.empty(C, n, dtype=compute_dtype(dtype), device=dev) if self.preconditioned else None
        return ComponentRows(index.to(dev), runs, run_major_permutation(runs, n, C).to(dev),
                             self.w_star[index.to(dev)].contiguous(), torch.empty(C * n, dtype=dtype, device=dev),
                             torch.zeros(C * n, dtype=dtype, device=dev), stat)

    # --- the rows ---------------------------------------------------------------------------------------------

    @property
    def num_rows(self) -> int:
        return len(self.components) * self.chains

    def bytes_per_row(self) -> list[int]:
        """Bytes of each component's row (weights, gradient, statistic), in component order."""
        item = torch.empty(0, dtype=self.layout.dtype).element_size()
        stat = torch.empty(0, dtype=compute_dtype(self.layout.dtype)).element_size() if self.preconditioned else 0
        return [(self.layout.numel if c is None else c.numel) * (2 * item + stat) for c in self.components]

    def packed(self, k: int) -> torch.Tensor:
        """[C, n_k] weights of component k's rows in coordinate order (a copy); [C, N] rows for a full one."""
        c = self.components[k]
        if c is None:
            f = self.full_components.index(k)
            return self.full.w[f * self.chains:(f + 1) * self.chains]
        return c.w[c.perm].view(self.chains, c.numel)

    def reset(self) -> None:
        """Every row back at w*, the statistic at its start value."""
        C = self.chains
        for c in self.components:
            if c is None:
                continue
            c.w[c.perm] = c.w_star.expand(C, -1).reshape(-1)
            if c.stat is not None:
                c.stat.fill_(self.initial_statistic)
        if self.full is not None:
            self.full.reset()

    def _check_rows(self, num_rows: int) -> None:
        if num_rows != self.num_rows:
            raise ValueError(f"a sparse-row state runs its {self.num_rows} rows as one row batch, got {num_rows}")

    def segments(self, num_rows: int, grad) -> list[tuple]:
        """The update's segments of every row: per restricted component, one per run (its weights' and
        gradients' [C, L] blocks, local start in the component's coordinates, global offset of the run);
        per full component one [C, N] segment. ``grad``: the engine's per-component gradients ([C, n_k] in
        coordinate order, [C, N] for a full component), scattered into the run-major buffers here."""
        self._check_rows(num_rows)
        out = []
        for k, c in enumerate(self.components):
            if c is None:
                f = self.full_components.index(k)
                rows = slice(f * self.chains, (f + 1) * self.chains)
                g = self.full.grad[rows] if grad is None else grad[k]
                out.append((self.full.w[rows], g.contiguous(), 0, 0))
                continue
            if grad is not None:
                c.grad[c.perm] = grad[k].reshape(-1)
            out += c.segments(self.chains)
        return out

    def prepare_update(self, backend, segments, w_star, stat, *, lr, nbeta, gamma, settings, seed, chain_ids,
                       mask=None) -> "ComponentUpdates":
        """The fused update of ``segments`` (``segments``' order), one ``backend.prepare`` per component: its
        runs against its own w*, statistic and the per-row values of its rows. ``w_star``, ``stat`` and ``mask``
        (the loop's) are not used: each component holds its own."""
        C, parts, at = self.chains, [], 0
        for k, c in enumerate(self.components):
            count = 1 if c is None else len(c.runs)
            rows = slice(k * C, (k + 1) * C)
            if c is None:
                f = self.full_components.index(k)
                own_w_star, own_stat = self.w_star, self.full.stat_rows(self.full.num_rows)
                own_stat = None if own_stat is None else own_stat[f * C:(f + 1) * C]
            else:
                own_w_star, own_stat = c.w_star, c.stat
            per_row = dict(lr=_rows(lr, rows), nbeta=_rows(nbeta, rows), gamma=_rows(gamma, rows))
            prepared = backend.prepare(segments[at:at + count], own_w_star, own_stat, settings=settings, seed=seed,
                                       chain_ids=chain_ids[rows], mask=None, **per_row)
            parts.append((prepared, at, count, [s[1] for s in segments[at:at + count]]))
            at += count
        return ComponentUpdates(parts)

    def row_masks(self, component):
        """None: every row samples exactly the coordinates it holds."""
        return None

    def stat_rows(self, num_rows: int):
        """None: each component's statistic is its own (``prepare_update``)."""
        return None

    def save_rows(self, num_rows: int) -> dict:
        self._check_rows(num_rows)
        return dict(components=[None if c is None else (c.w.cpu().clone(), None if c.stat is None else
                                                        c.stat.cpu().clone()) for c in self.components],
                    full=None if self.full is None else self.full.save_rows(self.full.num_rows))

    def load_rows(self, num_rows: int, rows: dict) -> None:
        self._check_rows(num_rows)
        for c, saved in zip(self.components, rows["components"]):
            if c is not None:
                c.w.copy_(saved[0])
                if c.stat is not None:
                    c.stat.copy_(saved[1])
        if self.full is not None:
            self.full.load_rows(self.full.num_rows, rows["full"])

    def unmoved_rows(self, num_rows: int) -> list[int]:
        """Rows whose weights are still bitwise w*."""
        self._check_rows(num_rows)
        out = []
        for k, c in enumerate(self.components):
            ref = self.w_star if c is None else c.w_star
            still = ~(self.packed(k) != ref).any(dim=1)
            out += [k * self.chains + j for j in torch.nonzero(still).flatten().tolist()]
        return out

    def isolation(self):
        """While sampling: private copies of the module's buffers and unsampled parameters."""
        return isolated_buffers(self.layout.model, self.device, sampled=self.layout.params)

    def restore(self) -> None:
        """Nothing to do: the module's own parameters are never written."""


def _rows(value, rows: slice):
    """A per-row hyperparameter ([B] tensor) for ``rows``; a number as it is."""
    return value[rows] if isinstance(value, torch.Tensor) and value.ndim == 1 else value


class ComponentUpdates:
    """The prepared updates of a sparse-row state's components, launched together (``PreparedUpdate``'s
    ``launch(counters, grads)`` with one gradient per segment, in ``segments``' order)."""

    def __init__(self, parts: list):
        """parts: (prepared update, first segment, segments, the gradients it was prepared with)."""
        self.parts = [(prepared, at, count) for prepared, at, count, _ in parts]
        self.held = [given for *_, given in parts]  # the gradient tensors each update holds now

    def launch(self, counters, grads=None) -> None:
        """One step of every component. A component given the very gradient tensors it holds (a restricted
        component's run views, the same every step) launches without replacing them: no check of thousands of
        tensors per step, the same update (its kernel reads them in place)."""
        for i, (prepared, at, count) in enumerate(self.parts):
            given, held = (None if grads is None else list(grads[at:at + count])), self.held[i]
            if given is not None and len(given) == len(held) and all(g is h for g, h in zip(given, held)):
                given = None
            elif given is not None:
                self.held[i] = given
            prepared.launch(counters, grads=given)
