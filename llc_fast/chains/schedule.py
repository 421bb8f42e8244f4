"""What a run records and with which hyperparameters: the schedule of steps and the per-chain values."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.update_spec import StepCounters


@dataclass(frozen=True)
class Schedule:
    """Which steps are recorded. Draw d is the minibatch loss at the state reached after
    ``num_burnin_steps + d * num_steps_bw_draws`` updates (draw 0 of a run without burn-in is w*).
    ``mala_every``: every that many steps from the first draw on, the step's MALA acceptance is
    computed (one extra forward and backward)."""

    num_draws: int
    num_burnin_steps: int = 0
    num_steps_bw_draws: int = 1
    freeze_preconditioner_at: int | None = None  # V stops taking gradients from this step on
    mala_every: int | None = None

    @property
    def num_steps(self) -> int:
        """Forward passes per chain; the last one is recorded and needs no update."""
        return self.num_burnin_steps + (self.num_draws - 1) * self.num_steps_bw_draws + 1

    @property
    def num_mala(self) -> int:
        if not self.mala_every:
            return 0
        return len(range(self.num_burnin_steps, self.num_steps - 1, self.mala_every))

    @property
    def draw_steps(self) -> range:
        """The step of each draw."""
        return range(self.num_burnin_steps, self.num_steps, self.num_steps_bw_draws)

    def replace(self, **changes) -> "Schedule":
        from dataclasses import replace

        return replace(self, **changes)

    def mala_at(self, step: int) -> int | None:
        k = step - self.num_burnin_steps
        if not self.mala_every or k < 0 or k % self.mala_every or step == self.num_steps - 1:
            return None
        return k // self.mala_every

    def draw_at(self, step: int) -> int | None:
        """The index of the draw recorded at ``step``, or None if the step records none."""
        k = step - self.num_burnin_steps
        if k < 0 or k % self.num_steps_bw_draws or step >= self.num_steps:
            return None
        return k // self.num_steps_bw_draws

    def first_draw_from(self, step: int) -> int:
        """Index of the first draw recorded at or after ``step``."""
        k = step - self.num_burnin_steps
        return max(0, -(-k // self.num_steps_bw_draws))

    def counters(self, step: int) -> StepCounters:
        f = self.freeze_preconditioner_at
        if f is None or step < f:
            return StepCounters(step=step, update_statistic=True, stat_step=step)
        return StepCounters(step=step, update_statistic=False, stat_step=f - 1)


@dataclass(frozen=True)
class ChainHyper:
    """Per-row hyperparameters, each an [R] float64 tensor, and the rows' global chain indices [R].

    component: int64 [R], each row's index into the run's components (``FlatState.components``: the
    row samples only that component's weights), or None when every row samples the whole layout. Rows
    of different components may share a chain index: they then read the same batches and noise.
    """

    lr: torch.Tensor
    nbeta: torch.Tensor
    gamma: torch.Tensor
    chain_ids: torch.Tensor
    component: torch.Tensor | None = None

    @property
    def num_rows(self) -> int:
        """R, the rows (chains, times the components when rows sample components)."""
        return self.chain_ids.numel()

    def rows(self, index) -> "ChainHyper":
        """The rows at ``index`` (a slice or a list of positions)."""
        return ChainHyper(self.lr[index], self.nbeta[index], self.gamma[index], self.chain_ids[index],
                          None if self.component is None else self.component[index])
