"""ChainTrace: the recorded losses of a run's chains, and the rule for chains that diverged.

A chain **diverges** at the first step whose minibatch loss L is NaN or infinite, or leaves the bound
``|L - L(w*)| > DIVERGENCE_FACTOR * max(|L(w*)|, 1)``: a chain that sits in the localized posterior has
nbeta * (L - L(w*)) of the order of the LLC, so a loss a hundred times the scale of L(w*) away from it
means the chain has left the basin (typically lr too large for nbeta or gamma). A diverged chain's draws
from that step on are NaN and the chain is left out of the estimate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .schedule import Schedule

DIVERGENCE_FACTOR = 100.0


def divergence_bound(init_loss: float) -> float:
    """The largest |L - L(w*)| a healthy chain may show (see module docstring)."""
    return DIVERGENCE_FACTOR * max(abs(init_loss), 1.0) if math.isfinite(init_loss) else math.inf


def first_bad_step(step_losses: np.ndarray, init_loss: float) -> int | None:
    """The first step whose loss is non-finite or out of bound, or None. step_losses: [T], NaN-free before."""
    bad = ~np.isfinite(step_losses) | (np.abs(step_losses - init_loss) > divergence_bound(init_loss))
    hits = np.flatnonzero(bad)
    return int(hits[0]) if hits.size else None


def nan_from_first_bad(losses: np.ndarray) -> np.ndarray:
    """A copy of [C, T] losses with each row NaN from its first non-finite value on."""
    out = np.array(losses, dtype=np.float64, copy=True)
    for row in out:
        bad = np.flatnonzero(~np.isfinite(row))
        if bad.size:
            row[bad[0]:] = np.nan
    return out


@dataclass
class ChainTrace:
    """loss_trace: float64 [C, D] (NaN from a chain's divergence on); burnin_loss_trace [C, B];
    mala_acceptance [C, K] (empty when not recorded); diverged_at: chain position -> first bad step;
    engine: "vmap", "sequential" or "fsdp", with fallback_reason when batching was not possible."""

    loss_trace: np.ndarray
    burnin_loss_trace: np.ndarray
    mala_acceptance: np.ndarray
    diverged_at: dict[int, int] = field(default_factory=dict)
    engine: str = "sequential"
    fallback_reason: str = ""
    unmoved: list[int] = field(default_factory=list)  # chain positions whose weights never left w*
    draws_target: int | None = None  # the most draws the run could have taken (a stopping target may stop earlier)
    observed: dict = field(default_factory=dict)  # evaluation set -> [C, D, ...] observable (``chains.observe``)

    @classmethod
    def empty(cls, num_rows: int, schedule: Schedule) -> "ChainTrace":
        return cls(loss_trace=np.full((num_rows, schedule.num_draws), np.nan),
                   burnin_loss_trace=np.full((num_rows, schedule.num_burnin_steps), np.nan),
                   mala_acceptance=np.full((num_rows, schedule.num_mala), np.nan))

    def record(self, first: int, step_losses: np.ndarray, mala: np.ndarray, schedule: Schedule,
               init_loss: float) -> None:
        """Store a row batch's per-step losses [B, T] (NaN where a step did not run) as rows first.. of the trace."""
        rows = range(first, first + step_losses.shape[0])
        self.burnin_loss_trace[rows.start:rows.stop] = step_losses[:, :schedule.num_burnin_steps]
        draws = step_losses[:, schedule.draw_steps]
        for row, losses, draw_row in zip(rows, step_losses, draws):
            bad = first_bad_step(losses, init_loss)
            if bad is not None:
                self.diverged_at[row] = bad
                draw_row[schedule.first_draw_from(bad):] = np.nan
        self.loss_trace[rows.start:rows.stop] = draws
        self.mala_acceptance[rows.start:rows.stop] = np.exp(mala)

    def take(self, positions: list[int]) -> "ChainTrace":
        """The chains at ``positions``, in that order."""
        where = {p: k for k, p in enumerate(positions)}
        return ChainTrace(self.loss_trace[positions], self.burnin_loss_trace[positions],
                          self.mala_acceptance[positions],
                          {where[p]: s for p, s in self.diverged_at.items() if p in where}, self.engine,
                          self.fallback_reason, [where[p] for p in self.unmoved if p in where], self.draws_target,
                          {name: values[positions] for name, values in self.observed.items()})

    @classmethod
    def gather(cls, parts: list[tuple[list[int], "ChainTrace"]], num_chains: int, schedule: Schedule) -> "ChainTrace":
        """One trace of ``num_chains`` chains (or rows) from (global positions, trace of those rows) parts, their
        observed evaluation-set values too."""
        out = cls.empty(num_chains, schedule)
        for chains, part in parts:
            for k, c in enumerate(chains):
                out.loss_trace[c], out.burnin_loss_trace[c] = part.loss_trace[k], part.burnin_loss_trace[k]
                out.mala_acceptance[c] = part.mala_acceptance[k]
            out.diverged_at.update({chains[k]: s for k, s in part.diverged_at.items()})
            out.unmoved += [chains[k] for k in part.unmoved]
        out.diverged_at = dict(sorted(out.diverged_at.items()))
        out.unmoved.sort()
        for name in dict.fromkeys(n for _, p in parts for n in p.observed):  # evaluation sets, [rows, draws, ...]
            shape = next(p.observed[name].shape[1:] for _, p in parts if name in p.observed)
            out.observed[name] = np.full((num_chains, *shape), np.nan, dtype=np.float32)
            for chains, part in parts:
                if chains and name in part.observed:
                    out.observed[name][chains] = part.observed[name]
        ran = [p for chains, p in parts if chains]
        out.engine = ran[0].engine if ran else "none"
        out.fallback_reason = next((p.fallback_reason for _, p in parts if p.fallback_reason), "")
        return out
