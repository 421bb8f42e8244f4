"""Observables measured along the chains at every draw: losses on named evaluation sets.

The chains are driven by the gradient of the sampling data's loss; at each draw the loop also
evaluates, without gradients, an observable on each evaluation set at the chain's current weights:
by default the loss_fn averaged over the set's batches ([G] per draw, the data-refined LLC), or an
``observable(model, batch) -> [T]`` tensor (e.g. per-token losses), concatenated over the set's
batches ([G, T] per draw, for susceptibilities). Each set is a fixed list of batches (the first
``num_batches`` of its loader, taken once), so every draw of every chain sees the same data and
L_set(w*) is computed exactly on it.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch

from .data import move_to_device


class Observers:
    """Named evaluation sets and what to measure on them.

    sets: {name: loader or list of batches}; num_batches: batches taken from each (all if fewer);
    observable: ``observable(model, batch) -> tensor`` with the same shape for every batch ([] for a
        scalar, [T] per token or sample), or None for ``loss_fn``'s scalar loss.
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
        self.storage = storage  # (name, shape) -> array to fill, e.g. a memory-mapped file; None: in memory
        self.batches: dict[str, list] = {}
        self.at_w_star: dict[str, np.ndarray] = {}
        self.values: dict[str, np.ndarray] = {}

    @property
    def names(self) -> list[str]:
        return list(self.loaders)

    def take_batches(self, device) -> None:
        """The first ``num_batches`` batches of every set, on ``device`` (once)."""
        for name, loader in self.loaders.items():
            if name in self.batches:
                continue
            out = []
            for batch in loader:
                out.append(move_to_device(batch, device))
                if len(out) == self.num_batches:
                    break
            if not out:
                raise ValueError(f"evaluation set {name!r} yielded no batches")
            self.batches[name] = out

    def measure(self, engine, num_rows: int) -> dict[str, torch.Tensor]:
        """Each set's observable for rows 0..G-1 of the engine's state: [G] (scalar observable, the mean over
        the set's batches) or [G, T_total] (concatenated over the batches)."""
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
        """The arrays the loop fills: [rows, draws, *shape] of NaN."""
        for name in self.names:
            shape = (num_rows, num_draws) + self.shape(name)
            array = self.storage(name, shape) if self.storage is not None else np.empty(shape, dtype=np.float32)
            array[...] = np.nan
            self.values[name] = array

    def record(self, first_row: int, draw: int, measured: dict[str, torch.Tensor]) -> None:
        for name, value in measured.items():
            self.values[name][first_row:first_row + value.shape[0], draw] = value.cpu().numpy()

    def blank_after(self, diverged_at: dict[int, int], first_draw: Callable[[int], int]) -> None:
        """NaN from each diverged row's first bad draw on (as the loss trace)."""
        for row, step in diverged_at.items():
            for array in self.values.values():
                array[row, first_draw(step):] = np.nan
