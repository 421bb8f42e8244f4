"""Running SGLD chains from w*: the sampling loop between the data, the model and the update.

Chains run one after another on one ``FlatState`` row (issue order: batched chains come
later); each chain reads its own batch stream and its own dropout randomness, so its trace
depends only on (seed, chain index), never on which chains ran before it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..kernels.update_spec import SamplerSettings, StepCounters
from ..state.flat import FlatState
from .data import STREAM_CHAIN, BatchStream, derived_seed, move_to_device

DIVERGENCE_CHECK_EVERY = 16  # steps between host checks for a non-finite loss


@dataclass(frozen=True)
class Schedule:
    """Which steps are recorded. Draw d is the minibatch loss at the state reached after
    ``num_burnin_steps + d * num_steps_bw_draws`` updates (draw 0 of a run without burn-in is w*)."""

    num_draws: int
    num_burnin_steps: int = 0
    num_steps_bw_draws: int = 1
    freeze_preconditioner_at: int | None = None  # V stops taking gradients from this step on

    @property
    def num_steps(self) -> int:
        """Forward passes per chain; the last one is recorded and needs no update."""
        return self.num_burnin_steps + (self.num_draws - 1) * self.num_steps_bw_draws + 1

    def draw_at(self, step: int) -> int | None:
        k = step - self.num_burnin_steps
        if k < 0 or k % self.num_steps_bw_draws:
            return None
        return k // self.num_steps_bw_draws

    def counters(self, step: int) -> StepCounters:
        f = self.freeze_preconditioner_at
        if f is None or step < f:
            return StepCounters(step=step, update_statistic=True, stat_step=step)
        return StepCounters(step=step, update_statistic=False, stat_step=f - 1)


@dataclass
class ChainTrace:
    """loss_trace: float64 [C, D], NaN after a chain diverged. diverged_at: chain row -> step."""

    loss_trace: np.ndarray
    diverged_at: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ChainHyper:
    """Per-chain hyperparameters, each a [C] float64 tensor, and the chains' global indices [C]."""

    lr: torch.Tensor
    nbeta: torch.Tensor
    gamma: torch.Tensor
    chain_ids: torch.Tensor


def run_chains_sequentially(
    model: torch.nn.Module,
    state: FlatState,
    data,
    loss_fn: Callable,
    hyper: ChainHyper,
    *,
    settings: SamplerSettings,
    schedule: Schedule,
    seed: int,
    update: Callable[..., None],
    device: torch.device,
    mask: torch.Tensor | None = None,
    on_step: Callable[[int], None] | None = None,
) -> ChainTrace:
    """Run every chain of ``hyper`` from w*, one at a time on row 0 of ``state``."""
    num_chains = hyper.chain_ids.numel()
    trace = np.full((num_chains, schedule.num_draws), np.nan)
    diverged: dict[int, int] = {}
    for row in range(num_chains):
        chain = int(hyper.chain_ids[row])
        state.reset()
        batches = BatchStream(data, seed=seed, stream=STREAM_CHAIN, index=chain)
        losses = torch.full((schedule.num_draws,), float("nan"), dtype=torch.float64, device=device)
        nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        step_args = dict(
            lr=hyper.lr[row : row + 1], nbeta=hyper.nbeta[row : row + 1], gamma=hyper.gamma[row : row + 1],
            settings=settings, seed=seed, chain_ids=hyper.chain_ids[row : row + 1], mask=mask,
        )
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), state.install(0):
            torch.manual_seed(derived_seed(seed, STREAM_CHAIN, chain, 2**32))  # dropout etc. of this chain
            for t in range(schedule.num_steps):
                batch = move_to_device(next(batches), device)
                state.grad.zero_()
                loss = loss_fn(model, batch)
                d = schedule.draw_at(t)
                if d is not None:
                    losses[d] = loss.detach()
                nonfinite |= ~torch.isfinite(loss.detach())
                last = t == schedule.num_steps - 1
                if (t + 1) % DIVERGENCE_CHECK_EVERY == 0 or last:
                    if bool(nonfinite):
                        diverged[row] = t
                        break
                if on_step is not None:
                    on_step(1)
                if last:
                    break
                loss.backward()
                update(state.w[:1], state.grad[:1], state.w_star, None if state.stat is None else state.stat[:1],
                       counters=schedule.counters(t), **step_args)
        row_trace = losses.cpu().numpy()
        if row in diverged:
            bad = np.flatnonzero(~np.isfinite(row_trace))  # draws after the detection are NaN already
            if bad.size:
                row_trace[bad[0] :] = np.nan
            if on_step is not None:  # account for the steps this chain will not take
                on_step(schedule.num_steps - diverged[row])
        trace[row] = row_trace
    return ChainTrace(trace, diverged)
