"""Observables measured along the chains at every draw: losses on named evaluation sets.

The chains are driven by the gradient of the sampling data's loss; at each draw the loop also
evaluates, without gradients, an observable on each evaluation set at the chain's current weights:
by default the loss_fn averaged over the set's batches ([B] per draw, the data-refined LLC), or an
``observable(model, batch) -> [T]`` tensor (e.g. per-token losses), concatenated over the set's
batches ([B, T] per draw, for susceptibilities). Each set is a fixed list of batches (the first
``num_batches`` of its loader, taken once), so every draw of every chain sees the same data and
L_set(w*) is computed exactly on it.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch

from .data import STREAM_EVAL, BatchStream, batches_in_first_pass, move_to_device
from .identity import callable_name, digest


class Observers:
    """Named evaluation sets and what to measure on them.

    sets: {name: loader or list of batches}; num_batches: batches taken from each (all if fewer);
    observable: ``observable(model, batch) -> tensor`` with the same shape for every batch ([] for a
        scalar, [T] per token or sample), or None for ``loss_fn``'s scalar loss.
    storage: ``storage({name: shape}) -> {name: float32 array of that shape}`` to hold the values (e.g. memory-mapped
        files), or None to hold them in memory.
    ``values[name]``: float32 array [rows, draws, *shape] filled by the loop (NaN where a chain did not
    reach a draw), allocated by ``allocate``; ``at_w_star[name]``: the observable at w* (float64 array).
    primary: the set whose estimate is the run's main one (``estimate_llc(eval_data=...)``), or None.
    """

    def __init__(self, sets: Mapping, *, num_batches: int = 1, observable: Callable | None = None,
                 storage: Callable | None = None, primary: str | None = None):
        if not isinstance(sets, Mapping) or not sets:
            raise ValueError("evaluation sets must be a non-empty dict {name: loader or list of batches}")
        for name in sets:
            if not isinstance(name, str) or not name:
                raise ValueError(f"evaluation set names must be non-empty strings, got {name!r}")
        if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
            raise ValueError(f"num_eval_batches must be an integer >= 1, got {num_batches!r}")
        self.loaders, self.num_batches, self.observable, self.primary = dict(sets), num_batches, observable, primary
        self.storage = storage  # {name: shape} -> {name: array to fill}, e.g. memory-mapped files; None: in memory
        self.batches: dict[str, list] = {}
        self.at_w_star: dict[str, np.ndarray] = {}
        self.values: dict[str, np.ndarray] = {}

    @property
    def names(self) -> list[str]:
        return list(self.loaders)

    def first_batches(self, name: str) -> list:
        """The first ``num_batches`` batches of set ``name`` (at most one pass), the same on every call: a
        shuffling loader starts its pass under a fixed seed, so a resumed run measures the same batches."""
        loader = self.loaders[name]
        stream = BatchStream(loader, seed=0, stream=STREAM_EVAL, index=0)
        out = [next(stream) for _ in range(batches_in_first_pass(loader, self.num_batches))]
        if not out:
            raise ValueError(f"evaluation set {name!r} yielded no batches")
        return out

    def take_batches(self, device) -> None:
        """The first batches of every set (``first_batches``), on ``device`` (once)."""
        for name in self.names:
            if name not in self.batches:
                self.batches[name] = [move_to_device(b, device) for b in self.first_batches(name)]

    def identity(self) -> dict:
        """What the sets are, for a run's fingerprint: per set the batches' count and digest, the observable."""
        observable = None if self.observable is None else callable_name(self.observable)
        sets = {name: dict(num_batches=len(batches), batches=digest(batches))
                for name, batches in ((n, self.first_batches(n)) for n in self.names)}
        return dict(sets=sets, observable=observable, primary=self.primary)

    def measure(self, engine, num_rows: int) -> dict[str, torch.Tensor]:
        """Each set's observable for rows 0..B-1 of the engine's state: [B] (scalar observable, the mean over
        the set's batches) or [B, T_total] (concatenated over the batches)."""
        out = {}
        for name, batches in self.batches.items():
            parts = [engine.evaluate(num_rows, batch, self.observable) for batch in batches]
            if parts[0].ndim == 1:
                out[name] = torch.stack(parts).to(torch.float64).mean(dim=0)
            else:
                out[name] = torch.cat([p.reshape(num_rows, -1) for p in parts], dim=1)
        return out

    def measure_w_star(self, engine) -> None:
        """The observables at w* (row 0 of the state before sampling), checked to be finite."""
        for name, value in self.measure(engine, 1).items():
            value = value[0].to(torch.float64).cpu().numpy()
            if not np.isfinite(value).all():
                raise ValueError(f"the observable on evaluation set {name!r} is not finite at w*: check the model "
                                 "and that set's data")
            self.at_w_star[name] = value

    def shape(self, name: str) -> tuple:
        return tuple(self.at_w_star[name].shape)

    def allocate(self, num_rows: int, num_draws: int) -> None:
        """The arrays the loop fills: [rows, draws, *shape] of NaN, all made by one call of ``storage`` (which can
        so check that they fit together before any is written)."""
        shapes = {name: (num_rows, num_draws) + self.shape(name) for name in self.names}
        arrays = self.storage(shapes) if self.storage is not None else \
            {name: np.empty(shape, dtype=np.float32) for name, shape in shapes.items()}
        for name in self.names:
            arrays[name][...] = np.nan
            self.values[name] = arrays[name]

    def record(self, first_row: int, draw: int, measured: dict[str, torch.Tensor]) -> None:
        for name, value in measured.items():
            self.values[name][first_row:first_row + value.shape[0], draw] = value.cpu().numpy()

    def blank_after(self, diverged_at: dict[int, int], first_draw: Callable[[int], int]) -> None:
        """NaN from each diverged row's first bad draw on (as the loss trace)."""
        for row, step in diverged_at.items():
            for array in self.values.values():
                array[row, first_draw(step):] = np.nan
