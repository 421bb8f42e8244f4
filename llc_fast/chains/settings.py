"""The plain settings of a run: what the loop and a sampler's set-up read, as values (no ``LLCConfig``).

``estimators.sampling.setup_settings`` builds them from an ``LLCConfig``; the chains layer never reads the config.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..kernels.update_spec import SamplerSettings
from .schedule import ChainHyper, Schedule


@dataclass(frozen=True)
class LoopSettings:
    """What ``runner.run_chains`` needs besides its engine, state and data.

    hyper: the rows to run (lr, nbeta, gamma, chain index, component: [R] each); update: the fused update's
    constants; schedule: the steps recorded; seed: of the batch streams and the noise; shared_batches: every
    row reads one batch sequence (devinterp's default) instead of its own.
    """

    hyper: ChainHyper
    update: SamplerSettings
    schedule: Schedule
    seed: int = 0
    shared_batches: bool = False


@dataclass(frozen=True)
class CurvatureSpec:
    """The curvature preconditioner's inputs (``curvature.curvature_preconditioner``).

    samples: Hessian-vector products at w*; max_gain: the largest gain; nbeta, gamma: per chain [C];
    restrictions: the weights sampled, one {param name: 0/1} per component (None in it: every weight)."""

    seed: int
    samples: int
    max_gain: float
    nbeta: tuple
    gamma: tuple
    restrictions: tuple


@dataclass(frozen=True)
class SetupSettings:
    """What a sampler's set-up needs (``setup.sample_local``, ``distributed.sharded``): the loop's settings and

    num_init_loss_batches: batches averaged for L(w*); backend: the update's backend name; device: None = the
    model's; mask: {param name: 0/1} or None; components: one restriction per component, or None;
    chain_batching ("auto", "vmap", "sequential"), max_batched_chains and batch_memory_bytes: how many rows run
    in one batched pass; compile_step: torch.compile that pass; curvature: the fixed preconditioner, or None;
    sparse_rows: "auto" (a restricted run's rows hold only their component's coordinates where that applies,
    ``chains.sparse_setup``), "on" (refuse where it does not) or "off" (full rows); row_batching: rows per vmapped
    call by measured speed within the memory plan ("measured") or by the plan alone ("fit"; ``chains.row_timing``).
    """

    loop: LoopSettings
    num_init_loss_batches: int = 16
    backend: str = "auto"
    device: str | torch.device | None = None
    progress: bool = False
    mask: dict | None = None
    components: tuple | None = None
    chain_batching: str = "auto"
    max_batched_chains: int | None = None
    batch_memory_bytes: int | None = None
    compile_step: bool = False
    curvature: CurvatureSpec | None = None
    sparse_rows: str = "auto"
    row_batching: str = "measured"

    def for_rows(self, index) -> "SetupSettings":
        """Only the rows at ``index`` (a slice or a list of positions) of ``loop.hyper``."""
        return replace(self, loop=replace(self.loop, hyper=self.loop.hyper.rows(index)))

    def replace(self, **changes) -> "SetupSettings":
        return replace(self, **changes)
