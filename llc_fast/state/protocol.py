"""ChainState: what the sampling loop needs of a sampler state, whatever holds the weights.

Implemented by ``flat.FlatState`` (one process: [R, N] flat buffers, module parameters as views)
and ``sharded.ShardedChainState`` (one chain's local FSDP shards on one rank, R = 1). The loop runs the
state's rows 0..B-1 as one row batch of B <= R rows.
"""
from __future__ import annotations

from typing import Protocol

import torch

from ..kernels.update_spec import RowMasks


class ChainState(Protocol):
    num_rows: int              # R, the chain rows the state holds (a row batch takes rows 0..B-1)
    supports_mala: bool        # the weights of a row batch are one [B, N] tensor ``w`` (MALA needs it)
    w_star: torch.Tensor       # [N_local] the trained weights
    flat_mask: torch.Tensor | None  # [N_local] 0/1, None: every weight is sampled

    def reset(self) -> None:
        """Every row back at w*, the statistic at its start value."""

    def segments(self, num_rows: int, grad: torch.Tensor | None) -> list[tuple]:
        """(w [B, n], grad [B, n], local_start, global_offset) of rows 0..B-1 for the fused update;
        ``grad`` is what the engine returned (None: the gradients live in the state)."""

    def row_masks(self, component: torch.Tensor | None) -> RowMasks | torch.Tensor | None:
        """The update's mask for rows of these components (int64 [B], ``ChainHyper.component``; None: the
        run has none): a ``RowMasks``, else ``flat_mask``."""

    def stat_rows(self, num_rows: int) -> torch.Tensor | None:
        """[B, N_local] RMSProp statistic of rows 0..B-1, or None for SGLD."""

    def save_rows(self, num_rows: int) -> dict:
        """A CPU copy of rows 0..B-1 (weights, statistic) that ``load_rows`` puts back."""

    def load_rows(self, num_rows: int, rows: dict) -> None:
        """Rows 0..B-1 as saved."""

    def unmoved_rows(self, num_rows: int) -> list[int]:
        """Rows 0..B-1 whose weights never left w* (a step size below the float resolution, say)."""

    def isolation(self):
        """Context manager: the module's buffers (and frozen parameters) are private copies meanwhile."""

    def restore(self) -> None:
        """After sampling: leave the model holding w* (bitwise)."""
